"""Optimizer and learning-rate schedule.

Design choices:
- AdamW with two parameter groups: weight decay on matrices, none on norms, biases and
  embeddings (decaying an embedding pulls rare tokens to zero; decaying a norm gain
  pulls it away from 1). Only parameters that require grad are given to the optimizer,
  so LoRA / QLoRA runs optimize the adapters alone. Tied weights are counted once.
- The fused kernel where torch has one for the device (CUDA, and CPU since torch 2.4),
  else the multi-tensor `foreach` path; never the per-parameter Python loop.
- The schedule is a pure function of the step (`lr_at`), written into the parameter
  groups before each step. Resume then needs nothing but the step counter, and the
  schedule cannot drift from the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from graftlm.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where an optimizer is built: the run config (OptimConfig) needs none
    import torch
    from torch import nn


DEFAULT_LR = 3e-4  # a model trained from scratch, or adapters
# Full fine-tuning of pre-trained weights moves every weight: TRL's default rates. At 3e-4
# (300x TRL's) a full-weight DPO or GRPO run unlearns a real model's pre-training.
FINE_TUNING_LR = {"sft": 2e-5, "reward": 1e-5, "ppo": 3e-6, "dpo": 1e-6, "grpo": 1e-6}


@dataclass
class OptimConfig:
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default: 3e-4 for a model trained from scratch and for adapters; full "
                "fine-tuning of pre-trained weights takes TRL's: sft 2e-5, reward 1e-5, ppo 3e-6, dpo and "
                "grpo 1e-6)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak"})
    schedule: Literal["cosine", "wsd", "constant"] = field(
        default="cosine", metadata={"help": "warmup then cosine, warmup-stable-decay, or constant"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup steps (default: a tenth of the run's steps, at most 100)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "WSD: final fraction of steps that decays"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0: no clipping)"})
    implementation: Literal["auto", "fused", "foreach"] = "auto"

    def warmup_for(self, max_steps: int) -> int:
        """`warmup_steps`, or where a run has not chosen it a tenth of its steps, at most
        100: a fixed 100 left a 30-step fine-tuning run in its warmup, at a third of its
        rate, having learnt nothing (TRL warms up for 0 steps; pre-training wants some)."""
        return min(100, max_steps // 10) if self.warmup_steps is None else self.warmup_steps

    @property
    def peak_lr(self) -> float:
        """`lr`, or the default where a run has not chosen one (`runs.default_lr` does)."""
        return DEFAULT_LR if self.lr is None else self.lr

    def validate(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"config field 'optim.lr': must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"config field 'optim.min_lr_ratio': must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"config field 'optim.warmup_steps': must be >= 0, got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"config field 'optim.decay_fraction': must be in (0, 1], got {self.decay_fraction}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"config field 'optim.{name}': must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ConfigError("config fields 'optim.weight_decay' and 'optim.grad_clip' must be >= 0, "
                              "'optim.eps' > 0")


def is_decayed(name: str, param: nn.Parameter) -> bool:
    return param.ndim >= 2 and "embed_tokens" not in name and "embedding" not in name


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():  # named_parameters already skips tied duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if is_decayed(name, p) else no_decay).append((name, p))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "param_names": [n for n, _ in members],
                           "weight_decay": wd})
    return groups


def _fused_supported(device: torch.device, dtypes: set) -> bool:
    import torch

    if device.type == "cuda":
        return True
    # The CPU fused kernel exists since torch 2.4 for float32 / bfloat16 / float16.
    return device.type == "cpu" and dtypes <= {torch.float32, torch.bfloat16, torch.float16}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    import torch

    groups = parameter_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("nothing to train: no parameter of the model requires grad")
    params = [p for g in groups for p in g["params"]]
    device = params[0].device
    fused = cfg.implementation == "fused" or (
        cfg.implementation == "auto" and _fused_supported(device, {p.dtype for p in params}))
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kind)


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `max_steps`."""
    peak, floor = cfg.peak_lr, cfg.peak_lr * cfg.min_lr_ratio
    warmup = cfg.warmup_for(max_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: hold the peak, then decay linearly over the last fraction.
    decay_steps = max(1, round(max_steps * cfg.decay_fraction))
    decay_start = max(warmup, max_steps - decay_steps)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return peak + (floor - peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
