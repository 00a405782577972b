"""graftlm's GRPO loss and its gradients against TRL 1.16's GRPOTrainer, for each loss type.

TRL computes the loss in `GRPOTrainer._compute_loss(model, inputs)` for one micro-batch,
already divided for gradient accumulation (its "dapo" by the token count of the whole
accumulated batch, `num_items_in_batch`), so the step's gradient is the sum of its
micro-batches' backward passes. We build a bare trainer with only the attributes that
method reads and run it on a tiny transformers Llama over two micro-batches of different
token counts (where the loss types differ); graftlm's objective runs on the same weights
loaded into its decoder, over the same rollouts, and the step is summed and divided as
graftlm's trainer does (`Trainer.train_step`: summed loss / summed count).

The rollouts are reused ones (`iterations` 2, a later pass) so that pi_old, given, differs
from the policy and the clip bites; the reference's log-probs are given too (beta > 0).
TRL's `use_bias_correction_kl` (default True: the KL term times the policy ratio) is set
as graftlm's `kl_bias_correction` (default False: the plain k3 estimate): off for each
loss type, on at the token and the sequence level.
"""

from __future__ import annotations

import types
from collections import defaultdict
from contextlib import nullcontext

import pytest
import torch

from graftlm.models.hf import load_model
from graftlm.objectives.configs import SamplingConfig
from graftlm.objectives.grpo import GRPOConfig, GRPOObjective, KeptRollout
from graftlm.objectives.rollout import Rollout
from tests.conftest import make_hf_model

GROUP, MAX_NEW, BETA, EPS, EPS_HIGH = 2, 8, 0.1, 0.2, 0.28
# Two micro-batches of 2 prompts x 2 completions; a micro-batch's prompts share a length
# (TRL left-pads prompts, and a transformers model does not shift positions for that).
MICRO_BATCHES = [dict(prompt_len=4, completion_lens=[5, 2, 7, 3], rewards=[1.0, 0.0, 0.5, 2.0]),
                 dict(prompt_len=6, completion_lens=[1, 6, 2, 2], rewards=[0.0, 1.0, 1.0, 0.25])]


def _micro_batches(policy, seed: int = 0) -> list[dict]:
    """Each micro-batch's prompt and completion ids, rewards, and pi_old's and the
    reference's log-probs in TRL's layout ([N, C], one per completion token, 0 on padding):
    the policy's own, moved by noise large enough to clip."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in MICRO_BATCHES:
        n, p, lens = len(spec["completion_lens"]), spec["prompt_len"], spec["completion_lens"]
        c = max(lens)
        prompts = torch.randint(3, 256, (n // GROUP, p), generator=g).repeat_interleave(GROUP, 0)
        completion_mask = torch.tensor([[1] * k + [0] * (c - k) for k in lens])
        completions = torch.randint(3, 256, (n, c), generator=g) * completion_mask
        with torch.no_grad():
            own = _graft_logps(policy, prompts, completions, completion_mask)
        old = (own + 0.3 * torch.randn(own.shape, generator=g)) * completion_mask
        ref = (own + 0.5 * torch.randn(own.shape, generator=g)) * completion_mask
        out.append(dict(prompt_ids=prompts, completion_ids=completions, completion_mask=completion_mask,
                        rewards=torch.tensor(spec["rewards"]), old=old, ref=ref))
    return out


def _graft_layout(prompts, completions, completion_mask):
    """graftlm's rollout rows (prompt + completion, right-padded) and completion mask."""
    input_ids = torch.cat([prompts, completions], 1)
    loss_mask = torch.cat([torch.zeros_like(prompts, dtype=torch.bool), completion_mask.bool()], 1)
    return input_ids, loss_mask


def _to_graft_positions(per_token: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """TRL's [N, C] per completion token -> graftlm's [N, P + C], where position t holds
    log p(token t + 1): completion token j is predicted at P - 1 + j."""
    out = torch.zeros(per_token.shape[0], prompt_len + per_token.shape[1])
    out[:, prompt_len - 1:prompt_len - 1 + per_token.shape[1]] = per_token
    return out


def _graft_logps(policy, prompts, completions, completion_mask) -> torch.Tensor:
    from graftlm.objectives.logprobs import shift_targets
    from graftlm.objectives.sft import model_logprobs
    input_ids, loss_mask = _graft_layout(prompts, completions, completion_mask)
    logp = model_logprobs(policy, input_ids, shift_targets(input_ids, loss_mask))
    p = prompts.shape[1]
    return logp[:, p - 1:p - 1 + completions.shape[1]] * completion_mask


def _trl_advantages(rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """TRL's group-relative advantages (from `_generate_and_score_completions`, which has no
    entry point of its own): reward - group mean, / (group std + 1e-4) unless "none"."""
    from trl.trainer.utils import nanstd
    grouped = rewards.view(-1, GROUP)
    advantages = (grouped - grouped.mean(-1, keepdim=True))
    if scale_rewards != "none":
        advantages = advantages / (nanstd(grouped, dim=1).unsqueeze(-1) + 1e-4)
    return advantages.reshape(-1)


def _bare_trl_trainer(model, loss_type: str, level: str, grad_accum: int, kl_bias_correction: bool):
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    trainer = object.__new__(GRPOTrainer)
    fake_accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), autocast=nullcontext, num_processes=1, is_main_process=True, gather=lambda t: t,
        gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t)
    attrs = dict(accelerator=fake_accelerator, model=model, loss_type=loss_type, importance_sampling_level=level,
                 beta=BETA, epsilon_low=EPS, epsilon_high=EPS_HIGH, max_completion_length=MAX_NEW,
                 current_gradient_accumulation_steps=grad_accum, aux_loss_enabled=False, top_entropy_quantile=1.0,
                 off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
                 _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                 # steps_per_generation = grad_accum: one generation batch per optimizer step, TRL's default
                 args=types.SimpleNamespace(use_bias_correction_kl=kl_bias_correction, delta=None,
                                            steps_per_generation=grad_accum))
    for key, value in attrs.items():  # `model` is a property of transformers' Trainer
        trainer.__dict__[key] = value
    return trainer


def _trl_step(hf_policy, micro_batches, loss_type, level, scale_rewards, kl_bias_correction):
    trainer = _bare_trl_trainer(hf_policy, loss_type, level, len(micro_batches), kl_bias_correction)
    # `num_items_in_batch`: completion tokens of the whole generation batch (all micro-batches).
    items = sum(mb["completion_mask"].sum() for mb in micro_batches)
    total = 0.0
    for mb in micro_batches:
        inputs = {"prompt_ids": mb["prompt_ids"], "prompt_mask": torch.ones_like(mb["prompt_ids"]),
                  "completion_ids": mb["completion_ids"], "completion_mask": mb["completion_mask"],
                  "advantages": _trl_advantages(mb["rewards"], scale_rewards),
                  "old_per_token_logps": mb["old"], "ref_per_token_logps": mb["ref"], "num_items_in_batch": items}
        loss = trainer._compute_loss(hf_policy, inputs)
        loss.backward()
        total += loss.item()
    return total, trainer._metrics["train"]


def _graft_objective(loss_type, level, scale_rewards, micro_batches, kl_bias_correction=False) -> GRPOObjective:
    """The objective holding each micro-batch as a rollout kept for a later pass."""
    cfg = GRPOConfig(sampling=SamplingConfig(group_size=GROUP, max_new_tokens=MAX_NEW), beta=BETA, epsilon=EPS,
                     epsilon_high=EPS_HIGH, iterations=2, loss_type=loss_type, importance_sampling_level=level,
                     scale_rewards=scale_rewards, kl_bias_correction=kl_bias_correction)
    cfg.validate()
    objective = GRPOObjective(cfg, tokenizer=None, reward=lambda completions, prompts, rows: [0.0] * len(prompts))
    for slot, mb in enumerate(micro_batches):
        input_ids, loss_mask = _graft_layout(mb["prompt_ids"], mb["completion_ids"], mb["completion_mask"])
        p = mb["prompt_ids"].shape[1]
        n = input_ids.shape[0]
        rollout = Rollout(input_ids, loss_mask, mb["rewards"], [], GROUP, 0.0, 0.0,
                          p + mb["completion_mask"].sum(-1), torch.zeros(n, dtype=torch.bool))
        kept = KeptRollout(rollout, _to_graft_positions(mb["old"], p), _to_graft_positions(mb["ref"], p))
        objective._kept[slot] = (_sample_ids(slot, n), kept)
    return objective


def _sample_ids(slot: int, rows: int) -> list[int]:
    prompts = rows // GROUP
    return list(range(slot * prompts, (slot + 1) * prompts))


def _graft_step(policy, objective, micro_batches):
    """As `Trainer.train_step` on one rank: each micro-batch's sum back-propagated, then the
    gradients and the loss divided by the counts summed over the step."""
    loss_sum, count, clip = 0.0, 0.0, []
    for slot, mb in enumerate(micro_batches):
        batch = {"reuse_pass": 1, "reuse_slot": slot,
                 "sample_ids": torch.tensor(_sample_ids(slot, mb["prompt_ids"].shape[0]))}
        part_sum, part_count, metrics = objective.loss(policy, batch)
        part_sum.backward()
        loss_sum, count = loss_sum + part_sum.item(), count + float(part_count)
        clip.append(metrics["clip_fraction"])
    for p in policy.parameters():
        p.grad.div_(max(count, 1.0))
    return loss_sum / max(count, 1.0), clip


CASES = [("dapo", "token", True), ("bnpo", "token", True), ("grpo", "token", True), ("dr_grpo", "token", True),
         ("luspo", "token", "group"), ("grpo", "sequence", "group"), ("dapo", "sequence", True),
         ("luspo", "sequence", True), ("dapo", "token", "none"), ("grpo", "token", False)]


def _check_against_trl(tmp_path, loss_type, level, scale_rewards, kl_bias_correction=False):
    """Both steps' loss and gradients on the same weights and rollouts; graftlm's policy,
    its gradients in place, and its step's loss, returned."""
    import transformers
    make_hf_model("llama", tmp_path / "policy", seed=0)
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    hf_policy.train()  # no dropout in this config; TRL reads .training for its mode
    policy = load_model(tmp_path / "policy").train()
    micro_batches = _micro_batches(policy)

    trl_scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    trl_loss, trl_metrics = _trl_step(hf_policy, micro_batches, loss_type, level, trl_scale, kl_bias_correction)
    objective = _graft_objective(loss_type, level, scale_rewards, micro_batches, kl_bias_correction)
    loss, clip = _graft_step(policy, objective, micro_batches)

    assert abs(loss - trl_loss) <= 1e-5, (loss, trl_loss)
    # The clip bit on some tokens but not all, in both.
    assert 0 < sum(clip) and all(c < 1 for c in clip), clip
    assert sum(trl_metrics["clip_ratio/region_mean"]) > 0
    hf_grads = {name: p.grad for name, p in hf_policy.named_parameters()}
    for name, p in policy.named_parameters():
        want = hf_grads[name if name.startswith("lm_head") else "model." + name]
        assert p.grad is not None and want is not None, name
        assert (p.grad - want).abs().max().item() <= 1e-5, name
    assert sum(1 for _ in policy.parameters()) == len(hf_grads)
    assert max(p.grad.abs().max().item() for p in policy.parameters()) > 1e-4
    return policy, micro_batches, loss


@pytest.mark.parametrize("loss_type,level,scale_rewards", CASES)
def test_grpo_loss_and_gradients_match_trl(loss_type, level, scale_rewards, tmp_path):
    _check_against_trl(tmp_path, loss_type, level, scale_rewards)


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_grpo_kl_bias_correction_matches_trl(loss_type, level, tmp_path):
    """`kl_bias_correction` against TRL's `use_bias_correction_kl` (its default); and the
    correction moves graftlm's loss and gradients on these rollouts well past the tolerance,
    so a KL term left unweighted would not match."""
    policy, micro_batches, loss = _check_against_trl(tmp_path, loss_type, level, True, kl_bias_correction=True)
    corrected = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    plain_loss, _ = _graft_step(policy, _graft_objective(loss_type, level, True, micro_batches), micro_batches)
    assert abs(loss - plain_loss) > 1e-4, (loss, plain_loss)
    assert max((p.grad - c).abs().max().item() for p, c in zip(policy.parameters(), corrected)) > 1e-4


def test_loss_types_differ_on_these_rollouts(tmp_path):
    """The micro-batches above tell the loss types apart: a parity test that matched one
    type's normalisation under another's name would fail."""
    make_hf_model("llama", tmp_path / "policy", seed=0)
    policy = load_model(tmp_path / "policy").train()
    micro_batches = _micro_batches(policy)
    losses = {}
    for loss_type in ("dapo", "bnpo", "grpo", "dr_grpo", "luspo"):
        policy.zero_grad(set_to_none=True)
        losses[loss_type], _ = _graft_step(policy, _graft_objective(loss_type, "token", True, micro_batches),
                                           micro_batches)
    values = sorted(losses.values())
    assert all(b - a > 1e-4 for a, b in zip(values, values[1:])), losses  # 10x the parity tolerance
