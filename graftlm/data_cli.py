"""`graft tokenizer train`, `graft prepare`, `graft data inspect`, `graft data stats`.

Each handler parses nothing itself: it calls the plain functions of `graftlm.data`
(`iter_examples`, `assign_splits`, `write_shards`, `Renderer`, `data_stats`) and prints.
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from graftlm.errors import GraftError, make_directory

_BAD_ROW_HELP = "bad rows: 'skip' (count them, stop above --max-bad-fraction) or 'raise'"


def _add_bad_row_options(parser) -> None:
    parser.add_argument("--errors", choices=("skip", "raise"), default="skip", help=_BAD_ROW_HELP)
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="stop when more than this fraction of rows is bad (default 0.01)")


def register(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = tok_sub.add_parser("train", help="train byte-level BPE (ChatML special tokens) on text")
    train.add_argument("--data", nargs="+", required=True, help="files, folders or globs")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="directory for tokenizer.json and its config")
    train.add_argument("--text-field", default="text", help="JSON field holding the text")
    _add_bad_row_options(train)
    train.set_defaults(handler=train_tokenizer_command)

    prep = subparsers.add_parser("prepare", help="tokenize text into memory-mapped token shards")
    prep.add_argument("--data", nargs="+", required=True, help="files, folders or globs")
    prep.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (a model dir works)")
    prep.add_argument("--out", required=True, help="shard directory to write")
    split = prep.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.1,
                       help="held-out share: of the text for a single document, else of documents by hash")
    split.add_argument("--val-docs", type=int, help="hold out the last N documents instead")
    prep.add_argument("--text-field", default="text", help="JSON field holding the text")
    _add_bad_row_options(prep)
    prep.set_defaults(handler=prepare_command)

    data = subparsers.add_parser("data", help="look at a data set: one rendered row, or statistics")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    inspect = data_sub.add_parser("inspect", help="show a rendered row, trained tokens highlighted")
    inspect.add_argument("--data", nargs="+", required=True)
    inspect.add_argument("--model", required=True, help="model or tokenizer directory")
    inspect.add_argument("--row", type=int, default=0, help="index among the valid rows (default 0)")
    inspect.add_argument("--objective", default=None,
                         help="text | sft | dpo | reward | grpo (default: guessed from the fields)")
    inspect.add_argument("--max-length", type=int, default=None)
    inspect.add_argument("--train-on", choices=("assistant", "all"), default="assistant")
    inspect.add_argument("--plain", action="store_true",
                         help="mark trained tokens as [[...]] instead of colours (default when not a TTY)")
    inspect.add_argument("--text-field", default="text")
    inspect.set_defaults(handler=inspect_command)

    stats = data_sub.add_parser("stats", help="rows, tokens, lengths, duplicates, bad rows")
    stats.add_argument("--data", nargs="+", required=True)
    stats.add_argument("--model", default=None, help="count tokens with this model's tokenizer")
    stats.add_argument("--objective", default=None)
    stats.add_argument("--max-length", type=int, default=None)
    stats.add_argument("--text-field", default="text")
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    stats.set_defaults(handler=stats_command)

    # `graft data` alone prints its help (the actions' own handlers win when given).
    for parser in (tok, data):
        parser.set_defaults(handler=lambda args, p=parser: p.print_help() or 1)


# -- tokenizer train ----------------------------------------------------------------------


def train_tokenizer_command(args) -> int:
    from graftlm.data.formats import RowCounts, iter_examples
    from graftlm.tokenizer import train_tokenizer

    make_directory(args.out, "--out", create=False)  # before the training it would lose
    counts, characters = RowCounts(), [0]

    def texts():
        for ex in iter_examples(args.data, "text", args.text_field, args.errors, args.max_bad_fraction, counts):
            characters[0] += len(ex["text"])
            yield ex["text"]

    tokenizer = train_tokenizer(texts(), args.vocab_size)
    out = tokenizer.save(make_directory(args.out, "--out"))
    print(f"tokenizer: {tokenizer.vocab_size} tokens from {counts.valid} documents -> {out}"
          + (f" ({_skipped(counts)})" if counts.bad else ""))
    if tokenizer.vocab_size < args.vocab_size:  # BPE ran out of pairs to merge before the size asked for
        n = characters[0]
        print(f"warning: {tokenizer.vocab_size:,} tokens, short of the {args.vocab_size:,} asked for: the text "
              f"({n:,} character{'s' if n != 1 else ''}) has no more pairs of tokens to merge, each of its words "
              "is one token already; train on more text for that vocabulary")
    return 0


def _skipped(counts) -> str:
    """Bad rows skipped, in words, with where the first was (as training commands say it)."""
    return (f"{counts.bad} bad row{'s' if counts.bad > 1 else ''} of {counts.rows} skipped"
            + (f"; the first: {counts.errors[0]}" if counts.errors else ""))


# -- prepare --------------------------------------------------------------------------------


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("tokenizing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                    disable=not sys.stderr.isatty())


def prepare_command(args) -> int:
    from graftlm.data.formats import RowCounts, iter_examples
    from graftlm.data.shards import assign_splits, write_shards
    from graftlm.data.sources import resolve_paths
    from graftlm.tokenizer import load_tokenizer

    make_directory(args.out, "--out", create=False)
    tokenizer = load_tokenizer(args.tokenizer)
    files = resolve_paths(args.data)
    counts = RowCounts()
    texts = (ex["text"] for ex in iter_examples(files, "text", args.text_field, args.errors,
                                                args.max_bad_fraction, counts))
    documents = assign_splits(texts, args.val_fraction, args.val_docs)
    total = sum(f.stat().st_size for f in files)  # bytes on disk: about the characters to go
    with _progress() as bar:
        task = bar.add_task("tokenizing", total=total)
        meta = write_shards(documents, tokenizer, make_directory(args.out, "--out"),
                            progress=lambda n: bar.advance(task, n))
    for name, info in meta["splits"].items():
        print(f"{name}: {info['tokens']:,} tokens, {info['documents']:,} documents, "
              f"{info['bytes']:,} bytes in {len(info['files'])} file(s)")
    print(f"shards ({meta['dtype']}) -> {Path(args.out) / 'meta.json'}"
          + (f"; {_skipped(counts)}" if counts.bad else ""))
    warning = _lopsided_split(meta["splits"], args.val_fraction if args.val_docs is None else None)
    if warning:
        print(warning)
    return 0


def _lopsided_split(splits: dict, val_fraction: float | None) -> str | None:
    """A line when validation holds far more of the tokens than asked: documents are held
    out whole (by hash, or the last --val-docs), so a few large files can put half the
    text there, and only the two counts above would show it."""
    tokens = {name: info["tokens"] for name, info in splits.items()}
    total, val = sum(tokens.values()), tokens.get("val", 0)
    bound = 0.5 if val_fraction is None else max(0.2, 2 * val_fraction)
    if not total or val / total <= bound:
        return None
    documents = sum(info["documents"] for info in splits.values())
    return (f"warning: validation holds {val / total:.0%} of the tokens ({splits['val']['documents']:,} of "
            f"{documents:,} documents, held out whole); hold out fewer with --val-docs N, or split the text "
            "into more documents (one JSONL row or file each)")


# -- data inspect ---------------------------------------------------------------------------


def _pick_row(args):
    from graftlm.data.formats import format_for, iter_examples
    from graftlm.data.sources import iter_rows
    from graftlm.data.stats import guess_objective

    objective = args.objective
    if objective is None:
        first = next((r for r in iter_rows(args.data) if r.error is None), None)
        objective = guess_objective(first.fields if first else {})
    fmt = format_for(objective)
    if args.row < 0:
        raise GraftError(f"--row must be >= 0, got {args.row}")
    for index, example in enumerate(iter_examples(args.data, fmt, args.text_field, max_bad_fraction=1.0)):
        if index == args.row:
            return fmt, example
    raise GraftError(f"--row {args.row}: the data has only {index + 1} valid rows")


def _runs(tokenizer, ids, mask) -> list[tuple[str, bool]]:
    """Consecutive tokens with the same mask, decoded together (keeps multi-byte characters whole)."""
    runs: list[tuple[list[int], bool]] = []
    for token, trained in zip(ids, mask):
        if runs and runs[-1][1] == bool(trained):
            runs[-1][0].append(token)
        else:
            runs.append(([token], bool(trained)))
    return [(tokenizer.decode(r, skip_special_tokens=False), trained) for r, trained in runs]


def _show_tokens(tokenizer, ids, mask, plain: bool) -> str:
    """Print the tokens as text, trained ones marked; returns the plain text printed."""
    runs = _runs(tokenizer, ids, mask)
    if plain:
        rendered = "".join(f"[[{text}]]" if trained else text for text, trained in runs)
        print(rendered)
        return rendered
    from rich.console import Console
    from rich.text import Text

    text = Text()
    for piece, trained in runs:
        text.append(piece, style="bold green" if trained else "dim")
    Console(highlight=False).print(text)
    return text.plain


def _warn_row(tokenizer, label, ids, mask, first_is_context: bool = True) -> list[str]:
    """Warn when nothing, or no stop token, is trained (a row's first token has no context)."""
    warnings = []
    start = 1 if first_is_context else 0
    trained = [i for i, m in zip(ids[start:], mask[start:]) if m]
    if not trained:
        warnings.append(f"warning: {label} trains no token")
    elif not set(trained) & set(tokenizer.stop_ids):
        warnings.append(f"warning: {label} trains no EOS / end-of-turn token: the model will not learn to stop")
    for w in warnings:
        print(w, file=sys.stderr)
    return warnings


def inspect_command(args) -> int:
    from graftlm.data.render import RenderConfig, Renderer
    from graftlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    fmt, example = _pick_row(args)
    renderer = Renderer(tokenizer, RenderConfig(args.max_length, "truncate", args.train_on))
    plain = args.plain or not sys.stdout.isatty()
    print(f"# {example['source']} ({fmt})" + ("" if plain else "  trained tokens in green, masked dimmed"))
    if fmt == "preference":
        pair = renderer.render_pair(example)
        if pair is None:
            raise GraftError(f"{example['source']}: dropped by the length policy or trains no token")
        print("## prompt")
        _show_tokens(tokenizer, pair.prompt_ids, [False] * len(pair.prompt_ids), plain)
        for name, ids, mask in (("chosen", pair.chosen_ids, pair.chosen_mask),
                                ("rejected", pair.rejected_ids, pair.rejected_mask)):
            print(f"## {name}: {len(ids)} tokens, {sum(mask)} trained")
            _show_tokens(tokenizer, ids, mask, plain)
            _warn_row(tokenizer, name, ids, mask, first_is_context=False)
        return 0
    if fmt == "rl":
        ids = renderer.render_prompt(example)
        print(f"## prompt: {len(ids)} tokens (the model's reply follows); extra: "
              f"{json.dumps(example['extra'], ensure_ascii=False)[:300]}")
        _show_tokens(tokenizer, ids, [False] * len(ids), plain)
        return 0
    row = renderer.render_full(example)
    if args.max_length is not None and len(row.input_ids) > args.max_length:
        print(f"(truncated from {len(row.input_ids)} to {args.max_length} tokens)")
        row.input_ids, row.loss_mask = row.input_ids[:args.max_length], row.loss_mask[:args.max_length]
    print(f"## {len(row.input_ids)} tokens, {row.trained_tokens} trained")
    _show_tokens(tokenizer, row.input_ids, row.loss_mask, plain)
    _warn_row(tokenizer, "row", row.input_ids, row.loss_mask)
    return 0


# -- data stats -----------------------------------------------------------------------------


def stats_command(args) -> int:
    from graftlm.data.stats import data_stats

    stats = data_stats(args.data, args.objective, args.model, args.text_field, args.max_length)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(stats['files'])} file(s), objective {stats['objective']}", show_header=False)
    length = stats["length"]
    lines = [
        ("rows", f"{stats['rows']:,} ({stats['valid']:,} valid, {stats['bad']:,} bad)"),
        ("tokens", f"{stats['tokens']:,}" + (", each pair's longer sequence" if "pair_tokens" in stats else "")
                   + f" ({stats['tokens_counted_with']})"),
        *([("tokens DPO trains", f"{stats['pair_tokens']:,} (both sequences of each pair)")]
          if "pair_tokens" in stats else []),
        ("length per row", f"min {length['min']}, p50 {length['p50']}, p90 {length['p90']}, "
                           f"max {length['max']}, mean {length['mean']:.1f}"),
        ("exact duplicates", f"{stats['exact_duplicates']:,}"),
        ("near duplicates", f"{stats['near_duplicates']:,} (MinHash, word 5-grams, Jaccard >= 0.8)"),
        ("rows training no token", "needs --model" if stats["untrained_rows"] is None
         else f"{stats['untrained_rows']:,}"),
    ]
    if stats["truncated"]:
        lines.append(("truncated to --max-length", f"{stats['truncated']:,}"))
    for key, value in lines:
        table.add_row(key, value)
    console = Console()
    console.print(table)
    for error in stats["bad_examples"]:
        console.print(f"bad row: {error}", markup=False, highlight=False)
    return 0
