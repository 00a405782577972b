"""The training loop: exact resume, accumulation = larger batch, skipped bad steps,
all-masked batches, schedules and weight-decay groups."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch

from graftlm.data.loader import ResumableLoader
from graftlm.errors import GraftError
from graftlm.models.config import preset
from graftlm.models.transformer import Decoder
from graftlm.objectives.clm import CausalLM, TokenWindows
from graftlm.optim import OptimConfig, lr_at, parameter_groups
from graftlm.trainer import TrainConfig, Trainer

SEQ = 16


def build_trainer(run_dir: Path | None, max_steps=8, batch_size=4, grad_accum=1, save_every=4,
                  precision="fp32", keep=0, identity=None, objective=None, seed=0,
                  learnable=False, **train_options) -> Trainer:
    """A tiny model on random tokens; the same arguments give the same run, bit for bit."""
    torch.manual_seed(seed)
    model = Decoder(preset("tiny", vocab_size=128))
    model.init_weights(torch.Generator().manual_seed(seed))
    tokens = np.random.default_rng(seed).integers(0, 128, size=SEQ * 40 + 1).astype(np.uint16)
    if learnable:  # a fixed cycle: next-token prediction can learn it quickly
        tokens = (np.arange(tokens.size) * 7 % 128).astype(np.uint16)
    train = TokenWindows(tokens, SEQ)
    val = TokenWindows(np.random.default_rng(seed + 1).integers(0, 128, size=SEQ * 6 + 1), SEQ)
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=SEQ,
                      precision=precision, eval_every=0, save_every=save_every, keep_checkpoints=keep,
                      log_every=1000, **train_options)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1)
    loader = ResumableLoader(train, batch_size, seed=seed)
    return Trainer(model, objective or CausalLM(), loader, cfg, optim, device=torch.device("cpu"),
                   val_dataset=val, val_bytes_per_token=2.0, run_dir=run_dir,
                   identity=identity or {"train.batch_size": batch_size}, tensorboard=False)


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and not r.get("skipped")}


def test_resume_from_mid_run_checkpoint_reproduces_losses_exactly(tmp_path):
    full = build_trainer(tmp_path / "full")
    full.fit()
    reference = train_losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, 9))

    resumed = build_trainer(tmp_path / "resumed", seed=0)
    resumed.resume(tmp_path / "full" / "checkpoints" / "step-4")
    assert resumed.step == 4
    resumed.fit()
    got = train_losses(tmp_path / "resumed")
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(reference[step], abs=1e-6)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _record_grads(trainer: Trainer) -> list[list[torch.Tensor]]:
    """Gradients as the optimizer sees them, step by step."""
    seen, step = [], trainer.optimizer.step

    def spy(*args, **kwargs):
        seen.append([p.grad.clone() for p in trainer.params])
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    return seen


def test_gradient_accumulation_equals_larger_batch():
    big = build_trainer(None, batch_size=8, grad_accum=1)
    small = build_trainer(None, batch_size=2, grad_accum=4)
    grads_big, grads_small = _record_grads(big), _record_grads(small)
    for _ in range(2):
        rb, rs = big.train_step(), small.train_step()
        assert rs["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert rs["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    for step_big, step_small in zip(grads_big, grads_small):
        for a, b in zip(step_big, step_small):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


class FlakyObjective(CausalLM):
    """NaN loss on the given calls (0-based), the ordinary loss otherwise."""

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0

    def loss(self, model, batch):
        loss_sum, count, metrics = super().loss(model, batch)
        self.calls += 1
        if self.calls - 1 in self.bad_calls:
            loss_sum = loss_sum * float("nan")
        return loss_sum, count, metrics


def test_non_finite_step_is_skipped_with_everything_unchanged(tmp_path):
    trainer = build_trainer(tmp_path, objective=FlakyObjective({1}), save_every=0)
    from graftlm.metrics import MetricsLogger
    trainer.logger = MetricsLogger(tmp_path, 8, tensorboard=False)
    assert trainer.train_step() is not None
    params = [p.detach().clone() for p in trainer.model.parameters()]
    opt_state = {k: v.clone() for k, v in trainer.optimizer.state[trainer.params[0]].items()}
    assert trainer.train_step() is None  # the NaN step
    trainer.logger.close()
    assert trainer.step == 1
    for before, p in zip(params, trainer.model.parameters()):
        assert torch.equal(before, p)
        assert p.grad is None
    for k, v in trainer.optimizer.state[trainer.params[0]].items():
        assert torch.equal(v, opt_state[k])
    skipped = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert skipped[-1]["skipped"] and len(skipped[-1]["sample_ids"]) == 4
    assert trainer.train_step()["step"] == 2  # training goes on


def test_too_many_bad_steps_in_a_row_stop_the_run():
    trainer = build_trainer(None, objective=FlakyObjective(range(100)))
    trainer.cfg.max_bad_steps = 3
    assert trainer.train_step() is None and trainer.train_step() is None
    with pytest.raises(GraftError, match="3 steps in a row"):
        trainer.train_step()


def test_all_masked_batch_gives_zero_loss_not_nan():
    model = Decoder(preset("tiny", vocab_size=128))
    model.init_weights()
    ids = torch.randint(0, 128, (2, SEQ))
    batch = {"input_ids": ids, "labels": ids, "loss_mask": torch.zeros(2, SEQ, dtype=torch.bool)}
    loss_sum, count, _ = CausalLM().loss(model, batch)
    assert loss_sum.item() == 0.0 and count.item() == 0
    loss_sum.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    class AllMasked(CausalLM):
        def loss(self, model, batch):
            batch = dict(batch, loss_mask=torch.zeros_like(batch["input_ids"], dtype=torch.bool))
            return super().loss(model, batch)

    record = build_trainer(None, objective=AllMasked()).train_step()
    assert record is not None and record["loss"] == 0.0 and math.isfinite(record["grad_norm"])


def test_throughput_counts_trained_tokens_without_padding_at_their_context():
    """MFU and tokens/s count what the model trained on: SFT rows without their padding,
    at the batch's padded length; an RL objective's own rollout tokens."""
    from graftlm.objectives.sft import RenderedRows, SFTObjective

    lengths = [5, 9, 3, 7]
    rows = [type("Row", (), {"input_ids": list(range(3, 3 + n)), "loss_mask": [True] * n})() for n in lengths]
    trainer = build_trainer(None, batch_size=2, grad_accum=2, objective=SFTObjective())
    trainer.loader = ResumableLoader(RenderedRows(rows, pad_id=0), 2, shuffle=False)
    trainer.flops_per_token = lambda context: 1000.0 + context
    record = trainer.train_step()
    assert record["step_tokens"] == trainer.tokens == sum(lengths)  # not 2 x 9 + 2 x 7
    assert trainer.flops == (5 + 9) * 1009 + (3 + 7) * 1007

    class Rollouts(CausalLM):  # trains on 11 tokens of its own at context 20, whatever the batch
        def loss(self, model, batch):
            total, count, metrics = super().loss(model, batch)
            return total, count, {**metrics, "tokens": 11, "context": 20}

    trainer = build_trainer(None, batch_size=2, objective=Rollouts())
    trainer.flops_per_token = lambda context: 1000.0 + context
    record = trainer.train_step()
    assert record["step_tokens"] == 11 and trainer.flops == 11 * 1020 and "train_tokens" not in record


def test_bf16_autocast_step_on_cpu_learns():
    trainer = build_trainer(None, precision="bf16-autocast", max_steps=6, learnable=True)
    first = trainer.train_step()["loss"]
    for _ in range(5):
        last = trainer.train_step()["loss"]
    assert math.isfinite(last) and last < first
    assert next(trainer.model.parameters()).dtype == torch.float32


def test_validation_reports_bits_per_byte():
    trainer = build_trainer(None)
    val = trainer.evaluate()
    assert val["val_bpb"] == pytest.approx(val["val_loss"] / math.log(2) / 2.0)


def test_schedules():
    cos = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, cos) == pytest.approx(0.1)
    assert lr_at(9, 100, cos) == pytest.approx(1.0)
    assert lr_at(55, 100, cos) == pytest.approx(0.55)
    assert lr_at(100, 100, cos) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, 100, wsd) == 1.0 and lr_at(79, 100, wsd) == 1.0
    assert lr_at(89, 100, wsd) == pytest.approx(0.5)
    assert lr_at(99, 100, wsd) == pytest.approx(0.0)
    const = OptimConfig(lr=2.0, warmup_steps=0, schedule="constant")
    assert lr_at(0, 10, const) == lr_at(9, 10, const) == 2.0


def test_default_warmup_is_a_tenth_of_the_run_at_most_100():
    # A fixed 100 steps left a 30-step fine-tuning run at a third of its rate at its end.
    default = OptimConfig(lr=1.0, schedule="constant")
    assert [default.warmup_for(n) for n in (5, 30, 600, 5000)] == [0, 3, 60, 100]
    assert lr_at(0, 30, default) == pytest.approx(1 / 3) and lr_at(2, 30, default) == 1.0
    assert lr_at(0, 5, default) == 1.0  # too short for any warmup
    assert OptimConfig(lr=1.0, warmup_steps=7).warmup_for(30) == 7  # a chosen one stays


def test_a_run_records_its_warmup_and_keeps_it_when_extended(tmp_path):
    from graftlm.cli import main
    from tests.unit.test_sft_packing import _data

    path, _ = _data(tmp_path, n=20)

    def sft(steps: int) -> dict:
        assert main(["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path),
                     "--out", str(tmp_path), "--name", "run", "--train.max-steps", str(steps),
                     "--train.batch-size", "2", "--train.eval-batches", "1", "--tensorboard", "false"]) == 0
        return yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]

    assert sft(20)["warmup_steps"] == 2
    assert sft(40)["warmup_steps"] == 2  # not 4: the steps already taken were warmed up over 2


def test_weight_decay_groups_exclude_norms_biases_and_embeddings():
    model = Decoder(preset("tiny", vocab_size=128, attention_bias=True))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed_tokens.weight" in no_decay["param_names"]
    assert all("norm" not in n and not n.endswith("bias") for n in decay["param_names"])
    assert "layers.0.self_attn.q_proj.bias" in no_decay["param_names"]
    names = decay["param_names"] + no_decay["param_names"]
    assert len(names) == len(set(names)) == len(list(model.named_parameters()))


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[2] / "recipes").glob("pretrain-*.yaml")))
def test_recipes_are_just_the_commands_config(recipe):
    from graftlm.config import build_config
    from graftlm.runs import run_config_class
    cfg = build_config(run_config_class("clm"), recipe, {"data": "shards", "train.max_steps": 3})
    assert cfg.model and cfg.train.max_steps == 3 and cfg.objective == "clm"


def test_a_cpu_run_measures_the_peak_the_plan_predicts(tmp_path):
    """On the CPU (no allocator statistic) the second step runs under the tensor tracker:
    summary's `peak_tensor_bytes` is the plan's quantity, within its tested 15%, where
    the process RSS is an order of magnitude off; tracking changes no result."""
    from graftlm.plan.memory import RunShape, memory_breakdown

    tracked = build_trainer(tmp_path / "tracked", max_steps=3, save_every=0)
    summary = tracked.fit()
    shape = RunShape(model=tracked.model.config, objective="clm", parameterization="full", precision="fp32",
                     batch_size=4, seq_len=SEQ, device_type="cpu")
    predicted = memory_breakdown(shape).peak
    assert abs(summary["peak_tensor_bytes"] - predicted) / predicted < 0.15, (summary["peak_tensor_bytes"], predicted)
    assert summary["peak_host_memory_bytes"] > 5 * summary["peak_tensor_bytes"]
    assert summary["peak_tensor_seq_len"] == SEQ  # token windows: every batch is seq_len wide

    untracked = build_trainer(tmp_path / "untracked", max_steps=3, save_every=0)
    untracked._tracks_tensor_memory = lambda: False
    assert "peak_tensor_bytes" not in untracked.fit()
    assert train_losses(tmp_path / "tracked") == train_losses(tmp_path / "untracked")
    assert "peak_tensor_bytes" not in build_trainer(None, max_steps=1, save_every=0).fit()  # no second step
    # A resumed process with one step left keeps the count its checkpoint carries.
    resumed = build_trainer(tmp_path / "resumed", max_steps=4, save_every=0)
    resumed.resume(tmp_path / "tracked" / "checkpoints" / "step-3")
    assert resumed.fit()["peak_tensor_bytes"] == summary["peak_tensor_bytes"]


def test_throughput_leaves_out_the_first_and_the_counted_step():
    """tokens/s and MFU describe the steady steps: not each process's first (compiling,
    making optimizer states) nor the CPU step whose tensors are counted."""
    import time
    trainer = build_trainer(None, max_steps=4)
    step, calls = trainer.train_step, []

    def slow_first_step():  # as a compiling first step is
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)
        return step()

    trainer.train_step = slow_first_step
    stats = trainer.fit()
    # Steps 1 (slow) and 2 (counted, on this CPU) are left out; 3 and 4 make the rate.
    assert trainer.steady["tokens"] == stats["tokens"] / 2 and trainer.steady["steps"] == 2
    assert trainer._seconds_per_step() == pytest.approx(trainer.steady["time_s"] / 2)  # the ETA's pace
    assert stats["train_time_s"] - trainer.steady["time_s"] >= 0.5  # the sleep is in the total only
    assert stats["tokens_per_s"] == pytest.approx(trainer.steady["tokens"] / trainer.steady["time_s"])


def test_warmup_longer_than_the_run_is_one_warning(tmp_path, capsys):
    short = build_trainer(tmp_path / "short", max_steps=3)
    short.optim_cfg = OptimConfig(lr=3e-4, warmup_steps=100)
    short.fit()
    captured = capsys.readouterr()
    warnings = [line for line in (captured.out + captured.err).splitlines() if "warmup" in line]
    assert len(warnings) == 1, warnings
    assert "--optim.warmup-steps 100" in warnings[0] and "--train.max-steps 3" in warnings[0]
    assert "9e-06" in warnings[0] and "0.0003" in warnings[0], warnings[0]
    build_trainer(tmp_path / "reached", max_steps=3).fit()  # warmup 2 of 3 steps: the peak is reached
    assert "warmup" not in capsys.readouterr().out


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank(tmp_path, monkeypatch):
    """Unsharded under torchrun rank 0 writes alone. When its write fails (here: the
    checkpoint module refuses, as on a full disk) it raises its own error and the other
    ranks hear of it in one all-reduce, instead of waiting for rank 0 in the next step
    until the collective times out. The ranks are simulated on a trained trainer: rank
    0's all-reduce adds what rank 1 sends (no failure), rank 1's what rank 0 sends."""
    from graftlm import checkpoint as ckpt
    from graftlm.errors import GraftError

    trainer = build_trainer(tmp_path, max_steps=1, save_every=0)
    trainer.fit()

    def refuse(*args, **kwargs):
        raise ckpt.CheckpointError("checkpoints/step-1: no space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", refuse)
    sent = []
    for rank, received in ((0, 0.0), (1, 1.0)):
        trainer.rank, trainer.world_size, trainer.is_main = rank, 2, rank == 0
        trainer.all_reduce = lambda t, received=received: sent.append(t.item()) or t + received
        with pytest.raises(GraftError) as e:
            trainer.save_checkpoint()
        expected = "no space left" if rank == 0 else "rank 0 could not write the checkpoint of step 1"
        assert expected in str(e.value)
    assert sent == [1.0, 0.0]  # rank 0 sent its failure, rank 1 that it had none
    trainer.all_reduce = lambda t: sent.append(t.item()) or t  # nobody failed: rank 1 goes on
    assert trainer.save_checkpoint() is None and sent[-1] == 0.0


@pytest.mark.parametrize("finished_before", [False, True])
def test_an_interrupted_run_says_what_it_kept_and_what_rerunning_does(tmp_path, capsys, finished_before):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if finished_before:  # an earlier command ended this run at step 3, then it was extended
        (run_dir / "summary.json").write_text(json.dumps({"steps": 3}))
    trainer = build_trainer(run_dir, max_steps=8, save_every=4)
    step = trainer.train_step

    def interrupted_at_six():
        if trainer.step == 5:
            raise KeyboardInterrupt
        return step()

    trainer.train_step = interrupted_at_six
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    out = capsys.readouterr().out
    assert ("interrupted at step 5 of 8: the checkpoint of step 4 is kept and the same command resumes from it "
            "(the 1 step after it is lost)") in out
    assert ("final/ still holds the model of the run's earlier end, step 3" in out) == finished_before
    assert (run_dir / "checkpoints" / "step-4").is_dir()


def test_sigterm_stops_a_run_as_ctrl_c_does_and_it_resumes(tmp_path, capsys, monkeypatch):
    """SLURM's preemption, `docker stop` and `kill` send SIGTERM: the run died unsaid (exit
    143, nothing printed, its .lock left); it now says what it kept, as for Ctrl-C."""
    import os
    import signal

    from graftlm.cli import main
    from test_sft_packing import _data
    path, _ = _data(tmp_path, n=20)
    argv = ["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path), "--out",
            str(tmp_path), "--name", "run", "--train.max-steps", "6", "--train.batch-size", "2",
            "--train.save-every", "2", "--train.eval-batches", "1", "--tensorboard", "false"]
    step, handler = Trainer.train_step, signal.getsignal(signal.SIGTERM)

    def killed_in_step_four(self):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", killed_in_step_four)
        assert main(argv) == 143
    captured = capsys.readouterr()
    assert "terminated (SIGTERM) at step 3 of 6: the checkpoint of step 2 is kept" in captured.out
    assert "graft sft: terminated (SIGTERM)" in captured.err
    assert signal.getsignal(signal.SIGTERM) is handler  # put back after the command
    assert main(argv) == 0
    assert "resuming from" in capsys.readouterr().out
