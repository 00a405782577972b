"""Checkpoints: atomic, verified, pickle-free, and exact to resume from.

Layout of `checkpoints/step-N/`:
  model.safetensors        the trained weights (all of them, or only the trainable ones
                           when the base is frozen, e.g. LoRA)
  optimizer.safetensors    optimizer state tensors, keyed `<param name>/<state key>`
  optimizer.json           param groups (hyper-parameters, parameter names)
  rng.safetensors          torch CPU / CUDA generator states as uint8 tensors
  trainer.json             step, loader position, Python / NumPy RNG, resume identity
  objective.safetensors    an objective's own tensors (optional; `rank<r>/...`: rank r's own)
  manifest.json            sha256 and size of every file above; written last

Design choices:
- Atomic: everything is written into `.tmp-step-N-<pid>/`, fsynced, and renamed to
  `step-N/` only when the manifest is in place. A crash (even SIGKILL) mid-save leaves
  a temporary directory that is never mistaken for a checkpoint and is swept later.
- Verified: loading checks every file against the manifest and names the first bad
  one; automatic resume walks back from the newest checkpoint to the newest valid one.
- Retention deletes old checkpoints only after a new one is complete, and never the
  newest.
- No pickle: tensors go through safetensors, everything else through JSON. A planted
  `.pt` / pickle file is at worst "not a safetensors file".
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from graftlm.errors import GraftError
from graftlm.models.hf import read_safetensors

FORMAT = "graftlm-checkpoint-v1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(GraftError):
    """A checkpoint is incomplete, corrupt or does not fit the run."""


# -- writing -------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def step_of(directory: Path) -> int:
    """The step a checkpoint directory (`step-N`) was saved at."""
    return int(_STEP_DIR.match(directory.name).group(1))


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints (named step-N), newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    documents: dict[str, object], keep_last: int = 0) -> Path:
    """Write `tensors` (file name -> tensors) and `documents` (file name -> JSON) as step-N.

    On any OSError (a full disk, say) the partial directory is removed, completed
    checkpoints are untouched, and a CheckpointError says so.
    """
    for file_name, group in tensors.items():  # a checkpoint never holds NaN or inf
        for key, value in group.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"step-{step}: not saved, '{key}' in {file_name} holds non-finite "
                                      "values; the last complete checkpoint is kept")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, group in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, tmp / name)
        for name, data in documents.items():
            write_json(tmp / name, data)
        files = {}
        for path in sorted(tmp.iterdir()):
            _fsync(path)
            files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})
        _fsync(tmp / MANIFEST)
        if final.exists():  # re-saving the same step (e.g. resumed at the very end)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for s, p in checkpoint_dirs(root) if s != step]
        kept = f"; {previous[0]} is intact" if previous else ""
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"{final}: could not write checkpoint ({reason}){kept}") from None
    if keep_last > 0:
        for _, old in checkpoint_dirs(root)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def sweep_partial(root: Path) -> None:
    """Remove temporary directories left by a save that crashed."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-step-"):
                shutil.rmtree(p, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------

def verify(directory: Path) -> dict:
    """Check every file against the manifest; returns the manifest or names the bad file."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (the checkpoint is incomplete)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: not a valid checkpoint manifest ({e})") from None
    for name, entry in files.items():
        path = directory / name
        if "/" in name or not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{path}: is {path.stat().st_size} bytes, the manifest says "
                                  f"{entry['bytes']} (truncated or replaced)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: checksum does not match the manifest (corrupted)")
    return manifest


def read_tensors(directory: Path, name: str) -> dict[str, torch.Tensor]:
    path = directory / name
    try:
        return read_safetensors(path)
    except GraftError as e:
        raise CheckpointError(str(e)) from None


def read_json(directory: Path, name: str):
    path = directory / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


def latest_valid(root: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported and skipped."""
    for _, directory in checkpoint_dirs(root):
        try:
            verify(directory)
            return directory
        except CheckpointError as e:
            warn(f"skipping checkpoint {directory.name}: {e}")
    return None


# -- model, optimizer and RNG state <-> files ----------------------------------------------

def model_tensors(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The weights to store; tied duplicates once (safetensors refuses shared storage)."""
    out, seen = {}, set()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if (trainable_only and name not in trainable) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach()
    return out


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = model_tensors(model, trainable_only=False)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise CheckpointError(f"{source}: has tensor '{unknown[0]}' that the model does not have")
    with torch.no_grad():
        for name, value in tensors.items():
            target = expected[name]
            if target.shape != value.shape:
                raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, "
                                      f"the model's is {tuple(target.shape)}")
            target.copy_(value)


def split_optimizer_state(state: dict, tensor_prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """{param name: {key: value}} -> (tensors for safetensors, scalars for JSON), keyed
    "name/key": the optimizer state in files that need no pickle."""
    tensors, scalars = {}, {}
    for name, entry in state.items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{tensor_prefix}{name}/{key}"] = value
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, scalars


def optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    names = {}
    groups = []
    for group in state["param_groups"]:
        names.update(zip(group["params"], group["param_names"]))
        groups.append({k: v for k, v in group.items() if k != "params"})
    tensors, scalars = split_optimizer_state({names[i]: entry for i, entry in state["state"].items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict, source: Path) -> None:
    current = optimizer.state_dict()
    saved_groups = meta["param_groups"]
    if [g["param_names"] for g in saved_groups] != [g["param_names"] for g in current["param_groups"]]:
        raise CheckpointError(f"{source}: optimizer state is for other parameters than the model trains")
    state: dict[int, dict] = {}
    groups = []
    for saved, group in zip(saved_groups, current["param_groups"]):
        restored = dict(saved, params=group["params"])
        restored["betas"] = tuple(restored["betas"])
        groups.append(restored)
        for index, name in zip(group["params"], group["param_names"]):
            prefix = name + "/"
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            entry.update({k[len(prefix):]: v for k, v in meta["scalars"].items() if k.startswith(prefix)})
            if entry:
                state[index] = entry
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_files() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return tensors, {"python": [version, list(mt_state), gauss],
                     "numpy": [np_kind, np_keys.tolist(), np_pos, np_has_gauss, np_gauss]}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, mt_state, gauss = meta["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- an objective's own state --------------------------------------------------------------

OBJECTIVE_FILE = "objective.safetensors"  # PPO's critic; each rank's GRPO rollouts as rank<r>/...


def gather_rank_tensors(own: dict[str, torch.Tensor], rank: int, world_size: int, all_reduce,
                        device) -> dict[str, torch.Tensor]:
    """Every rank's `own` tensors as `rank<r>/<key>`, on rank 0 ({} on the others; every
    rank calls this). For state that differs between ranks (GRPO's kept rollouts, each of
    its rank's prompts) in a checkpoint rank 0 writes, alone or beside FSDP2's shards. Each
    rank's tensors travel as their safetensors bytes in a row of their own, summed into
    zeros by the run's all-reduce: exact for any dtype, no pickle, no other collective."""
    if world_size == 1:
        return {f"rank0/{key}": value for key, value in own.items()}
    from safetensors.torch import load, save

    data = save({k: v.detach().contiguous().cpu() for k, v in own.items()}) if own else b""
    sizes = torch.zeros(world_size, dtype=torch.int64, device=device)
    sizes[rank] = len(data)
    sizes = all_reduce(sizes).tolist()
    if not any(sizes):  # between GRPO's blocks: nothing kept anywhere
        return {}
    rows = torch.zeros(world_size, max(sizes), dtype=torch.uint8, device=device)
    if data:
        rows[rank, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    rows = all_reduce(rows)
    if rank != 0:
        return {}
    rows = rows.cpu()
    return {f"rank{r}/{key}": value for r, size in enumerate(sizes) if size
            for key, value in load(rows[r, :size].numpy().tobytes()).items()}


def split_rank_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """(the tensors every rank shares, {rank: its own}) of `gather_rank_tensors`' layout."""
    shared, ranks = {}, {}
    for key, value in tensors.items():
        head, _, rest = key.partition("/")
        if head.startswith("rank") and head[4:].isdigit() and rest:
            ranks.setdefault(int(head[4:]), {})[rest] = value
        else:
            shared[key] = value
    return shared, ranks


def load_objective_state(objective, directory: Path, state: dict, rank: int, world_size: int, warn) -> None:
    """Hand an objective what it saved (`checkpoint_state`), and this rank its own part
    (`rank_checkpoint_state`) where the checkpoint has one for it."""
    if not hasattr(objective, "load_checkpoint_state"):
        return
    if "objective" not in state:  # saved before objectives kept state: resumable, not exactly
        warn(f"warning: {directory} holds no {objective.name} state (an older checkpoint): the objective's own "
             "state restarts (the rollout counter, so new sampling seeds; PPO's critic from its initialisation, "
             "with a fresh optimizer)")
        return
    path = directory / OBJECTIVE_FILE
    shared, ranks = split_rank_tensors(read_tensors(directory, OBJECTIVE_FILE) if path.is_file() else {})
    objective.load_checkpoint_state(shared, state["objective"], path)
    saved_world = (state.get("identity") or {}).get("world_size", world_size)
    # Each rank's part is of its own prompts: with another number of ranks (which only
    # --allow-config-change lets through) it fits none, and sampling anew is the way on.
    if ranks and saved_world != world_size:
        warn(f"warning: {directory} was saved by {saved_world} ranks, each keeping the rollouts of its own prompts "
             f"for the rest of an --{objective.name}.iterations block; they fit none of this run's {world_size} "
             f"rank{'s' if world_size > 1 else ''}, so that block's remaining passes sample anew")
        ranks = {}
    if hasattr(objective, "load_rank_checkpoint_state"):
        objective.load_rank_checkpoint_state(ranks.get(rank, {}))


# -- refusing to resume into a different run -----------------------------------------------

@dataclass
class IdentityChange:
    field: str
    saved: object
    current: object


def identity_changes(saved: dict, current: dict) -> list[IdentityChange]:
    keys = sorted(set(saved) | set(current))
    return [IdentityChange(k, saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)]


def _describe(changes: list[IdentityChange]) -> list[str]:
    """`field: old -> new` per change; a section added or dropped whole (full training to
    an adapter: every `adapter.*` field from None) is one `adapter: none -> lora`."""
    sections: dict[str, list[IdentityChange]] = {}
    for change in changes:
        if "." in change.field:
            sections.setdefault(change.field.split(".")[0], []).append(change)
    whole = {}
    for name, fields in sections.items():
        kind = next((c for c in fields if c.field == f"{name}.kind"), None)
        added, dropped = all(c.saved is None for c in fields), all(c.current is None for c in fields)
        if kind is not None and (added or dropped):
            whole[name] = f"{name}: {kind.saved or 'none'} -> {kind.current or 'none'}"
    described = []
    for c in changes:
        if c.field.split(".")[0] in whole:
            continue
        if isinstance(c.saved, dict) and isinstance(c.current, dict):  # the data's counts: the entries that differ
            described += [f"{c.field}.{key}: {c.saved.get(key)!r} -> {c.current.get(key)!r}"
                          for key in dict.fromkeys([*c.saved, *c.current]) if c.saved.get(key) != c.current.get(key)]
        else:
            described.append(f"{c.field}: {c.saved!r} -> {c.current!r}")
    return [*whole.values(), *described]


# Adapter fields that decide which tensors a run trains and their shapes.
RESHAPING_ADAPTER_FIELDS = ("adapter.kind", "adapter.r", "adapter.target_modules", "adapter.modules_to_save")


def _reshapes_trained_state(change: IdentityChange) -> bool:
    """A change after which the checkpoint's trained tensors cannot be loaded: an adapter
    of another kind, rank or set of layers, or adapters added to or dropped from a run."""
    return change.field in RESHAPING_ADAPTER_FIELDS or (change.field == "adapter" and change.saved != change.current)


def check_identity(saved: dict, current: dict, allow_change: bool, source: Path, warn=print) -> None:
    """Refuse to resume when what defines the data stream or model changed."""
    changes = identity_changes(saved, current)
    if not changes:
        return
    diff = "; ".join(_describe(changes))
    if any(_reshapes_trained_state(change) for change in changes):
        # --allow-config-change could not help: the saved tensors no longer fit the model.
        raise CheckpointError(f"{source}: the run changed since this checkpoint ({diff}), and what it trains has "
                              "another shape now, so it cannot continue from it: --fresh starts the run over")
    if allow_change:
        warn(f"warning: the run changed since {source} ({diff}); it continues, as --allow-config-change asks")
        return
    raise CheckpointError(f"{source}: the run changed since this checkpoint ({diff}); "
                          "pass --allow-config-change to resume anyway, or --fresh to start over")
