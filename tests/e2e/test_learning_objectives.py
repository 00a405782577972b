"""Learning tests: each objective improves a tiny CPU model on held-out prompts.

The task is generated here with a fixed seed: "copy: 4 7" -> "4 7" (two digits; 20 of the
100 digit pairs held out). Preference pairs reject a broken copy ("4 7 7", "4", "47",
...): a rejected completion is never another prompt's chosen one, so what DPO and the
reward model learn on the training prompts carries to the held-out ones. RL starts from
a briefly fine-tuned model and is measured by the mean reward of completions sampled
(fixed seed) on the held-out prompts. Everything runs through `graft <command>` as a user runs it,
and is measured with `graftlm.eval.evaluate` on the held-out rows.
"""

from __future__ import annotations

import json
import random

import pytest

from graftlm.cli import main
from graftlm.eval import evaluate

pytestmark = pytest.mark.slow
COMMON = ["--train.precision", "fp32", "--train.eval-every", "0", "--train.save-every", "0",
          "--train.log-every", "50", "--train.seq-len", "48", "--tensorboard", "false"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    held, train = pairs[:20], pairs[20:]

    def answer_rows(ps):
        return [{"prompt": f"copy: {a} {b}", "completion": f"{a} {b}"} for a, b in ps]

    def preference_rows(ps):
        rng = random.Random(1)
        return [{"prompt": f"copy: {a} {b}", "chosen": f"{a} {b}",
                 "rejected": rng.choice([f"{a} {b} {b}", f"{a}", f"{a}{b}", f"{a} {b} {a} {b}", f"{b} {a} {b}"])}
                for a, b in ps]

    from graftlm.tokenizer import train_tokenizer
    tok = train_tokenizer(iter(["copy: 0 1 2 3 4 5 6 7 8 9"] * 20), 300)
    tok.save(root / "tok")
    files = {
        "sft": _write(root / "sft.jsonl", answer_rows(train) * 4),
        "test": _write(root / "test.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]}
                                             for r in answer_rows(held)]),
        "pairs": _write(root / "pairs.jsonl", preference_rows(train) * 2),
        "test_pairs": _write(root / "test_pairs.jsonl", preference_rows(held)),
        "prompts": _write(root / "prompts.jsonl", [{"prompt": r["prompt"], "answer": r["completion"]}
                                                   for r in answer_rows(train)]),
    }
    return root, files


def _graft(*argv):
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def sft_model(task):
    root, files = task
    _graft("sft", "--model", "tiny", "--tokenizer", root / "tok", "--data", files["sft"], "--out", root / "runs",
           "--name", "sft", "--train.max-steps", 300, "--train.batch-size", 16, "--optim.lr", 3e-3,
           "--optim.warmup-steps", 10, *COMMON)
    return root / "runs" / "sft" / "final"


def test_sft_teaches_the_format(task, sft_model, tmp_path):
    root, files = task
    # An untrained model of the same shape: the "before".
    _graft("sft", "--model", "tiny", "--tokenizer", root / "tok", "--data", files["sft"], "--out", tmp_path,
           "--name", "before", "--train.max-steps", 1, "--optim.lr", 1e-9, *COMMON)
    before = evaluate(tmp_path / "before" / "final", files["test"], max_new_tokens=6)["metrics"]["base"]
    after = evaluate(sft_model, files["test"], max_new_tokens=6)["metrics"]["base"]
    assert before["exact_match"] <= 0.1
    assert after["exact_match"] >= 0.8, after


def test_dpo_raises_held_out_preference_accuracy(task, sft_model):
    root, files = task
    _graft("dpo", "--model", sft_model, "--data", files["pairs"], "--out", root / "runs", "--name", "dpo",
           "--train.max-steps", 60, "--train.batch-size", 8, "--optim.lr", 1e-3, "--dpo.beta", 0.1, *COMMON)
    result = evaluate(root / "runs" / "dpo" / "final", files["test_pairs"], reference=sft_model)
    assert result["metrics"]["base"]["reward_accuracy"] > 0.9, result  # implicit DPO reward vs the SFT model


@pytest.fixture(scope="module")
def reward_model(task, sft_model):
    root, files = task
    _graft("reward", "--model", sft_model, "--data", files["pairs"], "--out", root / "runs", "--name", "rm",
           "--train.max-steps", 60, "--train.batch-size", 8, "--optim.lr", 1e-3, *COMMON)
    return root / "runs" / "rm" / "final"


def test_reward_model_separates_held_out_pairs(task, reward_model):
    _, files = task
    result = evaluate(reward_model, files["test_pairs"])
    assert result["metrics"]["reward model"]["pairwise_accuracy"] > 0.9, result


def sampled_reward(model_dir, test_file, reward: str, group: int = 8) -> float:
    """Mean reward of `group` sampled completions per held-out prompt (fixed seed)."""
    from graftlm.data.render import Renderer
    from graftlm.models.hf import load_model
    from graftlm.objectives.rollout import RolloutSampler, SamplingConfig
    from graftlm.rewards import RewardScorer, build_reward
    from graftlm.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    rows = [json.loads(line) for line in open(test_file)]
    renderer = Renderer(tokenizer)
    batch = {"prompt_ids": [renderer.render_prompt({"prompt": r["prompt"]}) for r in rows],
             "prompts": [r["prompt"] for r in rows], "rows": [{"answer": r["answer"]} for r in rows]}
    sampler = RolloutSampler(SamplingConfig(group_size=group, max_new_tokens=6, seed=123),
                             RewardScorer(build_reward(reward)), tokenizer)
    return sampler.sample(model, batch, tokenizer.pad_id).rewards.mean().item()


@pytest.fixture(scope="module")
def weak_model(task):
    """A briefly fine-tuned model: right format most of the time, rarely the right digits."""
    root, files = task
    _graft("sft", "--model", "tiny", "--tokenizer", root / "tok", "--data", files["sft"], "--out", root / "runs",
           "--name", "weak", "--train.max-steps", 110, "--train.batch-size", 16, "--optim.lr", 3e-3, *COMMON)
    return root / "runs" / "weak" / "final"


FORMAT = "regex:^[0-9] [0-9]$"


def assert_rollout_tokens_counted(run_dir, sequences_per_step: int, max_new_tokens: int):
    """RL throughput counts the rollouts the policy trained on: a prompt and at least one
    generated token per sequence, at most seq_len + max_new_tokens, no padding."""
    summary = json.loads((run_dir / "summary.json").read_text())
    sequences = summary["steps"] * sequences_per_step
    assert 2 * sequences <= summary["tokens"] <= sequences * (48 + max_new_tokens), summary["tokens"]
    assert summary["tokens_per_s"] > 0 and summary["mfu"] > 0 and summary["flops"] > 0


def test_grpo_raises_held_out_reward_of_a_weak_sft_model(task, weak_model, tmp_path):
    """The weak model samples the format about 90% of the time (0.87 to 0.92 over seeds,
    160 completions each). 60 GRPO steps raise that to about 0.96 (30 steps: 0.925, too
    close to tell from the seed's noise); each side is scored on 640 completions."""
    _, files = task
    _graft("grpo", "--model", weak_model, "--data", files["prompts"], "--out", tmp_path, "--name", "grpo",
           "--grpo.reward", FORMAT, "--grpo.sampling.group-size", 8, "--grpo.sampling.max-new-tokens", 6,
           "--grpo.beta", 0.0, "--train.max-steps", 60, "--train.batch-size", 8, "--optim.lr", 1e-3, *COMMON)
    before = sampled_reward(weak_model, files["test"], FORMAT, group=32)
    after = sampled_reward(tmp_path / "grpo" / "final", files["test"], FORMAT, group=32)
    assert after >= before + 0.03, (before, after)
    assert_rollout_tokens_counted(tmp_path / "grpo", 8 * 8, 6)


def test_ppo_raises_the_reward_model_score(task, weak_model, reward_model, tmp_path):
    _, files = task
    _graft("ppo", "--model", weak_model, "--data", files["prompts"], "--out", tmp_path, "--name", "ppo",
           "--ppo.reward", reward_model, "--ppo.sampling.group-size", 4, "--ppo.sampling.max-new-tokens", 6,
           "--ppo.kl-coef", 0.01, "--ppo.value-lr", 3e-4, "--train.max-steps", 60, "--train.batch-size", 8,
           "--optim.lr", 1e-3, *COMMON)
    before = sampled_reward(weak_model, files["test"], str(reward_model))
    after = sampled_reward(tmp_path / "ppo" / "final", files["test"], str(reward_model))
    assert after >= before + 0.1, (before, after)
    assert_rollout_tokens_counted(tmp_path / "ppo", 8 * 4, 6)
