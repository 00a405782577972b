"""Where a model runs and in which dtype: one rule for every command.

- Device `auto` is the local CUDA device when there is one (`cuda:local_rank`), else
  the CPU; anything else is passed to `torch.device` and checked here, so a typo is
  one line naming the flag rather than a traceback.
- Inference dtype `auto` is bfloat16 on CUDA (every GPU since Ampere computes it at full
  speed and it halves the weights' memory; float16 on older cards) and float32 elsewhere (on the CPU, float32
  decoding matches transformers' token for token and is not slower at batch 1).
  Training keeps its own precision policy (`train.precision`), whose `auto` is bf16
  autocast where the device computes bf16 fast and float32 elsewhere (`fast_bfloat16`).
"""

from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from typing import TYPE_CHECKING

from graftlm.errors import GraftError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PRECISIONS = ("auto", "fp32", "bf16-autocast", "bf16")


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
        if device.type == "cuda":  # a card without bf16 units (T4, V100) computes float16 at speed
            return torch.bfloat16 if fast_bfloat16("cuda") else torch.float16
        return torch.float32
    return getattr(torch, requested)


@lru_cache(maxsize=None)
def fast_bfloat16(device_type: str) -> bool:
    """Whether this machine's `device_type` ("cpu", "cuda") multiplies bf16 matrices at
    least about as fast as float32.

    CUDA: compute capability 8.0 (Ampere) and newer; older cards emulate bf16. CPU: what
    PyTorch itself asks before it sends a bf16 matmul to oneDNN (AVX-512 or AMX on x86,
    the BF16 extension on Arm). Without it the matmul falls back to a scalar loop: on an
    AVX2-only CPU (AMD Zen 1-3, most laptops before 2020) a bf16 [2048, 512] x [512, 1408]
    product took 1.5 s against 30 ms in float32, a 50x slower training step."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return True  # other backends (mps, xpu) are taken at their word


@lru_cache(maxsize=None)
def fast_float16_on_cpu() -> bool:
    """The same question for float16 on the CPU (AVX512-FP16 / AMX-FP16, Arm FP16): an
    AVX2 CPU multiplies float16 in the same scalar loop (45x float32 here)."""
    import torch

    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def slow_on_cpu(dtype: "torch.dtype") -> bool:
    """Whether this CPU multiplies `dtype` in PyTorch's scalar fallback (a half dtype it has
    no kernel for): the one test behind the dtype warning and the CPU's measured peak."""
    import torch

    return (dtype == torch.bfloat16 and not fast_bfloat16("cpu")) or (dtype == torch.float16
                                                                       and not fast_float16_on_cpu())


def slow_bfloat16_reason(device: "torch.device") -> str:
    """Why bf16 is slow on `device`, for warnings (where `fast_bfloat16` is false)."""
    return "this CPU has no AVX-512, AMX or Arm BF16" if device.type == "cpu" else f"{device} emulates bf16"


def resolve_precision(requested: str, device: "torch.device", warn=print) -> str:
    """`train.precision` with `auto` made concrete for `device`: bf16 autocast where bf16 is
    fast, else fp32. An explicit bf16 choice on a device without fast bf16 is kept, with one
    warning that says what it costs."""
    if requested == "auto":
        return "bf16-autocast" if fast_bfloat16(device.type) else "fp32"
    if requested != "fp32" and not fast_bfloat16(device.type):
        warn(f"warning: --train.precision {requested}: {slow_bfloat16_reason(device)}, so bf16 matrix products run many times "
             "slower than float32 (50x on an AVX2 CPU); --train.precision auto or fp32 trains in float32")
    return requested


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES),
                        help="weights and compute dtype (auto: bfloat16 on CUDA, float16 on CUDA cards "
                             "before Ampere, float32 on the CPU)")


def placement(args: argparse.Namespace, warn=None) -> tuple["torch.device", "torch.dtype"]:
    """(device, dtype) from the flags of `add_placement_arguments`; a half dtype the CPU
    has no fast matmul for is kept, with one warning (on stderr: stdout is the output)."""
    import torch

    device = pick_device(0, args.device)
    dtype = pick_dtype(device, args.dtype)
    if device.type == "cpu" and slow_on_cpu(dtype):
        warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        units = "AVX-512 or AMX" if dtype == torch.bfloat16 else "AVX512-FP16 or AMX-FP16"
        warn(f"warning: --dtype {args.dtype}: this CPU has no fast {args.dtype} matrix products (it lacks "
             f"{units}), so every step runs many times slower than float32; --dtype auto runs in float32")
    return device, dtype
