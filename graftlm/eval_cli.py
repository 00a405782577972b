"""`graft eval`: the base model and each adapter side by side on held-out data (one table)."""

from __future__ import annotations

import argparse
import json
import sys

from graftlm.adapters_cli import add_allow_other_base, named_adapter
from graftlm.errors import GraftError
from graftlm.placement import pick_device


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="held-out loss / bpb, answer accuracy or pairwise accuracy, "
                                           "base and adapters side by side")
    p.add_argument("--model", required=True, help="model directory (or a reward model from graft reward)")
    p.add_argument("--adapter", action="append", type=named_adapter, default=[], metavar="[NAME=]DIR",
                   help="an adapter to compare (repeatable); named NAME, else as its directory "
                        "(runs/lora/final -> lora)")
    add_allow_other_base(p)
    p.add_argument("--data", required=True, help="held-out rows: text, prompts with answers, or pairs")
    p.add_argument("--few-shot", type=int, default=0, metavar="K",
                   help="also score the base prompted with the first K rows as examples")
    p.add_argument("--reference", help="preference data: reference model of a fully fine-tuned --model")
    p.add_argument("--reward", help="prompts: also report the mean of this reward (see graft grpo --grpo.reward)")
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    from graftlm.eval import evaluate

    if args.few_shot < 0:
        raise GraftError("--few-shot: must be >= 0")
    # Checked here for every kind of data: some kinds would only fail deep in the loop.
    for flag, value in (("--batch-size", args.batch_size), ("--max-rows", args.max_rows)):
        if value is not None and value < 1:
            raise GraftError(f"{flag}: must be >= 1, got {value}")
    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names) or "base" in names:
        raise GraftError("--adapter: names must be distinct and not 'base'")
    result = evaluate(args.model, args.data, dict(args.adapter), few_shot=args.few_shot,
                      max_rows=args.max_rows, max_new_tokens=args.max_new_tokens, reward=args.reward,
                      reference=args.reference, batch_size=args.batch_size, device=pick_device(0, args.device),
                      allow_other_base=args.allow_other_base, progress=_print_progress)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def _print_progress(variant: str, done: int, total: int) -> None:
    """Answers are generated (minutes on a CPU): one line per batch on stderr, rewritten
    in place on a terminal."""
    last = done == total
    end = ("\n" if last else "\r") if sys.stderr.isatty() else "\n"
    print(f"  {variant}: {done}/{total} answers", end=end, file=sys.stderr, flush=True)


def print_table(result: dict) -> None:
    from rich.table import Table

    from graftlm.console import table_console

    columns = sorted({k for m in result["metrics"].values() for k in m})
    console = table_console()
    # A line, not the table's title, which wraps at the narrow table's width.
    console.print(f"{result['model']} on {result['data']} ({result['rows']} rows, {result['kind']})",
                  highlight=False, markup=False)
    table = Table()
    table.add_column("variant")
    for c in columns:
        table.add_column(c, justify="right")
    for variant, metrics in result["metrics"].items():
        table.add_row(variant, *[_fmt(metrics.get(c)) for c in columns])
    console.print(table)
    if "bad_rows_skipped" in result:
        skipped = result["bad_rows_skipped"]
        print(f"skipped {skipped['bad']} bad row(s) of {skipped['of']}; first: {skipped['first']}")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
