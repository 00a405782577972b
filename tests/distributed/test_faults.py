"""FSDP2 under torchrun: a sharded (DCP) checkpoint resumes on the same loss curve, a
rank killed mid-run comes back from the last complete checkpoint (--max-restarts 1),
a collective that hangs fails with an error naming the rank instead of waiting, and a
rank killed without restarts is named, with its pid, by the line of the rank that
survives it (DDP and FSDP2, either rank killed).

Faults come from the test-only GRAFTLM_TEST_FAULT hook in graftlm/parallel.py: it
counts this rank's `all_reduce_sum` calls (two per optimizer step here: the loss sum
and the token count) and acts at the N-th, only in torchrun's first attempt.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest

from tests.distributed.support import COMMON, build_data, graft, ok, step_losses

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("fault-data"))


def pretrain_fsdp(data, out, name, save_every, extra=(), mode="fsdp", **kwargs):
    argv = ["pretrain", "--model", "tiny", "--data", data["shards"], "--out", out, "--name", name,
            "--train.max-steps", STEPS, "--train.batch-size", 2, "--train.grad-accum", 1,
            "--train.eval-every", 0, "--train.save-every", save_every, "--train.keep-checkpoints", 0,
            "--parallel", mode, *COMMON, *extra]
    return graft(argv, nproc=2, **kwargs)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted FSDP2 run: its losses, and its sharded checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("fault-runs")
    ok(pretrain_fsdp(data, out, "a", save_every=3))
    return out / "a", step_losses(out / "a")


def test_fsdp_checkpoint_is_sharded_and_resumes_on_the_same_curve(reference, data):
    run, expected = reference
    step3 = run / "checkpoints" / "step-3"
    shards = sorted(p.name for p in step3.glob("shard-*.safetensors"))
    assert len(shards) == 2, shards  # one per rank: nobody gathered the model
    manifest = json.loads((step3 / "manifest.json").read_text())
    assert set(shards) <= set(manifest["files"]) and "rng-rank-1.safetensors" in manifest["files"]
    assert not list(run.rglob("*.metadata")) and not list(run.rglob("*.pt"))  # nothing pickled

    # Drop the end of the run and resume from step 3.
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    result = ok(pretrain_fsdp(data, run.parent, "a", save_every=3))
    assert "resuming from" in result.stdout and "step-3 (step 3)" in result.stdout
    resumed = step_losses(run)  # later records of a step win: steps 4-6 come from the resume
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-5), (step, resumed, expected)


def test_killed_rank_restarts_from_last_checkpoint_and_finishes(reference, data, tmp_path):
    _, expected = reference
    # Rank 1 is SIGKILLed at step 5's first collective; step-4 is the last complete checkpoint.
    result = pretrain_fsdp(data, tmp_path, "k", save_every=2, torchrun_args=("--max-restarts", "1"),
                           GRAFTLM_TEST_FAULT="kill@9:1")
    ok(result)
    assert "resuming from" in result.stdout and "step-4 (step 4)" in result.stdout, result.stdout
    summary = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    got = step_losses(tmp_path / "k")
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), (step, got, expected)
    assert (tmp_path / "k" / "final" / "model.safetensors").is_file()


def test_hung_collective_times_out_naming_the_rank(data, tmp_path):
    start = time.monotonic()
    result = pretrain_fsdp(data, tmp_path, "h", save_every=0, extra=("--parallel.timeout-s", "10"),
                           timeout=120, GRAFTLM_TEST_FAULT="hang@3:1")
    assert result.returncode != 0
    assert "rank 0: a collective failed or timed out" in result.stderr + result.stdout, result.stderr[-3000:]
    assert time.monotonic() - start < 100


@pytest.mark.parametrize("mode, killed", [("ddp", 1), ("fsdp", 0)])
def test_the_line_of_the_survivor_names_the_killed_rank(data, tmp_path, mode, killed):
    # The killed rank is SIGKILLed at step 3's first collective: it prints nothing, and the
    # other rank's collective fails. Its line names the rank that died, not itself.
    result = pretrain_fsdp(data, tmp_path, "d", save_every=0, mode=mode, timeout=120,
                           GRAFTLM_TEST_FAULT=f"kill@5:{killed}")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("graft pretrain: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    named = re.fullmatch(rf"graft pretrain: error: rank {killed} \(pid (\d+)\) died(, killed by SIGKILL \(kill -9, "
                         rf"or the kernel's OOM killer\)| \(torchrun's summary below says how\)): a collective "
                         rf"failed on rank {1 - killed} without it", lines[0])
    assert named, lines[0]
    # The same process as torchrun's own summary says was killed.
    assert f"exitcode  : -9 (pid: {named[1]})" in result.stderr, result.stderr[-3000:]
