"""DoRA (weight-decomposed LoRA) as PEFT defines it.

The adapted weight is W' = m * (W + s·BA) / ||W + s·BA||, the norm taken per output
row; m (one value per output feature) is trained with A and B and starts at the row
norms of W, so that a fresh adapter is the identity. Following the paper (section 4.3)
and PEFT, the norm is treated as a constant in backward (detached). The forward pass
never forms W' for the input: it rescales the base output instead,

    y = base(x) + (m/n - 1) · (x Wᵀ) + (m/n) · s · B(A(x)),

which is what PEFT computes, so outputs match it to float precision.
"""

from __future__ import annotations

import torch


def row_norms(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s·BA|| per output row, in W's dtype (not differentiable)."""
    with torch.no_grad():
        combined = weight + scaling * (lora_b.to(weight.dtype) @ lora_a.to(weight.dtype))
        return torch.linalg.norm(combined, dim=1).to(weight.dtype)


def dora_delta(x: torch.Tensor, base_no_bias: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
               lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """What DoRA adds to the base layer's output for input x.

    base_no_bias is x Wᵀ (the base output without its bias), reused rather than recomputed.
    """
    dtype = x.dtype
    norms = row_norms(weight.to(dtype), lora_a, lora_b, scaling).detach()
    ratio = (magnitude.to(dtype) / norms)
    lora_out = (x @ lora_a.to(dtype).t()) @ lora_b.to(dtype).t()
    return (ratio - 1) * base_no_bias + ratio * lora_out * scaling


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', the norms used): the weight with DoRA folded in, and what unmerge needs."""
    combined = weight + scaling * (lora_b.to(weight.dtype) @ lora_a.to(weight.dtype))
    norms = torch.linalg.norm(combined, dim=1).to(weight.dtype)
    return combined * (magnitude.to(weight.dtype) / norms).unsqueeze(1), norms


def unmerged_weight(merged: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
                    norms: torch.Tensor, scaling: float) -> torch.Tensor:
    """Inverse of `merged_weight` given the norms it returned."""
    combined = merged / (magnitude.to(merged.dtype) / norms).unsqueeze(1)
    return combined - scaling * (lora_b.to(merged.dtype) @ lora_a.to(merged.dtype))
