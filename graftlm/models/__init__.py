"""The decoder (`transformer.py`), its config and presets (`config.py`), and Hugging Face
import / export (`hf.py`)."""

from graftlm.models.config import PRESETS, ModelConfig

__all__ = ["PRESETS", "ModelConfig", "Decoder"]


def __getattr__(name: str):
    # The decoder imports torch: only when asked for, so that `models.config` is read without it.
    if name == "Decoder":
        from graftlm.models.transformer import Decoder
        return Decoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
