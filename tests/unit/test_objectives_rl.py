"""GRPO and PPO objectives on a tiny model: rollouts, gradients, metrics, reward errors."""

from __future__ import annotations

import json

import pytest
import torch

from graftlm.errors import GraftError
from graftlm.objectives.grpo import GRPOConfig, GRPOObjective
from graftlm.objectives.ppo import PPOConfig, PPOObjective
from graftlm.objectives.rollout import SamplingConfig
from tests.unit.rl_support import CopyPrompts, length_reward, policy, prompt_batch


def test_grpo_loss_has_gradients_and_metrics(tokenizer):
    model = policy(tokenizer)
    cfg = GRPOConfig(sampling=SamplingConfig(group_size=4, max_new_tokens=5), beta=0.1)
    objective = GRPOObjective(cfg, tokenizer, reward=length_reward)
    total, count, metrics = objective.loss(model, prompt_batch(tokenizer))
    assert count.item() > 0 and torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy at step 0
    for key in ("reward/mean", "reward/std", "completion_length", "time/generation_s", "time/scoring_s"):
        assert key in metrics
    assert model.training  # sampling put the model back in training mode


def test_grpo_without_kl_runs_no_reference(tokenizer, monkeypatch):
    import graftlm.objectives.grpo as grpo
    monkeypatch.setattr(grpo, "reference_token_logps", lambda *a: pytest.fail("reference used with beta 0"))
    objective = GRPOObjective(GRPOConfig(sampling=SamplingConfig(group_size=2, max_new_tokens=3), beta=0.0),
                              tokenizer, reward=length_reward)
    objective.loss(policy(tokenizer), prompt_batch(tokenizer))


def test_grpo_reward_error_names_the_prompt(tokenizer, tmp_path):
    (tmp_path / "bad_reward.py").write_text("def score(completion, prompt):\n    return {'r': 1}\n")
    cfg = GRPOConfig(reward=f"{tmp_path / 'bad_reward.py'}:score",
                     sampling=SamplingConfig(group_size=2, max_new_tokens=3))
    objective = GRPOObjective(cfg, tokenizer)
    with pytest.raises(GraftError, match="prompt 'copy: 1 2'"):
        objective.loss(policy(tokenizer), prompt_batch(tokenizer))


def test_ppo_trains_policy_loss_and_steps_its_critic(tokenizer):
    model = policy(tokenizer)
    cfg = PPOConfig(reward="unused", sampling=SamplingConfig(group_size=2, max_new_tokens=4))
    objective = PPOObjective(cfg, tokenizer, model, reward=length_reward)
    before = [p.detach().clone() for p in objective.critic.parameters()]
    forwards = []
    objective.critic.register_forward_hook(lambda module, args, out: forwards.append(1))
    total, count, metrics = objective.loss(model, prompt_batch(tokenizer))
    total.backward()
    assert count.item() > 0 and "value_loss" in metrics
    # One critic forward gives the old values (detached) and the values its step trains.
    assert forwards == [1]
    assert any(not torch.equal(a, b) for a, b in zip(before, objective.critic.parameters()))
    # The critic is a copy: the policy's weights are not shared with it.
    assert all(p.data_ptr() != q.data_ptr() for p in model.parameters() for q in objective.critic.parameters())


def _constant_reward(completions, prompts, rows):
    return [1.0] * len(completions)


def test_zero_std_fraction_counts_scored_groups_whose_rewards_all_agree():
    from graftlm.objectives.grpo import zero_std_fraction

    nan = float("nan")
    # groups of 2: agree, differ, skipped (left out), agree -> 2 of the 3 scored groups
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, nan, 1.0, 0.5, 0.5])
    assert zero_std_fraction(rewards, 2) == pytest.approx(2 / 3)
    assert zero_std_fraction(torch.tensor([nan, 1.0]), 2) == 0.0


def test_grpo_logs_frac_reward_zero_std_and_clipped_ratio(tokenizer):
    model = policy(tokenizer)
    cfg = GRPOConfig(sampling=SamplingConfig(group_size=4, max_new_tokens=3), beta=0.0)
    _, _, same = GRPOObjective(cfg, tokenizer, reward=_constant_reward).loss(model, prompt_batch(tokenizer))
    assert same["frac_reward_zero_std"] == 1.0
    _, _, varied = GRPOObjective(cfg, tokenizer, reward=length_reward).loss(model, prompt_batch(tokenizer))
    assert varied["frac_reward_zero_std"] < 1.0
    # An untrained model never says EOS in 3 tokens: every completion is cut.
    assert same["completions/clipped_ratio"] == 1.0 and same["completion_length"] == 3.0


def test_clipped_ratio_is_the_share_of_completions_cut_at_max_new_tokens(tokenizer, monkeypatch):
    import graftlm.engine
    from graftlm.engine import Completion

    class Engine:  # the engine's answers: rows 0 and 3 stopped by EOS, rows 1 and 2 cut
        def __init__(self, model, tokenizer):
            pass

        def generate(self, prompts, params):
            eos = tokenizer.eos_id
            return [Completion([5, eos], "a", "stop", 3), Completion([5, 6, 7], "abc", "length", 3),
                    Completion([5, 6, 7], "abc", "length", 3), Completion([eos], "", "stop", 3)]

    monkeypatch.setattr(graftlm.engine, "Engine", Engine)
    cfg = GRPOConfig(sampling=SamplingConfig(group_size=2, max_new_tokens=3), beta=0.0)
    _, _, metrics = GRPOObjective(cfg, tokenizer, reward=length_reward).loss(policy(tokenizer), prompt_batch(tokenizer))
    assert metrics["completions/clipped_ratio"] == 0.5
    assert metrics["frac_reward_zero_std"] == 0.0  # lengths 1 vs 3, 3 vs 0: both groups differ


def test_rollout_warnings_print_once_then_at_most_every_n_steps_with_counts():
    from graftlm.objectives.rollout import RolloutWarnings

    warn = RolloutWarnings("grpo", SamplingConfig(group_size=4, max_new_tokens=64), groups=True, every=10)

    def step(n, zero_std=0.0, clipped=0.0):
        return warn({"step": n, "train_frac_reward_zero_std": zero_std, "train_completions/clipped_ratio": clipped,
                     "train_reward/mean": 0.0})

    assert step(1) == [] and step(2, zero_std=0.5, clipped=0.4) == []  # some groups agree: normal
    lines = step(3, zero_std=1.0)
    assert len(lines) == 1 and lines[0].startswith("warning: step 3: every prompt's 4 completions got the same "
                                                   "reward (mean reward 0")
    assert "--grpo.sampling.temperature" in lines[0] and "--grpo.sampling.group-size" in lines[0]
    assert "--grpo.reward" in lines[0]
    assert all(step(n, zero_std=1.0) == [] for n in range(4, 13))  # within 10 steps: quiet
    lines = step(13, zero_std=1.0)
    assert len(lines) == 1 and lines[0].startswith("warning: 10 of steps 4-13: every prompt's")
    clipped = step(14, clipped=0.75)
    assert clipped == ["warning: step 14: 75% of completions stopped at --grpo.sampling.max-new-tokens 64 "
                       "(train_completions/clipped_ratio) and were scored cut off; raise "
                       "--grpo.sampling.max-new-tokens, or fine-tune the model to end its answers (SFT on answers "
                       "that end with EOS)"]
    # Both at once: the cut completions first, and the equal rewards blamed on them.
    fresh = RolloutWarnings("grpo", SamplingConfig(group_size=4, max_new_tokens=8), groups=True)
    both = fresh({"step": 1, "train_frac_reward_zero_std": 1.0, "train_completions/clipped_ratio": 1.0,
                  "train_reward/mean": 0.0})
    assert len(both) == 2 and "stopped at --grpo.sampling.max-new-tokens 8" in both[0]
    assert "cut completions (above) likely all scored alike: raise --grpo.sampling.max-new-tokens first" in both[1]
    # PPO: no groups, so no zero-std warning; its own section's options.
    ppo = RolloutWarnings("ppo", SamplingConfig(group_size=1, max_new_tokens=8), groups=False)
    lines = ppo({"step": 1, "train_frac_reward_zero_std": 1.0, "train_completions/clipped_ratio": 1.0})
    assert len(lines) == 1 and "--ppo.sampling.max-new-tokens 8" in lines[0]


def test_grpo_run_warns_once_when_no_step_can_learn(tokenizer, tmp_path, capsys):
    from graftlm.data.loader import ResumableLoader
    from graftlm.optim import OptimConfig
    from graftlm.trainer import TrainConfig, Trainer

    cfg = GRPOConfig(sampling=SamplingConfig(group_size=2, max_new_tokens=3), beta=0.0)
    train = TrainConfig(max_steps=3, batch_size=2, precision="fp32", eval_every=0, save_every=0)
    Trainer(policy(tokenizer), GRPOObjective(cfg, tokenizer, reward=_constant_reward),
            ResumableLoader(CopyPrompts(tokenizer, 8), 2), train, OptimConfig(warmup_steps=0), device=torch.device("cpu"),
            run_dir=tmp_path, tensorboard=False).fit()
    out = capsys.readouterr().out  # 3 steps that learn nothing: one line, not three
    assert out.count("got the same reward") == 1 and "warning: step 1: every prompt's 2 completions" in out
    assert out.count("stopped at --grpo.sampling.max-new-tokens 3") == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_frac_reward_zero_std"] for r in records] == [1.0] * 3
    assert all(r["train_completions/clipped_ratio"] >= 0.5 for r in records)  # most cut, every step
