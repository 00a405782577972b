"""The CPU peak that MFU divides by: measured each run, and never lowered by a busy one."""

from __future__ import annotations

import json

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
