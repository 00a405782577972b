"""The `graft` command. Each subcommand maps to one plain function.

Feature modules own their subcommands: each module listed in `COMMAND_MODULES` has a
`register(subparsers)` function that adds its parsers and sets `handler` to the plain
function to call. Any `GraftError` becomes one line on stderr and exit status 2 (under
torchrun: once for the whole job, by the first rank that fails, `print_error`).

Every parser is a `GraftParser`: options are taken only as spelled in full (no argparse
prefixes: `--train.max-step` is an unknown option with a suggestion, not `--train.max-steps`),
and an option that holds one value, given twice, gets one warning naming both values and
keeps the last (`--model A --model B` uses B; `action="append"` options repeat as ever).

Building the parser imports no torch (tests/unit/test_cli_startup.py): `register` and what
it imports stay light, and handlers import what is heavy when they run, so that `--help`, a
parse error and `graft plan` answer at once. A training command's options come from the run
config's dataclasses (`run_config.py`, `objectives/configs.py`), which are defined apart
from the modules that train with them for that reason.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from graftlm.errors import GraftError, Terminated, sigterm_as_interrupt

COMMAND_MODULES = [
    "graftlm.demo",
    "graftlm.adapters_cli",
    "graftlm.data_cli",
    "graftlm.engine_cli",
    "graftlm.plan_cli",
    "graftlm.eval_cli",
    "graftlm.serve_cli",
    "graftlm.train_cli",
]


class _StoreNoting(argparse._StoreAction):
    """argparse's "store", which keeps the last of repeated values silently: here with one
    warning naming both. The last still wins, as scripts that append an override to a
    command's defaults (`$BASE --train.max-steps 10`) rely on."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "_given", None)
        if option_string is not None and given is not None:
            if self.dest in given:
                first_option, first_values = given[self.dest]
                both = f"({_shown(first_values)}, then {_shown(values)})"
                if option_string != first_option:  # two spellings of one field
                    what = f"{first_option} and {option_string} set the same field"
                else:
                    what = f"{first_option} given twice"
                dropped = f"; to give several, put them all after one {first_option}" if self.nargs in ("+", "*") else ""
                print(f"warning: {what} {both}: {_shown(values)} is used{dropped}", file=sys.stderr, flush=True)
            given[self.dest] = (option_string, values)
        super().__call__(parser, namespace, values, option_string)


def _shown(values) -> str:
    return " ".join(map(str, values)) if isinstance(values, list) else str(values)


class GraftParser(argparse.ArgumentParser):
    """An ArgumentParser without prefix matching, which says when a single-valued option is
    given twice. Subparsers are made of the same class (argparse uses the parent's type)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreNoting)
        self.register("action", "store", _StoreNoting)
        self._given: dict | None = None
        self._words: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._given, self._words = {}, list(sys.argv[1:] if args is None else args)
        try:
            return super().parse_known_args(args, namespace)
        finally:
            self._given = None

    def error(self, message):
        text = f"{self.format_usage()}{self.prog}: error: {message}"
        # `graft eval --mode m`: the misspelt option, not the --model it leaves missing.
        if message.startswith("the following arguments are required"):
            unknown = [w for w in getattr(self, "_words", []) if w.startswith("--") and w != "--"
                       and w.split("=", 1)[0] not in self._option_string_actions]
            if unknown:
                text = f"{self.prog}: error: {_unknown_argument(self, unknown)}"
        print_error(text)
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = GraftParser(
        prog="graft",
        description="Pre-train, fine-tune or LoRA a language model, and know what each costs.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    """graftlm's version and torch's (what a bug report needs first), without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    from graftlm import __version__
    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return f"graftlm {__version__} (torch {torch})"


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command that was given (`graft sft`, `graft data inspect`)."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, sub.dest, None) if sub else None
        if chosen not in (sub.choices if sub else {}):
            return parser
        parser = sub.choices[chosen]


# Other tools' names for a field: `--learning_rate` (transformers) is `--optim.lr` here.
SYNONYMS = {"learning-rate": "lr", "per-device-train-batch-size": "batch-size",
            "gradient-accumulation-steps": "grad-accum", "max-seq-length": "seq-len", "bf16": "precision",
            "fp16": "precision"}


def _leaf(flag: str) -> str:
    """`--optim.warmup_steps` -> `warmup-steps`: the field's own name, in dashes."""
    return flag.lstrip("-").rsplit(".", 1)[-1].replace("_", "-")


def _unknown_argument(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The first unknown option, and the closest one the command has: the one field of
    that name under any section (`--lr` -> `--optim.lr`), else the nearest spelling."""
    option = next((word for word in extras if word.startswith("-")), None)
    if option is None:
        return f"unexpected argument {extras[0]!r}"
    option = option.split("=", 1)[0]
    known = [flag for action in parser._actions for flag in action.option_strings
             if "_" not in flag and flag != "--help"]  # dashed spellings only; --help is never meant
    leaf = SYNONYMS.get(_leaf(option), _leaf(option))
    same_field = [flag for flag in known if _leaf(flag) == leaf and flag.startswith("--")]
    close = same_field if len(same_field) == 1 else difflib.get_close_matches(option, known, n=1)
    return f"unknown option {option}" + (f" (did you mean {close[0]}?)" if close else "")


def print_error(text: str) -> None:
    """An error to stderr; under torchrun, where every rank may meet it, once for the job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torch comes with it, as with every command
        from graftlm.parallel import print_error_once
        print_error_once(text)
    else:
        print(text, file=sys.stderr, flush=True)


def _rank_label(e: GraftError) -> str:
    """Across machines, which rank met the error (it may be its node's own: a file missing
    there), unless the message names it already (a collective that failed there)."""
    one_machine = os.environ.get("LOCAL_WORLD_SIZE", "1") == os.environ.get("WORLD_SIZE", "1")
    if one_machine or getattr(e, "rank_local", False):
        return ""
    return f" (rank {os.environ.get('RANK', '0')})"


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:
        # Answered before the parser is built: there is nothing to parse.
        print(_version())
        return 0
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse would blame the top-level `graft` with its usage and no hint
        command = _command_parser(parser, args)
        print_error(f"{command.prog}: error: {_unknown_argument(command, extras)}")
        return 2
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 1
    try:
        with sigterm_as_interrupt():  # SLURM's preemption stops a run as Ctrl-C does, said
            result = handler(args)
    except GraftError as e:
        print_error(f"graft {args.command}: error{_rank_label(e)}: {e}")
        return 2
    except RuntimeError as e:
        # Under DDP a rank that died fails the others inside backward, in the backend's
        # own words: the same line as a failed collective of graftlm's.
        from graftlm.parallel import as_collective_error
        failure = as_collective_error(e)
        if failure is None:
            raise
        print_error(f"graft {args.command}: error: {failure}")
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal: one line
            print(f"graft {args.command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except BrokenPipeError:  # `graft ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
