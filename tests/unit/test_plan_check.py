"""graft plan --check RUN: the plan for exactly that run beside what it measured."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from graftlm.cli import main
from graftlm.plan import load_catalogue, memory_breakdown, resolve_hardware
from graftlm.plan.compute import train_flops_per_token


def test_check_sets_prediction_beside_measurement(tmp_path, capsys):
    import yaml
    from graftlm.plan.check import check_run, run_shape
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "objective": "sft", "model": "small",
        "train": {"batch_size": 4, "seq_len": 128, "precision": "fp32", "grad_accum": 1},
        "adapter": {"kind": "qlora", "r": 8, "base_dtype": "bfloat16", "target_modules": ["all-linear"]},
        "parallel": {"mode": "none"}}))
    small_params = 2048 * 128 + 4 * (128 * 128 * 2 + 2 * 128 * 64 + 3 * 128 * 352 + 256) + 128
    (run / "summary.json").write_text(json.dumps({
        "objective": "sft", "parameterization": "qlora", "device": "cpu", "world_size": 1,
        "params_total": small_params, "tokens": 5120, "flops": 1e10, "train_time_s": 10.0, "steps": 10,
        "tokens_per_s": 512.0, "peak_flops": 1e11, "mfu": 0.02, "peak_tensor_bytes": 4_000_000,
        "nf4_dequant": {"params_per_s": 1e8, "seconds_per_call": 1e-4}}))
    shape, _ = run_shape(run)
    assert (shape.parameterization, shape.batch_size, shape.seq_len, shape.lora_r) == ("qlora", 4, 128, 8)
    assert shape.model.vocab_size == 2048  # solved from the recorded parameter count
    result = check_run(run, None)
    memory = result["figures"]["peak memory (bytes)"]
    assert memory["predicted"] == memory_breakdown(shape).peak
    assert memory["error"] == pytest.approx(memory["predicted"] / 4e6 - 1)
    flops = result["figures"]["FLOPs"]
    assert flops["predicted"] == pytest.approx(train_flops_per_token(shape) * 5120)
    # A CPU run's time: its recorded peak at the MFU the catalogue's `cpu` entry expects, plus
    # (QLoRA) 10 steps x 2 passes over the NF4 base at the rate the run recorded: the 28 block
    # linears of 4 x 184,320 parameters, in backward less the first block's q/k/v.
    dequant = 10 * ((28 * 1e-4 + 4 * 184_320 / 1e8) + (25 * 1e-4 + (4 * 184_320 - 128 * 256) / 1e8))
    assert result["figures"]["time: NF4 dequantization (s)"]["predicted"] == pytest.approx(dequant)
    catalogue = load_catalogue()
    cpu_mfu = catalogue["cpu"].mfu
    assert result["figures"]["time (s)"]["predicted"] == pytest.approx(flops["predicted"] / (1e11 * cpu_mfu) + dequant)
    assert "NF4 dequantization at 1e+08 params/s (the run's recorded rate, 100 us per weight)" in result["assumed"]
    catalogue["cpu"] = replace(catalogue["cpu"], mfu=cpu_mfu / 2)  # as a --hardware-file would
    assert check_run(run, None, catalogue)["figures"]["time (s)"]["predicted"] == \
        pytest.approx(flops["predicted"] / (1e11 * cpu_mfu / 2) + dequant)
    assert main(["plan", "--check", str(run)]) == 0
    out = capsys.readouterr().out
    assert "predicted / measured" in out and "of which NF4 dequantization" in out
    assert main(["plan", "--check", str(tmp_path / "missing")]) == 2
    # A counted peak of a step whose rows were padded to 48 tokens is predicted at 48.
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "peak_tensor_seq_len": 48}))
    result = check_run(run, None)
    assert result["figures"]["peak memory (bytes)"]["predicted"] == memory_breakdown(replace(shape, seq_len=48)).peak
    assert (result["memory_seq_len"], result["seq_len"]) == (48, 128)
    assert main(["plan", "--check", str(run)]) == 0
    assert "measured step's width, 48 tokens (seq_len 128" in " ".join(capsys.readouterr().out.split())


def test_check_counts_an_rl_batch_in_sampled_sequences(tmp_path):
    """A GRPO micro-batch of 2 prompts trains 2 x group_size completions: the plan's batch
    (sequences) is that, with the completion length the run sampled (-57% -> -8% on a
    measured GRPO run's peak)."""
    import yaml
    from graftlm.plan.check import run_shape
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "objective": "grpo", "model": "small", "train": {"batch_size": 2, "seq_len": 128},
        "grpo": {"sampling": {"group_size": 4, "max_new_tokens": 48}}}))
    (run / "summary.json").write_text(json.dumps({"device": "cpu", "world_size": 1}))
    shape, _ = run_shape(run)
    assert (shape.objective, shape.batch_size, shape.grpo_group, shape.grpo_completion_len) == ("grpo", 8, 4, 48)


def test_check_finds_an_adapter_runs_vocabulary(tmp_path):
    """An adapter run's parameter count holds its adapters: the vocabulary comes from the
    base model's config when the run named a model directory, and is solved from the
    base's own parameters for a preset (it used to be solved from the total: 3x off)."""
    import yaml
    from graftlm.models.config import preset
    from graftlm.models.hf import save_model
    from graftlm.models.transformer import Decoder
    from graftlm.plan.check import run_shape

    base = Decoder(preset("tiny", vocab_size=300))
    base_dir = save_model(base, tmp_path / "base")
    trained = 40_000  # A and B of the adapters
    for model, vocab in ((str(base_dir), 300), ("small", 700)):
        run = tmp_path / f"run-{vocab}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({
            "objective": "sft", "model": model, "adapter": {"kind": "lora", "r": 8}}))
        total = preset("tiny" if vocab == 300 else "small", vocab_size=vocab).num_params() + trained
        (run / "summary.json").write_text(json.dumps({
            "device": "cpu", "world_size": 1, "params_total": total, "params_trainable": trained}))
        assert run_shape(run)[0].model.vocab_size == vocab


@pytest.mark.parametrize("adapter, precision, base", [
    ({"base_dtype": "auto"}, "bf16-autocast", "bfloat16"), ({"base_dtype": "auto"}, "fp32", "float32"),
    ({"base_dtype": "float32"}, "bf16-autocast", "float32"), ({}, "bf16-autocast", "float32")])
def test_check_reads_the_base_dtype_the_run_stored(tmp_path, adapter, precision, base):
    """`plan --check` resolves `base_dtype: auto` by the run's precision as the trainer
    did; a run recorded before "auto" existed (no field) stored float32."""
    import yaml
    from graftlm.plan.check import run_shape
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "objective": "sft", "model": "small", "train": {"precision": precision},
        "adapter": {"kind": "lora", "r": 8, **adapter}}))
    (tmp_path / "summary.json").write_text(json.dumps({"device": "cpu", "world_size": 1}))
    assert run_shape(tmp_path)[0].lora_base_dtype == base


def test_check_labels_its_memory_row_peak_tensors(tmp_path, capsys):
    """The row compares live tensor bytes: `graft compare` calls them "peak tensors" (and
    RSS "peak RSS"), so `plan --check` does too; the JSON key, which demo.py reads, stays."""
    import yaml
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "objective": "sft", "model": "tiny", "train": {"batch_size": 2, "seq_len": 64, "precision": "fp32"}}))
    (tmp_path / "summary.json").write_text(json.dumps({
        "device": "cpu", "world_size": 1, "tokens": 1000, "flops": 1e9, "train_time_s": 1.0,
        "peak_flops": 1e11, "peak_tensor_bytes": 3_000_000}))
    assert main(["plan", "--check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "peak tensors" in out and "peak memory" not in out
    assert "time in steps (s)" in out  # train_time_s, which graft compare's wall time is not
    assert main(["plan", "--check", str(tmp_path), "--json"]) == 0
    assert "peak memory (bytes)" in json.loads(capsys.readouterr().out)[0]["figures"]


def test_check_sets_a_cpu_runs_rss_beside_the_tensors_uncompared(tmp_path, capsys):
    """A two-process CPU run records its RSS (no counted step): "peak tensors 10 MB vs
    394 MB, 0.03x" compared the interpreter and libraries with the plan's tensors."""
    from graftlm.plan.check import check_run
    run = _cpu_run(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    del summary["peak_tensor_bytes"]
    (run / "summary.json").write_text(json.dumps({**summary, "world_size": 2, "peak_memory_bytes": 393_600_000}))
    memory = check_run(run, None)["figures"]["peak memory (bytes)"]
    assert memory["measured"] == 393_600_000 and memory["ratio"] is None and not memory["compared"]
    assert main(["plan", "--check", str(run)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "peak tensors" in line)
    assert "not compared" in row and "0.0" not in row


def test_check_of_a_qlora_run_that_recorded_no_rate_takes_this_machines_and_says_so(tmp_path, monkeypatch):
    import yaml

    import graftlm.metrics
    from graftlm.plan.check import check_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "objective": "sft", "model": "small", "train": {"batch_size": 4, "seq_len": 128, "precision": "fp32"},
        "adapter": {"kind": "qlora", "r": 8}}))
    (run / "summary.json").write_text(json.dumps({
        "device": "cpu", "world_size": 1, "params_total": 400_000, "tokens": 5120, "steps": 10,
        "train_time_s": 10.0, "peak_flops": 1e11}))
    asked = []
    monkeypatch.setattr(graftlm.metrics, "nf4_dequant_rate",
                        lambda device, measure=True: asked.append((device.type, measure)) or graftlm.metrics.DequantRate(1e8))
    result = check_run(run, None)
    assert asked == [("cpu", False)]  # the cached figure when there is one: no torchao import to read it
    assert "the run recorded none: this CPU's, as measured on it" in result["assumed"]
    assert result["figures"]["time: NF4 dequantization (s)"]["predicted"] > 0
    # Checked against a catalogue device, the device's own rate.
    h100 = check_run(run, resolve_hardware("H100", load_catalogue()))
    assert "H100's, memory bandwidth" in h100["assumed"]


def _cpu_run(tmp_path, precision="fp32", step_mfus=None):
    """A finished CPU pre-training run's config.yaml and summary.json (and its step log)."""
    import yaml
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "objective": "clm", "model": "tiny", "train": {"batch_size": 4, "seq_len": 64, "precision": precision}}))
    (tmp_path / "summary.json").write_text(json.dumps({
        "device": "cpu", "world_size": 1, "precision": precision, "tokens": 10240, "flops": 1.4e10, "steps": 20,
        "train_time_s": 45.0, "tokens_per_s": 230.0, "mfu": 0.02, "peak_flops": 1.4e11,
        "peak_tensor_bytes": 11_500_000, "params_total": 223_552}))
    if step_mfus is not None:
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": 5.0, "mfu": m}) + "\n"
                                                        for i, m in enumerate(step_mfus)))
    return tmp_path


def test_check_shows_predicted_over_measured_not_an_unexplained_sign(tmp_path, capsys):
    """`plan --check` printed "error -99.3%" for time and "+13201%" for tokens/s with nothing
    saying which way the sign goes: the table now shows predicted / measured (0.98x: the
    plan says 2% less), and the JSON keeps `error`, (predicted - measured) / measured."""
    from graftlm.plan.check import check_run
    run = _cpu_run(tmp_path / "run")
    result = check_run(run, None)
    for fig in result["figures"].values():
        if fig["measured"]:
            assert fig["ratio"] == pytest.approx(fig["predicted"] / fig["measured"])
            assert fig["error"] == pytest.approx(fig["ratio"] - 1)
    assert main(["plan", "--check", str(run)]) == 0
    out = capsys.readouterr().out
    assert "predicted / measured" in out and "error" not in out
    memory = result["figures"]["peak memory (bytes)"]
    assert f"{memory['predicted'] / memory['measured']:.2f}x" in out
    assert f"{result['figures']['time (s)']['ratio']:.3g}x" in out  # far off: three figures, not "0.01x"


def test_check_on_another_kind_of_device_is_not_compared(tmp_path, capsys):
    """`--check CPU_RUN --hardware H100` set an H100's time against the CPU's: "+22812183%".
    It is now what the run would take on an H100, beside the measurement, not compared."""
    from graftlm.plan.check import check_run
    run = _cpu_run(tmp_path / "run")
    catalogue = load_catalogue()
    result = check_run(run, resolve_hardware("H100", catalogue), catalogue)
    assert result["time_compared"] is False
    for name in ("time (s)", "tokens/s"):
        fig = result["figures"][name]
        assert fig["predicted"] and fig["measured"] and fig["error"] is None and fig["ratio"] is None
    assert result["figures"]["FLOPs"]["ratio"] is not None  # the run's shape, whatever the device
    assert main(["plan", "--check", str(run), "--hardware", "H100"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") == 5}
    assert "not compared" in rows["time in steps (s)"] and "not compared" in rows["tokens/s"]
    assert "x" in rows["FLOPs"].split("│")[4]
    assert "what this run would take on H100; it trained on cpu" in " ".join(out.split())
    # A CPU run checked against the catalogue's CPU, or a GPU's against a GPU, is compared.
    assert check_run(run, resolve_hardware("cpu", catalogue), catalogue)["figures"]["time (s)"]["ratio"]
    gpu_run = tmp_path / "gpu"
    gpu_run.mkdir()
    (gpu_run / "config.yaml").write_text((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    (gpu_run / "summary.json").write_text(json.dumps({**summary, "device": "cuda:0"}))
    assert check_run(gpu_run, resolve_hardware("A100-80GB", catalogue), catalogue)["time_compared"] is True
    assert check_run(gpu_run, resolve_hardware("cpu", catalogue), catalogue)["time_compared"] is False


@pytest.mark.parametrize("fast", [False, True])
def test_check_of_a_bf16_cpu_run_says_it_computed_in_emulated_bf16(tmp_path, capsys, monkeypatch, fast):
    """A run trained in bf16 on an AVX2 CPU took 45 s where the plan said 0.34 s, with no
    word of why: its matrix products ran in PyTorch's emulated bf16, the prediction at a
    native rate. Said where this machine has no fast bf16; not where it has."""
    import graftlm.placement
    from graftlm.plan.check import check_run
    monkeypatch.setattr(graftlm.placement, "fast_bfloat16", lambda device_type: fast)
    notes = " ".join(check_run(_cpu_run(tmp_path / "bf16", "bf16-autocast"), None)["notes"])
    assert ("emulated bf16" in notes and "native rate the predicted time assumes" in notes) != fast
    assert "emulated" not in " ".join(check_run(_cpu_run(tmp_path / "fp32"), None)["notes"])
    assert main(["plan", "--check", str(tmp_path / "bf16")]) == 0
    assert ("note: the run computed in bf16-autocast on a CPU" in " ".join(capsys.readouterr().out.split())) != fast
    # A run that recorded its CPU's bf16 is judged by that, whatever machine checks it.
    run = _cpu_run(tmp_path / "recorded", "bf16-autocast")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "fast_bf16": fast}))
    notes = " ".join(check_run(run, None)["notes"])
    assert ("its CPU had no fast bf16" in notes and "if it trained here" not in notes) != fast
    (run / "summary.json").write_text(json.dumps({**summary, "fast_bf16": not fast}))
    assert ("emulated bf16" in " ".join(check_run(run, None)["notes"])) == fast


def test_check_says_when_other_work_slowed_the_runs_steps(tmp_path, capsys):
    """A CPU shared with other work: a run whose median step reached 30% MFU took 6x as long
    in all (5%), which read as the plan being 6x off. The note gives the median step's pace."""
    from graftlm.plan.check import check_run
    uneven = _cpu_run(tmp_path / "uneven", step_mfus=[0.3] * 11 + [0.005] * 9)
    result = check_run(uneven, None)
    at_median = 1.4e10 / (1.4e11 * 0.3)
    ratio = result["figures"]["time (s)"]["predicted"] / at_median
    assert any("median step reached MFU 30%, its steps together 2%" in n and f"{at_median:.3g} s" in n
               and f"{ratio:.3g}x" in n for n in result["notes"]), result["notes"]
    steady = _cpu_run(tmp_path / "steady", step_mfus=[0.021] * 20)
    assert not any("uneven" in n for n in check_run(steady, None)["notes"])


def test_check_says_what_an_evenly_slow_run_measured_against_the_assumed_mfu(tmp_path, capsys):
    """A tiny run on a busy CPU measured 13-469x the predicted time with nothing said: its
    steps were evenly slow, so the uneven-steps note never fired."""
    from graftlm.plan.check import check_run
    for run in (_cpu_run(tmp_path / "steady", step_mfus=[0.02] * 20), _cpu_run(tmp_path / "unlogged")):
        (note,) = check_run(run, None)["notes"]
        assert note.startswith("the run reached MFU 2.00% where the prediction assumes 30%: its steps were evenly slow")
    fast = _cpu_run(tmp_path / "fast")
    summary = json.loads((fast / "summary.json").read_text())
    summary.update(train_time_s=0.5, mfu=0.2)  # within 5x of the prediction: nothing to explain
    (fast / "summary.json").write_text(json.dumps(summary))
    assert not check_run(fast, None)["notes"]


def test_check_names_a_reward_run_as_one(tmp_path, capsys):
    import yaml

    from graftlm.plan.check import check_run
    run = _cpu_run(tmp_path / "rm")
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "objective": "reward"}))
    assert check_run(run, None)["objective"] == "reward"
    assert main(["plan", "--check", str(run)]) == 0
    assert "rm: reward / full" in capsys.readouterr().out.replace("\n", "")


def test_check_of_an_rl_run_says_when_sampling_took_far_more_than_predicted(tmp_path):
    """A GRPO run read 0.39x for time with nothing said: sampling was half its steps' time
    but 14% of the predicted time. The plan now counts each decode step's eager operators,
    but on a CPU a tiny model's decoding still goes to work it does not count (small matrix
    products, Python per row): a run whose sampling is far past its predicted share says so."""
    import yaml

    from graftlm.plan.check import check_run
    run = _cpu_run(tmp_path / "run")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "objective": "grpo", "model": "tiny", "train": {"batch_size": 2, "seq_len": 64, "precision": "fp32"},
        "grpo": {"sampling": {"group_size": 4, "max_new_tokens": 16}}}))

    def steps(generation_s):
        (run / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": i, "train_time/generation_s": generation_s, "train_time/train_s": 1.0,
             "train_time/scoring_s": 0.01}) + "\n" for i in range(1, 5)))
        return [n for n in check_run(run, None)["notes"] if n.startswith("sampling took")]

    note = steps(9.0)
    assert len(note) == 1 and note[0].startswith("sampling took 90% of the steps' time but ")
    assert "of the predicted time" in note[0]
    assert steps(0.05) == []  # a share of the time like its predicted share: nothing to say
    compiled = [n for n in check_run(run, None)["notes"] if "compiled its rollouts' decode step" in n]
    assert compiled == []
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["grpo"]["sampling"]["compile"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert steps(9.0) == []  # its sampling time holds the compile: no word on eager decoding's share
    compiled = [n for n in check_run(run, None)["notes"] if "compiled its rollouts' decode step" in n]
    assert len(compiled) == 1 and "the prediction times eager decoding" in compiled[0]
