"""GRPO and PPO objectives on a tiny model: rollouts, gradients, metrics, reward errors."""

from __future__ import annotations

import pytest
import torch

from graftlm.errors import GraftError
from graftlm.models import Decoder, ModelConfig
from graftlm.objectives.grpo import GRPOConfig, GRPOObjective
from graftlm.objectives.ppo import PPOConfig, PPOObjective
from graftlm.objectives.rollout import SamplingConfig


@pytest.fixture(scope="module")
def tokenizer():
    from graftlm.tokenizer import train_tokenizer
    return train_tokenizer(iter(["copy: 0 1 2 3 4 5 6 7 8 9"] * 10), 280)


def _policy(tokenizer):
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                                pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.train()


def _batch(tokenizer):
    prompts = ["copy: 1 2", "copy: 3 4"]
    return {"prompt_ids": [tokenizer.encode(p) for p in prompts], "prompts": prompts,
            "rows": [{"answer": "1 2", "source": "t.jsonl:1"}, {"answer": "3 4", "source": "t.jsonl:2"}]}


def _length_reward(completions, prompts, rows):
    return [float(len(c)) for c in completions]


def test_grpo_loss_has_gradients_and_metrics(tokenizer):
    model = _policy(tokenizer)
    cfg = GRPOConfig(sampling=SamplingConfig(group_size=4, max_new_tokens=5), beta=0.1)
    objective = GRPOObjective(cfg, tokenizer, reward=_length_reward)
    total, count, metrics = objective.loss(model, _batch(tokenizer))
    assert count.item() > 0 and torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy at step 0
    for key in ("reward/mean", "reward/std", "completion_length", "time/generation_s", "time/train_s"):
        assert key in metrics
    assert model.training  # sampling put the model back in training mode


def test_grpo_without_kl_runs_no_reference(tokenizer, monkeypatch):
    import graftlm.objectives.grpo as grpo
    monkeypatch.setattr(grpo, "reference_token_logps", lambda *a: pytest.fail("reference used with beta 0"))
    objective = GRPOObjective(GRPOConfig(sampling=SamplingConfig(group_size=2, max_new_tokens=3), beta=0.0),
                              tokenizer, reward=_length_reward)
    objective.loss(_policy(tokenizer), _batch(tokenizer))


def test_grpo_reward_error_names_the_prompt(tokenizer, tmp_path):
    (tmp_path / "bad_reward.py").write_text("def score(completion, prompt):\n    return {'r': 1}\n")
    cfg = GRPOConfig(reward=f"{tmp_path / 'bad_reward.py'}:score",
                     sampling=SamplingConfig(group_size=2, max_new_tokens=3))
    objective = GRPOObjective(cfg, tokenizer)
    with pytest.raises(GraftError, match="prompt 'copy: 1 2'"):
        objective.loss(_policy(tokenizer), _batch(tokenizer))


def test_ppo_trains_policy_loss_and_steps_its_critic(tokenizer):
    model = _policy(tokenizer)
    cfg = PPOConfig(reward="unused", sampling=SamplingConfig(group_size=2, max_new_tokens=4))
    objective = PPOObjective(cfg, tokenizer, model, reward=_length_reward)
    before = [p.detach().clone() for p in objective.critic.parameters()]
    total, count, metrics = objective.loss(model, _batch(tokenizer))
    total.backward()
    assert count.item() > 0 and "value_loss" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, objective.critic.parameters()))
    # The critic is a copy: the policy's weights are not shared with it.
    assert all(p.data_ptr() != q.data_ptr() for p in model.parameters() for q in objective.critic.parameters())
