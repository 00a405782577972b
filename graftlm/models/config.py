"""The decoder's config, its mapping to and from Hugging Face `config.json`, and presets.

One config covers the Llama family as Hugging Face defines it. The families differ in a
few switches only:

| family              | model_type | switches                                        |
|---------------------|------------|-------------------------------------------------|
| Llama 2/3/3.1+      | llama      | rope_scaling (llama3), tied in 3.2 small sizes   |
| Mistral             | mistral    | sliding_window                                  |
| Qwen2 / Qwen2.5     | qwen2      | attention_bias (q/k/v only)                     |
| Qwen3               | qwen3      | qk_norm, explicit head_dim                      |
| SmolLM2 / TinyLlama | llama      | tied embeddings (SmolLM2)                       |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graftlm.errors import ConfigError, GraftError, read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k and v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    sliding_window: int | None = None  # Mistral
    model_type: str = "llama"  # the HF family this config exports as
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Not part of the architecture: what the HF config said beyond our fields, kept so
    # that a round trip through graftlm does not lose it.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_heads, 1)
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config field '{name}': expected a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config field 'head_dim': RoPE needs an even size, got {self.head_dim}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model type '{self.model_type}' is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"model config field 'rope_scaling': rope type {rope_type!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of the `Decoder` this config builds."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * d
        block = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        total = self.num_layers * block + h
        return total + (embed + head if include_embeddings else 0)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("extra")
        return data


# ---------------------------------------------------------------------------------------
# Hugging Face config.json  <->  ModelConfig

_HF_FIELDS = {  # HF name -> ours, for fields that only differ in name
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "initializer_range",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
_INT_FIELDS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"}


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """Read a Hugging Face `config.json` mapping; errors name `source` and the field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GraftError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if hf.get("auto_map"):
        # We never run code shipped with a model; the architecture must be a known one.
        raise GraftError(f"{source}: asks for remote code (auto_map); graftlm runs no code from a model directory")
    kwargs: dict[str, Any] = {"model_type": model_type}
    for hf_name, ours in _HF_FIELDS.items():
        if hf_name not in hf or hf[hf_name] is None and ours not in ("head_dim",):
            if hf_name in hf and ours in ("bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs[ours] = None
            continue
        value = hf[hf_name]
        if hf_name in _INT_FIELDS and value is not None and (
                not isinstance(value, int) or isinstance(value, bool)):
            raise GraftError(f"{source}: field '{hf_name}' must be an integer, got {value!r}")
        if hf_name in ("rms_norm_eps", "initializer_range") and not isinstance(value, (int, float)):
            raise GraftError(f"{source}: field '{hf_name}' must be a number, got {value!r}")
        if hf_name == "tie_word_embeddings" and not isinstance(value, bool):
            raise GraftError(f"{source}: field '{hf_name}' must be true or false, got {value!r}")
        kwargs[ours] = value
    for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"):
        if required not in hf:
            raise GraftError(f"{source}: required field '{required}' is missing")
    kwargs.setdefault("num_kv_heads", hf["num_attention_heads"])
    kwargs.setdefault("tie_embeddings", False)
    if hf.get("hidden_act", "silu") != "silu":
        raise GraftError(f"{source}: field 'hidden_act' is {hf['hidden_act']!r}; only 'silu' is supported")
    if hf.get("mlp_bias"):
        raise GraftError(f"{source}: field 'mlp_bias' true is not supported")

    # RoPE: transformers >= 5 writes `rope_parameters`; older versions `rope_theta` and
    # `rope_scaling`. Read both.
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:
        rope = {**legacy, **rope}
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kwargs["rope_theta"] = float(theta)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type != "default":
        kwargs["rope_scaling"] = {"rope_type": rope_type, **rope}

    if model_type == "qwen2":
        kwargs["attention_bias"] = True
    elif hf.get("attention_bias"):
        # transformers' Llama / Qwen3 put it on o_proj too; graftlm's bias is Qwen2's, q/k/v only.
        raise GraftError(f"{source}: field 'attention_bias' true is not supported for {model_type} "
                         "(its o_proj bias): graftlm models attention biases as Qwen2 does, on q, k and v only")
    kwargs["qk_norm"] = model_type == "qwen3"
    if model_type == "mistral":
        kwargs["sliding_window"] = hf.get("sliding_window")
    elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise GraftError(f"{source}: 'use_sliding_window' true is not supported for {model_type}")
    known = set(_HF_FIELDS) | {"model_type", "rope_theta", "rope_scaling", "rope_parameters",
                               "attention_bias", "sliding_window", "hidden_act", "mlp_bias"}
    kwargs["extra"] = {k: v for k, v in hf.items() if k not in known}
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        raise GraftError(f"{source}: {e}") from None


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The `config.json` mapping `transformers` reads for this config."""
    if cfg.attention_bias and cfg.model_type != "qwen2":
        # transformers' attention_bias for these would add an o_proj bias the weights lack:
        # they would load with a random one. Qwen2's is q/k/v only, graftlm's.
        raise GraftError(f"attention_bias (q, k and v only) is Qwen2's in transformers, not {cfg.model_type}'s: "
                         "set model_type: qwen2 to save this model")
    architectures = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope_parameters = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
        rope_parameters["rope_type"] = rope_parameters.pop("type", rope_parameters.get("rope_type"))
    hf = {k: v for k, v in cfg.extra.items()
          if k not in ("transformers_version", "architectures", "torch_dtype", "dtype")}
    hf.update({
        "architectures": [architectures[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.initializer_range,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        # Both spellings, so that transformers 4.x and 5.x read the same RoPE.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": ({k: v for k, v in rope_parameters.items() if k != "rope_theta"}
                         if cfg.rope_scaling else None),
        "rope_parameters": rope_parameters,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    })
    if cfg.model_type in ("llama", "mistral", "qwen3"):
        hf["attention_bias"] = False
    if cfg.model_type == "llama":
        hf["mlp_bias"] = False
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
        hf["sliding_window"] = None
    return hf


# ---------------------------------------------------------------------------------------
# Presets for training from scratch (Llama architecture, untied unless small).

PRESETS: dict[str, dict] = {
    # for tests: builds in milliseconds
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                 num_heads=4, num_kv_heads=2, max_seq_len=512, tie_embeddings=True),
    # for the demo and CPU tests that must learn something
    "small": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=4,
                  num_heads=4, num_kv_heads=2, max_seq_len=512, tie_embeddings=True),
    # ~13M with an 8k vocabulary: learns tinyshakespeare on a laptop CPU
    "10m": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=6,
                num_heads=8, num_kv_heads=4, max_seq_len=1024, tie_embeddings=True),
    "30m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8,
                num_heads=8, num_kv_heads=8, max_seq_len=2048, tie_embeddings=False),
    "125m": dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_layers=12,
                 num_heads=12, num_kv_heads=4, max_seq_len=2048, tie_embeddings=True),
    "350m": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_layers=24,
                 num_heads=16, num_kv_heads=4, max_seq_len=2048, tie_embeddings=True),
    "1b": dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632, num_layers=22,
               num_heads=32, num_kv_heads=8, max_seq_len=2048, rope_theta=500000.0,
               tie_embeddings=False),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (presets: {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides})


def read_hf_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    return from_hf_config(read_json(path), source=str(path))


# -- what --model names (`graft plan` resolves it without torch) --------------------------

def check_model_dir(path: str | Path) -> Path:
    model_dir = Path(path)
    if not model_dir.exists():
        raise GraftError(f"{model_dir}: model directory does not exist")
    if not model_dir.is_dir():
        raise GraftError(f"{model_dir}: is not a directory")
    if not (model_dir / "config.json").exists():
        if (model_dir / "adapter_config.json").exists():  # a run's final/ after LoRA: a common mix-up
            raise GraftError(f"{model_dir}: is a PEFT adapter (adapter_config.json), not a model{_base_of(model_dir)}; "
                             "to use it, give the base with --model and this directory with --adapter DIR "
                             "(graft generate, graft chat) or --adapter NAME=DIR (graft eval, graft serve); "
                             "to train from it, merge it into the base first with `graft merge`")
        raise GraftError(f"{model_dir}: no config.json (not a Hugging Face model directory)"
                         f"{run_directory_hint(model_dir)}")
    return model_dir


def run_directory_hint(directory: Path) -> str:
    """'; it is a run directory: ...' when `directory` is a run's (its model is final/),
    else ''. A run's directory in place of its final/ is a common slip."""
    final = Path(directory) / "final"
    if (final / "config.json").exists() or (final / "adapter_config.json").exists():
        return f"; it is a run directory, whose model is {final}: pass that"
    return ""


def recorded_base(adapter_dir: str | Path) -> str | None:
    """The base model a PEFT adapter records (`base_model_name_or_path`); None when it
    records none or its config cannot be read."""
    try:
        base = read_json(Path(adapter_dir) / "adapter_config.json").get("base_model_name_or_path")
    except (GraftError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def _base_of(adapter_dir: Path) -> str:
    """' (its base: DIR)' as the adapter records it; nothing when it cannot be read."""
    base = recorded_base(adapter_dir)
    return f" (its base: {base})" if base else ""


def load_config(path: str | Path) -> ModelConfig:
    return read_hf_config(check_model_dir(path) / "config.json")


def resolve_model_config(spec: str) -> ModelConfig:
    """A preset name, an HF directory, or a config file (HF config.json or graftlm YAML)."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if path.is_dir():
        return load_config(path)
    if path.suffix == ".json" and path.exists():
        return read_hf_config(path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        from graftlm.config import build_config
        return build_config(ModelConfig, path)
    raise GraftError(f"model '{spec}' is neither a preset ({', '.join(PRESETS)}), "
                     "a model directory, nor a config file")
