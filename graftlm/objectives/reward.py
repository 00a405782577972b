"""Reward modelling: a scalar head trained with the Bradley-Terry loss on preference pairs.

Design choices:
- The model is a `ScalarHeadModel` (`models/heads.py`): the base decoder without its LM
  head plus `score`, saved as a Hugging Face sequence-classification model.
- Chosen and rejected go through one forward pass, as in DPO; each sequence is scored
  at its last non-pad token, so the batch is padded with the head's `pad_token_id`.
- loss = -log sigmoid(r_chosen - r_rejected - margin) (+ an optional `center_coef * (r_c +
  r_r)^2` that keeps rewards near zero, which makes them comparable across runs and keeps
  PPO's value targets small). Summed over pairs; the count is the number of pairs.
- It is TRL's RewardTrainer loss (tests/parity/test_reward_trl.py): `margin` is a pair's
  optional `margin` field (TRL's margin column, 0 when absent), `center_coef` TRL's
  `center_rewards_coefficient`. As in TRL, accuracy and the margin metric compare the raw
  scores: the data's margin shapes the loss, not what counts as ranking a pair right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graftlm.objectives import ObjectiveSpec
from graftlm.objectives.configs import HELP, RewardModelConfig
from graftlm.objectives.dpo import build_pair_splits, concatenated, pair_tokens


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores [B], rejected scores [B]) from one forward pass."""
    head = getattr(model, "module", model)
    ids, _ = concatenated(batch, pad_id=head.pad_token_id)
    return model(ids).chunk(2)


class RewardObjective:
    name = "reward"
    # Validation reports held-out pairwise accuracy and margin beside val_loss.
    val_metrics = ("rewards/accuracy", "rewards/margin")

    def __init__(self, config: RewardModelConfig | None = None):
        self.config = config or RewardModelConfig()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        chosen, rejected = pair_scores(model, batch)
        gap = chosen - rejected
        if "margin" in batch:
            gap = gap - batch["margin"].to(gap)
        losses = -F.logsigmoid(gap)
        if self.config.center_coef:
            losses = losses + self.config.center_coef * (chosen + rejected) ** 2
        metrics = {
            "rewards/chosen": chosen.detach().mean().item(),
            "rewards/rejected": rejected.detach().mean().item(),
            "rewards/margin": (chosen - rejected).detach().mean().item(),
            "rewards/accuracy": (chosen > rejected).float().mean().item(),
            **pair_tokens(batch),
        }
        return losses.sum(), torch.tensor(losses.shape[0], device=losses.device), metrics


def scalar_head(cfg, model, tokenizer):
    """The base decoder with a fresh score head; pads with the tokenizer's pad id.

    With adapters the fresh head trains in full beside them (as PEFT does for sequence
    classification): a low-rank update of a random head would leave the head unsaved."""
    from graftlm.adapters.config import SCALAR_HEAD
    from graftlm.models.heads import ScalarHeadModel

    pad = tokenizer.pad_id if tokenizer is not None else model.config.pad_token_id
    adapted = cfg.adapter is not None
    if adapted and SCALAR_HEAD not in cfg.adapter.modules_to_save:
        cfg.adapter.modules_to_save = [*cfg.adapter.modules_to_save, SCALAR_HEAD]
    return ScalarHeadModel.from_decoder(model, pad_token_id=pad, generator=torch.Generator().manual_seed(cfg.seed),
                                        record_base=adapted).train()


def save_reward_model(model, out, tokenizer) -> None:
    from graftlm.models.heads import save_scalar_model

    save_scalar_model(model, out, tokenizer_dir=tokenizer.path if tokenizer is not None else None)


SPEC = ObjectiveSpec(
    name="reward", help=HELP["reward"],
    config_cls=RewardModelConfig,
    build_dataset=lambda cfg, tokenizer: build_pair_splits(cfg, cfg.reward, tokenizer, "reward"),
    build_objective=lambda cfg, model: RewardObjective(cfg.reward),
    prepare_model=scalar_head, save_final=save_reward_model)
