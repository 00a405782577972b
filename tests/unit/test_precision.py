"""`train.precision auto`: bf16 autocast only where the device multiplies bf16 fast.

On an AVX2-only CPU PyTorch has no bf16 matmul kernel and falls back to a scalar loop
(~50x slower than float32), so `auto` trains in float32 there; runs record what `auto`
became, QLoRA computes in float32 there, and the planner plans the same way."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml

from graftlm import placement
from graftlm.adapters import qlora
from graftlm.cli import main
from graftlm.placement import fast_bfloat16, resolve_precision
from graftlm.plan import load_catalogue, resolve_hardware
from tests.unit.test_sft_packing import _data

CPU = torch.device("cpu")


def _matmul_seconds(dtype: torch.dtype) -> float:
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    a @ b  # first call: kernel selection, allocations
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def test_fast_bfloat16_says_how_this_cpu_multiplies_bf16():
    """The capability check against the machine itself: where it says "fast", a bf16
    matmul costs at most a few float32 ones (AMX / AVX512-BF16: less than one); where it
    says "slow", the fallback costs tens of them."""
    ratio = _matmul_seconds(torch.bfloat16) / _matmul_seconds(torch.float32)
    assert fast_bfloat16("cpu") == (ratio < 5), f"bf16 / fp32 matmul time {ratio:.1f}x"


@pytest.mark.parametrize("fast, requested, expected, warns", [
    (True, "auto", "bf16-autocast", False), (False, "auto", "fp32", False),
    (False, "fp32", "fp32", False), (False, "bf16-autocast", "bf16-autocast", True), (False, "bf16", "bf16", True),
    (True, "bf16", "bf16", False)])
def test_auto_follows_the_device_and_an_explicit_slow_choice_warns_once(monkeypatch, fast, requested, expected,
                                                                        warns):
    monkeypatch.setattr(placement, "fast_bfloat16", lambda device_type: fast)
    warnings = []
    assert resolve_precision(requested, CPU, warn=warnings.append) == expected
    assert len(warnings) == int(warns)
    if warns:
        assert f"--train.precision {requested}" in warnings[0] and "AVX-512" in warnings[0]
        assert "--train.precision auto or fp32" in warnings[0]


def test_a_run_records_what_auto_became_and_resumes_with_it(tmp_path):
    path, _ = _data(tmp_path, n=20)

    def sft(steps: int) -> int:
        return main(["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path),
                     "--out", str(tmp_path), "--name", "run", "--train.max-steps", str(steps),
                     "--train.batch-size", "2", "--train.eval-batches", "1", "--tensorboard", "false"])

    assert sft(1) == 0
    expected = "bf16-autocast" if fast_bfloat16("cpu") else "fp32"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["precision"] == expected
    # Continuing it with the same (default) flags is no config change: `auto` resolves alike.
    assert sft(2) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("fast", [True, False])
def test_qlora_computes_in_bf16_only_where_it_is_fast(monkeypatch, fast):
    monkeypatch.setattr(qlora, "fast_bfloat16", lambda device_type: fast)
    linear = torch.nn.Linear(128, 64, bias=True)
    qlora.quantize_linear_(linear)
    x = torch.randn(4, 128)
    dequantized = qlora.dequantize(linear.weight, torch.float32)
    compute = torch.bfloat16 if fast else torch.float32
    expected = (x.to(compute) @ dequantized.to(compute).t()).float() + linear.bias
    out = qlora.nf4_linear(x, linear)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-2 if fast else 1e-5, atol=1e-2 if fast else 1e-5)
    if not fast:  # and not merely close to the bf16 result: float32 all the way
        bf16 = (x.bfloat16() @ dequantized.bfloat16().t()).float() + linear.bias
        assert (out - bf16).abs().max() > 1e-4


def test_the_plan_trains_where_bf16_is_slow_as_a_run_would():
    catalogue = load_catalogue()
    cpu, t4, a100 = (resolve_hardware(name, catalogue).device for name in ("cpu", "T4", "A100-80GB"))
    assert cpu.training_precision("auto") == "fp32" and t4.training_precision("auto") == "fp32"
    assert a100.training_precision("auto") == "bf16-autocast"
    assert cpu.training_precision("bf16-autocast") == "bf16-autocast"  # asked for: planned as asked
    assert t4.peak_flops("fp32") == pytest.approx(8.1e12)  # its own fp32 figure, not half its fp16 one
    assert a100.peak_flops("fp32") == pytest.approx(a100.peak_flops("bf16-autocast") / 2)


def test_graft_plan_prints_the_precision_and_peak_it_plans_with(capsys):
    assert main(["plan", "--model", "tiny", "--data", "1M", "--hardware", "T4"]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out.splitlines()[1] and "8.1 TFLOP/s fp32" in out
    assert main(["plan", "--model", "tiny", "--data", "1M", "--hardware", "T4", "--precision", "bf16-autocast"]) == 0
    assert "65 TFLOP/s bf16" in capsys.readouterr().out


def test_a_hardware_file_with_a_bad_fast_bf16_is_named(tmp_path):
    extra = tmp_path / "hw.yaml"
    extra.write_text("mybox:\n  memory_gb: 8\n  bf16_tflops: 1\n  mfu: 0.3\n  usd_per_hour: 0\n  fast_bf16: maybe\n")
    with pytest.raises(Exception, match=r"hw\.yaml: device 'mybox': field 'fast_bf16' must be true or false"):
        load_catalogue(extra)


@pytest.mark.parametrize("fast", [True, False])
def test_inference_in_a_half_dtype_the_cpu_lacks_warns_on_stderr(monkeypatch, capsys, fast):
    import argparse
    monkeypatch.setattr(placement, "fast_bfloat16", lambda device_type: fast)
    monkeypatch.setattr(placement, "fast_float16_on_cpu", lambda: fast)
    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16"), (torch.float32, "auto")):
        assert placement.placement(argparse.Namespace(device="cpu", dtype=name)) == (CPU, dtype)
        out, err = capsys.readouterr()
        assert not out
        assert (f"--dtype {name}: this CPU has no fast {name}" in err) == (not fast and name != "auto"), err


@pytest.mark.parametrize("fast, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_inference_on_a_card_without_bf16_units_takes_float16(monkeypatch, fast, expected):
    monkeypatch.setattr(placement, "fast_bfloat16", lambda device_type: fast)
    assert placement.pick_dtype(torch.device("cuda"), "auto") == expected
    assert placement.pick_dtype(CPU, "auto") == torch.float32


def test_a_bf16_run_on_a_cpu_without_bf16_is_measured_against_its_float32_peak(monkeypatch, tmp_path):
    """MFU of a bf16 run on an AVX2 CPU: against what the CPU can do (float32), not
    against the scalar bf16 loop (which a mixed autocast step outran: MFU 223%)."""
    from graftlm import metrics
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the fake figure stays out of the real cache
    timed = []
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda device, dtype, **kw: timed.append(dtype) or 1e11)
    for fast, dtype, expected in ((False, torch.bfloat16, torch.float32), (True, torch.bfloat16, torch.bfloat16),
                                  (False, torch.float32, torch.float32)):
        monkeypatch.setattr(placement, "fast_bfloat16", lambda device_type, fast=fast: fast)
        metrics.peak_flops(CPU, dtype)
        assert timed[-1] == expected


def test_planning_bf16_on_a_device_without_it_warns(capsys):
    assert main(["plan", "--model", "tiny", "--data", "1M", "--hardware", "cpu", "--precision", "bf16-autocast"]) == 0
    err = capsys.readouterr().err
    assert "warning: --precision bf16-autocast on cpu, which has no fast bf16" in err
    assert main(["plan", "--model", "tiny", "--data", "1M", "--hardware", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
