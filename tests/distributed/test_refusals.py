"""What a refused multi-process run shows: one error line from rank 0, the other ranks
leaving quietly with the same exit status (no gloo traceback), and a sharded checkpoint
resumed with another number of processes refused once, with the command that resumes it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed.support import COMMON, ROOT, build_data, env, graft, ok

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("refusal-data"))


@pytest.fixture(scope="module")
def finished_fsdp_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("refusal-runs")
    argv = ["pretrain", "--model", "tiny", "--data", data["shards"], "--out", out, "--name", "f",
            "--train.max-steps", 2, "--train.batch-size", 2, "--train.eval-every", 0, "--train.save-every", 0,
            "--parallel", "fsdp", *COMMON]
    ok(graft(argv, nproc=2))
    return argv


def test_finished_run_under_torchrun_is_one_error_line(finished_fsdp_run):
    result = graft(finished_fsdp_run, nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line and "graft pretrain" in line]
    assert len(errors) == 1 and "the run is finished (2 steps)" in errors[0], result.stderr[-3000:]
    assert "[rank1]" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-3000:]


def test_sharded_checkpoint_resumed_by_one_process_names_the_command(finished_fsdp_run):
    argv = [str(a) for a in finished_fsdp_run]
    argv[argv.index("--train.max-steps") + 1] = "3"
    # `torchrun --nproc-per-node 1 ... --parallel fsdp`, as the user ran it
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             "1", "-m", "graftlm", *argv], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode != 0
    assert "nothing to shard" in result.stdout, result.stdout[-2000:]
    assert "checkpoint sharded over 2 ranks (fsdp)" in result.stderr, result.stderr[-3000:]
    assert "--nproc-per-node 2" in result.stderr and "allow-config-change" not in result.stderr
