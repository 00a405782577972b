"""The CPU peak that MFU divides by, and the NF4 dequantization rate QLoRA's time is
planned with: measured each run, and never lowered by a busy one."""

from __future__ import annotations

import json

import pytest
import torch

from graftlm import metrics


def test_cpu_peak_keeps_the_best_figure_a_busy_measurement_cannot_lower(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # What three runs measure: an idle machine, a faster idle one, then the cores shared.
    readings = iter([1.0e11, 3.0e11, 0.5e11])
    lengths = []

    def measure(device, dtype, seconds=0.25, **_):
        lengths.append(seconds)
        return next(readings)

    monkeypatch.setattr(metrics, "measure_matmul_peak", measure)
    cpu = torch.device("cpu")
    assert [metrics.peak_flops(cpu) for _ in range(3)] == [1.0e11, 3.0e11, 3.0e11]
    # The first run measures at length; later ones briefly, the cache backing them up.
    assert lengths[0] > lengths[1] == lengths[2]
    cached = json.loads((tmp_path / "graftlm" / "peak_flops.json").read_text())
    assert list(cached.values()) == [3.0e11]


def test_unreadable_peak_cache_is_measured_over(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "graftlm").mkdir()
    for garbage in ("not json", "[1, 2]", json.dumps({metrics.cpu_peak_key(torch.bfloat16): "fast"})):
        (tmp_path / "graftlm" / "peak_flops.json").write_text(garbage)
        monkeypatch.setattr(metrics, "measure_matmul_peak", lambda device, dtype, seconds=0.25, **_: 2.0e11)
        assert metrics.peak_flops(torch.device("cpu")) == 2.0e11


def test_nf4_dequant_rate_keeps_the_fastest_measurement_and_plans_read_it_without_measuring(tmp_path, monkeypatch):
    """QLoRA's dequantization rate is cached like the peak: a busy measurement (slower per
    parameter, or per call) never replaces a faster one, and rate and fixed cost stay the
    pair one measurement gave. A plan takes the cached pair without measuring."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    quiet, busy, quieter = (metrics.DequantRate(2e8, 2e-4), metrics.DequantRate(5e7, 1e-4),
                            metrics.DequantRate(3e8, 3e-4))
    readings = iter([quiet, busy, quieter])
    lengths = []

    def measure(device, seconds=0.2):
        lengths.append(seconds)
        return next(readings)

    monkeypatch.setattr(metrics, "measure_nf4_dequant", measure)
    cpu = torch.device("cpu")
    assert [metrics.nf4_dequant_rate(cpu) for _ in range(3)] == [quiet, quiet, quieter]
    assert lengths[0] > lengths[1] == lengths[2]  # at length once, briefly after
    assert metrics.nf4_dequant_rate(cpu, measure=False) == quieter and len(lengths) == 3
    cached = json.loads((tmp_path / "graftlm" / "nf4_dequant.json").read_text())
    assert list(cached.values()) == [{"params_per_s": 3e8, "seconds_per_call": 3e-4}]
    # A pass over weights: the fixed cost per weight plus the parameters at the rate.
    assert quieter.pass_seconds(3e8, 10) == pytest.approx(1 + 10 * 3e-4)


def test_recorded_dequant_rates_that_are_not_numbers_are_none():
    for recorded in (None, "fast", {}, {"params_per_s": "x"}, {"params_per_s": 0}, [1, 2],
                     {"params_per_s": 1e8, "seconds_per_call": -1}):
        assert metrics.DequantRate.from_dict(recorded) is None
    assert metrics.DequantRate.from_dict({"params_per_s": 1e8}) == metrics.DequantRate(1e8, 0.0)


def test_measured_nf4_dequant_rate_is_positive_and_brief():
    import time

    from graftlm.adapters.qlora import _nf4
    _nf4()  # torchao's import is slow, and no part of the measurement
    start = time.perf_counter()
    rate = metrics.measure_nf4_dequant(torch.device("cpu"), seconds=0.1)
    assert rate.params_per_s > 0 and rate.seconds_per_call >= 0
    assert time.perf_counter() - start < 10  # quantizing two small weights and 0.1 s of calls (0.15 s here)
