"""DDP and FSDP2 on 2 CPU processes give the same per-step losses as one process on the
same global batch (float32, 1e-5), for pre-training, SFT with LoRA and DPO; the run
directory is written by rank 0 only, and the final export loads in transformers / PEFT."""

from __future__ import annotations

import json

import pytest

from tests.distributed.support import COMMON, build_data, graft, ok, step_losses

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("dist-data"))


def command(kind: str, data: dict) -> list:
    if kind == "pretrain":
        return ["pretrain", "--model", "tiny", "--data", data["shards"]]
    if kind == "sft-lora":
        return ["sft", "--model", data["base"], "--data", data["sft"],
                "--adapter", "lora", "--adapter.r", "4", "--adapter.target-modules", "all-linear",
                "--sft.val-fraction", "0.1"]
    return ["dpo", "--model", "tiny", "--tokenizer", data["tok"], "--data", data["pairs"],
            "--dpo.val-fraction", "0.1"]


def run(kind: str, data: dict, out, name: str, nproc: int, mode: str | None):
    per_rank = 4 // nproc  # the global batch is 4 rows, 2 micro-batches per step
    argv = [*command(kind, data), "--out", out, "--name", name, "--train.max-steps", STEPS,
            "--train.batch-size", per_rank, "--train.grad-accum", 2, "--train.eval-every", 0,
            "--train.save-every", 0, *COMMON]
    if mode:
        argv += ["--parallel", mode]
    return ok(graft(argv, nproc=nproc))


@pytest.mark.parametrize("kind", ["pretrain", "sft-lora", "dpo"])
def test_ddp_and_fsdp_match_one_process(kind, data, tmp_path):
    run(kind, data, tmp_path, "one", 1, None)
    expected = step_losses(tmp_path / "one")
    assert sorted(expected) == list(range(1, STEPS + 1))
    for mode in ("ddp", "fsdp"):
        result = run(kind, data, tmp_path, mode, 2, mode)
        got = step_losses(tmp_path / mode)
        assert sorted(got) == sorted(expected), mode
        for step, loss in expected.items():
            assert got[step] == pytest.approx(loss, abs=1e-5), (mode, step, got, expected)
        # Only rank 0 logs: one progress line per step, not two.
        assert result.stdout.count(f"step {STEPS}/{STEPS}") == 1, result.stdout
        summary = json.loads((tmp_path / mode / "summary.json").read_text())
        assert summary["world_size"] == 2
    _check_export(kind, tmp_path / "fsdp" / "final", tmp_path / "ddp" / "final")


def _check_export(kind: str, fsdp_final, ddp_final) -> None:
    """The export gathered under FSDP2 is a normal HF model / PEFT adapter, equal to DDP's."""
    import torch
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if kind == "sft-lora" else "model.safetensors"
    a, b = load_file(fsdp_final / name), load_file(ddp_final / name)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    if kind == "sft-lora":
        import peft
        config = peft.LoraConfig.from_pretrained(str(fsdp_final))
        assert config.r == 4 and any(k.endswith("lora_B.weight") for k in a)
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(fsdp_final)
        ids = torch.tensor([[1, 5, 9, 14]])
        assert torch.isfinite(model(ids).logits).all()
