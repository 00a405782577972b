"""A run SIGKILLed at a random step resumes from its last complete checkpoint: the losses
equal the uninterrupted run's, and the sample ids it trains on are the same sequence,
each sample once per epoch, with gradient accumulation and across epoch boundaries."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_trainer import build_trainer, train_losses  # noqa: E402

import graftlm.checkpoint as ckpt  # noqa: E402
from graftlm.objectives.clm import CausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BATCH, ACCUM, STEPS, SAVE_EVERY = 4, 2, 12, 3  # 40 samples: 5 steps an epoch, 2.4 epochs


class RecordingLM(CausalLM):
    """The CLM loss, appending each micro-batch's sample ids to a log as it trains."""

    def __init__(self, log: Path):
        super().__init__()
        self.log = log

    def loss(self, model, batch):
        with self.log.open("a") as fh:
            fh.write(json.dumps(batch["sample_ids"].tolist()) + "\n")
        return super().loss(model, batch)


def run(run_dir: Path, log: Path) -> None:
    trainer = build_trainer(run_dir, max_steps=STEPS, batch_size=BATCH, grad_accum=ACCUM,
                            save_every=SAVE_EVERY, objective=RecordingLM(log))
    latest = ckpt.latest_valid(run_dir / "checkpoints", warn=lambda _: None)
    if latest is not None:
        trainer.resume(latest)
    trainer.fit()


def ids_per_step(log: Path) -> list[list[int]]:
    micro = [json.loads(line) for line in log.read_text().splitlines()]
    return [sum(micro[i:i + ACCUM], []) for i in range(0, len(micro), ACCUM)]


CHILD = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_kill_resume import run
run(Path(sys.argv[1]), Path(sys.argv[2]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_step_resumes_exactly(tmp_path, seed):
    reference_log = tmp_path / "reference.ids"
    run(tmp_path / "reference", reference_log)
    reference_losses = train_losses(tmp_path / "reference")
    reference_ids = ids_per_step(reference_log)

    kill_after = random.Random(seed).randint(SAVE_EVERY + 1, STEPS - 1)  # micro-steps logged
    run_dir, log = tmp_path / "killed", tmp_path / "killed.ids"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), str(log)], cwd=ROOT)
    deadline = time.time() + 120
    while not log.exists() or len(log.read_text().splitlines()) < kill_after * ACCUM:
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    latest = ckpt.latest_valid(run_dir / "checkpoints", warn=lambda _: None)
    resumed_from = int(latest.name.split("-")[1])
    assert 0 < resumed_from < STEPS
    before = ids_per_step(log)[:resumed_from]  # what the checkpoint had consumed
    log.unlink()
    run(run_dir, log)
    trained = before + ids_per_step(log)

    assert trained == reference_ids
    per_epoch = 40 // (BATCH * ACCUM)
    flat = sum(trained, [])
    for epoch in range(len(trained) // per_epoch):
        ids = flat[epoch * 40:(epoch + 1) * 40]
        assert sorted(ids) == list(range(40)), f"epoch {epoch} did not see every sample once"
    assert flat[:40] != flat[40:80], "the next epoch must get its own shuffle"
    losses = train_losses(run_dir)
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(reference_losses[step], abs=1e-6)
