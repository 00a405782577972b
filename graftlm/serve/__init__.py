"""OpenAI-compatible serving of one base model and many LoRA adapters.

`build_backend(...)` loads the model, tokenizer and operator adapters;
`create_app(backend, api_key)` is the FastAPI app; `graft serve` runs it on uvicorn.
"""

from graftlm.serve.app import create_app
from graftlm.serve.backend import ServeBackend, build_backend

__all__ = ["ServeBackend", "build_backend", "create_app"]
