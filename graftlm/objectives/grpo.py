"""Group relative policy optimisation (GRPO): online RL with group-normalised advantages.

For each prompt of the batch, `group_size` completions are sampled with the KV-cache
engine and scored by a reward (`graftlm.rewards`). Design choices:
- Advantage of a completion = (reward - its group's mean) / (group's std + eps): no
  value model. A group whose rewards all agree teaches nothing and gets advantage 0.
  A group with a skipped reward is dropped whole (its mean would be wrong).
- The policy loss is PPO's clipped surrogate on the per-token ratio
  pi(token) / pi_old(token), with `epsilon` (low) and `epsilon_high` bounds. With
  `iterations` = 1 (default) pi_old is the policy itself, detached (ratio 1, the
  gradient of the unclipped objective).
- `iterations` = k > 1 (the paper's mu): each optimizer step's rollouts are trained on
  for k optimizer steps. The loader serves each block of `grad_accum` micro-batches k
  times in a row (`data/loader.py`, `reuse`), so no prompt is skipped: pass 0 samples
  and keeps its rollout and log-probs (pi_old, the policy at sampling time, which is
  the policy of pass 0's step, and the reference's, which never changes), later passes
  reuse them: as TRL's ref_per_token_logps, the reference runs one forward per rollout,
  not one per pass. A reused rollout is matched by its slot and sample ids. A checkpoint
  that falls inside a block holds each rank's kept rollouts (`rank_checkpoint_state`:
  token ids, masks, rewards, pi_old's and the reference's log-probs, as they were at
  sampling time), so a resume trains the block's remaining passes on them, as the unbroken
  run does, without sampling.
- A step in which every group's completions got the same reward learns nothing: the
  run logs `frac_reward_zero_std` (the share of such groups, TRL's metric) and warns
  (`rollout.RolloutWarnings`), as it does when completions are cut at `max_new_tokens`.
- Validation: greedy completions of the held-out prompts, scored by the same reward
  (`val_reward`, see `rollout.held_out_reward`).
- KL to the reference policy with the k3 estimator exp(r - l) - (r - l) - 1 (r, l the
  reference and policy log-probs), weight `beta`; beta 0 runs no reference forward.
  `kl_bias_correction` (TRL's use_bias_correction_kl, True by default there, False here so
  that runs keep their gradients) multiplies it by the unclipped ratio pi / pi_old (per
  token, or the completion's with `importance_sampling_level` sequence); the logged `kl`
  is the term as it enters the loss, as TRL's.
- Normalisation, `loss_type` (TRL 1.16's names; `normalised` gives each micro-batch's sum
  and count, the trainer divides the step's summed loss by its summed count):
  dapo (default, TRL's too) divides by the step's completion tokens, so every token weighs
  the same; bnpo by each micro-batch's tokens, then a mean over micro-batches; grpo each
  completion by its length, then a mean over completions; dr_grpo by completions x
  max_new_tokens; luspo by completions (each completion's tokens summed).
- `importance_sampling_level` "sequence" (GSPO): one ratio per completion, exp of its
  mean per-token log-ratio, clipped as the per-token one is.
- `scale_rewards`: true / "group" divide advantages by the group's std, false / "none"
  do not (Dr. GRPO). TRL's "batch" is not offered: its std spans the whole generation
  batch of every rank, and graftlm samples each micro-batch on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from graftlm.objectives.logprobs import IGNORE_INDEX, shift_targets
from graftlm.objectives import ObjectiveSpec
from graftlm.objectives.configs import HELP, GRPOConfig
from graftlm.objectives.rollout import (Rollout, RolloutSampler, RolloutWarnings, build_prompt_splits,
                                        held_out_reward, rollout_metrics, run_tokenizer)
from graftlm.objectives.sft import model_logprobs
from graftlm.rewards import RewardScorer, build_rewards


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4,
                     unscorable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], valid [N]) from rewards [N] laid out group by group; NaN = skipped.

    `unscorable` [N] marks completions no reward applied to (every function returned
    None): as TRL 1.16 does, they are left out of their group's mean and std and get
    advantage 0. Counted as a 0 score, they would move the group's baseline (and could
    flip the sign of the others' advantages) for a score no reward gave."""
    grouped = rewards.view(-1, group_size)
    valid = ~torch.isnan(grouped).any(-1, keepdim=True).expand_as(grouped)
    filled = torch.nan_to_num(grouped)
    if unscorable is None or not unscorable.any():
        centered = filled - filled.mean(-1, keepdim=True)
        if scale:
            centered = centered / (filled.std(-1, keepdim=True) + eps)
        return (centered * valid).reshape(-1), valid.reshape(-1)
    counted = ~unscorable.to(torch.bool).view(-1, group_size)
    n = counted.sum(-1, keepdim=True)
    centered = (filled - (filled * counted).sum(-1, keepdim=True) / n.clamp_min(1)) * counted
    if scale:  # the unbiased std over the scored completions (0 with fewer than two)
        std = ((centered ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
        centered = centered / (std + eps)
    return (centered * valid).reshape(-1), valid.reshape(-1)


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of the scored groups whose rewards all agree (std 0: advantages 0), TRL's
    `frac_reward_zero_std`; groups with a skipped reward are left out (`skipped_groups`)."""
    grouped = rewards.view(-1, group_size)
    std = grouped[~torch.isnan(grouped).any(-1)].std(-1)
    return torch.isclose(std, torch.zeros_like(std)).float().mean().item() if std.numel() else 0.0


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate, always >= 0 (Schulman's k3)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def policy_ratio(logp: torch.Tensor, old_logp: torch.Tensor,
                 sequence_mask: torch.Tensor | None = None) -> torch.Tensor:
    """pi / pi_old per token, differentiable through `logp`. With `sequence_mask` [B, T]
    the ratio is one per row (GSPO): exp of the mean log-ratio over the row's masked
    tokens, the same on each of its tokens."""
    log_ratio = logp - old_logp
    if sequence_mask is not None:
        mask = sequence_mask.to(log_ratio.dtype)
        mean = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
        log_ratio = mean.expand_as(log_ratio)
    return torch.exp(log_ratio)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float,
                      sequence_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token clipped flag) of PPO's clipped objective, on
    `policy_ratio` (per row with `sequence_mask`)."""
    ratio = policy_ratio(logp, old_logp, sequence_mask)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def normalised(per_token: torch.Tensor, trained: torch.Tensor, rows: torch.Tensor, loss_type: str,
               max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, count) of one micro-batch for `loss_type` (TRL 1.16's names). The trainer
    divides the sum over a step's micro-batches and ranks by the count summed likewise, so
    each type's count is what TRL divides by, in the units that add up over the step.
    `rows`: completions of the scored groups (a group with a skipped reward is left out whole)."""
    tokens = trained.sum()
    if loss_type == "dapo":  # every completion token of the step weighs the same
        return (per_token * trained).sum(), tokens  # summed as before loss types, to the bit
    row_sums = (per_token * trained).sum(-1)
    if loss_type == "bnpo":  # each micro-batch's token mean, then a mean over micro-batches (and ranks)
        return row_sums.sum() / tokens.clamp_min(1), (tokens > 0).to(tokens.dtype)
    if loss_type == "grpo":  # each completion's token mean, then a mean over completions
        return (row_sums / trained.sum(-1).clamp_min(1)).sum(), rows
    if loss_type == "dr_grpo":  # a constant per completion: max_new_tokens, long or short
        return row_sums.sum() / max_new_tokens, rows
    if loss_type == "luspo":  # each completion's token sum, then a mean over completions
        return row_sums.sum(), rows
    raise ValueError(f"unknown GRPO loss type {loss_type!r}")


def reference_token_logps(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from graftlm.adapters import reference

    with torch.no_grad(), reference(model) as ref:
        return model_logprobs(ref, input_ids, targets)


@dataclass
class KeptRollout:
    """A rollout with the log-probs that stay the same on every pass over it."""
    rollout: Rollout
    old_logp: torch.Tensor  # pi_old: pass 0's own forward, detached
    ref_logp: torch.Tensor | None  # the reference's (None at beta 0: no reference)


def _without_nan(name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores with NaN where skipped, as a checkpoint holds them: it refuses non-finite values."""
    skipped = torch.isnan(values)
    return {name: values.masked_fill(skipped, 0.0), f"{name}_skipped": skipped}


def _with_nan(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return tensors[name].masked_fill(tensors[f"{name}_skipped"], float("nan"))


def kept_tensors(sample_ids: list[int], kept: KeptRollout) -> dict[str, torch.Tensor]:
    """What a later pass reads of a kept rollout, as tensors for a checkpoint."""
    r = kept.rollout
    tensors = {"sample_ids": torch.tensor(sample_ids, dtype=torch.int64), "input_ids": r.input_ids,
               "loss_mask": r.loss_mask, "lengths": r.lengths, "truncated": r.truncated,
               "old_logp": kept.old_logp, **_without_nan("rewards", r.rewards)}
    for name, values in r.reward_parts.items():
        tensors.update(_without_nan(f"reward_parts/{name}", values))
    if r.none_applied is not None:
        tensors["none_applied"] = r.none_applied
    if kept.ref_logp is not None:
        tensors["ref_logp"] = kept.ref_logp
    return tensors


def kept_from_tensors(tensors: dict[str, torch.Tensor], group_size: int,
                      device) -> tuple[list[int], KeptRollout]:
    """`kept_tensors` read back: (sample ids, the kept rollout), its tensors where the
    sampler put them (the rollout's ids, mask, rewards and log-probs on the model's device)."""
    parts = {key.removeprefix("reward_parts/"): _with_nan(tensors, key) for key in tensors
             if key.startswith("reward_parts/")}
    rollout = Rollout(tensors["input_ids"].to(device), tensors["loss_mask"].to(device),
                      _with_nan(tensors, "rewards").to(device), [], group_size, 0.0, 0.0, tensors["lengths"],
                      tensors["truncated"], parts, tensors.get("none_applied"))
    ref_logp = tensors["ref_logp"].to(device) if "ref_logp" in tensors else None
    return tensors["sample_ids"].tolist(), KeptRollout(rollout, tensors["old_logp"].to(device), ref_logp)


class GRPOObjective:
    name = "grpo"
    val_metric = "reward"

    def __init__(self, config: GRPOConfig, tokenizer, reward=None, device="cpu"):
        self.config = config
        self.uses_reference = config.beta > 0  # the trainer keeps it the run's first policy on resume
        scorer = RewardScorer(reward or build_rewards(config.reward, config.reward_weights, device=device),
                              config.reward_errors, section="grpo")
        self.sampler = RolloutSampler(config.sampling, scorer, tokenizer)
        # Several rewards: each one's held-out mean beside their sum (val_reward/<name>, summary.json).
        self.val_metrics = tuple(f"reward/{r.name}" for r in scorer.rewards) if len(scorer.rewards) > 1 else ()
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0
        self.device = torch.device(device)  # the model's: where restored kept rollouts go
        # slot -> (sample ids, rollout with its fixed log-probs) kept for the later passes
        self._kept: dict[int, tuple[list[int], KeptRollout]] = {}
        self.step_warnings = RolloutWarnings("grpo", config.sampling, groups=True)

    def _kept_rollout(self, batch: dict) -> KeptRollout | None:
        if batch.get("reuse_pass", 0) == 0:
            return None
        slot = batch["reuse_slot"]
        last_pass = batch["reuse_pass"] == self.config.iterations - 1
        kept = self._kept.pop(slot, None) if last_pass else self._kept.get(slot)
        if kept is None or kept[0] != batch["sample_ids"].tolist():
            return None
        # Sampled once: its generation time was reported with its first use.
        return replace(kept[1], rollout=replace(kept[1].rollout, generation_s=0.0, scoring_s=0.0))

    def _first_pass(self, model, batch: dict, rollout: Rollout, targets: torch.Tensor,
                    logp: torch.Tensor) -> KeptRollout:
        """pi_old and the reference's log-probs of a newly sampled rollout, kept if later
        passes train on it."""
        cfg = self.config
        ref_logp = reference_token_logps(model, rollout.input_ids, targets) if cfg.beta > 0 else None
        fixed = KeptRollout(rollout, logp.detach(), ref_logp)
        if batch.get("reuse_pass", cfg.iterations - 1) < cfg.iterations - 1:
            # Kept without its texts, which later passes never read (completions.jsonl has them
            # from now): what is kept is then exactly what a checkpoint holds and restores.
            kept = replace(fixed, rollout=replace(rollout, completions=[]))
            self._kept[batch["reuse_slot"]] = (batch["sample_ids"].tolist(), kept)
        return fixed

    def evaluate_batch(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return held_out_reward(self.sampler, model, batch, self.pad_id)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) the trainer saves in each checkpoint: the sampling seeds' position."""
        return {}, {"sampler": self.sampler.state_dict()}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], state: dict, source) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def rank_checkpoint_state(self) -> dict[str, torch.Tensor]:
        """This rank's rollouts kept for the later passes of the block in progress, as
        `slot<s>/<name>` (none between blocks); each rank's are its own prompts', so the
        trainer saves every rank's (`checkpoint.gather_rank_tensors`)."""
        return {f"slot{slot}/{name}": value for slot, (ids, kept) in self._kept.items()
                for name, value in kept_tensors(ids, kept).items()}

    def load_rank_checkpoint_state(self, tensors: dict[str, torch.Tensor]) -> None:
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            slot, name = key.split("/", 1)
            slots.setdefault(int(slot.removeprefix("slot")), {})[name] = value
        self._kept = {slot: kept_from_tensors(each, self.config.sampling.group_size, self.device)
                      for slot, each in slots.items()}

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        cfg = self.config
        kept = self._kept_rollout(batch)
        rollout = kept.rollout if kept is not None else self.sampler.sample(model, batch, self.pad_id)
        scale = cfg.scale_rewards in (True, "group")  # also TRL's names: "group" / "none"
        advantages, valid = group_advantages(rollout.rewards, rollout.group_size, scale, cfg.advantage_eps,
                                             rollout.none_applied)
        targets = shift_targets(rollout.input_ids, rollout.loss_mask)
        trained = (targets != IGNORE_INDEX) & valid[:, None]
        logp = model_logprobs(model, rollout.input_ids, targets)
        if kept is None:
            kept = self._first_pass(model, batch, rollout, targets, logp)
        sequence_mask = trained if cfg.importance_sampling_level == "sequence" else None
        per_token, clipped = clipped_surrogate(
            logp, kept.old_logp, advantages[:, None], cfg.epsilon,
            cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon, sequence_mask=sequence_mask)
        kl = torch.zeros_like(logp)
        if kept.ref_logp is not None:
            kl = k3_kl(logp, kept.ref_logp)
            if cfg.kl_bias_correction:
                # The tokens were sampled from pi_old: weighted by pi / pi_old (unclipped, not
                # detached), the term's gradient is an unbiased one of KL(pi || ref). The plain
                # k3's is, on-policy, that of KL(ref || pi), so they differ even where the ratio is 1.
                kl = kl * policy_ratio(logp, kept.old_logp, sequence_mask)
            per_token = per_token + cfg.beta * kl
        loss_sum, count = normalised(per_token, trained, valid.sum(), cfg.loss_type, cfg.sampling.max_new_tokens)
        denominator = trained.sum().clamp_min(1).item()  # the metrics are per completion token
        metrics = {
            **rollout_metrics(rollout),
            "kl": (kl.detach() * trained).sum().item() / denominator,
            "clip_fraction": (clipped & trained).sum().item() / denominator,
            "skipped_groups": (~valid).sum().item() / rollout.group_size,
            "frac_reward_zero_std": zero_std_fraction(rollout.rewards, rollout.group_size),
        }
        return loss_sum, count, metrics


def build_dataset(cfg, tokenizer):
    splits = build_prompt_splits(cfg, cfg.grpo, tokenizer, "grpo")
    # Each step's micro-batches are served `iterations` times in a row (see the loader).
    splits.train.reuse = (cfg.grpo.iterations, cfg.train.grad_accum)
    if cfg.grpo.iterations > 1:
        splits.identity["iterations"] = cfg.grpo.iterations
    return splits


SPEC = ObjectiveSpec(
    name="grpo", help=HELP["grpo"],
    config_cls=GRPOConfig,
    build_dataset=build_dataset,
    build_objective=lambda cfg, model: GRPOObjective(cfg.grpo, run_tokenizer(cfg),
                                                     device=next(model.parameters()).device),
    describe=lambda cfg: (f"grpo: {cfg.grpo.sampling.group_size} completions per prompt of up to "
                          f"{cfg.grpo.sampling.max_new_tokens} tokens at temperature {cfg.grpo.sampling.temperature:g}, "
                          f"KL beta {cfg.grpo.beta:g}, loss {cfg.grpo.loss_type}"
                          f"{', sequence-level ratio' if cfg.grpo.importance_sampling_level == 'sequence' else ''}"
                          f"{', KL x ratio' if cfg.grpo.kl_bias_correction and cfg.grpo.beta > 0 else ''}"))
