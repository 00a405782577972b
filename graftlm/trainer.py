"""The one training loop, for every objective and parameterization.

Design choices:
- An objective returns `(loss_sum, count, metrics)` per micro-batch. The loop
  back-propagates the sums and then scales the gradients by 1 / (count summed over the
  step's micro-batches and ranks), so gradient accumulation is exactly a larger batch
  and a rank with few trained tokens weighs exactly as much as its tokens.
- A step whose loss or gradient norm is not finite is skipped: gradients are dropped,
  parameters, optimizer state and the step counter stay as they were, the batch's
  sample ids are logged, and too many bad steps in a row stop the run.
- The learning rate is a pure function of the step (`optim.lr_at`); with the loader's
  `(epoch, position)`, the RNG states, the weights and the optimizer state, that is all
  a checkpoint needs for an exact resume, with what an objective holds itself (RL: the
  rollout counter the sampling seeds follow; PPO: its critic and the critic's optimizer).
  Such an objective has `checkpoint_state() -> (tensors, JSON)` and
  `load_checkpoint_state(tensors, JSON, source)`; its tensors are `objective.safetensors`
  (one copy, written by rank 0: they must be the same on every rank), its JSON
  `trainer.json`'s `objective`. What differs per rank (GRPO's kept rollouts:
  `rank_checkpoint_state()` / `load_rank_checkpoint_state(tensors)`) is gathered there as
  `rank<r>/...`. A reference model (`uses_reference`) is the run's first
  policy, so on resume it is copied before the checkpoint's weights load.
- Parallelism hooks only: `rank`, `world_size` and an `all_reduce` (sum) callable.
  Only rank 0 logs and writes; DDP / FSDP2 wrapping happens outside (`parallel.py`).
- The trainer never looks at what is trained: it optimizes the parameters that require
  grad and saves only those when `trainable_only` (adapters on a frozen base).
- Throughput and MFU count the tokens the trained model ran forward and backward on,
  without padding: an objective reports them as the metric `tokens` (RL: its rollouts'
  prompt + completion tokens), with `context`, the padded length they ran at (attention
  FLOPs grow with it); else every `*input_ids` token of the batch counts, at its width.
- Peak memory, as `graft plan` predicts it (live tensor bytes), is measured on one step:
  a CUDA allocator keeps that statistic itself, a CPU has none, so there the second
  step of the process runs under `plan.measure.TensorMemoryTracker` (once the optimizer
  states exist) and the summary records `peak_tensor_bytes` beside the process's RSS,
  with `peak_tensor_seq_len`, the width that step's batches were padded to (SFT and DPO
  batches are as wide as their longest row, often less than `seq_len`).
  Not under torch.compile or several ranks, where a dispatch mode does not belong.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from graftlm import checkpoint as ckpt
from graftlm.data.loader import ResumableLoader, iterate_once
from graftlm.errors import GraftError, Terminated
from graftlm.metrics import MetricsLogger, peak_device_memory_bytes, peak_host_memory_bytes
from graftlm.models.transformer import Decoder
from graftlm.optim import OptimConfig, build_optimizer, lr_at, set_lr
from graftlm.plan.measure import TensorMemoryTracker
from graftlm.placement import resolve_precision
from graftlm.run_config import PRETRAIN_SEQ_LEN, ROW_LENGTH, TrainConfig  # noqa: F401 (defined without torch)


class Objective(Protocol):
    name: str

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        ...


def release_freed_host_memory() -> None:
    """Hand the memory the C heap holds free back to the system (glibc's malloc_trim).

    Called once after a compiling step: compiling leaves the heap fragmented by many small
    objects, so that the next steps' activations are laid out anew beside the freed holes
    instead of in them. On the LoRA benchmark's compiled step (fp32, a cold inductor
    cache) the peak RSS went from 1524 to 1292 MiB, what a warm cache gives (1307).
    Elsewhere (macOS, musl) there is no malloc_trim, and nothing to do."""
    import ctypes
    import gc

    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _sum_locally(t: torch.Tensor) -> torch.Tensor:
    return t


def _time_the_rest(record: dict, elapsed: float) -> None:
    """Where an objective timed parts of its step (`train_time/generation_s`, `scoring_s`,
    PPO's `critic_s`: seconds in the step, summed over its micro-batches), the rest of the
    step, `train_time/train_s`: the policy's forwards, backward and optimizer step. (GRPO
    timed it inside its loss, so each step's held the previous step's backward.)"""
    parts = [v for k, v in record.items() if k.startswith("train_time/")]
    if parts:
        record["train_time/train_s"] = max(elapsed - sum(parts), 0.0)


class Trainer:
    def __init__(self, model: nn.Module, objective: Objective, loader: ResumableLoader,
                 cfg: TrainConfig, optim_cfg: OptimConfig, *, device: torch.device,
                 forward_model: nn.Module | None = None,
                 val_dataset=None, val_bytes_per_token: float | None = None,
                 run_dir: Path | None = None, identity: dict | None = None,
                 trainable_only: bool = False, flops_per_token: float | Callable[[int], float] = 0.0,
                 peak_flops: float = 0.0,
                 rank: int = 0, world_size: int = 1,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] = _sum_locally,
                 grad_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
                 tensorboard: bool = True, sharded: bool = False, started: float | None = None):
        """`started`: when the command began (`time.perf_counter()`), for the wall time.
        `model` is the module whose weights are trained and saved; `forward_model` the
        one the objective calls (a DDP / FSDP2 wrapper of it; default the model).
        `flops_per_token`: model FLOPs to train one token, or a function of the context
        length it is trained at."""
        self.model, self.objective, self.loader = model, objective, loader
        self.cfg, self.optim_cfg, self.device = cfg, optim_cfg, device
        # A run resolves `auto` (and warns) before it builds the model; here for direct use.
        self.precision = resolve_precision(cfg.precision, device, warn=lambda message: None)
        self.val_dataset, self.val_bytes_per_token = val_dataset, val_bytes_per_token
        self.run_dir, self.identity, self.trainable_only = run_dir, identity or {}, trainable_only
        self.flops_per_token = flops_per_token if callable(flops_per_token) else (lambda _: flops_per_token)
        self.peak_flops = peak_flops
        self.rank, self.world_size, self.all_reduce = rank, world_size, all_reduce
        # grad_sync(is_last_micro_step): skip the gradient all-reduce until the last one.
        self.grad_sync = grad_sync or (lambda last: contextlib.nullcontext())
        self.tensorboard = tensorboard
        self.is_main = rank == 0
        self.sharded = sharded  # FSDP2: every rank saves and loads its shards (graftlm.dcp)

        model.gradient_checkpointing = cfg.activation_checkpointing
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, optim_cfg)
        self.forward_model = forward_model if forward_model is not None else model
        if cfg.compile:
            # Every activation kept by default, with adapters too: on the LoRA benchmark
            # (fp32, 2 threads) a budget of 0.5 made the compiled step 8% slower (1.10x
            # a full step's speed instead of 1.20x) for 0.85x its peak RSS, and keeping all
            # stays at 0.56x PEFT's (after the heap trim below).
            for decoder in (m for m in model.modules() if isinstance(m, Decoder)):
                decoder.compile_layers(cfg.compile_activation_budget)
        self.step = 0  # optimizer steps taken
        self.tokens = 0  # tokens trained on (no padding), all ranks
        self.flops = 0.0  # their model FLOPs
        self.last_step_flops = 0.0
        self.train_time_s = 0.0  # time in training steps, summed over resumes
        self.started = time.perf_counter() if started is None else started
        self.earlier_wall_time_s = 0.0  # the commands before a resume, up to their last checkpoint
        # The run's tokens/s and MFU leave out each process's first step (compiling,
        # allocating the optimizer states: with compile, 38 tok/s against 22,000 in every
        # later step) and the step whose tensors are counted (a Python call per operator).
        self.steady = {"steps": 0, "time_s": 0.0, "tokens": 0, "flops": 0.0}
        self.bad_streak = 0
        self.last_loss: float | None = None
        self.last_val: dict = {}
        self.peak_tensor_bytes: int | None = None  # measured on CPU (`_tracked_step`)
        self.peak_tensor_context = 0  # the widest micro-batch of that step
        self.last_step_context = 0
        self.checkpoint_root = run_dir / "checkpoints" if run_dir is not None else None
        self.logger: MetricsLogger | None = None  # set by fit()

    # -- precision ----------------------------------------------------------------------

    def autocast(self):
        if self.precision == "bf16-autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _work(self, batch: dict, metrics: dict) -> tuple[int, float, int]:
        """(tokens, model FLOPs, context) of one micro-batch; pops the objective's `tokens` /
        `context`."""
        tokens, context = metrics.pop("tokens", None), metrics.pop("context", None)
        # Every objective names its token inputs `*input_ids` (input_ids, chosen_input_ids...).
        inputs = [v for k, v in batch.items() if k.endswith("input_ids") and torch.is_tensor(v)]
        if tokens is None:
            tokens = sum(v.numel() for v in inputs)
        if context is None:
            context = max((v.shape[-1] for v in inputs), default=0)  # no inputs: no tokens, no FLOPs
        return int(tokens), float(tokens) * self.flops_per_token(int(context)), int(context)

    # -- one optimizer step ---------------------------------------------------------------

    def train_step(self) -> dict | None:
        """One optimizer step over `grad_accum` micro-batches; None when it was skipped."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        count = torch.zeros((), device=self.device, dtype=torch.float32)
        objective_metrics: dict[str, float] = {}
        sample_ids, tokens, flops, widest = [], 0, 0.0, 0
        for micro in range(self.cfg.grad_accum):
            batch = self._to_device(self.loader.next_batch())
            sample_ids.extend(batch["sample_ids"].tolist())
            with self.grad_sync(micro == self.cfg.grad_accum - 1):
                with self.autocast():
                    part_sum, part_count, metrics = self.objective.loss(self.forward_model, batch)
                part_sum.backward()
            part_tokens, part_flops, context = self._work(batch, metrics)
            tokens, flops = tokens + part_tokens, flops + part_flops
            widest = max(widest, context)
            loss_sum += part_sum.detach().float()
            count += part_count.detach().float()
            for k, v in metrics.items():  # a mean over micro-batches; time spent, a sum over them
                share = 1 if k.startswith("time/") else self.cfg.grad_accum
                objective_metrics[k] = objective_metrics.get(k, 0.0) + float(v) / share
        # Tokens, FLOPs and the objective's metrics travel with the count: still two
        # collectives per step. Every rank's objective reports the same metric names;
        # logged values are their mean over ranks (equal batches: the global mean).
        names = sorted(objective_metrics)
        totals = self.all_reduce(torch.tensor([count.item(), float(tokens), flops] +
                                              [objective_metrics[k] for k in names],
                                              device=self.device, dtype=torch.float64))
        objective_metrics = {k: totals[3 + i].item() / self.world_size for i, k in enumerate(names)}
        loss_sum, count = self.all_reduce(loss_sum), totals[0].float()
        # DDP averages gradients over ranks; undo that and divide by the global count.
        scale = self.world_size / count.clamp_min(1)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
        max_norm = self.optim_cfg.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        self.last_step_context = widest  # the width this step's batches were padded to
        loss = loss_sum / count.clamp_min(1)
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._skip(loss, grad_norm, sample_ids)
            return None
        self.bad_streak = 0
        lr = lr_at(self.step, self.cfg.max_steps, self.optim_cfg)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        step_tokens = int(totals[1].item())
        self.tokens += step_tokens
        self.last_step_flops = totals[2].item()
        self.flops += self.last_step_flops
        self.last_loss = loss.item()
        return {"step": self.step, "loss": self.last_loss, "lr": lr, "grad_norm": grad_norm.item(),
                "tokens": self.tokens, "step_tokens": step_tokens, "epoch": self.loader.epoch_progress,
                **{f"train_{k}": v for k, v in objective_metrics.items()}}

    def _tracked_step(self) -> dict | None:
        """`train_step` while counting live tensor bytes; records their peak."""
        tracker = TensorMemoryTracker()
        # What exists before the step: the model, the optimizer states, and what the
        # objective holds (PPO's critic and its optimizer, a reward model).
        held = [self.model, self.optimizer, *getattr(self.objective, "__dict__", {}).values()]
        with tracker:
            for thing in held:
                if isinstance(thing, nn.Module):
                    tracker.track(list(thing.parameters()))
                elif isinstance(thing, torch.optim.Optimizer):
                    tracker.track(thing.state_dict()["state"])
            record = self.train_step()
        self.peak_tensor_bytes, self.peak_tensor_context = tracker.peak, self.last_step_context
        return record

    def _tracks_tensor_memory(self) -> bool:
        return self.device.type == "cpu" and not self.cfg.compile and self.world_size == 1

    def _skip(self, loss: torch.Tensor, grad_norm: torch.Tensor, sample_ids: list[int]) -> None:
        self.bad_streak += 1
        record = {"step": self.step, "skipped": True, "loss": str(float(loss)),
                  "grad_norm": str(float(grad_norm)), "sample_ids": sample_ids}
        if self.logger is not None:
            self.logger.log(record)
        self._message(f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                      f"(samples {sample_ids})")
        if self.bad_streak >= self.cfg.max_bad_steps:
            raise GraftError(f"{self.bad_streak} steps in a row had a non-finite loss or gradient "
                             f"(last samples {sample_ids}); lower optim.lr or check the data")

    # -- validation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return {}
        self.model.eval()
        # RL objectives score held-out prompts instead (`evaluate_batch`, `val_reward`).
        measure = getattr(self.objective, "evaluate_batch", self.objective.loss)
        metric = getattr(self.objective, "val_metric", "loss")
        # Metrics the objective names (`val_metrics`: DPO's reward accuracy and margin), each a
        # mean over its batch's counted units, so weighted by that count: exact over the split.
        names = tuple(getattr(self.objective, "val_metrics", ()))
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        weighted = torch.zeros(len(names), dtype=torch.float64)
        batches = 0
        for batch in iterate_once(self.val_dataset, self.cfg.batch_size, self.rank, self.world_size,
                                  self.cfg.eval_batches or None):
            with self.autocast():
                part_sum, part_count, metrics = measure(self.forward_model, self._to_device(batch))
            total += part_sum.double()
            count += part_count.double()
            if names:
                weighted += torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64) * float(part_count)
            batches += 1
        # Ranks with one batch fewer repeat a forward and drop it, so that FSDP2's
        # all-gathers stay matched across ranks.
        most = -(-len(range(0, len(self.val_dataset), self.world_size)) // self.cfg.batch_size)
        for batch in itertools.islice(iterate_once(self.val_dataset, self.cfg.batch_size),
                                      max(0, min(most, self.cfg.eval_batches or most) - batches)):
            with self.autocast():
                measure(self.forward_model, self._to_device(batch))
        total, count = self.all_reduce(total), self.all_reduce(count)
        result = {"step": self.step, f"val_{metric}": (total / count.clamp_min(1)).item()}
        if names:
            weighted = self.all_reduce(weighted.to(self.device)) / count.clamp_min(1)
            result.update({f"val_{k}": v.item() for k, v in zip(names, weighted)})
        if self.val_bytes_per_token and metric == "loss":
            # bits per byte: nats -> bits, over the UTF-8 bytes the predicted tokens cover.
            result["val_bpb"] = (total / math.log(2) / (count * self.val_bytes_per_token)).item()
        self.last_val = result
        return result

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        if self.checkpoint_root is None:
            return None
        # What the objective holds per rank travels to rank 0 first (every rank calls this).
        ranks = (ckpt.gather_rank_tensors(self.objective.rank_checkpoint_state(), self.rank, self.world_size,
                                          self.all_reduce, self.device)
                 if hasattr(self.objective, "rank_checkpoint_state") else {})
        if self.sharded or self.world_size == 1:  # every rank writes its part (DCP's own collectives)
            return self._write_checkpoint(ranks)
        # Unsharded under torchrun rank 0 writes alone, and the others hear whether it did:
        # a failed write (a full disk) then stops every rank at once, instead of leaving
        # them in the next step's all-reduce until --parallel.timeout-s.
        path, failure = None, None
        if self.is_main:
            try:
                path = self._write_checkpoint(ranks)
            except Exception as e:
                failure = e
        failed = self.all_reduce(torch.tensor([float(failure is not None)], device=self.device)).item() > 0
        if failure is not None:
            raise failure
        if failed:
            raise GraftError(f"rank 0 could not write the checkpoint of step {self.step} (its error is printed "
                             "there); every rank stops")
        return path

    def _write_checkpoint(self, rank_tensors: dict[str, torch.Tensor]) -> Path:
        state = {"step": self.step, "tokens": self.tokens, "flops": self.flops, "train_time_s": self.train_time_s,
                 "wall_time_s": self.wall_time_s(), "steady": self.steady,
                 "bad_streak": self.bad_streak, "last_loss": self.last_loss, "last_val": self.last_val,
                 "loader": self.loader.state_dict(), "identity": self.identity,
                 "trainable_only": self.trainable_only,
                 "peak_tensor": [self.peak_tensor_bytes, self.peak_tensor_context]}
        objective_files = {}
        if hasattr(self.objective, "checkpoint_state"):
            objective_tensors, state["objective"] = self.objective.checkpoint_state()
            if objective_tensors or rank_tensors:
                objective_files[ckpt.OBJECTIVE_FILE] = {**objective_tensors, **rank_tensors}
        if self.sharded:
            from graftlm import dcp
            return dcp.save_sharded(self.checkpoint_root, self.step, self.model, self.optimizer, state,
                                    rank=self.rank, trainable_only=self.trainable_only,
                                    keep_last=self.cfg.keep_checkpoints, files=objective_files)
        opt_tensors, opt_meta = ckpt.optimizer_files(self.optimizer)
        rng_tensors, rng_meta = ckpt.rng_files()
        state["rng"] = rng_meta
        return ckpt.save_checkpoint(
            self.checkpoint_root, self.step,
            tensors={"model.safetensors": ckpt.model_tensors(self.model, self.trainable_only),
                     "optimizer.safetensors": opt_tensors, "rng.safetensors": rng_tensors, **objective_files},
            documents={"optimizer.json": opt_meta, "trainer.json": state},
            keep_last=self.cfg.keep_checkpoints)

    def resume(self, directory: Path, allow_config_change: bool = False) -> None:
        """Restore everything from a checkpoint directory (verified first)."""
        ckpt.verify(directory)
        state = ckpt.read_json(directory, "trainer.json")
        self._check_layout(directory, state)
        ckpt.check_identity(state.get("identity", {}), self.identity, allow_config_change, directory,
                            warn=self._message)
        if getattr(self.objective, "uses_reference", False):
            # Full fine-tuning's reference (DPO, GRPO, PPO) is the model the run started from,
            # copied on first use: copied now, before the checkpoint's weights replace it.
            from graftlm.adapters import reference
            with reference(self.forward_model):
                pass
        if self.sharded or state.get("sharded"):
            from graftlm import dcp
            dcp.load_sharded(directory, self.model, self.optimizer, rank=self.rank,
                             trainable_only=self.trainable_only)
        else:
            self._load_single(directory, state)
        ckpt.load_objective_state(self.objective, directory, state, self.rank, self.world_size, self._message)
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens = state["step"], state["tokens"]
        # A checkpoint from before FLOPs were counted: its tokens at the run's sequence length.
        self.flops = state["flops"] if "flops" in state else self.tokens * self.flops_per_token(self.cfg.seq_len or 0)
        self.train_time_s, self.bad_streak = state["train_time_s"], state["bad_streak"]
        self.earlier_wall_time_s = state.get("wall_time_s", 0.0)
        self.steady = {**self.steady, **state.get("steady", {})}
        self.last_loss, self.last_val = state["last_loss"], state["last_val"]
        # Kept for a resumed process too short to count its own (it counts on its second step).
        self.peak_tensor_bytes, self.peak_tensor_context = state.get("peak_tensor", [None, 0])

    def _check_layout(self, directory: Path, state: dict) -> None:
        """Refuse, before any other check, a checkpoint whose files this run cannot load:
        FSDP shards of another number of ranks, or shards against a whole model (and back).
        No --allow-config-change can help there, so none is offered."""
        if not (self.sharded or state.get("sharded")):
            return
        if state.get("sharded"):
            ranks = state.get("world_size") or (state.get("identity") or {}).get("world_size")
            if ranks != self.world_size or not self.sharded:
                now = (f"not {self.world_size} process{'es' if self.world_size > 1 else ''}"
                       if ranks != self.world_size else "not without --parallel fsdp")
                raise ckpt.CheckpointError(
                    f"{directory}: checkpoint sharded over {ranks} ranks (fsdp); resume with "
                    f"`torchrun --nproc-per-node {ranks} -m graftlm ... --parallel fsdp` ({now}), "
                    "or --fresh to start over")
            return
        raise ckpt.CheckpointError(f"{directory}: written without --parallel fsdp (one unsharded model); "
                                   "resume it the way it was written, or --fresh to start over")

    def _load_single(self, directory: Path, state: dict) -> None:
        ckpt.load_model_tensors(self.model, ckpt.read_tensors(directory, "model.safetensors"),
                                directory / "model.safetensors")
        ckpt.load_optimizer_files(self.optimizer, ckpt.read_tensors(directory, "optimizer.safetensors"),
                                  ckpt.read_json(directory, "optimizer.json"), directory / "optimizer.json")
        ckpt.restore_rng(ckpt.read_tensors(directory, "rng.safetensors"), state["rng"])

    # -- the loop ---------------------------------------------------------------------------

    def _message(self, text: str) -> None:
        if self.logger is not None:
            self.logger.message(text)
        elif self.is_main:
            print(text, flush=True)

    def fit(self) -> dict:
        cfg = self.cfg
        self.logger = MetricsLogger(self.run_dir, cfg.max_steps, self.step, enabled=self.is_main,
                                    log_every=cfg.log_every, tensorboard=self.tensorboard)
        if self.checkpoint_root is not None and self.is_main:
            ckpt.sweep_partial(self.checkpoint_root)
        warmup = self.optim_cfg.warmup_for(cfg.max_steps)
        if warmup and warmup >= cfg.max_steps and self.step < cfg.max_steps:
            reached = lr_at(cfg.max_steps - 1, cfg.max_steps, self.optim_cfg)
            self._message(f"warning: --optim.warmup-steps {warmup} >= --train.max-steps {cfg.max_steps}: the run "
                          f"ends in its warmup, at lr {reached:.3g} (peak --optim.lr {self.optim_cfg.peak_lr:g}); "
                          "lower --optim.warmup-steps to reach the peak")
        saved_at = self.step if self.step > 0 else None
        first_step = self.step + 1
        # The second step of this process: the first has made the optimizer states.
        tracked_step = self.step + 2 if self._tracks_tensor_memory() else None
        try:
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                tracked = self.step + 1 == tracked_step
                record = self._tracked_step() if tracked else self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - start
                self.train_time_s += elapsed
                if record is None:
                    continue
                if self.step == first_step and cfg.compile:
                    release_freed_host_memory()
                if self.step != first_step and not tracked:
                    self.steady["steps"] += 1
                    self.steady["time_s"] += elapsed
                    self.steady["tokens"] += record["step_tokens"]
                    self.steady["flops"] += self.last_step_flops
                _time_the_rest(record, elapsed)
                tokens_per_s = record["step_tokens"] / max(elapsed, 1e-9)
                record.update(tokens_per_s=tokens_per_s, mfu=self._mfu(self.last_step_flops / max(elapsed, 1e-9)),
                              memory_bytes=peak_device_memory_bytes(self.device),
                              eta_s=(cfg.max_steps - self.step) * self._seconds_per_step())
                self.logger.log(record)
                # The objective may warn from its step's metrics (GRPO: rollouts that teach nothing).
                for line in getattr(self.objective, "step_warnings", lambda record: [])(record):
                    self._message(line)
                last = self.step == cfg.max_steps
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    val = self.evaluate()
                    if val:
                        self.logger.log(val)
                if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                    self.save_checkpoint()
                    saved_at = self.step
            if saved_at != self.step:  # resumed a finished run: make sure the end is saved
                self.save_checkpoint()
        except KeyboardInterrupt as stop:
            self._message(self._interrupted_note(saved_at, "terminated (SIGTERM)" if isinstance(stop, Terminated)
                                                 else "interrupted"))
            raise
        finally:
            self.logger.close()
        return self.stats()

    def _interrupted_note(self, saved_at: int | None, how: str = "interrupted") -> str:
        """What an interrupted run kept, and what the same command will do (nothing is saved
        on an interrupt: a save that was itself interrupted would leave less)."""
        line = f"{how} at step {self.step} of {self.cfg.max_steps}: "
        if self.checkpoint_root is None:
            return line + "this run saves no checkpoints"
        if saved_at is None:
            line += "no checkpoint was saved yet, so the same command starts over"
        else:
            lost = self.step - saved_at
            line += (f"the checkpoint of step {saved_at} is kept and the same command resumes from it"
                     + (f" (the {lost} step{'s' if lost > 1 else ''} after it {'are' if lost > 1 else 'is'} lost)"
                        if lost else ""))
        try:
            finished = json.loads((self.checkpoint_root.parent / "summary.json").read_text())["steps"]
        except (OSError, ValueError, KeyError, TypeError):
            return line
        return line + f"; final/ still holds the model of the run's earlier end, step {finished}"

    def _seconds_per_step(self) -> float:
        """For the ETA: the steady steps' pace once there is one (a compiling first step
        would stretch every estimate of a short run)."""
        if self.steady["steps"]:
            return self.steady["time_s"] / self.steady["steps"]
        return self.train_time_s / max(self.step, 1)

    def wall_time_s(self) -> float:
        """The run's wall time: this command's so far, plus the earlier commands' it resumed."""
        return self.earlier_wall_time_s + time.perf_counter() - self.started

    def _mfu(self, flops_per_s: float) -> float:
        if not self.peak_flops:
            return 0.0
        return flops_per_s / (self.peak_flops * self.world_size)

    def stats(self) -> dict:
        # Steady steps when there were any (a run of one step per process has none).
        time_s, tokens, flops = ((self.steady["time_s"], self.steady["tokens"], self.steady["flops"])
                                 if self.steady["time_s"] else (self.train_time_s, self.tokens, self.flops))
        per_s = 1 / time_s if time_s else 0.0
        return {"steps": self.step, "tokens": self.tokens, "train_time_s": self.train_time_s,
                "tokens_per_s": tokens * per_s, "mfu": self._mfu(flops * per_s),
                "flops": self.flops,
                "peak_memory_bytes": peak_device_memory_bytes(self.device),
                "peak_host_memory_bytes": peak_host_memory_bytes(),
                **({"peak_tensor_bytes": self.peak_tensor_bytes, "peak_tensor_seq_len": self.peak_tensor_context}
                   if self.peak_tensor_bytes is not None else {}),
                "final_train_loss": self.last_loss,
                "final_val_loss": self.last_val.get("val_loss"), "val_bpb": self.last_val.get("val_bpb"),
                # final_val_reward (RL), final_val_rewards/accuracy (DPO)...
                **{f"final_{k}": v for k, v in self.last_val.items() if k not in ("step", "val_loss", "val_bpb")}}
