"""graft plan's QLoRA time: the NF4 base dequantized in each micro-batch's passes, at the
catalogue's rate (a GPU's from its memory bandwidth, a CPU's measured), beside the matmuls."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from graftlm.cli import main
from graftlm.errors import GraftError
from graftlm.plan import PlanOptions, RunShape, load_catalogue, make_plan, resolve_hardware
from graftlm.plan.hardware import Hardware
from tests.unit.test_plan import LLAMA_7B


def _dequant_hardware(tmp_path, **fields):
    path = tmp_path / "hw.yaml"
    path.write_text(json.dumps({"box": {"memory_gb": 80, "bf16_tflops": 100, "mfu": 0.5, "usd_per_hour": 1.0,
                                        **fields}}))
    return resolve_hardware("box", load_catalogue(path))


def test_qlora_time_exceeds_lora_time_by_the_dequantization_of_its_nf4_base(tmp_path):
    """QLoRA runs the FLOPs LoRA runs, plus a dequantization of every NF4 base weight in
    forward and again in backward (all but the first block's q/k/v) per micro-batch: at a
    known rate, its time is LoRA's plus exactly that. The plan had it at LoRA's time."""
    hardware = _dequant_hardware(tmp_path, nf4_gparams_per_s=2.0)
    options = PlanOptions(seq_len=512, batch_size=4, precision="bf16-autocast")
    plan = make_plan(LLAMA_7B, 1e8, hardware, options)
    lora, qlora = plan["regimes"]["lora"], plan["regimes"]["qlora"]
    assert qlora["flops"] == lora["flops"]
    nf4 = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # every block linear
    first_qkv = 3 * 4096 * 4096
    micro_batches = 1e8 / (4 * 512)
    dequant = micro_batches * (2 * nf4 - first_qkv) / 2e9
    assert qlora["time_detail"]["NF4 dequantization"] == pytest.approx(dequant)
    assert qlora["time_s"] - lora["time_s"] == pytest.approx(dequant)
    assert set(qlora["dequant_detail"]) == {"train forward", "train backward"}
    assert "NF4 dequantization" not in lora["time_detail"]
    assert qlora["cost_usd"] == pytest.approx(qlora["time_s"] / 3600)
    # Two devices each dequantize their own micro-batches: half as many each.
    halved = make_plan(LLAMA_7B, 1e8, Hardware(hardware.device, 2), options)["regimes"]["qlora"]
    assert halved["time_detail"]["NF4 dequantization"] == pytest.approx(dequant / 2)


def test_plan_prints_qlora_dequantization_as_its_own_line(capsys):
    assert main(["plan", "--model", "7B", "--data", "100M", "--hardware", "H100", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    qlora = result["regimes"]["qlora"]
    dequant = qlora["time_detail"]["NF4 dequantization"]
    assert qlora["time_s"] == pytest.approx(qlora["time_detail"]["matmuls"] + dequant)
    assert result["hardware"]["nf4_dequant_source"] == "memory bandwidth"
    assert main(["plan", "--model", "7B", "--data", "100M", "--hardware", "H100"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "qlora:" in out and "dequantizing the NF4 base" in out and "memory bandwidth" in out


def test_a_gpus_dequantization_rate_follows_its_memory_bandwidth(tmp_path):
    from graftlm.metrics import NF4_DEQUANT_BANDWIDTH_FRACTION, NF4_DEQUANT_BYTES_BF16, NF4_DEQUANT_BYTES_FP32
    from graftlm.plan.hardware import FLOPS_PER_BYTE_FALLBACK
    catalogue = load_catalogue()
    for name in ("t4", "l4", "a10g", "rtx4090", "a10040gb", "a10080gb", "h100", "h200"):
        assert catalogue[name].memory_gbs, f"{name} has no memory bandwidth"
    h100 = catalogue["h100"].dequant_rate()
    assert h100.params_per_s == pytest.approx(3350e9 * NF4_DEQUANT_BANDWIDTH_FRACTION / NF4_DEQUANT_BYTES_BF16)
    assert catalogue["h200"].dequant_rate().params_per_s > h100.params_per_s
    # No fast bf16: torchao dequantizes to bf16, then casts on to float32.
    assert catalogue["t4"].dequant_rate().params_per_s == \
        pytest.approx(320e9 * NF4_DEQUANT_BANDWIDTH_FRACTION / NF4_DEQUANT_BYTES_FP32)
    # A CPU's eager operators are far below its bandwidth: the catalogue gives its rate.
    assert catalogue["cpu"].dequant_rate().params_per_s == catalogue["cpu"].nf4_gparams_per_s * 1e9
    # A user's device without a bandwidth: its bf16 peak's bytes at an H100's ratio, and said so.
    device = _dequant_hardware(tmp_path).device
    assert device.dequant_rate().params_per_s == \
        pytest.approx(100e12 / FLOPS_PER_BYTE_FALLBACK * NF4_DEQUANT_BANDWIDTH_FRACTION / NF4_DEQUANT_BYTES_BF16)
    assert "assumed" in device.dequant_source
    with pytest.raises(GraftError, match="memory_gbs"):
        _dequant_hardware(tmp_path, memory_gbs="fast")


def test_dequant_passes_of_preference_and_rl_steps():
    """A DPO micro-batch adds the reference forward; GRPO also one pass per generated token."""
    from graftlm.plan.compute import dequant_passes
    shape = RunShape(LLAMA_7B, parameterization="qlora", seq_len=512)
    nf4 = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert set(dequant_passes(shape)) == {"train forward", "train backward"}
    assert dequant_passes(replace(shape, objective="dpo"))["reference forward"] == (nf4, 7 * 32)
    grpo = dequant_passes(replace(shape, objective="grpo", grpo_completion_len=100))
    assert grpo["generation"] == (100 * nf4, 100 * 7 * 32) and "reference forward" in grpo
    assert dequant_passes(replace(shape, activation_checkpointing=True))["train forward"] == (2 * nf4, 2 * 7 * 32)
    assert dequant_passes(replace(shape, parameterization="lora")) == {}
