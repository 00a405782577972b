"""report.html per run and graft compare, from synthetic run directories."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import yaml

from graftlm.cli import main
from graftlm.report import compare_runs, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, loss_start: float = 5.0, steps: int = 20, adapter: bool = False) -> Path:
    run = root / name
    run.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, "loss": loss_start / step ** 0.3, "lr": 1e-3 * min(1, step / 5),
                        "tokens": 512 * step, "step_tokens": 512, "tokens_per_s": 1000 + 10 * step,
                        "mfu": 0.01, "memory_bytes": 2e8 + 1e6 * step})
        if step % 5 == 0:
            records.append({"step": step, "val_loss": loss_start / step ** 0.25, "val_bpb": 1.5})
    records.insert(3, {"step": 3, "skipped": True, "loss": "nan"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"objective": "sft", "model": "tiny", "train": {"batch_size": 4, "seq_len": 128},
         "adapter": {"kind": "lora", "r": 8} if adapter else None}))
    (run / "summary.json").write_text(json.dumps({
        "objective": "sft", "parameterization": "lora" if adapter else "full", "params_total": 100000,
        "params_trainable": 5000 if adapter else 100000, "tokens": 512 * steps, "flops": 1e12,
        "wall_time_s": 12.5 if adapter else 20.0, "tokens_per_s": 1100.0, "mfu": 0.01,
        "peak_memory_bytes": 9e8, "peak_host_memory_bytes": 9e8, "peak_tensor_bytes": 3e8 if adapter else 6e8,
        "device": "cpu", "precision": "fp32",
        "artifact_bytes": 20000, "final_train_loss": loss_start / steps ** 0.3, "final_val_loss": 2.0,
        "val_bpb": 1.5, "world_size": 1}))
    return run


def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def test_report_embeds_plots_and_tables(tmp_path):
    run = make_run(tmp_path, "sft-tiny")
    out = write_report(run)
    assert out == run / "report.html"
    text = out.read_text()
    images = embedded_pngs(text)
    assert len(images) == 1 and images[0].startswith(PNG_MAGIC) and len(images[0]) > 20000
    assert "<script" not in text and "http" not in text  # offline: nothing to fetch
    assert "peak_memory_bytes" in text and "train.seq_len" in text  # summary and config tables


def test_report_without_summary_still_plots(tmp_path):
    run = make_run(tmp_path, "crashed")
    (run / "summary.json").unlink()
    assert embedded_pngs(write_report(run).read_text())


def test_graft_report_and_compare(tmp_path, capsys):
    full = make_run(tmp_path, "full")
    lora = make_run(tmp_path, "lora", loss_start=6.0, adapter=True)
    assert main(["report", str(full)]) == 0
    assert (full / "report.html").exists()
    out = tmp_path / "cmp.html"
    assert main(["compare", str(full), str(lora), "--out", str(out), "--price-per-hour", "3.6"]) == 0
    printed = capsys.readouterr().out
    assert "full" in printed and "lora" in printed and "sft/lora" in printed
    # The step's live tensors and the process's RSS, each under its own name.
    assert "peak tensors" in printed and "peak RSS" in printed and "fp32" in printed and "wall time" in printed
    assert "600.0 MB" in printed and "300.0 MB" in printed and "900.0 MB" in printed
    html = out.read_text()
    assert len(embedded_pngs(html)) == 1 and "sft/full" in html
    rows = compare_runs([full, lora], tmp_path / "again.html", price_per_hour=3.6)
    assert rows[0]["cost_usd"] == 20.0 / 3600 * 3.6
    assert rows[1]["params_trainable"] == 5000
    assert [(r["peak_tensor_bytes"], r["peak_rss_bytes"]) for r in rows] == [(6e8, 9e8), (3e8, 9e8)]
    assert main(["compare", str(full), str(lora), "--out", str(out)]) == 0
    assert "cost" not in capsys.readouterr().out  # no price: no column of dashes


def test_compare_reads_a_cuda_runs_allocator_peak_as_its_tensors(tmp_path):
    run = make_run(tmp_path, "gpu")
    summary = json.loads((run / "summary.json").read_text())
    del summary["peak_tensor_bytes"]
    summary.update(device="cuda:0", peak_memory_bytes=5e9, peak_host_memory_bytes=2e9)
    (run / "summary.json").write_text(json.dumps(summary))
    row = compare_runs([run], tmp_path / "cmp.html")[0]
    assert (row["peak_tensor_bytes"], row["peak_rss_bytes"]) == (5e9, 2e9)


def test_compare_names_an_unfinished_run(tmp_path, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    assert main(["compare", str(run)]) == 2
    assert "empty: no summary.json" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nosuch")]) == 2
    assert "nosuch: run directory does not exist" in capsys.readouterr().err


def test_rl_runs_plot_and_print_the_held_out_reward(tmp_path, capsys, monkeypatch):
    from matplotlib.axes import Axes

    from graftlm.metrics import MetricsLogger
    from graftlm.report import run_plots

    logger = MetricsLogger(tmp_path, 4, tensorboard=False, log_every=1)
    logger.log({"step": 2, "val_reward": 0.375})
    # The progress line shows what tells an RL or preference step apart, not only its loss.
    train = {"loss": 0.0, "lr": 1e-5, "tokens_per_s": 100.0, "mfu": 0.01}
    logger.log({"step": 3, **train, "train_reward/mean": 0.25, "train_kl": 0.0123})
    logger.log({"step": 4, **train, "train_rewards/accuracy": 0.75, "train_rewards/margin": 0.12})
    logger.close()
    out = capsys.readouterr().out
    assert "val_reward 0.3750" in out
    assert "loss 0.0000  reward 0.250  kl 0.0123  100 tok/s" in out
    assert "loss 0.0000  acc 75%  margin 0.120  100 tok/s" in out

    titles = []
    original = Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda ax, title, *a, **k: titles.append(title) or original(ax, title))
    run_plots([{"step": 1, "loss": 0.5, "lr": 1e-3, "train_reward/mean": 0.2},
               {"step": 2, "val_reward": 0.375}])
    assert "reward" in titles and "learning rate" not in titles


def test_compare_names_dpo_variants_shows_held_out_scores_and_writes_beside_the_runs(tmp_path, capsys,
                                                                                     monkeypatch):
    import yaml
    runs = tmp_path / "runs"
    simpo, grpo = make_run(runs, "simpo"), make_run(runs, "grpo")
    for run, objective, extra in ((simpo, "dpo", {"final_val_rewards/accuracy": 0.875}),
                                  (grpo, "grpo", {"final_val_reward": 0.125})):
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "objective": objective, **extra}))
    (simpo / "config.yaml").write_text(yaml.safe_dump({"objective": "dpo", "dpo": {"loss": "simpo"}}))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["compare", str(simpo), str(grpo)]) == 0
    printed = capsys.readouterr().out
    assert "dpo (simpo)/full" in printed and "accuracy 88%" in printed and "reward 0.125" in printed
    assert (runs / "compare.html").exists() and not (elsewhere / "compare.html").exists()
    assert main(["compare", str(grpo)]) == 0  # one run: beside it as well
    assert (runs / "compare.html").exists()
