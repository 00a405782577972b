"""`graft pretrain` end to end: tokenizer, shards, training, run directory, the final
model in transformers, resume / finished-run rules, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from graftlm.cli import main

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    work = tmp_path_factory.mktemp("data")
    (work / "text.txt").write_text(SHAKESPEARE.read_text()[:60_000])
    assert main(["tokenizer", "train", "--data", str(work / "text.txt"), "--vocab-size", "384",
                 "--out", str(work / "tok")]) == 0
    assert main(["prepare", "--data", str(work / "text.txt"), "--tokenizer", str(work / "tok"),
                 "--out", str(work / "shards")]) == 0
    return work


def pretrain(shards: Path, out: Path, *extra: str) -> int:
    # graft takes each single-valued option once: `extra` replaces these defaults, not repeats them.
    defaults = {"--train.max-steps": "6", "--train.eval-every": "3", "--train.save-every": "3",
                "--train.precision": "fp32"}
    given = {word for word in extra if word.startswith("--")}
    kept = [word for flag, value in defaults.items() if flag not in given for word in (flag, value)]
    return main(["pretrain", "--model", "tiny", "--data", str(shards / "shards"), "--out", str(out),
                 "--name", "t", "--recipe", str(ROOT / "recipes" / "pretrain-tiny-cpu.yaml"), *kept, *extra])


@pytest.mark.slow
def test_pretrain_end_to_end(shards, tmp_path, capsys):
    import transformers

    assert pretrain(shards, tmp_path) == 0
    run = tmp_path / "t"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "checkpoints/step-6/manifest.json",
                 "report.html"):
        assert (run / name).exists(), name
    assert "<img" in (run / "report.html").read_text()
    assert list((run / "tensorboard").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    for key in ("objective", "parameterization", "params_total", "params_trainable", "tokens", "flops",
                "wall_time_s", "tokens_per_s", "mfu", "peak_memory_bytes", "peak_host_memory_bytes",
                "artifact_bytes", "final_train_loss", "final_val_loss", "val_bpb"):
        assert summary[key] is not None, key
    assert summary["objective"] == "clm" and summary["parameterization"] == "full"
    from graftlm.placement import fast_bfloat16
    assert summary["fast_bf16"] is fast_bfloat16("cpu")  # what plan --check judges its bf16 time by
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 2 * 64
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "memory_bytes"} <= set(train_rows[0])
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]

    # The final model is a Hugging Face model with the same logits.
    from graftlm.models.hf import load_model
    ours = load_model(run / "final")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, 384, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)

    # A finished run is never silently overwritten; a longer one continues; --fresh restarts.
    capsys.readouterr()
    assert pretrain(shards, tmp_path) == 2
    assert "finished" in capsys.readouterr().err
    # One stopped after summary.json but before its report gets the report when next asked.
    (run / "report.html").unlink()
    assert pretrain(shards, tmp_path) == 2
    assert "report.html was missing and is written now" in capsys.readouterr().err
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    first = json.loads((run / "summary.json").read_text())
    assert pretrain(shards, tmp_path, "--train.max-steps", "7", "--optim.lr", "2e-3") == 0
    out = capsys.readouterr().out
    # Continued, and what changed is said: the learning rate is allowed to, never silently.
    assert "resuming from" in out
    warning = next(line for line in out.splitlines() if line.startswith("warning: resumed with changed settings"))
    assert "train.max_steps: 6 -> 7" in warning and "optim.lr: 0.003 -> 0.002" in warning, warning
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 2e-3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 7
    # Times are the whole run's: the first command's with the resumed one's.
    assert summary["wall_time_s"] > first["wall_time_s"] and summary["train_time_s"] > first["train_time_s"]
    # A shorter command continues it as it was: what it leaves out is what the run recorded
    # (the recipe's batch, length and schedule, the fp32 and lr given before), not the defaults.
    assert main(["pretrain", "--model", "tiny", "--data", str(shards / "shards"), "--out", str(tmp_path),
                 "--name", "t", "--train.max-steps", "8"]) == 0
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if line.startswith("warning: resumed with changed settings"))
    assert warning.split("settings: ", 1)[1].startswith("train.max_steps: 7 -> 8 (config.yaml"), warning
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["train"]["batch_size"] == 4 and recorded["train"]["precision"] == "fp32"
    assert recorded["optim"]["lr"] == 2e-3 and recorded["optim"]["schedule"] == "cosine"
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    assert pretrain(shards, tmp_path, "--fresh", "--train.max-steps", "2", "--train.eval-every", "0") == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize("args, message", [
    (["--train.batch-size", "0"], "train.batch_size"),
    (["--optim.lr", "-1"], "optim.lr"),
    (["--train.precision", "fp8"], "train.precision"),
    (["--train.max-steps", "0"], "train.max_steps"),
])
def test_bad_config_values_are_one_line_errors(shards, tmp_path, capsys, args, message):
    assert pretrain(shards, tmp_path, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_tokenizer_that_does_not_match_is_refused(shards, tmp_path, capsys):
    other = tmp_path / "other"
    (tmp_path / "x.txt").write_text("completely different text " * 200)
    assert main(["tokenizer", "train", "--data", str(tmp_path / "x.txt"), "--vocab-size", "300",
                 "--out", str(other)]) == 0
    capsys.readouterr()
    assert pretrain(shards, tmp_path, "--tokenizer", str(other)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer" in err


def test_model_smaller_than_the_vocabulary_is_refused(shards, tmp_path, tiny_hf_dir, capsys):
    # tiny_hf_dir has a 256-token vocabulary; the shards need 384.
    assert main(["pretrain", "--model", str(tiny_hf_dir), "--data", str(shards / "shards"),
                 "--tokenizer", str(shards / "tok"), "--out", str(tmp_path), "--train.seq_len", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "384" in err and "256" in err


def test_version_names_graftlm_and_torch_without_importing_it(capsys):
    import graftlm
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"graftlm {graftlm.__version__} (torch {torch.__version__.split('+')[0]}")
    # torch takes seconds to import; the version is read from its package metadata.
    check = "import sys; from graftlm.cli import main; main(['--version']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False"


def test_a_run_in_progress_is_not_trained_by_a_second_command(shards, tmp_path, capsys):
    import os

    from graftlm.resuming import RunLock
    (tmp_path / "t").mkdir()
    first = RunLock()  # as the first command holds it while it trains
    first.acquire(tmp_path / "t")
    assert pretrain(shards, tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"another graft command (pid {os.getpid()}) is training this run; wait for it to end, "
                        "or pass --name for a new run"), err
    assert not (tmp_path / "t" / "checkpoints").exists()
    first.release()  # the first ends (or dies: the kernel lets go of its lock)
    assert pretrain(shards, tmp_path, "--train.max-steps", "2", "--train.eval-every", "0") == 0
    # The run let go of its lock when it ended: the next command on it proceeds.
    assert pretrain(shards, tmp_path, "--train.max-steps", "3", "--train.eval-every", "0") == 0
