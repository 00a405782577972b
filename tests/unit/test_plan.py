"""graft plan: breakdowns, fit, largest batch, JSON, catalogue, errors, rules of thumb
(`--check` RUN: test_plan_check.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from graftlm.cli import main
from graftlm.errors import GraftError
from graftlm.models.config import ModelConfig
from graftlm.plan import (PlanOptions, RunShape, largest_batch, load_catalogue, make_plan, memory_breakdown,
                          resolve_hardware)
from graftlm.plan.advice import recommend
from graftlm.plan.compute import train_flops_per_token
from graftlm.plan.planner import config_for_param_count, parse_count

LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                       num_heads=32, num_kv_heads=32, max_seq_len=4096)
PARTS = ("weights", "gradients", "optimizer", "weight_copies", "logits", "reference_model")


def test_seven_billion_rules_of_thumb():
    params = LLAMA_7B.num_params()
    assert 6.6e9 < params < 6.8e9
    full = memory_breakdown(RunShape(LLAMA_7B, parameterization="full"))
    assert (full.weights + full.gradients + full.optimizer) / params == pytest.approx(16, abs=0.01)
    lora = memory_breakdown(RunShape(LLAMA_7B, parameterization="lora"))
    assert lora.weights / params == pytest.approx(2, rel=0.03)
    qlora = memory_breakdown(RunShape(LLAMA_7B, parameterization="qlora"))
    assert 0.5 <= qlora.weights / params <= 0.62
    # 6ND for full training: within the attention term of 6 N per token
    assert train_flops_per_token(RunShape(LLAMA_7B, seq_len=2048)) / (6 * params) == pytest.approx(1, abs=0.08)
    lora_flops = train_flops_per_token(RunShape(LLAMA_7B, parameterization="lora", seq_len=2048))
    assert lora_flops / (4 * params) == pytest.approx(1, abs=0.1)


def test_seven_billion_full_does_not_fit_a_24gb_gpu_but_qlora_does():
    hardware = resolve_hardware("RTX4090", load_catalogue())
    plan = make_plan(LLAMA_7B, 5e7, hardware, PlanOptions(seq_len=1024, batch_size=1, goal="format"))
    regimes = plan["regimes"]
    assert not regimes["sft"]["fits"] and not regimes["sft"]["fits_with_checkpointing"]
    assert regimes["sft"]["largest_batch"] == 0
    assert regimes["qlora"]["fits"] and regimes["qlora"]["largest_batch"] >= 1
    assert plan["recommendation"]["regime"] in ("lora", "qlora")


def test_breakdown_adds_up_to_the_peak():
    for parameterization in ("full", "lora", "qlora"):
        for objective in ("sft", "dpo"):
            shape = RunShape(LLAMA_7B, objective=objective, parameterization=parameterization, batch_size=2)
            m = memory_breakdown(shape)
            static = m.weights + m.optimizer + m.reference_model
            start = static + m.activations + m.weight_copies + m.logits
            assert m.peak == max(start, static + m.gradients)
            assert m.peak_moment in ("start of backward", "end of backward")


def test_checkpointing_lowers_activations_and_dpo_doubles_them():
    shape = RunShape(LLAMA_7B, batch_size=4, seq_len=2048)
    m = memory_breakdown(shape)
    assert m.activations_checkpointed < m.activations / 5
    dpo = memory_breakdown(replace(shape, objective="dpo"))
    assert dpo.activations == 2 * m.activations
    assert dpo.reference_model == m.weights  # a frozen copy of the float32 weights
    assert memory_breakdown(replace(shape, objective="dpo", parameterization="lora")).reference_model == 0


def test_grpo_has_a_kv_cache_and_fsdp_divides_the_states():
    shape = RunShape(LLAMA_7B, objective="grpo", batch_size=8, seq_len=1024)
    m = memory_breakdown(shape)
    assert m.kv_cache == 2 * 32 * 4096 * 2 * 8 * 1024
    sharded = memory_breakdown(replace(shape, devices=8, sharding="fsdp"))
    assert sharded.optimizer == m.optimizer // 8
    assert memory_breakdown(replace(shape, devices=8, sharding="ddp")).optimizer == m.optimizer


def test_largest_batch_is_the_boundary_of_fitting():
    shape = RunShape(LLAMA_7B, parameterization="qlora", seq_len=2048)
    usable = 24 * 2 ** 30
    best = largest_batch(shape, usable)
    assert best >= 1
    assert memory_breakdown(replace(shape, batch_size=best)).peak <= usable
    assert memory_breakdown(replace(shape, batch_size=best + 1)).peak > usable
    assert largest_batch(RunShape(LLAMA_7B), 10 * 2 ** 30) == 0


def test_parse_count_and_param_count_models():
    assert parse_count("7B") == 7e9 and parse_count("500m") == 5e8 and parse_count("2.5e9") == 2.5e9
    assert parse_count("data/train.jsonl") is None
    cfg = config_for_param_count(7e9)
    assert abs(cfg.num_params() - 7e9) / 7e9 < 0.1


def test_catalogue_extension_and_counts(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("MI300X:\n  memory_gb: 192\n  bf16_tflops: 1307\n  mfu: 0.35\n  usd_per_hour: 3.0\n"
                     "H100:\n  memory_gb: 80\n  bf16_tflops: 989\n  mfu: 0.5\n  usd_per_hour: 2.0\n")
    catalogue = load_catalogue(extra)
    hw = resolve_hardware("mi300x x4", catalogue)
    assert hw.count == 4 and hw.device.memory_gb == 192
    assert resolve_hardware("H100", catalogue).device.mfu == 0.5  # overridden
    assert resolve_hardware("rtx 4090", catalogue).device.name == "RTX4090"
    for name in ("cpu", "T4", "L4", "A10G", "RTX4090", "A100-40GB", "A100-80GB", "H100", "H200"):
        assert resolve_hardware(name, catalogue).device.name == name


def test_bad_hardware_name_lists_the_known_ones(capsys):
    with pytest.raises(GraftError, match="unknown device 'V100'.*A100-80GB.*H200"):
        resolve_hardware("V100", load_catalogue())
    assert main(["plan", "--model", "tiny", "--data", "1M", "--hardware", "V100"]) == 2
    err = capsys.readouterr().err
    assert "V100" in err and "RTX4090" in err and len(err.strip().splitlines()) == 1


def test_bad_catalogue_entry_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("X1:\n  memory_gb: 10\n  bf16_tflops: fast\n  mfu: 0.3\n  usd_per_hour: 1\n")
    with pytest.raises(GraftError, match="bad.yaml: device 'X1': field 'bf16_tflops'"):
        load_catalogue(bad)
    bad.write_text("X1:\n  memory_gb: [10\n")
    with pytest.raises(GraftError, match=r"bad.yaml:\d+: invalid YAML"):
        load_catalogue(bad)


def test_json_output_for_scripts(capsys):
    assert main(["plan", "--model", "125m", "--data", "2B", "--hardware", "H100x8", "--seq-len", "1024",
                 "--batch", "4", "--goal", "from-scratch", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["regimes"]) == {"pretrain", "cpt", "sft", "dpo", "grpo", "ppo", "lora", "qlora"}
    pretrain = result["regimes"]["pretrain"]
    assert pretrain["fits"] is True and pretrain["time_s"] > 0 and pretrain["cost_usd"] > 0
    assert result["hardware"]["count"] == 8
    assert result["recommendation"]["regime"] == "pretrain"
    assert result["regimes"]["lora"]["artifact"] == "adapter"
    assert result["regimes"]["lora"]["artifact_bytes"] < pretrain["artifact_bytes"] / 10


def test_advice_follows_the_goal():
    hw = resolve_hardware("A100-80GB", load_catalogue())
    small = ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=16,
                        num_heads=16, num_kv_heads=4)
    def advised(goal, tokens):
        return make_plan(small, tokens, hw, PlanOptions(seq_len=1024, batch_size=4, goal=goal))["recommendation"]
    assert advised("deep", 1e8)["regime"] == "sft"
    assert advised("variants", 1e7)["regime"] == "lora"
    assert advised("domain", 5e8)["regime"] == "cpt"
    scratch = advised("from-scratch", 1e7)
    assert scratch["regime"] != "pretrain" and "billions" in " ".join(scratch["reasons"])


def test_rich_table_for_people(capsys):
    assert main(["plan", "--model", "1b", "--data", "100M", "--hardware", "L4", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "largest batch" in out and "recommendation" in out and "QLoRA" in out


def test_data_files_use_data_stats(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 30
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["plan", "--model", "tiny", "--data", str(path), "--seq-len", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"]["stats"]["rows"] == 30
    warnings = " ".join(result["regimes"]["lora"]["data_warnings"])
    assert "duplicates" in warnings and "only 30 rows" in warnings


def test_plan_assumes_the_base_dtype_the_trainer_picks():
    hardware = resolve_hardware("A100-80GB", load_catalogue())
    for precision, words, base_bytes in (("bf16-autocast", "bf16 base", 2), ("fp32", "fp32 base", 4)):
        lora = make_plan(LLAMA_7B, 5e7, hardware, PlanOptions(precision=precision))["regimes"]["lora"]
        assert words in lora["description"]
        assert lora["memory"]["weights"] / LLAMA_7B.num_params() == pytest.approx(base_bytes, rel=0.03)


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"]])
def test_runs_count_training_flops_as_the_plan_does(targets):
    """summary.json's FLOPs come from the planner's formula: the base's forward and input
    gradient, plus each adapter's forward, input gradient and weight gradient (2 x 3 x
    adapter params per token), less the input gradients autograd skips in the first block."""
    from graftlm.adapters import apply_adapters
    from graftlm.adapters.config import AdapterConfig
    from graftlm.metrics import training_flops_per_token
    from graftlm.models.transformer import Decoder
    from graftlm.runs import flops_per_token_at, run_config_class

    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=128)
    adapter = AdapterConfig(kind="lora", r=4, target_modules=targets)
    run = run_config_class("sft")(model="x", data="x", adapter=adapter)
    model = Decoder(cfg)
    apply_adapters(model, adapter)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    first_block = model.layers[0].self_attn
    # The first block's attention input comes from frozen embeddings and a frozen norm.
    skipped = sum(2 * getattr(first_block, name).weight.numel() for name in ("q_proj", "k_proj", "v_proj"))
    expected = training_flops_per_token(cfg, 96, 0.0) + 6 * adapters - skipped
    assert flops_per_token_at(run, cfg)(96) == pytest.approx(expected)
    assert flops_per_token_at(run, cfg)(96) == pytest.approx(train_flops_per_token(
        RunShape(cfg, parameterization="lora", lora_r=4, lora_targets=adapter.targets, seq_len=96)))


def test_over_budget_everywhere_is_said_plainly(capsys):
    # A model of 1.2B parameters (not the preset 1b, built with random weights: pre-training only).
    assert main(["plan", "--model", "1.2B", "--data", "1e9", "--budget", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    regimes, rec = result["regimes"], result["recommendation"]
    cheapest = min(r["cost_usd"] for r in regimes.values() if r["fits"] or r["fits_with_checkpointing"])
    assert regimes["lora"]["fits"] and regimes[rec["regime"]]["cost_usd"] == cheapest > 5
    reasons = " ".join(rec["reasons"])
    assert "every regime that fits costs more than the budget of $5.00" in reasons
    assert f"${cheapest:,.2f}" in reasons and "does not fit" not in reasons
    # LoRA fits but is over the budget, QLoRA is not: the reason says so, not that LoRA does not fit.
    fits = dict.fromkeys(("pretrain", "cpt", "sft", "dpo", "grpo", "lora", "qlora"), True)
    costs = {**dict.fromkeys(fits, 20.0), "lora": 10.0, "qlora": 7.0}
    regime, reasons = recommend("format", 1e7, 10**9, True, fits, costs, budget=8)
    assert regime == "qlora" and "unquantized is over the budget" in reasons[-1]


@pytest.mark.parametrize("flag, value, said", [("--price-per-hour", "-1", "must be >= 0, got -1"),
                                               ("--budget", "-3", "must be >= 0, got -3"),
                                               ("--epochs", "0", "must be > 0, got 0"),
                                               ("--epochs", "nan", "must be > 0, got nan")])
def test_nonsense_costs_name_the_flag(capsys, flag, value, said):
    assert main(["plan", "--model", "tiny", "--data", "1M", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: {said}" in err and len(err.strip().splitlines()) == 1


def test_hardware_line_uses_one_unit(capsys):
    """The catalogue's memory_gb / reserved_gb are GiB; the line printed them as "17.2 GB
    per device (4 GiB reserved)". Both now come in the tables' decimal GB."""
    assert main(["plan", "--model", "tiny", "--data", "1M", "--hardware", "cpu"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("hardware"))
    assert "GiB" not in line and "17.2 GB per device (4.3 GB reserved)" in line


def test_time_table_marks_regimes_that_do_not_fit(capsys):
    """1b on a CPU: full SFT does not fit even with checkpointing, yet its time was listed
    unmarked beside LoRA's, as if it could run."""
    assert main(["plan", "--model", "1b", "--data", "1M", "--hardware", "cpu", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert "does not fit" in rows["full fine-tuning (SFT)"]
    assert "does not fit" not in rows["LoRA (SFT, fp32 base)"] and "with ckpt" in rows["LoRA (SFT, fp32 base)"]


def test_plan_defaults_to_what_each_trainer_trains_at(capsys):
    """Without --batch / --seq-len the plan assumed 8 x 2048 tokens while `graft sft` trains
    at its config's defaults (then 256 tokens): 125m full SFT on a CPU read 8.2 GB, not 2.4 GB.
    Each regime now takes its objective's defaults from the run config dataclasses, and
    the printed plan says it assumed them. The default row length depends on the objective
    and stays within the model's context, as a run picks it."""
    from graftlm.runs import run_config_class
    for model, context in (("125m", 2048), ("small", 512)):
        assert main(["plan", "--model", model, "--data", "1M", "--hardware", "cpu", "--json"]) == 0
        regimes = json.loads(capsys.readouterr().out)["regimes"]
        for name, objective in (("pretrain", "clm"), ("sft", "sft"), ("dpo", "dpo"), ("lora", "sft")):
            train = run_config_class(objective)().train
            assert (regimes[name]["batch_size"], regimes[name]["seq_len"]) == \
                (train.batch_size, train.seq_len_for(objective, context))
    grpo = run_config_class("grpo")()
    assert regimes["grpo"]["batch_size"] == grpo.train.batch_size * grpo.grpo.sampling.group_size
    sft = regimes["sft"]
    assert main(["plan", "--model", "small", "--data", "1M", "--hardware", "cpu", "--seq-len", str(sft["seq_len"]),
                 "--batch", str(sft["batch_size"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["regimes"]["sft"]["memory"] == sft["memory"]
    assert main(["plan", "--model", "125m", "--data", "1M", "--hardware", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--batch and --seq-len not given: what each trainer uses by default" in out
    assert main(["plan", "--model", "125m", "--data", "1M", "--seq-len", "128", "--batch", "2"]) == 0
    # --batch counts prompts for GRPO and PPO, as --train.batch-size does.
    assert ("batch per device: 2 x 128 tokens (pretrain, cpt, sft, dpo, lora, qlora), 8 x 128 tokens (grpo: 2 "
            "prompts x 4 completions), 2 x 128 tokens (ppo: 2 prompts x 1 completions)\n") in capsys.readouterr().out


def _built_params(model: str, vocab_size: int | None) -> int:
    """Parameters of the model `graft pretrain --model MODEL` builds for that vocabulary."""
    import torch
    from graftlm.runs import build_model, run_config_class
    built = build_model(run_config_class("clm")(model=model, data="x"), vocab_size, None, torch.device("cpu"))
    return sum(p.numel() for p in built.parameters())


def test_plan_reads_a_shard_directory_and_its_vocabulary(tmp_path, capsys):
    """`--data shards/` (from `graft prepare`) failed as if meta.json were rows; its train
    tokens and vocabulary come from meta.json, and a preset is counted with that
    vocabulary, as the trainer builds it (tiny read 125k parameters for a 354,624 model)."""
    from graftlm.data.shards import write_shards
    from graftlm.tokenizer import train_tokenizer
    text = " ".join(f"word{i % 97} and more{i % 13}." for i in range(3000))
    tokenizer = train_tokenizer(iter([text]), 300)
    tokenizer.save(tmp_path / "tok")
    meta = write_shards(iter([("train", text), ("val", text[:500])]), tokenizer, tmp_path / "shards")
    assert main(["plan", "--model", "tiny", "--data", str(tmp_path / "shards"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"]["tokens"] == meta["splits"]["train"]["tokens"]
    assert result["model"]["params"] == _built_params("tiny", tokenizer.vocab_size)
    for flags, vocab in ((["--vocab-size", "4096"], 4096), (["--tokenizer", str(tmp_path / "tok")], 300)):
        assert main(["plan", "--model", "tiny", "--data", "1M", *flags]) == 0
        assert f"tiny (vocabulary {vocab}): {_built_params('tiny', vocab) / 1e3:.3g}k parameters" in \
            capsys.readouterr().out
    assert _built_params("tiny", 4096) == 354_624


def test_a_preset_name_plans_the_preset_not_a_parameter_count(capsys):
    """'125m' and '1b' are presets the trainer builds; the plan approximated them with
    another shape of about that many parameters."""
    assert main(["plan", "--model", "125m", "--data", "1M", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["params"] == _built_params("125m", None)


def test_recommendation_agrees_with_itself_and_the_goal():
    """2e9 tokens for 125m read "pre-training from scratch is justified" above a warning
    that 2e9 is under compute-optimal; `--goal from-scratch` with too little data still
    gave the "teaching a format" reason; and with no goal nothing said which was assumed."""
    from graftlm.models.config import preset
    hw = resolve_hardware("H100x8", load_catalogue())
    model = preset("125m")

    def advised(goal, tokens, has_base=False):
        plan = make_plan(model, tokens, hw, PlanOptions(goal=goal), has_base=has_base)
        return plan["recommendation"]["regime"], " ".join(plan["recommendation"]["reasons"])

    regime, reasons = advised(None, 1.5e9)  # under the 2.5e9 its 125M parameters want, by more than a fifth
    assert regime == "pretrain" and "justified" not in reasons and "under the ~20 tokens" in reasons
    assert "no --goal given: assumed 'from-scratch'" in reasons
    regime, reasons = advised("from-scratch", 1e7)
    assert regime == "lora" and "billions" in reasons and "format" not in reasons
    assert "--goal" not in reasons  # the goal was given: nothing assumed
    regime, reasons = advised("from-scratch", 5e8)
    assert regime == "sft" and "format" not in reasons and "deep change" not in reasons
    assert "assumed 'format'" in advised(None, 1e6, has_base=True)[1]
    assert "assumed 'deep'" in advised(None, 5e8, has_base=True)[1]
    assert make_plan(model, 5e8, hw, PlanOptions())["recommendation"]["goal"] == "deep"


def test_hardware_this_is_the_cpu_at_hand_measured_as_runs_measure_it(tmp_path, monkeypatch):
    import os

    import torch

    from graftlm import metrics
    from graftlm.placement import fast_bfloat16
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    recorded = metrics.peak_flops(torch.device("cpu"), torch.float32)  # as a run records it
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda *args, **kwargs: 1.0)  # a busy moment
    hardware = resolve_hardware("this", load_catalogue())
    device = hardware.device
    assert hardware.count == 1 and device.name == "this"
    assert device.memory_gb == pytest.approx(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    assert device.fast_bf16 == fast_bfloat16("cpu")
    # The best figure runs have recorded, not one measured while the cores were busy.
    assert device.peak_flops("fp32") == pytest.approx(recorded, rel=1e-9)  # through TFLOP/s and back
    assert device.usd_per_hour == 0.0 and device.mfu == load_catalogue()["cpu"].mfu


def test_hardware_this_on_a_card_the_catalogue_names_takes_its_mfu_and_price(monkeypatch):
    import types

    import torch

    import graftlm.metrics
    import graftlm.placement
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(graftlm.metrics, "peak_flops", lambda device, dtype: 989e12 if dtype == torch.bfloat16 else 495e12)
    monkeypatch.setattr(graftlm.metrics, "nf4_dequant_rate", lambda device, measure=True: graftlm.metrics.DequantRate(5e10))
    monkeypatch.setattr(graftlm.placement, "fast_bfloat16", lambda device_type: True)
    catalogue = load_catalogue()
    device = resolve_hardware("this x2", catalogue)
    # QLoRA's dequantization: the rate measured on the card (as its runs record it)
    assert device.device.dequant_rate().params_per_s == 5e10 and device.device.dequant_source == "measured here"
    h100 = catalogue["h100"]
    assert device.count == 2 and device.device.memory_gb == 80
    assert (device.device.mfu, device.device.usd_per_hour, device.device.reserved_gb) == \
        (h100.mfu, h100.usd_per_hour, h100.reserved_gb)
    assert device.device.peak_flops("bf16-autocast") == 989e12 and "H100" in device.device.description


def _gsm_rows(tmp_path, n: int = 60):
    """The first `n` rows of GSM8K's training split (real data), as a file."""
    from tests.conftest import SHARED_DATA
    lines = (SHARED_DATA / "gsm8k_train.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def test_plan_counts_data_with_the_tokenizer_beside_the_model(tmp_path, capsys):
    """`--model runs/x/final --data rows.jsonl` estimated the tokens as UTF-8 bytes / 4
    (40.1k for 86k) though the model directory holds its tokenizer, as every run's final/
    does: it now counts with it, as --tokenizer would, and an estimate says it is one."""
    from graftlm.data.stats import data_stats
    from graftlm.models.config import preset
    from graftlm.models.hf import save_model
    from graftlm.models.transformer import Decoder
    from graftlm.tokenizer import train_tokenizer
    data, lines = _gsm_rows(tmp_path)
    final = save_model(Decoder(preset("tiny", vocab_size=300)), tmp_path / "final")
    train_tokenizer(iter(lines), 300).save(final)
    counted = data_stats([data], tokenizer=final)["tokens"]
    estimate = data_stats([data])["tokens"]
    assert counted > 1.3 * estimate  # a 300-token vocabulary: about two bytes a token, not four

    assert main(["plan", "--model", str(final), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"]["tokens"] == counted
    assert result["data"]["stats"]["tokens_counted_with"] == "tokenizer"
    assert result["data"]["stats"]["tokenizer"] == str(final)
    assert main(["plan", "--model", str(final), "--data", str(data)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"data {counted / 1e3:.3g}k tokens (counted with {final}'s tokenizer)" in out
    assert "estimated" not in out
    # No tokenizer anywhere: the table says the count is an estimate, and how to get the real one.
    assert main(["plan", "--model", "tiny", "--data", str(data)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"data {estimate / 1e3:.3g}k tokens (estimated)" in out
    assert "UTF-8 bytes / 4" in out and "--tokenizer DIR" in out and "tokenizer.json" in out


def test_a_preset_is_trained_from_scratch_never_adapted(tmp_path, capsys):
    """`--model tiny --data shards/` advised "LoRA (SFT, fp32 base)", assuming goal 'format':
    a preset is built with random weights, so there is no base to adapt; the plan assumes
    from-scratch, says why, and says how to fine-tune instead."""
    from graftlm.data.shards import write_shards
    from graftlm.tokenizer import train_tokenizer
    text = _shakespeare(40_000)
    tokenizer = train_tokenizer(iter([text]), 300)
    write_shards(iter([("train", text), ("val", text[:2000])]), tokenizer, tmp_path / "shards")
    assert main(["plan", "--model", "tiny", "--data", str(tmp_path / "shards"), "--hardware", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "recommendation: pre-training from scratch" in out
    assert "no --goal given: assumed 'from-scratch' (preset 'tiny' is built with random weights" in out
    assert "pass its directory as --model" in out and "random weights: a new model" in out
    assert "LoRA" not in out.split("recommendation:")[1]
    # Whatever the goal, the budget or the data, a preset is not fine-tuned or adapted.
    data, _ = _gsm_rows(tmp_path)
    for flags in (["--goal", "format"], ["--goal", "variants"], ["--budget", "0"], ["--data", str(data)]):
        shards = [] if "--data" in flags else ["--data", str(tmp_path / "shards")]  # --data is taken once
        args = ["plan", "--model", "tiny", *shards, "--hardware", "cpu", "--json"]
        assert main(args + flags) == 0
        rec = json.loads(capsys.readouterr().out)["recommendation"]
        assert (rec["regime"], rec["goal"]) == ("pretrain", "from-scratch"), flags
    assert "--goal format needs a pre-trained base" in " ".join(_advised(["--goal", "format"], tmp_path, capsys))
    assert "the data is sft rows: pre-train a base on raw text first" in " ".join(
        _advised(["--data", str(data)], tmp_path, capsys))
    fits = dict.fromkeys(("pretrain", "cpt", "sft", "lora", "qlora"), True)
    costs = {**dict.fromkeys(fits, 20.0), "lora": 1.0, "qlora": 0.5}
    regime, reasons = recommend(None, 1e7, 10**8, False, fits, costs, budget=5, random_init=True)
    assert regime == "pretrain" and "pre-training costs $20.00, over the budget of $5.00" in " ".join(reasons)
    regime, reasons = recommend(None, 1e7, 10**8, False, {**fits, "pretrain": False}, costs, None, random_init=True)
    assert regime == "pretrain" and "pre-training does not fit this hardware" in " ".join(reasons)
    # A model directory with weights is still fine-tuned.
    from graftlm.models.config import preset
    from graftlm.models.hf import save_model
    from graftlm.models.transformer import Decoder
    final = save_model(Decoder(preset("tiny", vocab_size=300)), tmp_path / "final")
    assert main(["plan", "--model", str(final), "--data", "1M", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommendation"]["regime"] == "lora"


def _shakespeare(chars: int) -> str:
    from tests.conftest import SHARED_DATA
    return (SHARED_DATA / "tinyshakespeare.txt").read_text()[:chars]


def _advised(flags, tmp_path, capsys) -> list[str]:
    shards = [] if "--data" in flags else ["--data", str(tmp_path / "shards")]  # --data is taken once
    argv = ["plan", "--model", "tiny", *shards, "--hardware", "cpu", "--json", *flags]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)["recommendation"]["reasons"]


def test_no_weights_and_pretraining_shards_assume_from_scratch():
    """A model given only by its size, with `graft prepare` shards: raw text to pre-train on."""
    from graftlm.data.shards import FORMAT
    hw = resolve_hardware("H100", load_catalogue())
    plan = make_plan(config_for_param_count(1e8), 3e8, hw, PlanOptions(), has_base=False,
                     data_stats={"format": FORMAT, "tokens": 3e8})
    assert plan["recommendation"]["goal"] == "from-scratch"
    assert "no base weights given and pre-training shards" in plan["recommendation"]["reasons"][0]


def test_the_adapter_share_quoted_is_this_models(capsys):
    """The advice said an adapter learns a format "with ~1% of the trainable weights" while
    the table beside it showed 37.4k of 224k (17%) for a tiny model."""
    from graftlm.plan.advice import fmt_share
    hw = resolve_hardware("H100", load_catalogue())
    for cfg in (ModelConfig(vocab_size=2048, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                            num_kv_heads=2), LLAMA_7B):
        plan = make_plan(cfg, 1e6, hw, PlanOptions(goal="format"))
        lora = plan["regimes"]["lora"]
        share = lora["params_trainable"] / lora["params_total"]
        reasons = " ".join(plan["recommendation"]["reasons"])
        assert f"training {fmt_share(share)} of the weights" in reasons and "~1%" not in reasons
        scratch = " ".join(make_plan(cfg, 1e6, hw, PlanOptions(goal="from-scratch"), has_base=False)
                           ["recommendation"]["reasons"])
        assert f"trains {fmt_share(share)} of the weights" in scratch
    assert (fmt_share(0.167), fmt_share(0.056), fmt_share(0.0061)) == ("17%", "5.6%", "0.61%")


def test_a_catalogue_device_says_its_kind(tmp_path):
    catalogue = load_catalogue()
    assert catalogue["cpu"].kind == "cpu" and catalogue["h100"].kind == "gpu"
    mine = tmp_path / "mine.yaml"
    mine.write_text("laptop:\n  kind: cpu\n  memory_gb: 32\n  bf16_tflops: 1\n  mfu: 0.3\n  usd_per_hour: 0\n"
                    "cpu:\n  memory_gb: 64\n  bf16_tflops: 2\n  mfu: 0.2\n  usd_per_hour: 0\n")
    assert load_catalogue(mine)["laptop"].kind == "cpu" and load_catalogue(mine)["cpu"].kind == "cpu"
    mine.write_text("x:\n  kind: tpu\n  memory_gb: 32\n  bf16_tflops: 1\n  mfu: 0.3\n  usd_per_hour: 0\n")
    with pytest.raises(GraftError, match="device 'x': field 'kind' must be one of cpu, gpu"):
        load_catalogue(mine)




def test_a_recommendation_that_does_not_fit_says_so_on_its_line(capsys):
    """`--model 1b` on a CPU: "recommendation: pre-training from scratch", while its own table
    said it does not fit; and `1b` (the preset) read as a 1B model of random weights."""
    assert main(["plan", "--model", "1b", "--data", "20M", "--hardware", "cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "recommendation, though it does not fit this hardware: pre-training from scratch" in out
    assert "or its size (--model 1B) to plan one of that size" in out
    assert main(["plan", "--model", "1B", "--data", "20M", "--hardware", "cpu"]) == 0
    assert "recommendation: " in " ".join(capsys.readouterr().out.split())


def test_the_tokens_per_parameter_warning_leaves_a_model_near_the_target_alone():
    from graftlm.plan.advice import data_warnings
    assert data_warnings("pretrain", 10e9, 533e6, None) == []  # 94% of 20 per parameter
    assert "under the ~20 tokens per parameter" in data_warnings("pretrain", 5e9, 533e6, None)[0]
