"""GRPO and PPO resume exactly: a run interrupted after its checkpoint and resumed from it
gives the unbroken run's step losses, weights (PPO: the critic's and its optimizer's too)
and completions.jsonl. The rollout counter, which the sampling seeds follow, and PPO's
critic are the objective's checkpoint state, as are the rollouts GRPO keeps for the later
passes of an `iterations` block when the checkpoint falls inside one; an older checkpoint
without it still resumes. Full fine-tuning's reference (DPO's too) stays the model the run
started from."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from graftlm import checkpoint as ckpt
from graftlm.cli import main
from graftlm.trainer import Trainer

STEPS, SAVE_EVERY, INTERRUPT_AT = 6, 2, 5  # the interrupted run dies in step 5, after step-4 is saved


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from graftlm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("rl_resume")
    train_tokenizer(iter(["copy: 0 1 2 3 4 5 6 7 8 9"] * 10), 280).save(root / "tok")
    # Pays for length: completions differ in reward, so every step trains.
    (root / "reward.py").write_text("def score(completion, prompt):\n    return float(len(completion))\n")
    rows = [{"prompt": f"copy: {i % 10} {i // 10}"} for i in range(40)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _argv(objective: str, files, out, name: str, save_every: int = SAVE_EVERY, extra: tuple = ()) -> list[str]:
    return [objective, "--model", "tiny", "--tokenizer", str(files / "tok"), "--data", str(files / "prompts.jsonl"),
            "--out", str(out), "--name", name, f"--{objective}.reward", f"{files / 'reward.py'}:score",
            f"--{objective}.sampling.group-size", "2", f"--{objective}.sampling.max-new-tokens", "4",
            f"--{objective}.sampling.log-completions", "3", "--train.max-steps", str(STEPS),
            "--train.batch-size", "2", "--train.save-every", str(save_every), "--train.eval-every", "0",
            "--train.seq-len", "32", "--train.precision", "fp32", "--train.log-every", "1",
            "--optim.lr", "3e-3", "--optim.warmup-steps", "0", "--tensorboard", "false", *extra]


def _interrupt_in_step(step: int, monkeypatch) -> None:
    """Ctrl-C at the start of `step` + 1: step `step` is logged, its checkpoint is not saved."""
    train_step = Trainer.train_step

    def interrupted(self):
        if self.step == step:
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)


def _steps(run) -> dict[int, tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"], r["train_reward/mean"]) for r in rows if "loss" in r}


def _assert_same_tensors(a, b) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, different


def _rollouts(run) -> list[int]:
    return [json.loads(line)["rollout"] for line in (run / "completions.jsonl").read_text().splitlines()]


def _unbroken_and_resumed(objective: str, files, tmp_path, monkeypatch, interrupt_at: int = INTERRUPT_AT,
                          last_rollout: int = INTERRUPT_AT, **options):
    """`last_rollout`: the rollouts the interrupted attempt has sampled when it stops."""
    assert main(_argv(objective, files, tmp_path, "unbroken", **options)) == 0
    with monkeypatch.context() as patch:
        _interrupt_in_step(interrupt_at, patch)
        assert main(_argv(objective, files, tmp_path, "resumed", **options)) == 130
    resumed = tmp_path / "resumed"
    # The dead attempt logged past its checkpoint: the resume drops those rows and writes them again.
    assert max(_steps(resumed)) == interrupt_at
    assert max(_rollouts(resumed)) == last_rollout
    assert main(_argv(objective, files, tmp_path, "resumed", **options)) == 0
    return tmp_path / "unbroken", resumed


def _assert_same_run(unbroken, resumed) -> None:
    assert _steps(resumed) == _steps(unbroken)
    assert len(_steps(unbroken)) == STEPS
    assert (resumed / "completions.jsonl").read_text() == (unbroken / "completions.jsonl").read_text()
    _assert_same_tensors(resumed / "final" / "model.safetensors", unbroken / "final" / "model.safetensors")


def test_grpo_resumed_from_a_checkpoint_is_the_unbroken_run(files, tmp_path, monkeypatch):
    unbroken, resumed = _unbroken_and_resumed("grpo", files, tmp_path, monkeypatch)
    _assert_same_run(unbroken, resumed)
    assert _rollouts(unbroken) == [r for r in range(1, STEPS + 1) for _ in range(3)]  # one rollout a step
    assert ckpt.read_json(resumed / "checkpoints" / f"step-{STEPS}", "trainer.json")["objective"] == \
        {"sampler": {"rollouts": STEPS}}


def test_ppo_resumed_from_a_checkpoint_is_the_unbroken_run_critic_included(files, tmp_path, monkeypatch):
    unbroken, resumed = _unbroken_and_resumed("ppo", files, tmp_path, monkeypatch)
    _assert_same_run(unbroken, resumed)
    last = f"checkpoints/step-{STEPS}/objective.safetensors"
    # The critic's weights and its AdamW state, bitwise.
    _assert_same_tensors(resumed / last, unbroken / last)
    saved = load_file(unbroken / last)
    assert any(k.startswith("critic/") for k in saved) and any(k.endswith("/exp_avg_sq") for k in saved)
    first = load_file(unbroken / f"checkpoints/step-{SAVE_EVERY * 2}/objective.safetensors")
    assert not torch.equal(first["critic/score.weight"], saved["critic/score.weight"])  # the critic trained


# k = 2 over 2 micro-batches: steps 1-2, 3-4 and 5-6 each train twice on one step's two
# rollouts (one per micro-batch). The step-3 checkpoint falls inside the second block.
REUSE = {"save_every": 3, "extra": ("--grpo.iterations", "2", "--train.grad-accum", "2")}


def test_grpo_resumed_inside_an_iterations_block_trains_on_the_rollouts_it_kept(files, tmp_path, monkeypatch):
    """Resumed from step 3, step 4 trains on the rollouts step 3 sampled, with the log-probs
    they had when sampled (pi_old) and the reference's: sampled anew, step 4 would have
    other completions, rewards and ratios, and every later seed would move on by two."""
    unbroken, resumed = _unbroken_and_resumed("grpo", files, tmp_path, monkeypatch, interrupt_at=4,
                                              last_rollout=4, **REUSE)
    _assert_same_run(unbroken, resumed)
    assert _rollouts(unbroken) == [r for r in range(1, STEPS + 1) for _ in range(3)]  # two a block
    inside = load_file(resumed / "checkpoints" / "step-3" / ckpt.OBJECTIVE_FILE)
    for slot in (0, 1):
        assert {"input_ids", "old_logp", "ref_logp", "rewards", "sample_ids"} <= \
            {k.removeprefix(f"rank0/slot{slot}/") for k in inside}
    # Between blocks nothing is kept, so nothing is saved but the rollout counter.
    assert not (resumed / "checkpoints" / f"step-{STEPS}" / ckpt.OBJECTIVE_FILE).exists()


def test_resume_inside_a_block_with_another_world_size_samples_anew_with_one_warning(
        files, tmp_path, monkeypatch, capsys):
    """Each rank kept the rollouts of its own prompts: with another number of ranks (as
    --allow-config-change allows) they fit no rank, so the block's last pass samples anew."""
    with monkeypatch.context() as patch:
        _interrupt_in_step(4, patch)
        assert main(_argv("grpo", files, tmp_path, "ranks", **REUSE)) == 130
    directory = tmp_path / "ranks" / "checkpoints" / "step-3"
    state = ckpt.read_json(directory, "trainer.json")
    state["identity"]["world_size"] = 2
    _rewrite(directory, "trainer.json", state)
    capsys.readouterr()
    assert main(_argv("grpo", files, tmp_path, "ranks", extra=(*REUSE["extra"], "--allow-config-change"),
                      save_every=REUSE["save_every"])) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "2 ranks" in line]
    assert len(warnings) == 1 and "sample" in warnings[0] and "anew" in warnings[0], warnings
    assert max(_rollouts(tmp_path / "ranks")) == STEPS + 2  # the block was sampled twice


def _rewrite(directory, name: str, document: dict) -> None:
    """Replace a checkpoint's JSON file, its manifest entry with it."""
    ckpt.write_json(directory / name, document)
    manifest = ckpt.read_json(directory, ckpt.MANIFEST)
    manifest["files"][name] = {"sha256": ckpt._sha256(directory / name), "bytes": (directory / name).stat().st_size}
    ckpt.write_json(directory / ckpt.MANIFEST, manifest)


def test_checkpoint_without_objective_state_resumes_with_one_warning(files, tmp_path, monkeypatch, capsys):
    """A GRPO checkpoint from before objectives saved their state: it resumes, and says the
    rollout counter restarts."""
    with monkeypatch.context() as patch:
        _interrupt_in_step(SAVE_EVERY, patch)
        assert main(_argv("grpo", files, tmp_path, "old")) == 130
    directory = tmp_path / "old" / "checkpoints" / f"step-{SAVE_EVERY}"
    state = ckpt.read_json(directory, "trainer.json")
    del state["objective"]
    _rewrite(directory, "trainer.json", state)
    capsys.readouterr()
    assert main(_argv("grpo", files, tmp_path, "old")) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "holds no grpo state" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "restarts" in warnings[0]
    assert len(_steps(tmp_path / "old")) == STEPS


def test_full_dpo_resumed_keeps_the_model_it_started_from_as_reference(files, tmp_path, monkeypatch):
    """Full fine-tuning's DPO reference is a frozen copy of the policy, made at its first
    use: after a resume that came after the checkpoint's weights were loaded, so the run
    went on measuring against its step-4 policy (its loss back at log 2) without a word."""
    rows = [{"prompt": f"copy: {i % 10}", "chosen": f"{i % 10} {i % 10}", "rejected": f"{(i + 3) % 10}"}
            for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def dpo(name: str) -> list[str]:
        return ["dpo", "--model", "tiny", "--tokenizer", str(files / "tok"), "--data", str(tmp_path / "pairs.jsonl"),
                "--out", str(tmp_path), "--name", name, "--train.max-steps", str(STEPS), "--train.batch-size", "2",
                "--train.save-every", str(SAVE_EVERY), "--train.eval-every", "0", "--train.seq-len", "32",
                "--train.precision", "fp32", "--train.log-every", "1", "--optim.lr", "3e-3",
                "--optim.warmup-steps", "0", "--tensorboard", "false"]

    assert main(dpo("unbroken")) == 0
    with monkeypatch.context() as patch:
        _interrupt_in_step(INTERRUPT_AT, patch)
        assert main(dpo("resumed")) == 130
    assert main(dpo("resumed")) == 0

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "unbroken") and len(losses(tmp_path / "unbroken")) == STEPS
    _assert_same_tensors(tmp_path / "resumed" / "final" / "model.safetensors",
                         tmp_path / "unbroken" / "final" / "model.safetensors")
