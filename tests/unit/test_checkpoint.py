"""Checkpoints: corruption is detected and named, auto-resume falls back, a full disk or
a SIGKILL mid-save never damages a completed checkpoint, a changed run is refused, and a
planted pickle is never unpickled."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from graftlm import checkpoint as ckpt
from graftlm.errors import GraftError

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import build_trainer, train_losses  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_checkpoints(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=4, save_every=2)
    trainer.fit()
    root = tmp_path / "checkpoints"
    assert [p.name for _, p in ckpt.checkpoint_dirs(root)] == ["step-4", "step-2"]
    return root


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-10])


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, message", [
    (_truncate, "optimizer.safetensors", "truncated or replaced"),
    (_flip, "model.safetensors", "checksum does not match"),
    (lambda p: p.unlink(), "manifest.json", "missing"),
])
def test_corruption_is_named_and_auto_resume_falls_back(two_checkpoints, damage, file, message):
    newest = two_checkpoints / "step-4"
    damage(newest / file)
    with pytest.raises(GraftError, match=message) as err:
        ckpt.verify(newest)
    assert file in str(err.value)
    warnings = []
    assert ckpt.latest_valid(two_checkpoints, warn=warnings.append) == two_checkpoints / "step-2"
    assert file in warnings[0]


def test_full_disk_during_save_leaves_the_previous_checkpoint_intact(two_checkpoints, monkeypatch):
    trainer = build_trainer(two_checkpoints.parent, max_steps=6)
    trainer.resume(two_checkpoints / "step-4")
    trainer.train_step()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(GraftError, match=r"step-5.*disk full.*step-4 is intact"):
        trainer.save_checkpoint()
    assert [p.name for p in two_checkpoints.iterdir()] and not any(
        p.name.startswith(".tmp") for p in two_checkpoints.iterdir())
    ckpt.verify(two_checkpoints / "step-4")
    assert ckpt.latest_valid(two_checkpoints) == two_checkpoints / "step-4"


def test_non_finite_tensors_are_never_saved(two_checkpoints):
    trainer = build_trainer(two_checkpoints.parent, max_steps=6)
    trainer.resume(two_checkpoints / "step-4")
    trainer.train_step()
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(GraftError, match=r"step-5: not saved, .* non-finite"):
        trainer.save_checkpoint()
    assert [p.name for _, p in ckpt.checkpoint_dirs(two_checkpoints)] == ["step-4", "step-2"]
    assert ckpt.latest_valid(two_checkpoints) == two_checkpoints / "step-4"


def test_retention_keeps_the_last_k(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=8, save_every=2, keep=2)
    trainer.fit()
    assert [p.name for _, p in ckpt.checkpoint_dirs(tmp_path / "checkpoints")] == ["step-8", "step-6"]


def test_changed_run_is_refused_with_the_difference(two_checkpoints):
    changed = build_trainer(None, identity={"train.batch_size": 8})
    with pytest.raises(GraftError, match=r"train\.batch_size: 4 -> 8.*--allow-config-change"):
        changed.resume(two_checkpoints / "step-4")
    allowed = build_trainer(None, identity={"train.batch_size": 8})
    allowed.resume(two_checkpoints / "step-4", allow_config_change=True)
    assert allowed.step == 4


def test_an_adapter_added_to_a_run_is_one_change_not_one_per_field():
    saved = {"adapter": None, "seed": 0}
    current = {"adapter.kind": "lora", "adapter.r": 16, "adapter.alpha": 32.0, "seed": 1}
    assert ckpt._describe(ckpt.identity_changes(saved, current)) == ["adapter: none -> lora", "seed: 0 -> 1"]
    assert ckpt._describe(ckpt.identity_changes(current, saved)) == ["adapter: lora -> none", "seed: 1 -> 0"]
    # Within a section, each field that changed is named.
    assert ckpt._describe(ckpt.identity_changes(current, {**current, "adapter.r": 8})) == ["adapter.r: 16 -> 8"]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("target", ["rng.safetensors", "optimizer.safetensors", "model.safetensors"])
def test_planted_pickle_is_refused_and_never_runs(two_checkpoints, tmp_path, target):
    marker = tmp_path / "pwned"
    directory = two_checkpoints / "step-4"
    (directory / target).write_bytes(pickle.dumps(Payload(str(marker))))
    # The attacker also fixes the manifest, so only the format check stands in the way.
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][target] = {"sha256": ckpt._sha256(directory / target),
                                 "bytes": (directory / target).stat().st_size}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GraftError, match=target):
        build_trainer(None).resume(directory)
    assert not marker.exists()


def test_pickle_only_directory_is_not_a_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints" / "step-9"
    directory.mkdir(parents=True)
    (directory / "model.pt").write_bytes(pickle.dumps(Payload(str(tmp_path / "pwned"))))
    assert ckpt.latest_valid(tmp_path / "checkpoints", warn=lambda _: None) is None
    assert not (tmp_path / "pwned").exists()


KILLED_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
import graftlm.checkpoint as ckpt
from test_trainer import build_trainer
original = ckpt.write_json
def slow_write(path, data):
    original(path, data)
    if ".tmp-step-6" in str(path):  # hang in the middle of saving step 6
        Path({marker!r}).write_text("saving")
        time.sleep(120)
ckpt.write_json = slow_write
build_trainer(Path({run!r}), max_steps=8, save_every=3).fit()
"""


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_previous_and_matches(tmp_path):
    reference_dir, run = tmp_path / "reference", tmp_path / "killed"
    build_trainer(reference_dir, max_steps=8, save_every=3).fit()
    reference = train_losses(reference_dir)

    marker = tmp_path / "saving"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), marker=str(marker), run=str(run))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before saving step 6"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    root = run / "checkpoints"
    assert any(p.name.startswith(".tmp-step-6") for p in root.iterdir())
    latest = ckpt.latest_valid(root)
    assert latest == root / "step-3"
    resumed = build_trainer(run, max_steps=8, save_every=3)
    resumed.resume(latest)
    resumed.fit()
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    got = train_losses(run)  # the killed process's steps 4-6 are replaced by the resumed ones
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(reference[step], abs=1e-6)


@pytest.mark.parametrize("allow", [False, True])
@pytest.mark.parametrize("identity", [{"train.batch_size": 4, "world_size": 1},
                                      {"train.batch_size": 8, "world_size": 1}])
def test_sharded_checkpoint_resumed_with_another_world_size_is_one_refusal(tmp_path, allow, identity):
    """An FSDP checkpoint of 2 ranks resumed by 1 process (torchrun turns --parallel fsdp
    into no sharding then): one refusal naming the ranks and the command, whatever else
    changed, and no --allow-config-change, which cannot load shards into another layout."""
    saved = {"train.batch_size": 4, "world_size": 2}
    ckpt.save_checkpoint(tmp_path, 4, tensors={}, documents={"trainer.json": {
        "step": 4, "identity": saved, "sharded": True, "world_size": 2}})
    trainer = build_trainer(None, identity=identity)
    with pytest.raises(ckpt.CheckpointError) as refused:
        trainer.resume(tmp_path / "step-4", allow_config_change=allow)
    message = str(refused.value)
    assert "sharded over 2 ranks (fsdp)" in message
    assert "torchrun --nproc-per-node 2" in message and "--parallel fsdp" in message
    assert "allow-config-change" not in message and "mode fsdp; resume it the same way" not in message


def test_a_changed_setting_is_refused_before_the_data_is_read(tmp_path, monkeypatch, capsys):
    """Another batch size is known from the command alone: the refusal comes before the
    data is tokenized and the model loaded (minutes, on a large data set)."""
    from graftlm import runs
    from graftlm.cli import main
    from test_sft_packing import _data
    path, _ = _data(tmp_path, n=20)

    def sft(*flags) -> int:
        return main(["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path),
                     "--out", str(tmp_path), "--name", "run", "--train.batch-size", "2", "--train.save-every", "1",
                     "--train.eval-batches", "1", "--tensorboard", "false", *flags])

    assert sft("--train.max-steps", "2") == 0
    read = []
    monkeypatch.setattr(runs, "find_tokenizer", lambda *a: read.append(a) or pytest.fail("data read first"))
    assert sft("--train.max-steps", "3", "--train.batch-size", "4") != 0
    assert "train.batch_size: 2 -> 4" in capsys.readouterr().err and not read
    # Allowed when asked: the same check then lets the run go on to read its data.
    monkeypatch.undo()
    assert sft("--train.max-steps", "3", "--train.batch-size", "4", "--allow-config-change") == 0


def test_a_refusal_names_every_changed_setting_and_a_checkpoint_past_max_steps(tmp_path, capsys):
    """Resumed in one process with another batch size, a two-process run was refused for
    the batch size alone, and for both only under --allow-config-change. A checkpoint past
    --train.max-steps ended the run at once on its model and its stale numbers."""
    # Data that changed is named by the counts that differ, not as two dictionaries.
    assert ckpt._describe(ckpt.identity_changes({"render": {"rows": 7473, "truncated": 188}},
                                                {"render": {"rows": 200, "truncated": 188}})) == \
        ["render.rows: 7473 -> 200"]
    from graftlm.resuming import refuse_changed_settings, run_identity
    from graftlm.runs import run_config_class
    cfg = run_config_class("clm")(model="tiny", data="shards")
    checkpoint = tmp_path / "step-4"
    checkpoint.mkdir()
    (checkpoint / "trainer.json").write_text(json.dumps({"identity": run_identity(cfg, {}, 2)}))
    cfg.train.batch_size *= 2
    with pytest.raises(GraftError, match=r"train\.batch_size: 8 -> 16; world_size: 2 -> 1"):
        refuse_changed_settings(cfg, checkpoint, False, world_size=1)
    # A sharded checkpoint's layout check names the command for its number of ranks instead.
    (checkpoint / "trainer.json").write_text(json.dumps({"identity": run_identity(cfg, {}, 2), "sharded": True}))
    refuse_changed_settings(cfg, checkpoint, False, world_size=1)

    from graftlm.cli import main
    from test_sft_packing import _data
    path, _ = _data(tmp_path, n=20)
    run = ["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path), "--out",
           str(tmp_path), "--name", "run", "--train.batch-size", "2", "--train.save-every", "2",
           "--train.eval-batches", "1", "--tensorboard", "false"]
    assert main([*run, "--train.max-steps", "4"]) == 0
    (tmp_path / "run" / "summary.json").unlink()  # as a run interrupted after its step-4 checkpoint
    capsys.readouterr()
    assert main([*run, "--train.max-steps", "3"]) == 2
    assert "the run is past --train.max-steps 3 (step 4)" in capsys.readouterr().err
