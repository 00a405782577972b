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
  micro-step (`no_sync`);
- nothing assumes one host: the device comes from LOCAL_RANK, everything written to
  the run directory is written by global rank 0 (sharded checkpoints: every rank
  writes its own shard into a directory on storage all nodes share);
- the final export gathers the full weights into a weight-less copy of the model made
  before wrapping (a "skeleton" on the meta device), so the HF / PEFT writers see a
  plain module on rank 0 whatever the wrapping;
- online RL samples with every block unsharded once (`unsharded_for_generation`):
  ranks stop generating at different lengths, and per-step all-gathers would hang;
- QLoRA's NF4 weights (torchao) are frozen and packed: DDP gets them broadcast bit for
  bit and then ignores them; FSDP2 shards them through torchao's support, after a check
  that names any layer that cannot split evenly; the export does not gather them.

Test-only fault injection (`GRAFTLM_TEST_FAULT`, read nowhere else): `kill@N:R` kills
rank R with SIGKILL at its N-th `all_reduce_sum` call (the trainer makes two per step and
two per validation), `hang@N:R` makes rank R sleep there; both only in torchrun's first
attempt (TORCHELASTIC_RESTART_COUNT 0), so a restarted job runs clean.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import signal
import sys
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from graftlm.errors import GraftError
from graftlm.liveness import Lost, lost_ranks, register
from graftlm.placement import pick_device
from graftlm.run_config import ParallelConfig  # defined without torch


class CollectiveError(GraftError):
    """A collective failed or timed out on this rank; the message names the rank."""

    rank_local = True


def collective_error(rank: int, what: str, e: BaseException) -> CollectiveError:
    """The line for a collective that failed on this rank: the rank that died, where
    torchrun's store and this machine's processes tell it (`liveness.py`)."""
    _hold_off_sigterm()
    lost = _lost_ranks(rank)
    if lost is not None and lost.gone:
        them = "them" if len(lost.ranks) > 1 else "it"
        return CollectiveError(f"{lost.phrase}: {what} failed on rank {rank} without {them}")
    blamed = lost.phrase if lost is not None else "another rank may have died or hung"
    return CollectiveError(f"rank {rank}: {what} failed or timed out ({str(e).splitlines()[0]}); {blamed}")


def _hold_off_sigterm():
    """Ignore SIGTERM in a rank that is about to print its error and exit; the handler it
    replaces (None outside the main thread, where Python handles no signal).

    torchrun SIGTERMs every rank at its next look (every 0.1 s) after one exits: a rank
    that met the loss of another in a collective has that long to find which rank it was
    and print the line, and a SIGTERM in between would leave no line, or "terminated".
    From a collective's failure it lasts until the error leaves `sigterm_as_interrupt`
    (which puts back the handler it found) or the process exits."""
    try:
        return signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:
        return None


def _lost_ranks(rank: int) -> Lost | None:
    """`liveness.lost_ranks` through torchrun's agent store; None without that store, or
    when the store does not answer within a few seconds (it went with a lost machine)."""
    if not (dist.is_initialized() and _agent_store()):
        return None
    try:
        store = _job_store(timeout_s=3)
        several_hosts = os.environ.get("LOCAL_WORLD_SIZE", "1") != os.environ["WORLD_SIZE"]
        return lost_ranks(store, rank, dist.get_world_size(), several_hosts)
    except (RuntimeError, ValueError, KeyError, OSError):
        return None


def as_collective_error(e: BaseException) -> CollectiveError | None:
    """The communication backend's own error raised outside graftlm's collectives (gloo's,
    from DDP's gradient all-reduce inside backward, when another rank died; NCCL's), as
    the one line `all_reduce_sum` gives; None for any other error."""
    if not dist.is_initialized() or not (isinstance(e, dist.DistError) or "/gloo/" in str(e)):
        return None
    return collective_error(dist.get_rank(), "a collective", e)


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


def init_distributed(cfg: ParallelConfig, device: str | None = None) -> Dist:
    """Join the process group that torchrun set up (or run alone)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        if cfg.mode != "none" and launched_by_torchrun() is False:
            raise GraftError(f"--parallel.mode {cfg.mode} needs torchrun "
                             f"(torchrun --nproc-per-node N -m graftlm ...)")
        target = pick_device(0, device)
        if cfg.mode != "none":  # torchrun with one process: the run is a plain one-device run
            print(f"note: --parallel {cfg.mode} with one process: nothing to "
                  f"{'shard' if cfg.mode == 'fsdp' else 'replicate'}, the model trains unsharded on {target}",
                  flush=True)
        return Dist(device=target, mode="none")
    if cfg.mode == "none":
        raise GraftError("launched by torchrun with several processes: choose --parallel.mode ddp or fsdp")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    target = pick_device(local_rank, device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        store = _attempt_store(rank, world, timeout)
        if _agent_store():  # it outlives every rank: the record of one that dies stays readable
            register(store, rank)  # before the group forms, so every collective finds every record
        dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world, store=store,
                                device_id=target if target.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=target, mode=cfg.mode)


# FSDP2-wrapped model -> (a weight-less copy of it made before sharding, fully_shard kwargs).
_SKELETONS: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, dict]]" = weakref.WeakKeyDictionary()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder's blocks, wherever the decoder sits (a Decoder, or a scalar head's `.model`)."""
    from graftlm.models.transformer import Decoder

    decoders = [m for m in model.modules() if isinstance(m, Decoder)]
    if not decoders:
        raise GraftError(f"--parallel.mode fsdp: no transformer decoder inside {type(model).__name__}")
    return list(decoders[0].layers)


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device (no memory);
    tied parameters stay tied."""
    memo = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in memo:
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store of this torchrun attempt.

    torchrun keeps one store for the whole job across `--max-restarts`; a restarted
    rank that reads the peer addresses left by the killed attempt connects to a dead
    process ("Connection refused"). A prefix per attempt keeps the attempts apart.
    """
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not _agent_store(), timeout=timeout)
    return dist.PrefixStore(_attempt_prefix(), store)


def _agent_store() -> bool:
    """True when torchrun's agent serves the store at MASTER_ADDR: it is up before any
    rank starts and outlives them all (static and c10d rendezvous both do)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _attempt_prefix() -> str:
    return f"graftlm/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _job_store(timeout_s: float) -> dist.Store:
    """A connection to torchrun's agent store, under this attempt's prefix."""
    return dist.PrefixStore(_attempt_prefix(), dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False))


def print_error_once(text: str) -> None:
    """Print an error to stderr once for the whole torchrun job, from the first rank that
    fails (any rank, before or after the process group exists).

    torchrun stops the other ranks (SIGTERM) as soon as one exits, so a line left to
    rank 0 is lost whenever another rank exits first. The first rank to fail, counted in
    torchrun's store, prints; the others leave only once its line is out. Alone, or
    without that store, every failing rank prints: never no line at all. SIGTERM waits
    meanwhile (`_hold_off_sigterm`): torchrun's, sent as another rank exits, would cut it."""
    previous = _hold_off_sigterm()
    try:
        _print_once(text)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _print_once(text: str) -> None:
    store = None
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and _agent_store():
        try:
            store = _job_store(timeout_s=10)
            if store.add("error", 1) > 1:
                store.wait(["error-printed"], datetime.timedelta(seconds=10))
                return
        except RuntimeError:  # the store is gone, or the first rank died before printing
            store = None
    print(text, file=sys.stderr, flush=True)
    if store is not None:
        with contextlib.suppress(RuntimeError):
            store.set("error-printed", "")


def wrap_model(model: nn.Module, d: Dist, cfg: ParallelConfig) -> nn.Module:
    """DDP or FSDP2 around a built model (adapters already injected)."""
    if not d.enabled:
        return model
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [d.device.index] if d.device.type == "cuda" else None
        _sync_nf4_outside_ddp(model)
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy
    kwargs = {}
    if cfg.fsdp_mixed_precision and d.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    _check_nf4_shardable(model, d.world_size)
    skeleton = meta_skeleton(model)
    _shard(model, kwargs)
    _SKELETONS[model] = (skeleton, kwargs)
    # The chunked log-probs come back as a view; objectives never modify them in place,
    # which is the case FSDP2 warns about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def _sync_nf4_outside_ddp(model: nn.Module) -> None:
    """DDP starts by broadcasting rank 0's parameters; an NF4 weight (QLoRA's frozen base)
    would go through its dequantized values and be quantized again on arrival, which
    shifts its scalers. Broadcast its packed inner tensors instead, bit for bit, and
    tell DDP to leave it alone (it is frozen, so DDP has no gradient to reduce either)."""
    from torch.nn.parallel import DistributedDataParallel

    from graftlm.adapters.qlora import is_nf4

    names = []
    for name, param in model.named_parameters():
        if is_nf4(param):
            for inner in param.__tensor_flatten__()[0]:
                dist.broadcast(getattr(param, inner), src=0)
            names.append(name)
    if names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def _check_nf4_shardable(model: nn.Module, world_size: int) -> None:
    """QLoRA's NF4 weights shard through torchao's FSDP2 support, which splits each
    inner tensor evenly: say which layer cannot, before fully_shard fails on an assert."""
    from graftlm.adapters.qlora import check_shardable, is_nf4

    for name, param in model.named_parameters():
        if is_nf4(param):
            check_shardable(param, world_size, name)


def _shard(model: nn.Module, kwargs: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the (wrapped) model: the reference policy of full-parameter DPO /
    GRPO / PPO. Under FSDP2 it is sharded like the model (every rank calls this at the
    same step); under DDP it is a plain copy of the module (it never needs gradients)."""
    if not is_sharded(model):
        return copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    skeleton, kwargs = _SKELETONS[model]
    device = next(iter(model.parameters())).device
    ref = copy.deepcopy(skeleton).to_empty(device=device)
    _shard(ref, kwargs)
    set_model_state_dict(ref, get_model_state_dict(model))
    return ref.eval().requires_grad_(False)


def is_sharded(model: nn.Module) -> bool:
    return model in _SKELETONS


@contextlib.contextmanager
def gathered(model: nn.Module, d: Dist):
    """The trained model as a plain module with full weights on rank 0 (None elsewhere).

    Under FSDP2 every rank must enter (the weights are all-gathered); rank 0 gets the
    skeleton filled with them, on the CPU.

    QLoRA: the frozen base is not gathered. Its export is the adapters alone, and
    torchao's NF4 leaves the all-gathers of its packed tensors unwaited on the ranks
    that drop the result. Those weights stay on the meta device in the returned
    module, so that nothing can read uninitialised memory from them."""
    if not is_sharded(model):
        yield unwrap(model) if d.is_main else None
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from graftlm.adapters.qlora import is_nf4

    quantized = any(is_nf4(p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters())
    frozen = ({name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
              if quantized else set())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=quantized))
    if not d.is_main:
        yield None
        return
    plain = _SKELETONS[model][0].to_empty(device="cpu")
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if not _tied(plain, k) and k not in frozen]:
        raise GraftError(f"FSDP export: gathered weights do not match the model ({(unexpected or missing)[0]})")
    _back_to_meta(plain, frozen.intersection(missing))
    if hasattr(plain, "reset_rope"):
        plain.reset_rope()
    yield plain


def _back_to_meta(model: nn.Module, names: set[str]) -> None:
    """Put parameters `names` (and whatever is tied to them) back on the meta device."""
    replaced: dict[int, nn.Parameter] = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if name in names or id(param) in replaced:
            meta = replaced.setdefault(id(param), nn.Parameter(torch.empty_like(param, device="meta"), False))
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, meta)


def _tied(model: nn.Module, name: str) -> bool:
    """True when parameter `name` is the same tensor as another, loaded one (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return sum(p is params.get(name) for p in params.values()) > 1


@contextlib.contextmanager
def unsharded_for_generation(model: nn.Module):
    """FSDP2: all-gather every block once and keep it gathered while the policy samples
    (a no-op otherwise). Each rank then generates without collectives, for as many
    steps as its own rows need."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        for m in fsdp_modules:
            m.reshard()


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


_collectives = 0


def _injected_fault(d: Dist) -> None:
    """Test-only (`GRAFTLM_TEST_FAULT=kill@N:R` or `hang@N:R`, see the module docstring)."""
    global _collectives
    spec = os.environ.get("GRAFTLM_TEST_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    _collectives += 1
    kind, _, where = spec.partition("@")
    at, _, rank = where.partition(":")
    if _collectives == int(at) and d.rank == int(rank):
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum over ranks (a no-op alone); errors from a hung peer name this rank."""
    if not d.enabled:
        return value
    _injected_fault(d)
    try:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    except RuntimeError as e:
        raise collective_error(d.rank, "a collective", e) from None
    return value


def average_gradients(parameters) -> None:
    """Average `.grad` over ranks in place (a no-op alone), for a module trained outside
    DDP / FSDP (PPO's critic): one flat all-reduce, then a division by the world size."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
    except RuntimeError as e:
        raise collective_error(dist.get_rank(), "a gradient all-reduce", e) from None
    flat /= dist.get_world_size()
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def decide_on_main(decide, d: Dist):
    """`decide()` on rank 0, its result (or its GraftError) on every rank.

    For what only rank 0 looks at (the run directory): every rank then takes the same
    branch. A refusal is raised on every rank (printed once, `print_error_once`)
    instead of leaving the others waiting in a collective that rank 0 never joins."""
    verdict, refusal = [None, None], None
    if d.is_main:
        try:
            verdict = [decide(), None]
        except GraftError as e:
            if not d.enabled:
                raise
            verdict, refusal = [None, str(e)], e
    if d.enabled:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[1] is not None:
        raise refusal or GraftError(verdict[1])
    return verdict[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
