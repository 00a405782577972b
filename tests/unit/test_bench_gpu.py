"""bench/gpu.py and bench/gpu.sh without a GPU: the script's own code runs on the CPU
(`--smoke`), its FLOPs are the ones the trainer records, a failing torch.compile falls
back to eager, and gpu.sh refuses to start without CUDA instead of measuring a CPU."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_bench_flops_are_the_trainers(gpu_bench, kind):
    """The MFU of the table and of a training run's summary use the same count."""
    from graftlm.adapters.config import AdapterConfig
    from graftlm.models.config import preset
    from graftlm.runs import flops_per_token_at, run_config_class
    from graftlm.trainer import TrainConfig

    cfg = preset("1b")
    adapter = AdapterConfig(kind="lora", r=16, target_modules=["all-linear"]) if kind == "lora" else None
    run = run_config_class("clm")(model="1b", data="unused", adapter=adapter, train=TrainConfig(seq_len=2048))
    assert gpu_bench.flops_per_token(cfg, 2048, kind) == pytest.approx(flops_per_token_at(run, cfg)(2048))
    # A ~1B model: about 6 GFLOPs per token in full (6N), less with LoRA (no base weight gradients).
    full = gpu_bench.flops_per_token(cfg, 2048, "full")
    assert 5e9 < full < 1e10 and gpu_bench.flops_per_token(cfg, 2048, "lora") < 0.75 * full


def test_failing_compile_is_measured_eager(gpu_bench, capsys):
    calls = []

    def make_step(compile_model):
        def step():
            calls.append(compile_model)
            if compile_model:
                raise RuntimeError("triton not found\nmore detail")
        return step

    step, how = gpu_bench.compiled_or_eager(make_step, compile_model=True)
    step()
    assert how == "eager" and calls == [True, False]
    assert "torch.compile failed (RuntimeError: triton not found)" in capsys.readouterr().out


@pytest.mark.slow
def test_smoke_run_prints_every_row_of_the_table():
    result = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        match = re.match(r"(.+?\(eager\))\s+([\d,]+)\s+([\d.]+)%\s+nan$", line)
        if match:
            rows[match[1]] = (float(match[2].replace(",", "")), float(match[3]))
    assert set(rows) == {"graftlm pre-training (eager)", "graftlm LoRA r=16 (eager)", "graftlm QLoRA r=16 (eager)",
                         "transformers + PEFT LoRA r=16 (eager)"}, result.stdout
    nf4 = re.search(r"QLoRA frozen linear weights: .* \(([\d.]+)x; goal <= 0.3x\)", result.stdout)
    assert nf4 and 0.2 < float(nf4[1]) <= 0.3, result.stdout
    assert all(tps > 0 and math.isfinite(mfu) for tps, mfu in rows.values()), rows
    ratio = re.search(r"^graftlm LoRA step / full step\s+([\d.]+)x", result.stdout, re.M)
    assert ratio and float(ratio[1]) == pytest.approx(
        rows["graftlm LoRA r=16 (eager)"][0] / rows["graftlm pre-training (eager)"][0], rel=0.02)
    generation = re.findall(r"^(.+ batch [18])\s+([\d,.]+)\s+([\d.]+)x$", result.stdout, re.M)
    assert {name for name, _, _ in generation} == {
        f"{side} batch {b}" for side in ("transformers generate", "graftlm engine (eager)") for b in (1, 8)}
    assert all(float(tps.replace(",", "")) > 0 for _, tps, _ in generation)
    # GRPO's sampling beside the plan's prediction for it (the compiled side is off in a smoke run).
    sampling = dict(re.findall(r"^(graft plan \(.+?\)|graftlm eager)\s+([\d.]+)\s+[\d.]+", result.stdout, re.M))
    assert len(sampling) == 2 and all(float(ms) > 0 for ms in sampling.values()), result.stdout


def test_a_failing_row_leaves_the_others_measured(gpu_bench, monkeypatch, capsys):
    # The first GPU run lost every row after graftlm's LoRA row, which raised.
    def broken(cfg, args, device, kind="lora"):
        raise RuntimeError("CUDA error: device-side assert triggered\nmore")

    monkeypatch.setattr(gpu_bench, "bench_adapter_graftlm", broken)
    monkeypatch.setattr(gpu_bench, "bench_pretrain", lambda cfg, args, device: ("graftlm pre-training", 1.0, 0.5, 2.0))
    monkeypatch.setattr(gpu_bench, "bench_lora_peft", lambda cfg, args, device: ("PEFT", 3.0, 0.25, 1.0))
    gpu_bench.main(["--smoke", "--only", "pretrain", "lora", "qlora", "peft"])
    out = capsys.readouterr().out
    assert "lora failed: RuntimeError: CUDA error: device-side assert triggered" in out
    assert "qlora failed: RuntimeError" in out and re.search(r"^PEFT\s+3", out, re.M)
    assert "LoRA step / full step" not in out


def test_gpu_sh_refuses_to_run_without_cuda():
    # CUDA hidden, so that this holds on a GPU machine too.
    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    assert "no CUDA device visible to torch" in result.stderr
