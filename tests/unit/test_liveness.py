"""Which rank is gone, as the rank that meets a failed collective finds it (liveness.py):
real processes, killed or exited, that registered themselves in a store; no torchrun
(tests/distributed/test_faults.py has the whole job)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from graftlm import liveness

# A rank's process: registers itself (printing the record it would store), then waits to be
# killed, or exits with the status given.
RANK = """
import sys, time
from graftlm.liveness import register
class Printed:
    def set(self, key, value):
        print(value, flush=True)
register(Printed(), 1)
time.sleep(float(sys.argv[1]))
sys.exit(int(sys.argv[2]))
"""


@pytest.fixture
def store():
    store = dist.HashStore()
    liveness.register(store, 0)  # this process is the rank that met the failure
    return store


def rank_1(store, sleep_s: float = 60, status: int = 0) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", RANK, str(sleep_s), str(status)], stdout=subprocess.PIPE,
                               text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    store.set("rank/1", process.stdout.readline())
    return process


def test_a_killed_rank_is_named_with_its_signal_while_torchrun_has_not_reaped_it(store):
    process = rank_1(store)
    assert liveness.lost_ranks(store, 0, 2, several_hosts=False) is None  # alive: nothing is known
    process.kill()
    while liveness._stat(process.pid)[0] != "Z":  # not reaped: a zombie, as under torchrun's agent
        time.sleep(0.01)
    lost = liveness.lost_ranks(store, 0, 2, several_hosts=True)
    assert lost.gone and lost.ranks == [1]
    assert lost.phrase == (f"rank 1 (pid {process.pid} on {socket.gethostname()}) died, killed by SIGKILL "
                           "(kill -9, or the kernel's OOM killer)")
    process.wait()  # reaped: how it ended is torchrun's to say
    lost = liveness.lost_ranks(store, 0, 2, several_hosts=False)
    assert lost.phrase == f"rank 1 (pid {process.pid}) died (torchrun's summary below says how)"


def test_a_rank_that_exited_is_named_with_its_status(store):
    process = rank_1(store, sleep_s=0, status=3)
    while liveness._stat(process.pid)[0] != "Z":
        time.sleep(0.01)
    assert liveness.lost_ranks(store, 0, 2, several_hosts=False).phrase == \
        f"rank 1 (pid {process.pid}) died, exiting with status 3"
    process.wait()


def test_a_pid_taken_by_another_process_is_not_the_rank(store):
    record = json.loads(store.get("rank/0"))
    store.set("rank/1", json.dumps({**record, "start": "0"}))  # this process's pid, another start
    assert liveness.lost_ranks(store, 0, 2, several_hosts=False).gone


def test_a_rank_on_another_machine_is_named_when_it_does_not_report(store, monkeypatch):
    monkeypatch.setattr(liveness, "REPORT_WAIT_S", 0.2)
    record = json.loads(store.get("rank/0"))
    for rank in (1, 2):
        store.set(f"rank/{rank}", json.dumps({**record, "machine": "another", "host": "node1"}))
    store.append("failing", "2,")  # rank 2 met the failure too: alive
    lost = liveness.lost_ranks(store, 0, 3, several_hosts=True)
    assert not lost.gone and lost.phrase == "rank 1 (on node1) did not report within 0.2 s: died or hung?"
    store.append("failing", "1,")
    assert liveness.lost_ranks(store, 0, 3, several_hosts=True) is None

