"""The identity of a base model, recorded in every adapter saved from it.

Two numbers: `config_sha256` over the architecture fields of the model config, and
`weights_sha256` over a fixed sample of every base weight (64 evenly spaced values per
tensor, rounded to bf16 so that a base stored in float32 and the same base loaded in
bf16 agree). Sampling keeps it cheap on large models while any retrained, fine-tuned
or different base changes it. It is taken before QLoRA quantizes or a cast changes
the base, and kept on the model, so it always names the base as loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from torch import nn

ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps",
                       "tie_embeddings", "attention_bias", "qk_norm", "sliding_window", "model_type")
SAMPLES_PER_TENSOR = 64


def config_sha256(config) -> str:
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    fields = {k: values.get(k) for k in ARCHITECTURE_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(SAMPLES_PER_TENSOR, flat.numel())).long()
        sample = flat[index.to(flat.device)].to(torch.bfloat16).view(torch.int16).cpu()
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def base_identity(model: nn.Module) -> dict:
    """{"config_sha256", "weights_sha256"} of a model that has no adapters yet."""
    stored = getattr(model, "adapter_base_identity", None)
    if stored is not None:
        return stored
    return {"config_sha256": config_sha256(model.config), "weights_sha256": weights_sha256(model)}
