"""PPO: classic RLHF against a reward model, with a value model and GAE.

Design choices:
- Rollouts come from `rollout.py` (the same sampling and scoring as GRPO), usually one
  completion per prompt; the reward is a reward model directory (`graft reward`).
- Per-token reward: -kl_coef * (log pi_old - log pi_ref) at every completion token, plus
  the reward model's score at the last one (the KL-shaped reward of InstructGPT).
- The critic is a `ScalarHeadModel` giving a value per position, initialised from the
  reward model (or `value_model`). Advantages come from generalised advantage
  estimation (gamma, lambda) over the completion tokens and are whitened per rollout;
  returns = advantages + old values.
- The critic belongs to the objective, with its own AdamW: the trainer optimises the
  policy only, so the value loss (clipped, as in PPO) is back-propagated and stepped
  here, once per micro-batch; under `torch.no_grad` (validation) it is not. Under DDP /
  FSDP it is not wrapped: its gradients are averaged over ranks before each step, so
  that the ranks' critics stay identical. Checkpoints hold it whole with its optimizer
  state and the rollout counter (`checkpoint_state`, the trainer's `objective.*`);
  `final/` holds the policy only.
- The policy loss is the clipped surrogate (shared with GRPO), summed over completion
  tokens; the count is their number. The KL is in the reward, not in the loss.
- The reported `loss` is PPO's whole objective, policy loss + value loss (per completion
  token): with whitened advantages the policy loss is ~0 by construction at each rollout's
  first pass, so on its own it would read as "nothing trained". The two parts are logged
  too (`policy_loss`, `value_loss`, as TRL's loss/policy_avg and loss/value_avg; the
  progress line shows `vf`). The value part joins the returned sum detached: it moves the
  number, not the policy's gradient, since the critic is stepped here by its own optimizer
  (its weight is its learning rate, `value_lr`: there is no vf_coef). Under `torch.no_grad`
  there is no value loss and the sum is the policy's.
- Validation: greedy completions of the held-out prompts, scored by the reward
  (`val_reward`, see `rollout.held_out_reward`); the critic is not involved.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from graftlm import checkpoint as ckpt
from graftlm.objectives.grpo import clipped_surrogate, reference_token_logps
from graftlm.objectives.logprobs import IGNORE_INDEX, shift_targets
from graftlm.objectives import ObjectiveSpec
from graftlm.objectives.configs import HELP, PPOConfig
from graftlm.parallel import average_gradients
from graftlm.objectives.rollout import (RolloutSampler, RolloutWarnings, build_prompt_splits, held_out_reward,
                                        rollout_metrics, run_tokenizer)
from graftlm.objectives.sft import model_logprobs
from graftlm.rewards import RewardScorer, build_reward


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> torch.Tensor:
    """Generalised advantage estimates [N, T] over the positions in `mask` (contiguous per row)."""
    n, t = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(n, device=rewards.device, dtype=rewards.dtype)
    mask = mask.to(rewards.dtype)
    for i in reversed(range(t)):
        follows = mask[:, i + 1] if i + 1 < t else torch.zeros_like(running)
        next_value = values[:, i + 1] * follows if i + 1 < t else torch.zeros_like(running)
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        running = delta + gamma * lam * running * follows
        advantages[:, i] = running * mask[:, i]
    return advantages


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    values = x[mask]
    if values.numel() < 2:
        return x * mask
    return (x - values.mean()) / (values.std() + eps) * mask


def build_critic(config: PPOConfig, policy) -> torch.nn.Module:
    from graftlm.models.heads import ScalarHeadModel, is_scalar_model_dir, load_scalar_model

    source = config.value_model or (config.reward if Path(config.reward).is_dir() else None)
    param = next(policy.parameters())
    if source and is_scalar_model_dir(source):
        critic = load_scalar_model(source, dtype=param.dtype, device=param.device)
    else:
        backbone = copy.deepcopy(getattr(policy, "module", policy))
        critic = ScalarHeadModel.from_decoder(backbone, pad_token_id=backbone.config.pad_token_id or 0)
    return critic.train().requires_grad_(True)


class PPOObjective:
    name = "ppo"
    val_metric = "reward"

    def __init__(self, config: PPOConfig, tokenizer, policy, reward=None, device="cpu"):
        self.config = config
        self.uses_reference = config.kl_coef > 0  # the trainer keeps it the run's first policy on resume
        scorer = RewardScorer(reward or build_reward(config.reward, device=device), config.reward_errors,
                              section="ppo")
        self.sampler = RolloutSampler(config.sampling, scorer, tokenizer)
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0
        self.critic = build_critic(config, policy)
        trainable = [(n, p) for n, p in self.critic.named_parameters() if p.requires_grad]
        # Named groups: checkpoints key its state by parameter name, as the policy's.
        self.critic_optimizer = torch.optim.AdamW(
            [{"params": [p for _, p in trainable], "param_names": [n for n, _ in trainable]}],
            lr=config.value_lr, weight_decay=0.0)
        # Completions cut at max_new_tokens (PPO's advantages are not per group).
        self.step_warnings = RolloutWarnings("ppo", config.sampling, groups=False)

    def evaluate_batch(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return held_out_reward(self.sampler, model, batch, self.pad_id)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) the trainer saves in each checkpoint: the critic, its optimizer
        state and the rollout counter. Every rank's critic is the same, so one copy."""
        optimizer_tensors, optimizer_meta = ckpt.optimizer_files(self.critic_optimizer)
        tensors = {**{f"critic/{k}": v for k, v in ckpt.model_tensors(self.critic, trainable_only=False).items()},
                   **{f"critic_optimizer/{k}": v for k, v in optimizer_tensors.items()}}
        return tensors, {"sampler": self.sampler.state_dict(), "critic_optimizer": optimizer_meta}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], state: dict, source) -> None:
        def under(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        ckpt.load_model_tensors(self.critic, under("critic/"), source)
        ckpt.load_optimizer_files(self.critic_optimizer, under("critic_optimizer/"), state["critic_optimizer"],
                                  source)
        # The saved groups carry the saved learning rate; a resume with a new --ppo.value-lr uses it.
        for group in self.critic_optimizer.param_groups:
            group["lr"] = self.config.value_lr
        self.sampler.load_state_dict(state["sampler"])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        cfg = self.config
        rollout = self.sampler.sample(model, batch, self.pad_id)
        valid = rollout.valid
        ids = rollout.input_ids
        targets = shift_targets(ids, rollout.loss_mask)
        actions = (targets != IGNORE_INDEX) & valid[:, None]

        logp = model_logprobs(model, ids, targets)
        old_logp = logp.detach()
        training = torch.is_grad_enabled()
        # The critic's one forward: before its step, its values are also the old values.
        started = time.perf_counter()
        values = self.critic(ids, per_token=True).float() if training else None
        critic_forward_s = time.perf_counter() - started
        with torch.no_grad():
            ref_logp = reference_token_logps(model, ids, targets) if cfg.kl_coef > 0 else old_logp
            old_values = values.detach() if training else self.critic(ids, per_token=True).float()
            kl = (old_logp - ref_logp) * actions
            token_rewards = -cfg.kl_coef * kl
            last = actions.float().cumsum(-1).argmax(-1)  # last action position of each row
            score = torch.nan_to_num(rollout.rewards)
            token_rewards[torch.arange(ids.shape[0], device=ids.device), last] += score * valid
            advantages = gae(token_rewards, old_values * actions, actions, cfg.gamma, cfg.lam)
            returns = advantages + old_values
            if cfg.whiten_advantages:
                advantages = whiten(advantages, actions)

        per_token, clipped = clipped_surrogate(logp, old_logp, advantages, cfg.epsilon, cfg.epsilon)
        count = actions.sum()
        denominator = count.clamp_min(1).item()
        policy_sum = (per_token * actions).sum()
        metrics = {**rollout_metrics(rollout), "kl": kl.sum().item() / denominator,
                   "clip_fraction": (clipped & actions).sum().item() / denominator,
                   "policy_loss": policy_sum.item() / denominator}
        if not training:
            return policy_sum, count, metrics
        metrics.update(self._critic_step(values, old_values, returns, actions, critic_forward_s))
        # The whole objective as reported (see the module docstring): the value loss, per
        # completion token like the policy's, is added detached (no gradient to the policy).
        value_sum = torch.tensor(metrics["value_loss"], device=policy_sum.device, dtype=policy_sum.dtype) * count
        return policy_sum + value_sum, count, metrics

    def _critic_step(self, values, old_values, returns, actions, forward_s: float) -> dict:
        start = time.perf_counter()
        clipped = old_values + (values - old_values).clamp(-self.config.value_clip, self.config.value_clip)
        losses = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
        value_loss = (losses * actions).sum() / actions.sum().clamp_min(1)
        self.critic_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        # The critic is not wrapped in DDP / FSDP (the trainer wraps the policy only), so
        # nothing else keeps its replicas equal: every rank steps on the average gradient.
        average_gradients(self.critic.parameters())
        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 1.0)
        self.critic_optimizer.step()
        return {"value_loss": value_loss.item(), "time/critic_s": forward_s + time.perf_counter() - start}


SPEC = ObjectiveSpec(
    name="ppo", help=HELP["ppo"],
    config_cls=PPOConfig,
    build_dataset=lambda cfg, tokenizer: build_prompt_splits(cfg, cfg.ppo, tokenizer, "ppo"),
    build_objective=lambda cfg, model: PPOObjective(cfg.ppo, run_tokenizer(cfg), model,
                                                    device=next(model.parameters()).device))
