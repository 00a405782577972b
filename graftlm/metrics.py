"""What a run costs and how it goes: FLOPs, MFU, memory, and the run's metric streams.

FLOPs of training, per token, of the base model (`training_flops_per_token`). What
adapters add is counted in `plan/compute.py` (`train_flops_per_token`), and runs record
that function's figure, so plan and summary.json count alike:
  N    = parameters that do matrix multiplies: every parameter except the input
         embedding table, plus the output projection (counted even when tied, because
         the multiply happens either way).
  attn = per layer, QK^T and AV cost 2 * 2 * d_attn FLOPs per (query, key) pair, and a
         causal query sees (T + 1) / 2 keys on average:  2 * L * d_attn * (T + 1).
  forward           = 2 N + attn
  backward, inputs  = 2 N + 2 attn   (activation gradients; always needed)
  backward, weights = 2 N * f        (f = trainable fraction of N; 1 for full training)
  total             = (4 + 2 f) N + 3 attn     -> the familiar 6 N + 3 attn when f = 1.
Recomputation from activation checkpointing is not counted: MFU is model FLOPs
utilisation, the work the model needs, not the work this run happened to do.

MFU = achieved model FLOP/s / peak FLOP/s of the device. CUDA peaks come from a table of
dense bf16 figures; CPU peaks are measured, because no table knows what a shared laptop
core can do. The measurement is the fastest single matmul of a few, at two sizes:
another process on the same cores only ever slows a call down, so the fastest one is
the least wrong (an average taken under load read a peak 3x too low and MFUs near
200%). Still, work that holds the cores for the whole measurement (two test workers, a
build) reads low, and a cached low figure made every later MFU too high (the demo's
runs printed up to 117%). So each run measures again, briefly, and the cache in
~/.cache/graftlm keeps the best figure this machine has shown: it only ever rises.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from graftlm.models.config import ModelConfig
from graftlm.placement import slow_on_cpu

if TYPE_CHECKING:  # torch is imported where a device is measured: `graft plan`'s arithmetic needs none
    import torch

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
CUDA_PEAK_BF16 = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 756e12,
    "B200": 2250e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    return cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size


def training_flops_per_token(cfg: ModelConfig, seq_len: int, trainable_fraction: float = 1.0) -> float:
    """Model FLOPs to train on one token at context `seq_len` (see the module docstring)."""
    n = matmul_params(cfg)
    attn = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (seq_len + 1)
    return (4 + 2 * trainable_fraction) * n + 3 * attn


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 2 * matmul_params(cfg) + 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (seq_len + 1)


# -- peak FLOP/s ----------------------------------------------------------------------------

def measure_matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048),
                        seconds: float = 0.25) -> float:
    """FLOP/s of the fastest single square matmul, over `seconds` of calls at each size."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up: kernel selection, first-touch allocation
        sync()
        started = time.perf_counter()
        for _ in range(100):
            start = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * size ** 3 / (time.perf_counter() - start))
            if time.perf_counter() - started > seconds:
                break
    return best


def cpu_peak_key(dtype: torch.dtype) -> str:
    """The peak cache's entry for this CPU, thread count and dtype ("fastest": figures
    cached by a former, averaging measurement are not reused)."""
    import torch

    return f"{platform.processor() or platform.machine()}|threads={torch.get_num_threads()}|{dtype}|fastest"


def _cache_file(name: str) -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graftlm" / name


def _read_cache(path: Path) -> dict:
    try:
        known = json.loads(path.read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, known: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Replaced whole, so that a run starting meanwhile never reads half a file
        # (it would take the cache for empty and could write a lower figure).
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(known, indent=1))
        os.replace(partial, path)
    except OSError:
        pass  # a read-only home only loses the best figure for the next run


def _cached_number(known: dict, key: str) -> float:
    try:
        return float(known.get(key, 0.0))
    except (ValueError, TypeError):
        return 0.0


def peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype  # the default, set here: torch is imported on use
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in sorted(CUDA_PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
            if key in name:
                return value if dtype in (torch.bfloat16, torch.float16) else value / 2
        return measure_matmul_peak(device, dtype, sizes=(4096, 8192))
    if slow_on_cpu(dtype):
        # A half dtype this CPU has no kernel for runs a scalar loop (placement.fast_bfloat16):
        # the CPU's peak is its float32 one (MFU then shows the waste; timing the loop itself
        # took seconds and gave a "peak" below what a mixed autocast step reaches, MFU > 100%).
        dtype = torch.float32
    cache = _cache_file("peak_flops.json")
    key = cpu_peak_key(dtype)
    known = _read_cache(cache)
    cached = _cached_number(known, key)
    # Later runs measure briefly (about 0.3 s in all): the best figure of past runs backs them up.
    measured = measure_matmul_peak(device, dtype, seconds=0.08 if cached else 0.25)
    if measured > cached:
        known[key] = measured
        _write_cache(cache, known)
    return max(measured, cached)


# -- NF4 dequantization (QLoRA) -------------------------------------------------------------
#
# QLoRA's frozen base linears hold NF4 weights (adapters/qlora.py), which torchao's
# linear_nf4 dequantizes on every call, `weight.to(compute dtype)`: in forward, again in
# backward for the input gradient, and in every reference forward and generated token.
# That is elementwise work of no model FLOPs, so MFU cannot account for it, and it is
# a large share of a QLoRA step (plan --check read a CPU QLoRA run's time 51% too low
# without it). Its time per pass over the weights is modelled as
#     weights x seconds_per_call + parameters / params_per_s
# the per-call cost being the dozen eager operators torchao runs per weight (it dominates
# on a small model), the rate their memory traffic. Both are measured together, from the
# fastest NF4 linear forward + backward of a small and of a large weight, less the same
# product with a plain weight; a GPU in the catalogue takes the rate from its bandwidth.

# Bytes torchao's eager `get_original_weight` moves per parameter, to bf16: the two
# nibble extractions and their int64 casts (11), two table lookups reading int64 and
# writing bf16 (10), the repeated block scalers (2), two scalings (6) and the stack that
# interleaves them (4). Casting on to float32 (no fast bf16) reads 2 and writes 4 more.
NF4_DEQUANT_BYTES_BF16 = 33
NF4_DEQUANT_BYTES_FP32 = NF4_DEQUANT_BYTES_BF16 + 6
# Of the memory bandwidth, what a chain of simple elementwise kernels reaches on a GPU.
NF4_DEQUANT_BANDWIDTH_FRACTION = 0.7


@dataclass(frozen=True)
class DequantRate:
    """How fast this device dequantizes NF4 weights to the dtype QLoRA computes in."""

    params_per_s: float
    seconds_per_call: float = 0.0  # per weight and pass: the operators' fixed cost

    def pass_seconds(self, params: float, weights: float) -> float:
        """One dequantization of `weights` weights holding `params` parameters in all."""
        return weights * self.seconds_per_call + params / self.params_per_s

    @classmethod
    def from_bandwidth(cls, bytes_per_s: float, fast_bf16: bool = True) -> DequantRate:
        """A GPU's: its memory bandwidth over the bytes moved per parameter. The fixed cost
        is left out: a GPU queues the kernels of one weight while it runs the last's."""
        per_param = NF4_DEQUANT_BYTES_BF16 if fast_bf16 else NF4_DEQUANT_BYTES_FP32
        return cls(bytes_per_s * NF4_DEQUANT_BANDWIDTH_FRACTION / per_param)

    @classmethod
    def from_dict(cls, recorded) -> DequantRate | None:
        """From summary.json's `nf4_dequant` (None when absent or not numbers)."""
        try:
            rate = cls(float(recorded["params_per_s"]), float(recorded.get("seconds_per_call", 0.0)))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        return rate if rate.params_per_s > 0 and rate.seconds_per_call >= 0 else None

    def as_dict(self) -> dict:
        return {"params_per_s": self.params_per_s, "seconds_per_call": self.seconds_per_call}


def nf4_compute_dtype(device: torch.device) -> torch.dtype:
    """What `adapters.qlora.nf4_linear` dequantizes to on `device`."""
    import torch

    from graftlm.adapters.qlora import STORED_DTYPE
    from graftlm.placement import fast_bfloat16
    return STORED_DTYPE if fast_bfloat16(device.type) else torch.float32


def measure_nf4_dequant(device: torch.device, seconds: float = 0.2) -> DequantRate:
    """Time QLoRA's NF4 linear (`adapters.qlora.nf4_linear`: torchao's linear_nf4) forward
    and backward on one row, against the same product with a plain weight: what is left is
    two dequantizations, in the autograd context a step runs them in (about 1.3x a bare
    `weight.to(dtype)`). Fastest of repeated calls at two weight sizes, over `seconds` in
    all: their difference gives the rate per parameter, the small one the fixed cost."""
    import torch

    dtype = nf4_compute_dtype(device)
    # Large enough on a GPU for the traffic to dominate; quantizing it is what costs on a CPU.
    sizes = ((64, 64), (2048, 2048) if device.type == "cuda" else (256, 1024))
    with torch.inference_mode(False), torch.enable_grad():  # whatever the caller's mode: backward runs
        (small, t_small), (large, t_large) = [
            (rows * cols, _nf4_pass_seconds(device, rows, cols, dtype, seconds / len(sizes))) for rows, cols in sizes]
    per_param = max(t_large - t_small, 1e-9) / (large - small)
    return DequantRate(1 / per_param, max(t_small - small * per_param, 0.0))


def _nf4_pass_seconds(device: torch.device, rows: int, cols: int, dtype: torch.dtype, seconds: float) -> float:
    """One dequantization of a [rows, cols] NF4 weight, as `measure_nf4_dequant` times it."""
    import torch
    from torch import nn

    from graftlm.adapters.qlora import nf4_linear, quantize_linear_
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    linear = nn.Linear(cols, rows, bias=False, device=device)
    plain = linear.weight.detach().to(dtype)
    quantize_linear_(linear)
    x = torch.randn(1, cols, device=device, dtype=dtype, requires_grad=True)
    fastest = {}
    for name, product in (("nf4", lambda: nf4_linear(x, linear)),
                          ("plain", lambda: torch.nn.functional.linear(x, plain))):
        product().sum().backward()  # warm-up: allocation, first touch
        sync()
        best = math.inf
        started = time.perf_counter()
        for _ in range(1000):
            start = time.perf_counter()
            product().sum().backward()
            sync()
            best = min(best, time.perf_counter() - start)
            if time.perf_counter() - started > seconds / 2:
                break
        fastest[name] = best
    return max(fastest["nf4"] - fastest["plain"], 0.0) / 2  # forward and backward each dequantize


def nf4_dequant_rate(device: torch.device, measure: bool = True) -> DequantRate:
    """This device's NF4 dequantization rate, measured briefly and cached in
    ~/.cache/graftlm like the matmul peak: the cache keeps the fastest figures this device
    has shown, as busy cores only slow a measurement down. `measure=False` takes the
    cached figures when there are any (a plan need not import torchao); a run measures
    again (about 0.15 s; 0.3 s the first time)."""
    import torch

    cache = _cache_file("nf4_dequant.json")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_peak_key(nf4_compute_dtype(device))
    key = f"{device.type}|{name}"
    known = _read_cache(cache)
    cached = DequantRate.from_dict(known.get(key))
    if cached is not None and not measure:
        return cached
    measured = measure_nf4_dequant(device, seconds=0.1 if cached else 0.25)
    # The pair that dequantizes a typical weight (a million parameters) faster: a rate and
    # a fixed cost from different measurements would make a figure no measurement showed.
    best = min((r for r in (measured, cached) if r is not None), key=lambda r: r.pass_seconds(2 ** 20, 1))
    if best != cached:
        known[key] = best.as_dict()
        _write_cache(cache, known)
    return best


# -- memory ---------------------------------------------------------------------------------

def peak_host_memory_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def current_host_memory_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def peak_device_memory_bytes(device: torch.device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_host_memory_bytes()


# -- the run's metric streams ---------------------------------------------------------------

# Objective metrics shown on the progress line when a step has them: (key, label, format).
# PPO's value loss (`vf`) sits next to the loss it is part of.
HEADLINE_METRICS = (("train_value_loss", "vf", ".4f"),
                    ("train_rewards/accuracy", "acc", ".0%"), ("train_rewards/margin", "margin", ".3f"),
                    ("train_reward/mean", "reward", ".3f"), ("train_kl", "kl", ".3g"))


class MetricsLogger:
    """metrics.jsonl + TensorBoard + a live progress bar (or log lines), on rank 0 only."""

    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int = 0,
                 enabled: bool = True, log_every: int = 10, tensorboard: bool = True):
        self.enabled = enabled and run_dir is not None
        self.log_every = max(1, log_every)
        self.total_steps = total_steps
        self._jsonl = self._writer = self._progress = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.exists():
            # Resumed: rows after the checkpoint's step were written by the run that
            # died; they are about to be written again.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            self._progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn())
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 status="")
            self._progress.start()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        if record.get("skipped"):
            return  # the trainer reports skipped steps itself
        step = record["step"]
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key.replace(".", "/"), value, step)
        if "loss" in record:
            self._show_train(record)
        elif "val_loss" in record:
            held_out = "".join(f", val_{label} {format(record['val_' + key[len('train_'):]], spec)}"
                               for key, label, spec in HEADLINE_METRICS
                               if isinstance(record.get("val_" + key[len("train_"):]), (int, float)))
            self.message(f"step {step}: val_loss {record['val_loss']:.4f}"
                         + (f", val_bpb {record['val_bpb']:.4f}" if record.get("val_bpb") else "") + held_out)
        elif "val_reward" in record:
            self.message(f"step {step}: val_reward {record['val_reward']:.4f} (held-out, greedy)")

    def _show_train(self, r: dict) -> None:
        # What tells a preference or RL run's progress, beside its loss (GRPO's sits near 0,
        # IPO's starts at 1 / (2 beta)^2): every figure stays in metrics.jsonl.
        headline = "".join(f"  {label} {format(r[key], spec)}" for key, label, spec in HEADLINE_METRICS
                           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]))
        status = (f"loss {r['loss']:.4f}{headline}  {r['tokens_per_s']:,.0f} tok/s  "
                  f"MFU {100 * r['mfu']:.1f}%")
        if self._progress is not None:
            self._progress.update(self._task, completed=r["step"], status=status)
        elif r["step"] % self.log_every == 0 or r["step"] == self.total_steps:
            eta = r.get("eta_s")
            print(f"step {r['step']}/{self.total_steps}  {status}  lr {r['lr']:.2e}"
                  + (f"  ETA {eta:,.0f}s" if eta is not None else ""), flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._progress = self._writer = self._jsonl = None
