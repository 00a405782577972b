"""The decoder (`transformer.py`), its config and presets (`config.py`), and Hugging Face
import / export (`hf.py`)."""

from graftlm.models.config import PRESETS, ModelConfig
from graftlm.models.transformer import Decoder

__all__ = ["PRESETS", "ModelConfig", "Decoder"]
