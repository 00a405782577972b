"""What the HTTP layer serves: the base model, its tokenizer, adapters and the scheduler.

Design choices:
- One base model is loaded once; adapters are loaded into it by name
  (`graftlm.adapters.load_adapter`) and removed (`unload_adapter`) in the model thread,
  between decode steps, so the base is never reloaded and no step sees half an adapter.
- Decoding is `graftlm.engine`'s: the scheduler drives one `engine.Batch` (rows with
  per-row adapters, text released with stop strings held back).
"""

from __future__ import annotations

import os

import sys
import time
from pathlib import Path

from graftlm.errors import GraftError
from graftlm.serve.registry import AdapterEntry, AdapterRegistry, check_adapter_name, resolve_adapter_path
from graftlm.serve.scheduler import Scheduler


class ServeBackend:
    def __init__(self, model, tokenizer, stepper, base_name: str, adapter_root: str | Path | None,
                 max_batch: int, max_queue: int, compiled: bool = False, allow_other_base: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.allow_other_base = allow_other_base  # the operator's, for clients' loads too
        # A compiled decode step is traced through the adapter layers' wrappers: they stay
        # when the last adapter is unloaded, or the next base step would recompile (tens of
        # seconds) while requests wait.
        self.compiled = compiled
        self.context_length = model.config.max_seq_len
        self.registry = AdapterRegistry(base_name)
        self.adapter_root = adapter_root
        self.scheduler = Scheduler(stepper, max_batch=max_batch, max_queue=max_queue)
        self.created = int(time.time())
        self._loading: set[str] = set()  # names being loaded: a second load of one is refused
        # "nf4" once a QLoRA adapter has quantized the one base in place, for good (unloading
        # it does not undo that): requests for the base then run on the 4-bit weights too,
        # which the startup line, /v1/models and /health say.
        self.base_quantization: str | None = None

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_bos=self.tokenizer.add_bos)
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]
        return ids

    def load_adapter_now(self, name: str, path: str | Path) -> AdapterEntry:
        """Load before the scheduler starts (operator's --adapter NAME=DIR)."""
        from graftlm.adapters import load_adapter
        check_adapter_name(name)
        if name == self.registry.base_name or name in self.registry:
            raise GraftError(f"--adapter {name}: the name is already taken")
        load_adapter(self.model, Path(path), name, allow_other_base=self.allow_other_base)
        return self._register(name, Path(path))

    async def load_adapter(self, name: str, client_path: str) -> AdapterEntry:
        """A client's load: the path must stay under --adapter-root."""
        from graftlm.adapters import load_adapter
        from graftlm.serve.app import APIError
        if self.adapter_root is None:
            raise APIError(403, "loading adapters over HTTP is disabled (start with --adapter-root)",
                           param="path", code="adapter_loading_disabled")
        real = resolve_adapter_path(self.adapter_root, client_path)
        if name in self._loading:
            raise APIError(409, f"adapter '{name}' is already being loaded", param="name",
                           code="adapter_exists")
        self._loading.add(name)
        try:
            await self.scheduler.run_control(
                lambda: load_adapter(self.model, real, name, allow_other_base=self.allow_other_base))
        except GraftError as e:
            # The server's directories are not the client's to see: the adapter is named
            # as the client named it, other paths under the root relative to it.
            why = str(e).replace(str(real), client_path).replace(os.path.realpath(self.adapter_root) + os.sep, "")
            raise APIError(400, f"adapter '{client_path}' cannot be loaded: {why}", param="path",
                           code="invalid_adapter")
        finally:
            self._loading.discard(name)
        return self._register(name, real)

    def _register(self, name: str, path: Path) -> AdapterEntry:
        """Adapter `name`, just loaded into the model, becomes one clients may name."""
        if self.model.adapter_configs[name].kind == "qlora":
            self.base_quantization = "nf4"
        entry = AdapterEntry(name, path, int(time.time()))
        self.registry.add(entry)
        return entry

    async def unload_adapter(self, name: str) -> None:
        from graftlm.adapters import unload_adapter
        self.registry.remove(name)  # new requests for it now get 404
        await self.scheduler.run_control(lambda: unload_adapter(self.model, name, unwrap=not self.compiled),
                                         when_unused=name)


def build_backend(model_dir: str | Path, adapters: dict[str, str] | None = None,
                  adapter_root: str | Path | None = None, max_batch: int = 16,
                  max_queue: int = 256, base_name: str | None = None, device="cpu",
                  dtype=None, compile: bool = False, allow_other_base: bool = False) -> ServeBackend:
    """Load the base model and tokenizer, and the operator's adapters; start nothing yet.
    `dtype` None: float32. `compile`: decode with the engine's compiled step (compiled
    here, before serving, with the adapters already loaded): steps whose rows all ask for
    the base run compiled, steps with an adapter row eagerly (see `graftlm.engine`)."""
    import torch

    from graftlm.engine import Batch, Engine, check_generative
    from graftlm.models.hf import load_model
    from graftlm.runs import name_of_model_dir
    from graftlm.tokenizer import load_tokenizer
    model_dir = Path(model_dir)
    if adapter_root is not None and not Path(adapter_root).is_dir():
        raise GraftError(f"--adapter-root {adapter_root}: not a directory")
    if compile and adapter_root is not None:
        # The graph holds the model's structure and a copy of its weights: an adapter loaded
        # later would recompile it (tens of seconds) while requests wait.
        raise GraftError("--compile takes adapters at start only: give them with --adapter NAME=DIR, "
                         "not --adapter-root")
    check_generative(model_dir)
    model = load_model(model_dir, dtype=dtype or torch.float32, device=device)
    tokenizer = load_tokenizer(model_dir)
    engine = Engine(model, tokenizer, compile=compile)
    batch = Batch(engine, row_adapters=True, want_text=True)
    backend = ServeBackend(model, tokenizer, batch,
                           base_name or name_of_model_dir(model_dir), adapter_root, max_batch, max_queue,
                           compiled=compile, allow_other_base=allow_other_base)
    for name, path in (adapters or {}).items():
        backend.load_adapter_now(name, path)
    if compile:  # after the adapters: the graph is traced over the model as it will serve
        eager = "; requests for an adapter decode eagerly" if adapters else ""
        print(f"compiling the decode step before serving (tens of seconds){eager}", file=sys.stderr)
        engine.warm_up()
    return backend
