"""GRPO `iterations` > 1 reuses rollouts (and their pi_old and reference log-probs) without
skipping a prompt; GRPO / PPO validate by the greedy held-out reward (`val_reward` in
metrics.jsonl and summary.json)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from graftlm.cli import main
from graftlm.data.loader import ResumableLoader
from graftlm.models import Decoder, ModelConfig
from graftlm.objectives.grpo import (GRPOConfig, GRPOObjective, clipped_surrogate, group_advantages,
                                     reference_token_logps)
from graftlm.objectives.logprobs import IGNORE_INDEX, shift_targets
from graftlm.objectives.ppo import PPOConfig, PPOObjective
from graftlm.objectives.rollout import SamplingConfig, collate_prompts
from graftlm.objectives.sft import model_logprobs
from graftlm.optim import OptimConfig
from graftlm.trainer import TrainConfig, Trainer

PROMPTS = [f"copy: {a} {b}" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (9, 0), (2, 4))]


def _tokenizer():
    from graftlm.tokenizer import train_tokenizer
    return train_tokenizer(iter(["copy: 0 1 2 3 4 5 6 7 8 9"] * 10), 280)


def _policy(tokenizer):
    model = Decoder(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                                pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.train()


class Prompts:
    def __init__(self, tokenizer, prompts, reuse=None):
        self.items = [{"prompt_ids": tokenizer.encode(p), "prompt_text": p, "row": {"answer": str(i)}}
                      for i, p in enumerate(prompts)]
        if reuse:
            self.reuse = reuse

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    collate = staticmethod(collate_prompts)


class Indices:
    def __init__(self, n, reuse):
        self.n, self.reuse = n, reuse

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor(i)}


def test_loader_serves_each_block_k_times_and_every_sample_once_per_epoch():
    loader = ResumableLoader(Indices(12, reuse=(3, 2)), batch_size=2, seed=1)
    batches = [loader.next_batch() for _ in range(18)]  # 3 passes of 3 blocks of 2 batches
    ids = [b["sample_ids"].tolist() for b in batches]
    for block in range(3):
        first = ids[block * 6:block * 6 + 2]
        assert ids[block * 6 + 2:block * 6 + 4] == first and ids[block * 6 + 4:block * 6 + 6] == first
        assert [(b["reuse_pass"], b["reuse_slot"]) for b in batches[block * 6:block * 6 + 6]] == \
            [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    fresh = [i for b, batch in zip(ids, batches) if batch["reuse_pass"] == 0 for i in b]
    assert sorted(fresh) == list(range(12))  # one epoch, no sample skipped or repeated

    # Resume mid-block (after pass 1, slot 0) serves exactly the same batches.
    loader = ResumableLoader(Indices(12, reuse=(3, 2)), batch_size=2, seed=1)
    for _ in range(9):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = ResumableLoader(Indices(12, reuse=(3, 2)), batch_size=2, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["sample_ids"].tolist() for _ in range(9)] == ids[9:]


def test_grpo_iterations_2_samples_every_training_prompt_of_an_epoch():
    tokenizer = _tokenizer()
    seen: list[str] = []

    def reward(completions, prompts, rows):
        seen.extend(prompts)
        return [float(len(c)) for c in completions]

    cfg = GRPOConfig(sampling=SamplingConfig(group_size=2, max_new_tokens=4), beta=0.0, iterations=2)
    objective = GRPOObjective(cfg, tokenizer, reward=reward)
    # The reuse block is the step's micro-batches, as `grpo.build_dataset` sets it.
    loader = ResumableLoader(Prompts(tokenizer, PROMPTS, reuse=(2, 2)), batch_size=1, seed=0)
    model = _policy(tokenizer)
    train = TrainConfig(max_steps=6, batch_size=1, grad_accum=2, precision="fp32", eval_every=0, save_every=0)
    Trainer(model, objective, loader, train, OptimConfig(lr=1e-2, warmup_steps=0), device=torch.device("cpu"),
            tensorboard=False).fit()
    # 6 steps x 2 micro-batches = 12 micro-batches = 6 prompts sampled once, trained on twice.
    assert sorted(set(seen)) == sorted(PROMPTS)
    assert len(seen) == len(PROMPTS) * 2  # each prompt's group of 2, sampled once
    assert loader.epoch == 1 and loader.position == 0


def test_grpo_reused_rollout_keeps_pi_old_from_sampling_time():
    tokenizer = _tokenizer()
    cfg = GRPOConfig(sampling=SamplingConfig(group_size=4, max_new_tokens=5), beta=0.0, iterations=2,
                     epsilon=0.05)
    calls = []
    objective = GRPOObjective(cfg, tokenizer, reward=lambda c, p, r: calls.append(1) or [float(len(x)) for x in c])
    model = _policy(tokenizer)
    batch = collate_prompts(Prompts(tokenizer, PROMPTS[:2]).items)
    batch["sample_ids"] = torch.tensor([0, 1])
    first, _, _ = objective.loss(model, {**batch, "reuse_pass": 0, "reuse_slot": 0})
    rollout = objective._kept[0][1].rollout
    targets = shift_targets(rollout.input_ids, rollout.loss_mask)
    with torch.no_grad():
        old = model_logprobs(model, rollout.input_ids, targets)
    # Kept: the sampling policy's own log-probs, detached.
    kept_old = objective._kept[0][1].old_logp
    assert not kept_old.requires_grad and torch.allclose(kept_old, old, atol=1e-6)
    # The first pass is on-policy (ratio 1). Its loss may well be 0 (equally long completions:
    # each group's advantages sum to 0 over as many tokens), its gradient is the policy gradient's.
    first.backward()
    assert max(p.grad.abs().max().item() for p in model.parameters()) > 1e-4

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # an optimizer step, large enough to leave the clip range
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.zero_grad(set_to_none=True)
    total, _, metrics = objective.loss(model, {**batch, "reuse_pass": 1, "reuse_slot": 0})
    total.backward()
    got = [p.grad.clone() for p in model.parameters()]
    assert len(calls) == 1  # the second pass sampled nothing
    assert metrics["clip_fraction"] > 0  # the ratio to pi_old is not 1
    assert 0 not in objective._kept  # freed after its last pass

    # The second pass: the moved policy's clipped surrogate against pi_old of sampling time,
    # in value and gradient. (pi_old taken anew at this pass would make the ratio 1, unclipped.)
    model.zero_grad(set_to_none=True)
    new = model_logprobs(model, rollout.input_ids, targets)
    advantages, valid = group_advantages(rollout.rewards, 4)
    per_token, _ = clipped_surrogate(new, old, advantages[:, None], 0.05, 0.05)
    trained = (targets != IGNORE_INDEX) & valid[:, None]
    want = (per_token * trained).sum()
    want.backward()
    assert torch.allclose(total, want, atol=1e-5)
    for p, grad in zip(model.parameters(), got):
        assert torch.allclose(grad, p.grad, atol=1e-6)


class RecomputingReference(GRPOObjective):
    """GRPO as it was: a reused rollout's reference log-probs computed again on each pass."""

    def __init__(self, *args, model, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = model

    def _kept_rollout(self, batch):
        kept = super()._kept_rollout(batch)
        if kept is None:
            return None
        rollout = kept.rollout
        targets = shift_targets(rollout.input_ids, rollout.loss_mask)
        return replace(kept, ref_logp=reference_token_logps(self.model, rollout.input_ids, targets))


def _length_reward(completions, prompts, rows):
    return [float(len(c)) for c in completions]


def _grpo_run_with_kl(run_dir, tokenizer, objective_class) -> list[dict]:
    """metrics.jsonl of 6 steps of 2 micro-batches at 3 iterations: 4 rollouts, each
    trained on in 3 passes, with the KL to the reference in the loss."""
    model = _policy(tokenizer)
    cfg = GRPOConfig(sampling=SamplingConfig(group_size=2, max_new_tokens=4), beta=0.5, iterations=3)
    extra = {"model": model} if objective_class is RecomputingReference else {}
    objective = objective_class(cfg, tokenizer, reward=_length_reward, **extra)
    loader = ResumableLoader(Prompts(tokenizer, PROMPTS[:4], reuse=(3, 2)), batch_size=1, seed=0)
    train = TrainConfig(max_steps=6, batch_size=1, grad_accum=2, precision="fp32", eval_every=0, save_every=0)
    Trainer(model, objective, loader, train, OptimConfig(lr=3e-2, warmup_steps=0), device=torch.device("cpu"),
            run_dir=run_dir, tensorboard=False).fit()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_iterations_run_the_reference_once_per_rollout_with_the_same_losses(tmp_path, monkeypatch):
    import graftlm.adapters

    forwards = {}
    real_reference = graftlm.adapters.reference

    def counted_reference(model):
        forwards[run] = forwards.get(run, 0) + 1
        return real_reference(model)

    monkeypatch.setattr(graftlm.adapters, "reference", counted_reference)
    tokenizer = _tokenizer()
    records = {}
    for run, objective_class in (("kept", GRPOObjective), ("again", RecomputingReference)):
        records[run] = _grpo_run_with_kl(tmp_path / run, tokenizer, objective_class)
    assert forwards == {"kept": 4, "again": 12}  # 4 rollouts: k - 1 = 2 fewer forwards each
    assert len(records["kept"]) == len(records["again"]) == 6
    assert max(r["train_kl"] for r in records["kept"]) > 0  # the policy moved away from the reference
    for kept, again in zip(records["kept"], records["again"]):
        assert kept["loss"] == pytest.approx(again["loss"], rel=1e-6, abs=1e-9)
        assert kept["train_kl"] == pytest.approx(again["train_kl"], rel=1e-6, abs=1e-12)


def test_held_out_reward_is_the_mean_greedy_reward():
    from graftlm.engine import Engine, SamplingParams

    tokenizer = _tokenizer()

    def reward(completions, prompts, rows):
        return [len(c) + float(r["answer"]) for c, r in zip(completions, rows)]

    val = Prompts(tokenizer, PROMPTS[:5])
    model = _policy(tokenizer)
    for objective in (GRPOObjective(GRPOConfig(sampling=SamplingConfig(group_size=2, max_new_tokens=5)),
                                    tokenizer, reward=reward),
                      PPOObjective(PPOConfig(reward="unused", sampling=SamplingConfig(max_new_tokens=5)),
                                   tokenizer, model, reward=reward)):
        train = TrainConfig(max_steps=1, batch_size=2, precision="fp32", eval_batches=0)
        trainer = Trainer(model, objective, ResumableLoader(val, 2), train, OptimConfig(),
                          device=torch.device("cpu"), val_dataset=val, tensorboard=False)
        result = trainer.evaluate()
        outputs = Engine(model, tokenizer).generate([i["prompt_ids"] for i in val.items],
                                                    SamplingParams(max_new_tokens=5, temperature=0.0))
        want = sum(len(o.text) + i for i, o in enumerate(outputs)) / 5
        assert set(result) == {"step", "val_reward"} and abs(result["val_reward"] - want) < 1e-9
        assert trainer.stats()["final_val_reward"] == result["val_reward"]


def test_graft_grpo_logs_val_reward_every_eval_and_in_summary(tmp_path, capsys):
    tokenizer = _tokenizer()
    tokenizer.save(tmp_path / "tok")
    (tmp_path / "reward.py").write_text("def score(completion, prompt, answer):\n    return float(answer)\n")
    rows = [{"prompt": f"copy: {i % 10} {i // 10}", "answer": str(i)} for i in range(40)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["grpo", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"),
                 "--data", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path), "--name", "g",
                 "--grpo.reward", f"{tmp_path / 'reward.py'}:score", "--grpo.val-fraction", "0.25",
                 "--grpo.iterations", "2", "--grpo.sampling.group-size", "2", "--grpo.sampling.max-new-tokens", "3",
                 "--grpo.sampling.log-completions", "3", "--train.max-steps", "2", "--train.batch-size", "2", "--train.eval-every", "1",
                 "--train.eval-batches", "0", "--train.seq-len", "32", "--train.precision", "fp32",
                 "--train.save-every", "0", "--tensorboard", "false"]) == 0
    assert "grpo: 2 completions per prompt of up to 3 tokens at temperature 1, KL beta 0.04, loss dapo" in \
        capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val_reward" in r]
    assert [r["step"] for r in vals] == [1, 2]
    # A step's time in parts: generation, scoring and the rest (train_s held the step before's backward).
    for r in (r for r in records if "loss" in r):
        parts = sum(v for k, v in r.items() if k.startswith("train_time/"))
        assert parts == pytest.approx(r["step_tokens"] / r["tokens_per_s"], rel=1e-6)
        assert r["train_time/train_s"] > 0
    # The reward is the row's answer: the mean is over exactly the 10 held-out rows.
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    held_out_mean = sum(order[:10]) / 10
    assert all(abs(r["val_reward"] - held_out_mean) < 1e-9 for r in vals)
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["final_val_reward"] == vals[-1]["val_reward"]
    # One rollout (2 steps of 2 iterations), its first 3 completions; the greedy held-out answers are not logged.
    logged = [json.loads(line) for line in (tmp_path / "g" / "completions.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in logged] == [1, 1, 1]
    answers = {r["prompt"]: float(r["answer"]) for r in rows}
    assert all(r["reward"] == answers[r["prompt"]] and isinstance(r["completion"], str)
               and isinstance(r["truncated"], bool) for r in logged)


def test_graft_grpo_sums_several_weighted_rewards_and_logs_each(tmp_path):
    """TRL's list of reward functions with weights, from the command line: the reward is
    the weighted sum, each one's mean is logged beside it, completions.jsonl shows each."""
    tokenizer = _tokenizer()
    tokenizer.save(tmp_path / "tok")
    (tmp_path / "reward.py").write_text("def score(completion, prompt, answer):\n    return float(answer)\n")
    rows = [{"prompt": f"copy: {i % 10} {i // 10}", "answer": str(i % 3)} for i in range(20)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["grpo", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"),
                 "--data", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path), "--name", "g",
                 "--grpo.reward", f"{tmp_path / 'reward.py'}:score", "regex:.", "--grpo.reward-weights", "2", "0.5",
                 "--grpo.sampling.group-size", "2", "--grpo.sampling.max-new-tokens", "3",
                 "--grpo.sampling.log-completions", "4", "--train.max-steps", "2", "--train.batch-size", "2",
                 "--train.eval-every", "2", "--grpo.val-fraction", "0.2", "--train.seq-len", "32",
                 "--train.precision", "fp32", "--train.save-every", "0", "--tensorboard", "false"]) == 0
    records = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    # Held out too: each reward's mean beside the sum, kept in summary.json.
    val = next(r for r in records if "val_reward" in r)
    assert val["val_reward"] == pytest.approx(2 * val["val_reward/score"] + 0.5 * val["val_reward/regex"])
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["final_val_reward/score"] == val["val_reward/score"]
    steps = [r for r in records if "train_reward/mean" in r]
    assert len(steps) == 2
    for r in steps:  # both apply to every completion: the mean of the sum is the sum of the means
        assert r["train_reward/mean"] == pytest.approx(2 * r["train_reward/score/mean"]
                                                       + 0.5 * r["train_reward/regex/mean"])
    logged = [json.loads(line) for line in (tmp_path / "g" / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 8
    answers = {r["prompt"]: float(r["answer"]) for r in rows}
    for r in logged:
        assert r["rewards"] == {"score": answers[r["prompt"]], "regex": float(r["completion"] != "")}
        assert r["reward"] == pytest.approx(2 * r["rewards"]["score"] + 0.5 * r["rewards"]["regex"])
