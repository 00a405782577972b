"""Per-token log-probabilities and cross-entropy, computed in chunks from hidden states.

Every objective needs log p(token) at each position: the CLM and SFT losses are their
negated mean, DPO sums them per sequence, GRPO and PPO take per-token ratios. Computing
them in chunks of positions from the final hidden states (instead of asking the model
for logits) keeps the [tokens, vocab] float32 logits of a whole batch out of memory:
only one chunk's logits live at a time, and autograd re-creates them in backward.
"""

from __future__ import annotations

import torch

from graftlm.models.kernels import linear_logprobs

IGNORE_INDEX = -100


def token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int = 256) -> torch.Tensor:
    """log p(targets) for hidden [..., H] and targets [...]; float32, same shape as targets.

    Positions whose target is IGNORE_INDEX get an arbitrary finite value: mask them.
    """
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    # One autograd Function over all chunks: it keeps no logits for backward and remakes
    # each chunk's there with one matmul (same numbers with and without grad).
    return linear_logprobs(hidden, lm_head_weight, targets.clamp_min(0), chunk_size).view(shape)


def shift_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts input t+1.

    loss_mask [B, T] marks the input tokens that are trained (as targets); the last
    position has no target. Returns [B, T] with IGNORE_INDEX where nothing is trained.
    """
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    if loss_mask is not None:
        targets[:, :-1] = targets[:, :-1].masked_fill(~loss_mask[:, 1:].bool(), IGNORE_INDEX)
    return targets


def cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                  chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over trained positions, number of trained positions).

    Returned as a sum and a count so that gradient accumulation and data parallelism
    can divide by the global token count, which makes accumulation exactly a larger
    batch. A batch with no trained position gives a zero loss (never NaN) that still
    touches every parameter, so distributed ranks stay in step.
    """
    valid = targets != IGNORE_INDEX
    logp = token_logprobs(hidden, lm_head_weight, targets, chunk_size)
    total = -(logp * valid).sum()
    return total, valid.sum()
