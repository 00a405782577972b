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
from pathlib import Path

import torch

from graftlm.models.config import ModelConfig
from graftlm.placement import slow_on_cpu

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
    return f"{platform.processor() or platform.machine()}|threads={torch.get_num_threads()}|{dtype}|fastest"


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
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
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graftlm" / "peak_flops.json"
    key = cpu_peak_key(dtype)
    try:
        known = json.loads(cache.read_text())
        cached = float(known.get(key, 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        known, cached = {}, 0.0
    # Later runs measure briefly (about 0.3 s in all): the best figure of past runs backs them up.
    measured = measure_matmul_peak(device, dtype, seconds=0.08 if cached else 0.25)
    if measured > cached:
        known[key] = measured
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # Replaced whole, so that a run starting meanwhile never reads half a file
            # (it would take the cache for empty and could write a lower figure).
            partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(known, indent=1))
            os.replace(partial, cache)
        except OSError:
            pass  # a read-only home only loses the best figure for the next run
    return max(measured, cached)


# -- memory ---------------------------------------------------------------------------------

def peak_host_memory_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def current_host_memory_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def peak_device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_host_memory_bytes()


# -- the run's metric streams ---------------------------------------------------------------

# Objective metrics shown on the progress line when a step has them: (key, label, format).
HEADLINE_METRICS = (("train_rewards/accuracy", "acc", ".0%"), ("train_rewards/margin", "margin", ".3f"),
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
            self.message(f"step {step}: val_loss {record['val_loss']:.4f}"
                         + (f", val_bpb {record['val_bpb']:.4f}" if record.get("val_bpb") else ""))
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
