"""Sharded checkpoints under FSDP2, with PyTorch Distributed Checkpoint (DCP).

Every rank writes its own shards of the weights and of the optimizer state; nobody
gathers the model. Layout of `checkpoints/step-N/` (the same directory names, the
same manifest and the same atomic rename as `checkpoint.py`):
  shard-*.safetensors      DCP's Hugging Face storage: each rank's slices of the model
                           (`model/<name>`) and optimizer (`optimizer/<name>/<key>`)
                           tensors, with their offsets in the safetensors metadata
  optimizer.json           param groups and non-tensor optimizer state
  rng-rank-R.safetensors   rank R's torch generator states (+ rng-rank-R.json)
  objective.safetensors    what the objective holds whole on every rank (PPO's critic)
                           and each rank's own (`rank<r>/...`, GRPO's kept rollouts),
                           written by rank 0 (the trainer's `files`)
  trainer.json             step, loader position, resume identity, `sharded: true`
  manifest.json            sha256 and size of every file above; written last

Design choices:
- DCP's safetensors storage (`HuggingFaceStorageWriter/Reader`), not its default
  format: the default keeps its metadata as a pickle, and graftlm never unpickles.
  Offsets travel as JSON inside each safetensors header.
- Atomic: all ranks write into `.tmp-step-N-dcp/` (rank 0 creates it), a barrier
  waits for every shard, then rank 0 writes the JSON files and the manifest and
  renames the directory. A rank killed mid-save leaves only the temporary directory,
  which resume never mistakes for a checkpoint. Several nodes need that directory on
  storage they all see.
- Resume needs the same world size (the trainer's identity already refuses a change);
  the shards load in place into the sharded parameters and optimizer state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from graftlm import checkpoint as ckpt
from graftlm.checkpoint import CheckpointError

SHARD_MARK = "sharded"  # trainer.json key telling a DCP checkpoint from a single-file one


def _flat_state(model, optimizer, trainable_only: bool) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(tensors to save or load into, optimizer JSON, the model and optimizer state dicts).
    Tied weights are stored once (safetensors refuses shared storage)."""
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    # named_parameters() names a tied parameter once
    unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    tensors = {f"model/{name}": value for name, value in model_sd.items() if name in unique}
    optimizer_tensors, scalars = ckpt.split_optimizer_state(optim_sd["state"], "optimizer/")
    tensors.update(optimizer_tensors)
    return tensors, {"param_groups": optim_sd["param_groups"], "scalars": scalars}, model_sd, optim_sd


def save_sharded(root: Path, step: int, model, optimizer, state: dict, *, rank: int,
                 trainable_only: bool, keep_last: int = 0,
                 files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path | None:
    """Every rank calls this; returns the checkpoint directory on rank 0 (None elsewhere).
    `files`: safetensors files (name -> tensors) of unsharded state that rank 0 writes."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-dcp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    tensors, optim_meta, _, _ = _flat_state(model, optimizer, trainable_only)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    rng_tensors, rng_meta = ckpt.rng_files()
    from safetensors.torch import save_file
    save_file(rng_tensors, tmp / f"rng-rank-{rank}.safetensors")
    ckpt.write_json(tmp / f"rng-rank-{rank}.json", rng_meta)
    dist.barrier()  # every shard is on disk
    done = None
    if rank == 0:
        for name, group in (files or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, tmp / name)
        ckpt.write_json(tmp / "optimizer.json", optim_meta)
        ckpt.write_json(tmp / "trainer.json", {**state, SHARD_MARK: True,
                                               "world_size": dist.get_world_size()})
        files = {}
        for path in sorted(tmp.iterdir()):
            ckpt._fsync(path)
            files[path.name] = {"sha256": ckpt._sha256(path), "bytes": path.stat().st_size}
        ckpt.write_json(tmp / ckpt.MANIFEST, {"format": ckpt.FORMAT, "step": step, "files": files})
        ckpt._fsync(tmp / ckpt.MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        ckpt._fsync(root)
        if keep_last > 0:
            for _, old in ckpt.checkpoint_dirs(root)[keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
        done = final
    dist.barrier()  # nobody resumes or saves again before the rename
    return done


def is_sharded_checkpoint(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / "trainer.json").read_text()).get(SHARD_MARK))
    except (OSError, ValueError):
        return False


def load_sharded(directory: Path, model, optimizer, *, rank: int, trainable_only: bool) -> None:
    """Load this rank's shards in place (every rank calls this; the manifest is verified)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    saved_world = ckpt.read_json(directory, "trainer.json").get("world_size")
    if saved_world != dist.get_world_size():
        raise CheckpointError(f"{directory}: sharded over {saved_world} ranks; resume it with "
                              f"{saved_world} processes, not {dist.get_world_size()}")
    tensors, _, model_sd, optim_sd = _flat_state(model, optimizer, trainable_only)
    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(directory)))
    except Exception as e:  # DCP wraps per-rank failures in its own exception type
        raise CheckpointError(f"{directory}: could not load the sharded checkpoint "
                              f"({str(e).splitlines()[0]})") from None
    meta = ckpt.read_json(directory, "optimizer.json")
    for name, entry in optim_sd["state"].items():
        for key in entry:
            entry[key] = tensors.get(f"optimizer/{name}/{key}", meta["scalars"].get(f"{name}/{key}"))
    saved_groups = meta["param_groups"]
    if [g["params"] for g in saved_groups] != [g["params"] for g in optim_sd["param_groups"]]:
        raise CheckpointError(f"{directory}: optimizer state is for other parameters than the model trains")
    optim_sd["param_groups"] = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in saved_groups]
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
    rng = ckpt.read_tensors(directory, f"rng-rank-{rank}.safetensors")
    ckpt.restore_rng(rng, ckpt.read_json(directory, f"rng-rank-{rank}.json"))
