"""Where a model runs and in which dtype: one rule for every command.

- Device `auto` is the local CUDA device when there is one (`cuda:local_rank`), else
  the CPU; anything else is passed to `torch.device` and checked here, so a typo is
  one line naming the flag rather than a traceback.
- Inference dtype `auto` is bfloat16 on CUDA (every recent GPU computes it at full
  speed and it halves the weights' memory) and float32 elsewhere (on the CPU, float32
  decoding matches transformers' token for token and is not slower at batch 1).
  Training keeps its own precision policy (`train.precision`).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from graftlm.errors import GraftError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def pick_device(local_rank: int = 0, requested: str | None = None) -> "torch.device":
    import torch  # here, not at import: `graft --help` stays instant

    if requested and requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise GraftError(f"--device: unknown device {requested!r} (auto, cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise GraftError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise GraftError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_dtype(device: "torch.device", requested: str = "auto") -> "torch.dtype":
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES),
                        help="weights and compute dtype (auto: bfloat16 on CUDA, float32 on the CPU)")


def placement(args: argparse.Namespace) -> tuple["torch.device", "torch.dtype"]:
    """(device, dtype) from the flags of `add_placement_arguments`."""
    device = pick_device(0, args.device)
    return device, pick_dtype(device, args.dtype)
