"""Where a run executes: one device, or several processes under `torchrun`.

graftlm uses PyTorch's own distributed engine and nothing home-made: `torchrun` starts
the processes and sets RANK / WORLD_SIZE / LOCAL_RANK, `torch.distributed` moves the
tensors (NCCL on GPUs, gloo on CPUs), DDP or FSDP2 (`fully_shard`) holds the model.

Rules that keep parallelism orthogonal to the other two axes:
- wrap after the model is built and after adapters are injected; never touch the
  model definition or the objectives;
- FSDP2 shards each transformer block, then the root (embeddings, final norm, head),
  with a mixed-precision policy (bf16 compute, fp32 gradient reduction) when asked;
- objectives ask the model for log-probs inside `forward` (`targets=`), so every
  parameter is used where DDP and FSDP2 expect it;
- gradient accumulation skips the gradient synchronisation on all but the last
  micro-step (`no_sync`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from graftlm.errors import ConfigError, GraftError


@dataclass
class ParallelConfig:
    mode: Literal["none", "ddp", "fsdp"] = "none"
    timeout_s: int = 600  # a collective that waits longer fails, naming the rank
    fsdp_mixed_precision: bool = True  # bf16 params in compute, fp32 reductions (CUDA)

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"config field 'parallel.timeout_s': must be positive, got {self.timeout_s}")


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(local_rank: int = 0, requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(cfg: ParallelConfig, device: str | None = None) -> Dist:
    """Join the process group that torchrun set up (or run alone)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        if cfg.mode != "none" and launched_by_torchrun() is False:
            raise GraftError(f"--parallel.mode {cfg.mode} needs torchrun "
                             f"(torchrun --nproc-per-node N -m graftlm ...)")
        return Dist(device=pick_device(0, device), mode="none")
    if cfg.mode == "none":
        raise GraftError("launched by torchrun with several processes: choose --parallel.mode ddp or fsdp")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    target = pick_device(local_rank, device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                device_id=target if target.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=target, mode=cfg.mode)


def wrap_model(model: nn.Module, d: Dist, cfg: ParallelConfig) -> nn.Module:
    """DDP or FSDP2 around a built model (adapters already injected)."""
    if not d.enabled:
        return model
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kwargs = {}
    if cfg.fsdp_mixed_precision and d.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Decoder inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Synchronise gradients only when `enabled` (the last micro-step of a step)."""
    if enabled or not dist.is_initialized():
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over ranks (a no-op alone); errors from a hung peer name this rank."""
    if not d.enabled:
        return value
    try:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    except RuntimeError as e:
        raise GraftError(f"rank {d.rank}: a collective failed or timed out ({str(e).splitlines()[0]}); "
                         "another rank may have died or hung") from None
    return value


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
