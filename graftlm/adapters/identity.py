"""The identity of a base model, recorded in every adapter saved from it.

Three parts: `config_sha256` over the architecture fields of the model config (compared
exactly), `architecture`, those fields themselves (so that a mismatch names the field
that differs; adapters saved before it was recorded fall back to the hash), and
`weights_sample`, 32 evenly spaced values of every base weight in name
order (float32, base64), compared within half-precision rounding. A tolerance, not a
hash: the same base stored or loaded in float32, bf16 or float16 rounds its values
differently, and a hash of rounded values told an adapter trained on a float32 base
that the same base loaded in float16 (`--dtype float16`, a GPU without bf16) was
another model. Any retrained, fine-tuned or different base still moves some of the
thousands of sampled values by more than rounding does. The sample is taken before
QLoRA quantizes or a cast changes the base, and kept on the model, so it always names
the base as loaded.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json

import torch
from torch import nn

ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps",
                       "tie_embeddings", "attention_bias", "qk_norm", "sliding_window", "model_type")
SAMPLES_PER_TENSOR = 32
# Two half-precision roundings apart at most (bf16 keeps 8 significant bits, float16 11,
# and float16 flushes values under 6e-5 to coarser subnormal steps); with room to spare.
RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE = 2.0 ** -6, 1e-6


def architecture(config) -> dict:
    """The architecture fields of a model config, as JSON keeps them."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps({k: values.get(k) for k in ARCHITECTURE_FIELDS}))


def config_sha256(config) -> str:
    return hashlib.sha256(json.dumps(architecture(config), sort_keys=True).encode()).hexdigest()


def architecture_difference(recorded: dict, config) -> str | None:
    """The fields in which `config` differs from a recorded `architecture`, in words
    ("hidden_size 64 (adapter's base) vs 128 (this model)"); None when none does."""
    now = architecture(config)
    differ = [f"{field} {json.dumps(recorded.get(field))} (adapter's base) vs {json.dumps(now[field])} (this model)"
              for field in ARCHITECTURE_FIELDS if recorded.get(field) != now[field]]
    return ", ".join(differ) or None


def _named_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return sorted(model.named_parameters(), key=lambda item: item[0])


@torch.no_grad()
def _sample(model: nn.Module) -> torch.Tensor:
    samples = []
    for _, param in _named_weights(model):
        flat = param.detach().reshape(-1)
        # linspace counts in float32, where an index past 2**24 rounds: the last one can
        # round up past the end (a 1B model's embedding). Clamped rather than computed in
        # int64, so that every sample that was in range stays where adapters recorded it.
        index = torch.linspace(0, flat.numel() - 1, min(SAMPLES_PER_TENSOR, flat.numel())).long()
        index.clamp_(max=flat.numel() - 1)
        samples.append(flat[index.to(flat.device)].float().cpu())
    return torch.cat(samples) if samples else torch.zeros(0)


def weights_sample(model: nn.Module) -> str:
    return base64.b64encode(_sample(model).numpy().tobytes()).decode()


def base_identity(model: nn.Module) -> dict:
    """{"config_sha256", "architecture", "weights_sample"} of a model that has no adapters yet."""
    stored = getattr(model, "adapter_base_identity", None)
    if stored is not None:
        return stored
    return {"config_sha256": config_sha256(model.config), "architecture": architecture(model.config),
            "weights_sample": weights_sample(model)}


def weights_difference(recorded: str, model: nn.Module) -> str | None:
    """None when `model`'s base weights are the recorded ones up to half-precision
    rounding; else what differs first, in words."""
    try:
        before = torch.frombuffer(bytearray(base64.b64decode(recorded, validate=True)), dtype=torch.float32)
    except ValueError:
        return "the recorded sample is not base64 of float32 values"
    identity = getattr(model, "adapter_base_identity", None)
    now = (torch.frombuffer(bytearray(base64.b64decode(identity["weights_sample"])), dtype=torch.float32)
           if identity and "weights_sample" in identity else _sample(model))
    if before.numel() != now.numel():
        return f"{before.numel()} sampled values recorded, {now.numel()} here (other tensors)"
    off = (before - now).abs() > RELATIVE_TOLERANCE * torch.maximum(before.abs(), now.abs()) + ABSOLUTE_TOLERANCE
    if not off.any():
        return None
    first = int(off.nonzero()[0])
    names = [name for name, param in _named_weights(model) for _ in range(min(SAMPLES_PER_TENSOR, param.numel()))]
    where = f" (first in '{names[first]}')" if len(names) == now.numel() else ""
    return (f"{int(off.sum())} of {now.numel()} sampled values differ{where}: "
            f"{before[first].item():.6g} recorded, {now[first].item():.6g} here")
