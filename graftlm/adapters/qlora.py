"""QLoRA's frozen base: linear weights stored in 4-bit NF4, computed in bf16 (float32 on
a device without fast bf16: `placement.fast_bfloat16`).

We use torchao's `NF4Tensor` (the NF4 of the QLoRA paper: 64-value blocks with
absmax scalers, the scalers double-quantized to int8), which is plain PyTorch and so
runs on CPU and CUDA alike; bitsandbytes is CUDA-oriented and not needed. The weight
stays an `nn.Parameter` (requires_grad=False) holding an `NF4Tensor`, so `F.linear`,
`.to(device)` and FSDP2 work through torchao's overrides. The input is cast to the
compute dtype, the weight is dequantized to it inside the matmul, and the result is
cast back to the caller's dtype; the backward pass needs only the quantized weight.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from graftlm.adapters.nf4_layout import NF4_BLOCK, SHARDABLE_SCALER_BLOCKS, _scaler_block  # noqa: F401
from graftlm.errors import GraftError
from graftlm.placement import fast_bfloat16

STORED_DTYPE = torch.bfloat16  # what the NF4 codes dequantize to, as in the QLoRA paper


def _nf4():
    # torchao's import is slow, so only QLoRA pays for it, and chatty: it warns about
    # compiled kernels it cannot load (builds for CUDA or another Python, which NF4 does
    # not use) and about its own enum registrations. Those warnings are silenced for it.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import NF4Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return NF4Tensor, linear_nf4


def is_nf4(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "NF4Tensor"


def check_shardable(weight: torch.Tensor, world_size: int, name: str = "") -> None:
    """Raise a one-line GraftError when FSDP2 cannot split this NF4 weight over `world_size` ranks."""
    rows, n_scalers = weight.shape[0], weight.quantization_factor.numel()
    if rows % world_size or n_scalers % world_size:
        raise GraftError(f"qlora under --parallel fsdp: layer '{name}' ({rows} rows, {n_scalers} NF4 scaler "
                         f"blocks) cannot be split evenly over {world_size} ranks; use --parallel ddp, "
                         f"or a world size dividing both")


def quantize_linear_(linear: nn.Linear, name: str = "") -> None:
    """Replace `linear.weight` by its NF4 quantization (in place; the bias stays as is)."""
    NF4Tensor, _ = _nf4()
    weight = linear.weight.detach()
    if weight.numel() % NF4_BLOCK:
        raise GraftError(f"qlora: layer '{name}' has {weight.numel()} weights, not a multiple of the "
                         f"NF4 block of {NF4_BLOCK}; leave it out of adapter.target_modules")
    n_blocks = weight.numel() // NF4_BLOCK
    quantized = NF4Tensor.from_tensor(weight.to(STORED_DTYPE).contiguous(), NF4_BLOCK, _scaler_block(n_blocks))
    linear.weight = nn.Parameter(quantized, requires_grad=False)


def nf4_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """`linear(x)` with an NF4 weight: bf16 compute (float32 where bf16 is slow: QLoRA's
    [2048, 512] x [512, 1408] forward and backward took 4.7 s in bf16 on an AVX2 CPU,
    0.33 s in float32), output in x's dtype."""
    _, linear_nf4 = _nf4()
    compute = STORED_DTYPE if fast_bfloat16(x.device.type) else torch.float32
    out = linear_nf4(x.to(compute), linear.weight)
    if linear.bias is not None:
        out = out + linear.bias.to(out.dtype)
    return out.to(x.dtype)


def dequantize(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A plain tensor of `weight` (NF4 or not) in `dtype`."""
    if is_nf4(weight):
        return weight.get_original_weight().to(dtype)
    return weight.detach().to(dtype)


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes that `tensor` really occupies (for NF4: the codes, scalers and constants)."""
    if is_nf4(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(storage_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()
