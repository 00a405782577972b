"""Direct preference optimisation and its variants: sigmoid (DPO), IPO, SimPO and ORPO.

Design choices:
- Chosen and rejected completions go through the model in ONE forward pass,
  concatenated along the batch (right-padded to one length: with causal attention the
  padding after a sequence cannot change it). One pass halves the kernel launches and,
  under FSDP, the all-gathers.
- A completion's log-probability is the sum of its trained tokens' log-probs
  (`loss_mask`, from the renderer). IPO follows TRL: the log-ratios are averaged over
  the completion's tokens before the squared loss, so beta means the same at any length.
  SimPO and ORPO use token-averaged log-probs and need no reference model.
- ORPO's NLL term follows TRL's ORPOTrainer (and the paper's L_SFT): the mean NLL per
  chosen token of the micro-batch (pooled over its pairs, not a mean of per-pair
  means), plus beta (the paper's lambda) times the mean odds-ratio loss. To fit the
  (sum, count = pairs) contract, each pair carries its share of the pooled mean,
  pairs * its NLL / the chosen tokens. Unlike TRL, which puts the NLL on the prompt
  tokens too, only trained (`loss_mask`) tokens count, as in the paper.
- The reference log-probs come from `graftlm.adapters.reference(model)` under
  `torch.no_grad()` (LoRA: the same weights with adapters disabled; full: a frozen copy).
  A batch may carry them precomputed (`ref_chosen_logps`, `ref_rejected_logps`), e.g.
  computed once per data set; then no reference forward runs.
- The loss is a sum over pairs and the count is the number of pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graftlm.objectives import DataSplits, ObjectiveSpec
from graftlm.objectives.configs import HELP, REFERENCE_FREE, DPOConfig
from graftlm.objectives.logprobs import IGNORE_INDEX, shift_targets
from graftlm.objectives.sft import (FineTuneData, left_out, load_splits, model_logprobs, render_splits,
                                   renderer_for)


def pad_right(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Rendered pairs -> batch. Each example has `chosen_input_ids`, `chosen_loss_mask`,
    `rejected_input_ids`, `rejected_loss_mask` (lists); padding is on the right. Optional:
    `ref_chosen_logps` / `ref_rejected_logps` (DPO) and `margin` (the reward model)."""
    batch = {}
    for side in ("chosen", "rejected"):
        ids = [e[f"{side}_input_ids"] for e in examples]
        masks = [[bool(m) for m in e[f"{side}_loss_mask"]] for e in examples]
        batch[f"{side}_input_ids"] = pad_right(ids, pad_id)
        batch[f"{side}_loss_mask"] = pad_right(masks, 0).bool()
        batch[f"{side}_lengths"] = torch.tensor([len(i) for i in ids])
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if all(key in e for e in examples):
            batch[key] = torch.tensor([float(e[key]) for e in examples])
    if any("margin" in e for e in examples):  # the reward model's; a pair without one has 0
        batch["margin"] = torch.tensor([float(e.get("margin", 0.0)) for e in examples])
    return batch


def pair_tokens(batch: dict) -> dict:
    """The trainer's `tokens` metric: chosen + rejected tokens without their padding."""
    if "chosen_lengths" not in batch:
        return {}
    return {"tokens": int(batch["chosen_lengths"].sum() + batch["rejected_lengths"].sum())}


def concatenated(batch: dict, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen; rejected] as one right-padded batch: (input_ids [2B, T], loss_mask [2B, T])."""
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    length = max(c_ids.shape[1], r_ids.shape[1])

    def widen(x, value):
        return F.pad(x, (0, length - x.shape[1]), value=value)

    ids = torch.cat([widen(c_ids, pad_id), widen(r_ids, pad_id)])
    mask = torch.cat([widen(batch["chosen_loss_mask"], False), widen(batch["rejected_loss_mask"], False)])
    return ids, mask.bool()


def sequence_logps(model, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of trained-token log-probs [N], number of trained tokens [N])."""
    targets = shift_targets(input_ids, loss_mask)
    valid = targets != IGNORE_INDEX
    logp = model_logprobs(model, input_ids, targets)
    return (logp * valid).sum(-1), valid.sum(-1)


def reference_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (chosen, rejected) sequence log-probs: precomputed, or one no-grad pass."""
    if "ref_chosen_logps" in batch:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    from graftlm.adapters import reference

    ids, mask = concatenated(batch)
    with torch.no_grad(), reference(model) as ref:
        logps, _ = sequence_logps(ref, ids, mask)
    return logps.chunk(2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def preference_losses(config: DPOConfig, chosen: torch.Tensor, rejected: torch.Tensor,
                      chosen_len: torch.Tensor, rejected_len: torch.Tensor,
                      ref_chosen: torch.Tensor | None = None,
                      ref_rejected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards (chosen, rejected) from sequence log-prob sums."""
    beta, eps = config.beta, config.label_smoothing
    c_len, r_len = chosen_len.clamp_min(1), rejected_len.clamp_min(1)
    if config.loss in REFERENCE_FREE:
        c_avg, r_avg = chosen / c_len, rejected / r_len
        reward_c, reward_r = beta * c_avg.detach(), beta * r_avg.detach()
        if config.loss == "simpo":
            logits = beta * (c_avg - r_avg) - config.simpo_gamma
            losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        else:  # orpo: pooled per-token NLL of the chosen tokens + beta * -log sigmoid(log odds ratio)
            log_odds = (c_avg - r_avg) - (log1mexp(c_avg) - log1mexp(r_avg))
            nll_share = -chosen * chosen.shape[0] / chosen_len.sum().clamp_min(1)
            losses = nll_share - beta * F.logsigmoid(log_odds)
        return losses, reward_c, reward_r
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if config.loss == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    else:  # ipo, with TRL's per-token averaging of the log-ratios
        delta = chosen_ratio / c_len - rejected_ratio / r_len
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPOObjective:
    # Validation reports held-out preference accuracy and margin beside val_loss (TRL's eval_rewards/*).
    val_metrics = ("rewards/accuracy", "rewards/margin")

    def __init__(self, config: DPOConfig | None = None):
        self.config = config or DPOConfig()
        self.name = "dpo"
        self.uses_reference = self.config.loss not in REFERENCE_FREE

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        ids, mask = concatenated(batch)
        logps, lengths = sequence_logps(model, ids, mask)
        chosen, rejected = logps.chunk(2)
        c_len, r_len = lengths.chunk(2)
        ref_c = ref_r = None
        if self.uses_reference:
            ref_c, ref_r = reference_logps(model, batch)
        losses, reward_c, reward_r = preference_losses(self.config, chosen, rejected, c_len, r_len, ref_c, ref_r)
        pairs = losses.shape[0]
        metrics = {
            "rewards/chosen": reward_c.mean().item(),
            "rewards/rejected": reward_r.mean().item(),
            "rewards/margin": (reward_c - reward_r).mean().item(),
            "rewards/accuracy": (reward_c > reward_r).float().mean().item(),
            "logps/chosen": chosen.detach().mean().item(),
            "logps/rejected": rejected.detach().mean().item(),
            **pair_tokens(batch),
        }
        return losses.sum(), torch.tensor(pairs, device=losses.device), metrics


class PreferencePairs:
    """Rendered pairs as prompt + completion ids with completion masks; `collate` pads."""

    def __init__(self, pairs, pad_id: int):
        self.pairs, self.pad_id = pairs, pad_id

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        p = self.pairs[index]
        prompt_mask = [False] * len(p.prompt_ids)
        return {"chosen_input_ids": p.prompt_ids + p.chosen_ids, "chosen_loss_mask": prompt_mask + p.chosen_mask,
                "rejected_input_ids": p.prompt_ids + p.rejected_ids,
                "rejected_loss_mask": prompt_mask + p.rejected_mask, "margin": p.margin}

    def collate(self, samples: list[dict]) -> dict:
        return collate_pairs(samples, self.pad_id)


def build_pair_splits(cfg, section: FineTuneData, tokenizer, objective: str, pad_id: int | None = None) -> DataSplits:
    """Train / validation preference pairs for `dpo` and `reward`."""
    renderer = renderer_for(cfg, section, tokenizer)
    train_rows, val_rows, read = load_splits(cfg, section, objective)
    train, val, lost_validation = render_splits(cfg, section, renderer, renderer.render_pair, train_rows, val_rows,
                                                "preference pair")
    pad = tokenizer.pad_id if pad_id is None else pad_id
    return DataSplits(train=PreferencePairs(train, pad), val=PreferencePairs(val, pad) if val else None,
                      vocab_size=tokenizer.vocab_size,
                      identity={"data": cfg.data, "pairs": len(train), "render": renderer.counts.to_dict()},
                      stats=left_out(read, renderer, lost_validation))


SPEC = ObjectiveSpec(
    name="dpo", help=HELP["dpo"],
    config_cls=DPOConfig, build_dataset=lambda cfg, tokenizer: build_pair_splits(cfg, cfg.dpo, tokenizer, "dpo"),
    build_objective=lambda cfg, model: DPOObjective(cfg.dpo),
    describe=lambda cfg: f"dpo: loss {cfg.dpo.loss}, beta {cfg.dpo.beta:g}"
                         + (f", gamma {cfg.dpo.simpo_gamma:g}" if cfg.dpo.loss == "simpo" else ""))
