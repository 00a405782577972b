"""The commands and parameterizations not covered by test_same_losses.py, under torchrun
with 2 gloo processes, DDP and FSDP2 each:

- `graft reward` (deterministic): per-step losses equal one process on the same global
  batch (1e-5); the FSDP2 export equals DDP's and loads in transformers.
- QLoRA (`--adapter qlora`, torchao NF4 frozen base): the same, plus an FSDP2 run whose
  sharded checkpoint (the adapters and their optimizer state) resumes on the same loss curve.
- `graft grpo` (full and QLoRA) and `graft ppo`: every DDP rank ends with bit-identical
  weights (policy, and PPO's critic, which trains outside the wrapper), FSDP2 gives the
  same per-step losses and final weights as DDP, the summary counts both ranks, and the
  export loads in transformers. Each rank seeds its rows by their place in the global
  batch, so full GRPO under DDP also gives one process's per-step losses.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.support import COMMON, ROOT, build_data, graft, ok, step_losses

pytestmark = pytest.mark.slow
STEPS = 3
DIGEST = ("tests/distributed/rank_digest.py",)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("every-data"))


def train(argv: list, out, name: str, nproc: int, mode: str | None, global_batch: int = 4,
          grad_accum: int = 2, extra: tuple = (), **kwargs):
    """`graft <argv>`: STEPS steps of `global_batch` rows in `grad_accum` micro-batches, split over nproc."""
    argv = [*argv, "--out", out, "--name", name, "--train.max-steps", STEPS,
            "--train.batch-size", global_batch // grad_accum // nproc, "--train.grad-accum", grad_accum,
            "--train.eval-every", 0, *COMMON, *extra]
    if "--train.save-every" not in extra:
        argv += ["--train.save-every", 0]
    if mode:
        argv += ["--parallel", mode]
    result = ok(graft(argv, nproc=nproc, **kwargs))
    assert result.stdout.count(f"step {STEPS}/{STEPS}") == 1, result.stdout  # only rank 0 reports
    return result


def assert_same_losses(got: dict, expected: dict, label: str) -> None:
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1)), (label, got, expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), (label, step, got, expected)


def assert_same_tensors(a_file, b_file) -> None:
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def loads_in_transformers(final, cls: str = "AutoModelForCausalLM"):
    import transformers

    model = getattr(transformers, cls).from_pretrained(final)
    out = model(torch.tensor([[1, 5, 9, 14]]))
    assert torch.isfinite(out.logits).all()
    return model


def summary_of(run_dir) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert math.isfinite(summary["final_train_loss"]) and summary["tokens_per_s"] > 0
    return summary


# -- reward model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_runs(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward-runs")
    argv = ["reward", "--model", "tiny", "--tokenizer", data["tok"], "--data", data["pairs"],
            "--reward.val-fraction", 0.1]
    train(argv, out, "one", 1, None)
    for mode in ("ddp", "fsdp"):
        train(argv, out, mode, 2, mode)
    return out


def test_reward_model_matches_one_process_under_ddp_and_fsdp(reward_runs):
    expected = step_losses(reward_runs / "one")
    for mode in ("ddp", "fsdp"):
        assert_same_losses(step_losses(reward_runs / mode), expected, mode)
        summary_of(reward_runs / mode)
    # The model trains (the losses differ from step to step), so the equality means something.
    assert len({round(loss, 6) for loss in expected.values()}) == STEPS, expected
    assert_same_tensors(reward_runs / "fsdp" / "final" / "model.safetensors",
                        reward_runs / "ddp" / "final" / "model.safetensors")
    loads_in_transformers(reward_runs / "fsdp" / "final", "AutoModelForSequenceClassification")


# -- QLoRA ----------------------------------------------------------------------------------------

def test_qlora_matches_one_process_and_fsdp_resumes(data, tmp_path):
    argv = ["sft", "--model", data["base"], "--data", data["sft"],
            "--adapter", "qlora", "--adapter.r", 4, "--sft.val-fraction", 0.1]
    # NF4 layers compute in bf16, whose matmul rounding depends on the batch shape: the
    # reference keeps each rank's micro-batch of one row, in 4 micro-steps (same global batch).
    train(argv, tmp_path, "one", 1, None, grad_accum=4)
    expected = step_losses(tmp_path / "one")
    train(argv, tmp_path, "ddp", 2, "ddp")
    save = ("--train.save-every", 2, "--train.keep-checkpoints", 0)
    result = train(argv, tmp_path, "fsdp", 2, "fsdp", extra=save)
    # The export gathers no NF4 weight: none of torchao's all-gathers is left unwaited.
    assert "unwaited collective" not in result.stdout + result.stderr, result.stderr[-2000:]
    for mode in ("ddp", "fsdp"):
        assert_same_losses(step_losses(tmp_path / mode), expected, mode)
        assert summary_of(tmp_path / mode)["parameterization"] == "qlora"
    assert_same_tensors(tmp_path / "fsdp" / "final" / "adapter_model.safetensors",
                        tmp_path / "ddp" / "final" / "adapter_model.safetensors")
    import peft
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "fsdp" / "final")).r == 4

    # Resume from the sharded checkpoint of step 2 (adapters; the NF4 base is rebuilt from the model).
    run = tmp_path / "fsdp"
    shutil.rmtree(run / "checkpoints" / "step-3")
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    result = train(argv, tmp_path, "fsdp", 2, "fsdp", extra=save)
    assert "step-2 (step 2)" in result.stdout, result.stdout
    assert_same_losses(step_losses(run), expected, "fsdp resumed")


# -- online RL ------------------------------------------------------------------------------------

def rl_pair(argv: list, out) -> tuple[dict, dict]:
    """A DDP run that reports each rank's weight hashes, and an FSDP2 run: (digests, summary).
    Both export the same model (or adapter), which loads in transformers (or PEFT)."""
    digests = out / "digests.json"
    train(argv, out, "ddp", 2, "ddp", global_batch=4, entry=DIGEST, PYTHONPATH=str(ROOT),
          GRAFTLM_TEST_DIGESTS=str(digests))
    train(argv, out, "fsdp", 2, "fsdp", global_batch=4)
    assert_same_losses(step_losses(out / "fsdp"), step_losses(out / "ddp"), "fsdp vs ddp")
    adapter = "--adapter" in argv
    name = "adapter_model.safetensors" if adapter else "model.safetensors"
    assert_same_tensors(out / "fsdp" / "final" / name, out / "ddp" / "final" / name)
    if adapter:
        import peft
        assert peft.LoraConfig.from_pretrained(str(out / "fsdp" / "final")).r == 4
    else:
        loads_in_transformers(out / "fsdp" / "final")
    return json.loads(digests.read_text()), summary_of(out / "ddp")


def rollout_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train_reward/mean" in r]


@pytest.mark.parametrize("parameterization", ["full", "qlora"])
def test_grpo_ranks_train_one_model_under_ddp_and_fsdp(parameterization, data, tmp_path):
    """Full: the reference is a frozen copy (sharded like the policy under FSDP2); QLoRA:
    the reference is the NF4 base with the adapters off, and sampling unshards NF4 blocks."""
    model = data["base"] if parameterization == "qlora" else "tiny"  # adapters train on saved weights
    argv = ["grpo", "--model", model, "--tokenizer", data["tok"], "--data", data["sft"],
            "--grpo.reward", "regex:e", "--grpo.sampling.group-size", 4,
            "--grpo.sampling.max-new-tokens", 6, "--grpo.beta", 0.04]
    if parameterization == "qlora":
        argv += ["--adapter", "qlora", "--adapter.r", 4]
    digests, summary = rl_pair(argv, tmp_path)
    assert len(set(digests["policy"])) == 1, digests
    if parameterization == "full":  # the same samples, drawn by one process
        train(argv, tmp_path, "one", 1, None, global_batch=4)
        assert_same_losses(step_losses(tmp_path / "ddp"), step_losses(tmp_path / "one"), "ddp vs one process")
        # Logged metrics are the mean over ranks, not rank 0's alone.
        one = [r["train_reward/mean"] for r in rollout_rows(tmp_path / "one")]
        assert [r["train_reward/mean"] for r in rollout_rows(tmp_path / "ddp")] == pytest.approx(one, abs=1e-6)
    rows = rollout_rows(tmp_path / "ddp")
    assert len(rows) == STEPS and all(0 <= r["train_reward/mean"] <= 1 for r in rows), rows
    assert all(r["train_kl"] >= 0 for r in rows) and any(r["train_kl"] > 0 for r in rows), rows
    # Tokens count both ranks' rollouts: 4 prompts x 4 completions a step, each at least
    # one generated token past its prompt.
    assert summary["tokens"] >= STEPS * 16 * 2, summary


def test_ppo_ranks_train_one_policy_and_one_critic_under_ddp_and_fsdp(data, reward_runs, tmp_path):
    argv = ["ppo", "--model", "tiny", "--tokenizer", data["tok"], "--data", data["sft"],
            "--ppo.reward", reward_runs / "one" / "final", "--ppo.sampling.group-size", 2,
            "--ppo.sampling.max-new-tokens", 6, "--ppo.value-lr", 1e-3]
    digests, summary = rl_pair(argv, tmp_path)
    assert len(set(digests["policy"])) == 1 and len(set(digests["critic"])) == 1, digests
    rows = rollout_rows(tmp_path / "ddp")
    assert len(rows) == STEPS and all(math.isfinite(r["train_value_loss"]) for r in rows), rows
    assert summary["tokens"] >= STEPS * 8 * 2, summary
