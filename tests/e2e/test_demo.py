"""`graft demo --quick`: every stage produces its artefacts, and fine-tuning beats the base."""

import json

import pytest

from graftlm.cli import main


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "what each regime bought" in printed

    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert json.loads((out / "shards" / "meta.json").read_text())["splits"]["train"]["tokens"] > 0
    runs = out / "runs"
    for name in ("base", "sft", "dpo", "lora", "qlora", "lora-mood"):
        run = runs / name
        for artefact in ("config.yaml", "metrics.jsonl", "summary.json", "report.html"):
            assert (run / artefact).exists(), f"{name} has no {artefact}"
    for name in ("base", "sft", "dpo"):
        assert (runs / name / "final" / "model.safetensors").exists()
    model_bytes = (runs / "sft" / "final" / "model.safetensors").stat().st_size
    for name in ("lora", "qlora", "lora-mood"):
        adapter = runs / name / "final" / "adapter_model.safetensors"
        assert (runs / name / "final" / "adapter_config.json").exists()
        assert adapter.stat().st_size < 0.3 * model_bytes

    result = json.loads((out / "demo.json").read_text())
    accuracy = result["accuracy"]
    # Fine-tuning, full and LoRA alike, must beat the base prompted with examples. Quick
    # mode's adapters once scored 0% (their answers were word pieces the base had never
    # produced, on a base too little trained); on bases from 4 pre-training seeds they
    # now score 85-100% (the full demo's figures are in the README).
    assert accuracy["sft"] > accuracy["base"], accuracy
    assert 0.0 <= accuracy["dpo"] <= 1.0
    for name in ("lora", "qlora"):
        assert accuracy[name] >= 0.75 and accuracy[name] > accuracy["base"], accuracy
    assert accuracy["lora-mood"] >= 0.75 and accuracy["lora-mood"] > result["mood"]["base+3-shot"], result["mood"]
    assert {row[0] for row in result["swaps"]} >= {"base", "where", "mood", "mixed batch: where"}
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 1
