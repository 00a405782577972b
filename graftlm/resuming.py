"""How a run continues: its directory (resume, fresh, refuse), the lock that lets one
command train it at a time, the settings it recorded, and what a resume must find
unchanged (`run_identity`), refused before the data is read where the settings alone
tell (`refuse_changed_settings`).

Design choices:
- A resume refuses a change in what defines the data stream and the model
  (`IDENTITY_FIELDS`, the data's identity, an adapter's base weights), naming each
  field that changed; other settings given anew are allowed, listed and recorded.
- A continued run keeps what it recorded (`config.yaml`) for whatever its command
  leaves out, except where and how it runs (`FROM_THE_COMMAND`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from torch import nn

from graftlm import checkpoint as ckpt
from graftlm.adapters.identity import base_identity
from graftlm.config import as_read_now, flatten, from_dict, to_dict, under_given
from graftlm.errors import GraftError, read_json
from graftlm.optim import OptimConfig, lr_at
from graftlm.report import write_report_or_warn

if TYPE_CHECKING:
    from graftlm.runs import RunConfig


# Fields that define the data stream and the model; a resume refuses a change in them.
IDENTITY_FIELDS = ("model", "seed", "train.batch_size", "train.grad_accum", "adapter")
# Where a run is and where it runs: a continued run takes these from the command that
# continues it (the launcher decides the devices), never from what it recorded.
FROM_THE_COMMAND = ("out", "name", "device", "parallel")


def prepare_run_directory(run_dir: Path, cfg: RunConfig, resume: bool | None, fresh: bool,
                          given=None, warn=print) -> tuple[Path | None, dict, RunConfig]:
    """The checkpoint to resume from (None: start fresh), after clearing what `fresh` drops;
    the settings the run recorded (empty when it starts fresh); and the config it trains
    with: a continued run's recorded settings under those the command gave (`given`,
    dotted fields; None: every field of `cfg` was given), so that a shorter command, or a
    larger --train.max-steps alone, continues it as it was.

    resume: True (must resume), None (resume when there is a checkpoint), False (never).
    """
    summary = run_dir / "summary.json"
    if fresh:
        for name in ("checkpoints", "final", "tensorboard", "metrics.jsonl", "summary.json", "config.yaml",
                     "report.html"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return None, {}, cfg
    root = run_dir / "checkpoints"
    latest = ckpt.latest_valid(root, warn=warn) if resume is not False else None
    recorded = recorded_config(run_dir) if latest is not None or summary.exists() else {}
    recorded = as_read_now(cfg, recorded) if recorded else {}
    continued = under_given(cfg, recorded, [*given, *FROM_THE_COMMAND]) if recorded and given is not None else cfg
    if summary.exists():
        done = read_json(summary).get("steps", 0)
        if done >= continued.train.max_steps:
            written = ""
            if not (run_dir / "report.html").exists():  # stopped between summary.json and its report
                written = "; its report.html was missing and is written now" if write_report_or_warn(run_dir) else ""
            raise GraftError(f"{run_dir}: the run is finished ({done} steps){written}; pass --fresh to train it "
                             "again, --name for a new run, or a larger --train.max-steps to continue")
    if resume and latest is None:
        raise GraftError(f"{root}: no complete checkpoint to resume from")
    reached = ckpt.step_of(latest) if latest is not None else 0
    if reached > continued.train.max_steps:  # it would end at once, on the checkpoint's model and numbers
        raise GraftError(f"{latest}: the run is past --train.max-steps {continued.train.max_steps} (step {reached}); "
                         f"pass --train.max-steps {reached} or more to continue it, or --fresh to start over")
    if latest is None:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a run that died before its first checkpoint
        return None, {}, cfg  # nothing to continue: its command alone says how it trains
    return latest, recorded, continued


def run_identity(cfg: RunConfig, data_identity: dict, world_size: int, saved: dict | None = None,
              model: nn.Module | None = None) -> dict:
    """What a resume must find unchanged. A section (the adapter) is one entry per field,
    so that a refused resume names the field that changed (`adapter.r: 8 -> 4`); a
    checkpoint that recorded the section whole (`saved`, written before) is compared whole.
    An adapter run also records its frozen base's weights (a digest of the sample its
    adapter records, `adapters.identity`): a resume reads them from --model again, and
    other weights there would silently train the rest of the adapter on another base.
    A checkpoint from before this was recorded is not compared on it."""
    flat = {}
    if cfg.adapter is not None and model is not None and (not saved or "adapter_base_weights" in saved):
        sample = base_identity(model)["weights_sample"]
        flat["adapter_base_weights"] = hashlib.sha256(sample.encode()).hexdigest()[:16]
    for dotted in IDENTITY_FIELDS:
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        if not dataclasses.is_dataclass(value):
            flat[dotted] = value
        elif isinstance((saved or {}).get(dotted), dict):
            flat[dotted] = to_dict(value)
        else:
            flat.update({f"{dotted}.{name}": v for name, v in to_dict(value).items()})
    return {"objective": cfg.objective, "world_size": world_size, **flat, **data_identity}


def _trainer_state(checkpoint: Path | None) -> dict:
    """A checkpoint's trainer.json, or {} where there is none to read (the resume itself
    names what is wrong with the checkpoint)."""
    if checkpoint is None:
        return {}
    try:
        state = ckpt.read_json(checkpoint, "trainer.json")
    except GraftError:
        return {}
    return state if isinstance(state, dict) else {}


def saved_identity(checkpoint: Path | None) -> dict:
    return _trainer_state(checkpoint).get("identity") or {}


def refuse_changed_settings(cfg: RunConfig, checkpoint: Path | None, allow_change: bool, world_size: int) -> None:
    """The resume check of the settings alone, before the data is tokenized and the model
    loaded (minutes, on a large data set): another batch size or adapter rank is refused
    at once. The data and the base weights are compared when they are read; another
    number of ranks of a sharded checkpoint by its layout check, which names the command
    to run."""
    if checkpoint is None:
        return
    state = _trainer_state(checkpoint)
    saved = state.get("identity") or {}
    current = run_identity(cfg, {}, world_size, saved)
    if state.get("sharded"):
        del current["world_size"]
    # Allowed changes warn once, later, with the data's and the weights' changes beside them.
    ckpt.check_identity({key: saved.get(key) for key in current}, current, allow_change, checkpoint,
                        warn=lambda line: None)


def recorded_config(run_dir: Path) -> dict:
    """The settings a run recorded when it last ran (its config.yaml), as dotted keys;
    empty when there are none to read."""
    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return flatten(recorded) if isinstance(recorded, dict) else {}


def changed_settings(recorded: dict, config: dict, defaults: dict | None = None) -> list[str]:
    """`field: old -> new` for each setting of `config` that differs from the one the run
    `recorded` (none when it recorded none). A field the run did not record (a later
    graftlm's, such as grpo.loss_type) at its value in `defaults` (the same config at its
    defaults) is no change: a field is added with the default that keeps the old behaviour,
    so that default is also what such a run trained with, and what a change is from."""
    if not recorded:
        return []
    new = flatten(config)
    unrecorded = {key: value for key, value in flatten(defaults or {}).items() if key not in recorded}
    unrecorded_defaults = {key for key, value in unrecorded.items() if new.get(key) == value}

    def old(key: str) -> str:
        if key in unrecorded:
            return f"{unrecorded[key]} (not recorded: the default)"
        return str(recorded.get(key))

    def same(a, b) -> bool:  # `shards/` and `shards` name one directory
        if isinstance(a, str) and b == [a]:  # a field that became a list (grpo.reward) recorded as one value
            return True
        return a == b or (isinstance(a, str) and isinstance(b, str) and a and b
                          and os.path.normpath(a) == os.path.normpath(b))

    return [f"{key}: {old(key)} -> {new.get(key)}" for key in dict.fromkeys([*new, *recorded])
            if key not in unrecorded_defaults and not same(recorded.get(key), new.get(key))]


def schedule_jump(recorded: dict, cfg: RunConfig, step: int) -> str | None:
    """A line when a continued run changes its learning rate at once: a decaying schedule
    is laid out over max_steps, so a run extended to more (or fewer) steps takes the next
    step's rate of a run planned for the new length; other --optim settings move it too.
    The rate it comes from is the one its last step used (its recorded settings)."""
    before = recorded.get("train.max_steps")
    if not isinstance(before, int) or step < 1:
        return None
    try:
        used = from_dict(OptimConfig, {**to_dict(cfg.optim), **{k.removeprefix("optim."): v for k, v in
                                                                recorded.items() if k.startswith("optim.")}})
    except GraftError:  # settings of an older graftlm that no longer read: no note
        return None
    last, next_ = lr_at(step - 1, before, used), lr_at(step, cfg.train.max_steps, cfg.optim)
    # Against the next step's rate as the run was planned: a short schedule's own decay
    # from one step to the next is no change (it read as one on every resume).
    planned = lr_at(step, before, used)
    if max(planned, next_) <= 1.2 * min(planned, next_):
        return None
    change = (f"the rate goes from {last:.3g} at step {step} to {next_:.3g} at step {step + 1}, "
              f"where the run as planned would use {planned:.3g}")
    if before == cfg.train.max_steps:
        return f"note: with the changed --optim settings {change}"
    return (f"note: the {cfg.optim.schedule} learning-rate schedule now spans {cfg.train.max_steps} steps, as if "
            f"planned for them: {change}")


class RunLock:
    """One command trains a run directory at a time: rank 0 holds an exclusive flock on
    `<run>/.lock` (holding its pid) until the run ends; the kernel lets go when the process
    dies, so a killed or restarted run is never locked out. A second command on a run in
    progress (another terminal, a requeued job) resumed beside the first, and both wrote
    the same checkpoints, metrics.jsonl and summary.json."""

    def __init__(self):
        self._file = None

    def acquire(self, run_dir: Path) -> None:
        """Take the lock of `run_dir` if it exists and is not held yet (again after the
        directory is made: a new run has none to lock at first)."""
        if self._file is not None or not run_dir.is_dir():
            return
        file = open(run_dir / ".lock", "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            raise GraftError(f"{run_dir}: another graft command{f' (pid {holder})' if holder else ''} is training "
                             "this run; wait for it to end, or pass --name for a new run") from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
