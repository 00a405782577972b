"""Helpers for the distributed tests: tiny data sets, and `graft` under torchrun.

Every distributed run is a real `torchrun --standalone --nproc-per-node 2 -m graftlm ...`
on the CPU (gloo backend), as a user launches it; one-process references run the same
command without torchrun, with the per-rank batch size times the world size, so both
see the same global batch.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
COMMON = ["--train.precision", "fp32", "--train.seq-len", "32", "--tensorboard", "false",
          "--train.log-every", "1", "--optim.lr", "3e-3", "--optim.warmup-steps", "0"]


def build_data(root: Path) -> dict[str, Path]:
    """Token shards, a ChatML tokenizer, SFT rows, preference pairs and a random tiny base."""
    from graftlm.cli import main

    (root / "text.txt").write_text(SHAKESPEARE.read_text()[:30_000])
    assert main(["tokenizer", "train", "--data", str(root / "text.txt"), "--vocab-size", "320",
                 "--out", str(root / "tok")]) == 0
    assert main(["prepare", "--data", str(root / "text.txt"), "--tokenizer", str(root / "tok"),
                 "--out", str(root / "shards")]) == 0
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    random.Random(0).shuffle(pairs)
    sft = [{"prompt": f"copy: {a} {b}", "completion": f"{a} {b}"} for a, b in pairs[:40]]
    # Rows whose completion is cut away by truncation train nothing and are dropped by the
    # renderer; the all-masked case is made by the test itself where it needs one.
    prefs = [{"prompt": f"copy: {a} {b}", "chosen": f"{a} {b}", "rejected": f"{b} {a}"} for a, b in pairs[:40]]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    return {"shards": root / "shards", "tok": root / "tok", "sft": root / "sft.jsonl",
            "pairs": root / "pairs.jsonl", "base": random_base(root / "base", root / "tok")}


def random_base(out: Path, tokenizer_dir: Path, preset: str = "tiny") -> Path:
    """A model directory of `preset` with random weights and the tokenizer's vocabulary:
    a base for adapters, which refuse a preset's name (its weights would be lost)."""
    import torch

    from graftlm.models import Decoder
    from graftlm.models.config import preset as preset_config
    from graftlm.models.hf import save_model
    from graftlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    model = Decoder(preset_config(preset, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                  eos_token_id=tokenizer.eos_id))
    model.init_weights(torch.Generator().manual_seed(0))
    return save_model(model, out, tokenizer_dir=tokenizer_dir)


def env(**extra: str) -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    out.pop("GRAFTLM_TEST_FAULT", None)
    out.update(extra)
    return out


def graft(argv: list, nproc: int = 1, torchrun_args: tuple = (), timeout: float = 240,
          entry: tuple = ("-m", "graftlm"), **extra_env: str) -> subprocess.CompletedProcess:
    """`graft <argv>` in a subprocess, under torchrun when nproc > 1 (`entry`: what torchrun
    starts, e.g. a test script wrapping the CLI)."""
    argv = [str(a) for a in argv]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(nproc), *torchrun_args, *entry, *argv]
    else:
        cmd = [sys.executable, "-m", "graftlm", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def step_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and not r.get("skipped")}
