"""Which rank of a torchrun job is gone, for the error line of a rank whose collective failed.

A rank that dies without a word (SIGKILL: `kill -9`, the kernel's OOM killer; a crash)
reaches the others only as a failed collective, in the backend's words: gloo names a
socket's address, NCCL a communicator, neither the rank. torchrun's "Root Cause" names
it, but below our line. So every rank leaves one record in torchrun's agent store as it
joins (`register`: its pid, the process's start time, its host and machine), before the
process group exists, so that once any collective has run every record is there; nothing
more while training. The rank that meets a failed collective (`lost_ranks`):
- says so in the store (for the others' view of it, below);
- on its own machine (same boot and pid namespace) looks at each rank's process: one that
  has ended is named, with its exit status while the process is a zombie (torchrun reaps
  it at its next look, every 0.1 s, and then stops the job: usually after our line);
- on other machines, where no pid can be checked, names the ranks that have not said
  within a second that a collective failed on them too: they died or hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass

# How long the rank that met the failure waits for the ranks on other machines to say
# that they met it too; those that do not are named. Only when a rank elsewhere is in the job.
REPORT_WAIT_S = 1.0


@dataclass
class Lost:
    """What a failed collective is blamed on: `ranks` seen gone on this machine (`gone`),
    else ranks elsewhere that did not report; `phrase` names them."""

    gone: bool
    ranks: list[int]
    phrase: str


def register(store, rank: int) -> None:
    """This rank's record, read by the rank that meets a failed collective."""
    store.set(f"rank/{rank}", json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid()),
                                          "host": socket.gethostname(), "machine": _machine()}))


def lost_ranks(store, rank: int, world: int, several_hosts: bool) -> Lost | None:
    """The ranks the failure is blamed on, or None when nothing is known (every rank on
    this machine alive and none elsewhere): the caller then says what it said before."""
    store.append("failing", f"{rank},")
    records = [json.loads(r) for r in store.multi_get([f"rank/{r}" for r in range(world)])]
    here = _machine()
    gone = {}
    for r, record in enumerate(records):
        if r != rank and here is not None and record["machine"] == here:
            how = _ended(record["pid"], record["start"])
            if how is not None:
                where = f"pid {record['pid']} on {record['host']}" if several_hosts else f"pid {record['pid']}"
                gone[r] = f"rank {r} ({where}) {how}"
    if gone:
        return Lost(True, list(gone), ", ".join(gone.values()))
    elsewhere = [r for r, record in enumerate(records) if r != rank and (here is None or record["machine"] != here)]
    deadline = time.monotonic() + REPORT_WAIT_S
    while elsewhere:
        reported = {int(r) for r in store.get("failing").decode().split(",") if r}
        elsewhere = [r for r in elsewhere if r not in reported]
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not elsewhere:
        return None
    hosts = sorted({records[r]["host"] for r in elsewhere})
    named = ", ".join(map(str, elsewhere[:4])) + (f" and {len(elsewhere) - 4} more" if len(elsewhere) > 4 else "")
    return Lost(False, elsewhere, f"rank{'s' if len(elsewhere) > 1 else ''} {named} (on {', '.join(hosts)}) did not "
                       f"report within {REPORT_WAIT_S:g} s: died or hung?")


def _machine() -> str | None:
    """This machine and pid namespace (pids mean the same process within it); None where
    /proc cannot say (not Linux): every other rank then counts as elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (after the name, which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def _ended(pid: int, start: str | None) -> str | None:
    """How the process of a rank on this machine ended; None while it runs. Its start
    time tells a pid used again by another process."""
    fields = _stat(pid)
    same = fields is not None and fields[19] == start
    if same and fields[0] not in "ZX":
        return None
    # A zombie still holds its wait status (field 52, since Linux 3.5; 0 where we
    # may not read it); once torchrun has reaped it, only torchrun's summary knows.
    status = int(fields[49]) if same and len(fields) > 49 else 0
    number = status & 0x7F
    if number:
        try:
            name = signal.Signals(number).name
        except ValueError:  # a real-time signal
            name = f"signal {number}"
        oom = " (kill -9, or the kernel's OOM killer)" if number == signal.SIGKILL else ""
        return f"died, killed by {name}{oom}"
    if status:
        return f"died, exiting with status {status >> 8}"
    return "died (torchrun's summary below says how)"
