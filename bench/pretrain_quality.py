"""Pre-training quality on the CPU: the `10m` preset on tinyshakespeare (90/10 split), via
the same commands a user types (`graft tokenizer train`, `graft prepare`,
`graft pretrain`). Prints the validation curve (loss, bits per byte) and the time.
Goal: <= 2.3 bits per byte on the held-out 10% within 10 minutes on 2 CPU cores.
    .venv/bin/python bench/pretrain_quality.py [--steps 1000] [--out bench/out/shakespeare] [--train.X V ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from graftlm.cli import main as graft

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "shakespeare"))
    args, extra = parser.parse_known_args()  # anything else: overrides for `graft pretrain`
    out = Path(args.out)
    start = time.perf_counter()
    if not (out / "shards" / "meta.json").exists():
        assert graft(["tokenizer", "train", "--data", str(DATA), "--vocab-size", str(args.vocab),
                      "--out", str(out / "tok")]) == 0
        assert graft(["prepare", "--data", str(DATA), "--tokenizer", str(out / "tok"),
                      "--out", str(out / "shards"), "--val-fraction", "0.1"]) == 0
    prepared = time.perf_counter()
    code = graft(["pretrain", "--recipe", str(ROOT / "recipes" / "pretrain-shakespeare-cpu.yaml"),
                  "--data", str(out / "shards"), "--out", str(out / "runs"), "--fresh",
                  "--train.max-steps", str(args.steps), "--train.eval-every", str(max(1, args.steps // 8)),
                  "--train.save-every", "0", "--tensorboard", "false", *extra])
    assert code == 0
    run = out / "runs" / "shakespeare-10m"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    print(f"\n{'step':>6s}{'val loss':>10s}{'val bpb':>9s}")
    for r in rows:
        if "val_loss" in r:
            print(f"{r['step']:6d}{r['val_loss']:10.4f}{r['val_bpb']:9.4f}")
    total = time.perf_counter() - start
    print(f"10m preset ({summary['params_total'] / 1e6:.1f}M params, vocab {args.vocab}): "
          f"val bpb {summary['val_bpb']:.3f} (goal <= 2.3) after {summary['tokens']:,} tokens; "
          f"training {summary['train_time_s']:.0f}s, tokenizer + shards {prepared - start:.0f}s, "
          f"total {total:.0f}s (goal <= 600s); {summary['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {100 * summary['mfu']:.1f}%")


if __name__ == "__main__":
    main()
