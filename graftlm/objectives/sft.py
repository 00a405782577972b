"""Supervised fine-tuning: masked next-token cross-entropy over the assistant's tokens.

Design choices:
- The loss is a sum over trained target tokens and the count is their number, so the
  trainer's division by the step's total count makes gradient accumulation exactly a
  larger batch (every trained token weighs the same, whatever micro-batch it is in).
- Which tokens are trained is decided by the renderer (`data/render.py`): the batch
  carries `loss_mask` [B, T] marking inputs trained as targets. This module never
  looks at roles or templates.
- Packed rows (`document_ids`) never predict across a document boundary: the target of
  the last token of one document would be the first token of the next.
- `model_logprobs` is the one place that turns (model, ids, targets) into per-token
  log-probabilities; DPO, GRPO, PPO and eval all call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graftlm.objectives.logprobs import IGNORE_INDEX, shift_targets


def model_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                   position_ids: torch.Tensor | None = None,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """log p(targets[b, t] | input_ids[b, :t+1]) as float32 [B, T]; mask IGNORE_INDEX yourself.

    The model computes them inside its forward (chunked), where DDP and FSDP2 expect
    every parameter to be used.
    """
    return model(input_ids, position_ids=position_ids, document_ids=document_ids, targets=targets)


def packed_targets(batch: dict) -> torch.Tensor:
    """Next-token targets of a (possibly packed) batch, masked by `loss_mask`."""
    input_ids = batch["input_ids"]
    loss_mask = batch.get("loss_mask")
    targets = shift_targets(input_ids, loss_mask)
    document_ids = batch.get("document_ids")
    if document_ids is not None:
        crosses = document_ids[:, 1:] != document_ids[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(crosses, IGNORE_INDEX)
    return targets


@dataclass
class SFTConfig:
    """SFT has no knobs of its own: masking policy lives in the data config."""


class SFTObjective:
    name = "sft"

    def __init__(self, config: SFTConfig | None = None):
        self.config = config or SFTConfig()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        targets = packed_targets(batch)
        logp = model_logprobs(model, batch["input_ids"], targets, batch.get("position_ids"),
                              batch.get("document_ids"))
        trained = targets != IGNORE_INDEX
        # Multiplying (not indexing) keeps every parameter in the graph even when a
        # micro-batch has no trained token, so distributed ranks stay in step.
        total = -(logp * trained).sum()
        count = trained.sum()
        return total, count, {"trained_tokens": int(count)}
