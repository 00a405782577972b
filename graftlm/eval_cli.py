"""`graft eval`: a model and each adapter side by side on held-out data (one table).

The model's row is named as `graft serve` names it, by its run or directory
(`runs/sft/final` -> `sft`), not "base": a full fine-tune is not its base. The heading says
how many rows were evaluated of how many read, and why the others were left out; under
the table each metric column says what it measures."""

from __future__ import annotations

import argparse
import json
import sys

from graftlm.adapters_cli import add_allow_other_base, named_adapter
from graftlm.errors import GraftError
from graftlm.placement import pick_device


def register(subparsers) -> None:
    from graftlm.evaluation.kinds import KINDS
    from graftlm.evaluation.rows import MAX_BAD_FRACTION

    p = subparsers.add_parser("eval", help="held-out loss / bpb, answers' exact_match, or pairs' (chosen + rejected) "
                                           "logp_accuracy / reward_accuracy; a model and its adapters side by side")
    p.add_argument("--model", required=True, help="model directory (or a reward model from graft reward)")
    p.add_argument("--adapter", action="append", type=named_adapter, default=[], metavar="[NAME=]DIR",
                   help="an adapter to compare (repeatable); named NAME, else as its directory "
                        "(runs/lora/final -> lora); default: none")
    add_allow_other_base(p)
    p.add_argument("--data", required=True, help="held-out rows: text, chat, prompts with answers, or pairs")
    p.add_argument("--as", dest="kind", choices=list(KINDS.values()), default=None,
                   help="score the rows as this kind where their fields allow it: text (loss, bpb), chat (loss of "
                        "the assistant / completion tokens), answers (greedy exact_match), pairs (accuracies); "
                        "default: the fields decide: chosen + rejected -> pairs; prompt or question with answer or "
                        "completion -> answers (--as chat for their held-out loss); messages -> chat; text -> text")
    p.add_argument("--few-shot", type=int, default=0, metavar="K",
                   help="answers and chat: also score the model (row NAME+K-shot) with the first K rows as "
                        "examples, which are not scored: answers: solved examples in each prompt; chat: their user "
                        "and assistant turns before each conversation, as context (default 0: none)")
    p.add_argument("--reference", metavar="DIR",
                   help="pairs: reference model of a fully fine-tuned --model, for its reward_accuracy "
                        "(implicit DPO reward); default: none, no reward_accuracy for the model's row")
    p.add_argument("--reward", help="answers: also report the mean of this reward (see graft grpo --grpo.reward); "
                                    "default: none")
    p.add_argument("--max-rows", type=int, default=None, metavar="N",
                   help="score the first N rows (after the few-shot examples); default: all")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="answers: tokens generated per answer at most (default 64)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="rows per forward pass or generation batch (default 16)")
    p.add_argument("--max-bad-fraction", type=float, default=MAX_BAD_FRACTION, metavar="F",
                   help=f"bad rows are skipped and counted; stop when more than this share of the rows is bad "
                        f"(default {MAX_BAD_FRACTION}: a file mostly bad; 0 stops on any bad row, 1 never)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: a table)")
    p.set_defaults(handler=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    from graftlm.data.formats import TooManyBadRows
    from graftlm.eval import evaluate

    if args.few_shot < 0:
        raise GraftError("--few-shot: must be >= 0")
    if not 0 <= args.max_bad_fraction <= 1:
        raise GraftError(f"--max-bad-fraction: must be in [0, 1], got {args.max_bad_fraction}")
    # Checked here for every kind of data: some kinds would only fail deep in the loop.
    for flag, value in (("--batch-size", args.batch_size), ("--max-rows", args.max_rows)):
        if value is not None and value < 1:
            raise GraftError(f"{flag}: must be >= 1, got {value}")
    from graftlm.runs import name_of_model_dir

    model_name = name_of_model_dir(args.model)
    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names) or model_name in names:
        raise GraftError(f"--adapter: names must be distinct and not the model's, {model_name!r} "
                         f"(name one with --adapter NAME=DIR)")
    try:
        result = evaluate(args.model, args.data, dict(args.adapter), name=model_name, few_shot=args.few_shot,
                          max_rows=args.max_rows, max_new_tokens=args.max_new_tokens, reward=args.reward,
                          reference=args.reference, batch_size=args.batch_size, device=pick_device(0, args.device),
                          allow_other_base=args.allow_other_base, progress=_print_progress, kind=args.kind,
                          max_bad_fraction=args.max_bad_fraction)
    except TooManyBadRows as e:
        raise GraftError(f"{e} (raise the share with --max-bad-fraction, up to 1; or is it the wrong file?)") from None
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


def heading(result: dict) -> str:
    """`MODEL on DATA (KIND): N of M rows evaluated; left out: ...`: every row of the data
    is accounted for. KIND is named as `--as` takes it (pairs, not preference)."""
    line = (f"{result['model']} on {result['data']} ({result['kind']}): "
            f"{result['rows']:,} of {result.get('rows_in_data', result['rows']):,} rows evaluated")
    context = result.get("context")
    reasons = {"bad": "bad", "few_shot_examples": "used as few-shot examples", "past_max_rows": "past --max-rows",
               "too_long": f"too long for the {context}-token context", "nothing_to_score": "with no token to score",
               "too_short": "shorter than 2 tokens"}
    left = result.get("rows_left_out") or {}
    if left:
        line += "; left out: " + ", ".join(f"{n:,} {reasons.get(k, k)}" for k, n in left.items())
    if result.get("rows_cut"):
        kept = "end" if result["kind"] == "answers" else "start"
        line += f"; {result['rows_cut']:,} cut to fit the {context}-token context (their {kept} kept)"
    if result.get("few_shot_prompts_cut"):
        line += f"; {result['few_shot_prompts_cut']:,} few-shot prompts cut to fit (their first examples lost)"
    return line


def print_table(result: dict) -> None:
    from rich.table import Table

    from graftlm.console import table_console

    columns = sorted({k for m in result["metrics"].values() for k in m})
    console = table_console()
    # Lines, not the table's title, which wraps at the narrow table's width; a terminal wraps them.
    console.print(heading(result), highlight=False, markup=False, soft_wrap=True)
    if "bad_rows_skipped" in result:
        console.print(f"first bad row: {result['bad_rows_skipped']['first']}", highlight=False, markup=False,
                      soft_wrap=True)
    table = Table()
    table.add_column("model")
    for c in columns:
        table.add_column(c, justify="right")
    for variant, metrics in result["metrics"].items():
        table.add_row(variant, *[_fmt(metrics.get(c)) for c in columns])
    console.print(table)
    for column, meaning in result.get("definitions", {}).items():
        console.print(f"{column}: {meaning}", highlight=False, markup=False, soft_wrap=True)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
