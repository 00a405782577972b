"""Flags are taken only as spelled in full, and a single-valued flag only once."""

from __future__ import annotations

import argparse

import pytest

from graftlm.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _status(argv) -> int:
    """main's exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_no_graft_parser_takes_abbreviations():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 10
    assert [p.prog for p in parsers if p.allow_abbrev] == []


@pytest.mark.parametrize("argv, line", [
    (["sft", "--model", "m", "--data", "d", "--train.max-step", "5"],
     "graft sft: error: unknown option --train.max-step (did you mean --train.max-steps?)"),
    (["sft", "--model", "m", "--data", "d", "--sft.packin", "true"],
     "graft sft: error: unknown option --sft.packin (did you mean --sft.packing?)"),
    (["sft", "--model", "m", "--data", "d", "--train.max-step=5"],
     "graft sft: error: unknown option --train.max-step (did you mean --train.max-steps?)"),
    (["eval", "--mode", "m", "--data", "d"],
     "graft eval: error: unknown option --mode (did you mean --model?)"),
    (["data", "stats", "--dat", "d"],
     "graft data stats: error: unknown option --dat (did you mean --data?)"),
    # a misspelt required option is named, not the option it leaves missing
    (["eval", "--modle", "m", "--data", "d"],
     "graft eval: error: unknown option --modle (did you mean --model?)"),
])
def test_an_abbreviated_flag_is_refused_with_the_full_one(argv, line, capsys):
    assert _status(argv) == 2
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("argv, line, dest, kept", [
    (["eval", "--model", "runs/a/final", "--model", "runs/b/final", "--data", "d"],
     "warning: --model given twice (runs/a/final, then runs/b/final): runs/b/final is used", "model", "runs/b/final"),
    (["sft", "--model", "m", "--data", "d", "--train.max-steps", "5", "--train.max_steps", "9"],
     "warning: --train.max-steps and --train.max_steps set the same field (5, then 9): 9 is used",
     "cfg:train.max_steps", "9"),
    (["sft", "--model", "m", "--data", "d", "--adapter", "lora", "--adapter.kind=qlora"],
     "warning: --adapter and --adapter.kind set the same field (lora, then qlora): qlora is used",
     "cfg:adapter.kind", "qlora"),
    (["sft", "--model", "m", "--data", "d", "--adapter.target-modules", "q_proj", "v_proj",
      "--adapter.target-modules", "k_proj"],
     ("warning: --adapter.target-modules given twice (q_proj v_proj, then k_proj): k_proj is used; to give "
      "several, put them all after one --adapter.target-modules"), "cfg:adapter.target_modules", ["k_proj"]),
    (["data", "stats", "--data", "a.jsonl", "--data", "b.jsonl"],
     "warning: --data given twice (a.jsonl, then b.jsonl): b.jsonl is used; to give several, put them all "
     "after one --data", "data", ["b.jsonl"]),
    (["generate", "--model", "m", "--prompt", "hi", "--max-new-tokens", "4", "--max-new-tokens", "8"],
     "warning: --max-new-tokens given twice (4, then 8): 8 is used", "max_new_tokens", 8),
])
def test_a_single_valued_flag_given_twice_says_which_value_is_used(argv, line, dest, kept, capsys):
    """`graft eval --model A --model B` evaluated B without a word. The last value still
    wins (scripts append overrides to their defaults), with one line naming both."""
    args = build_parser().parse_args(argv)
    assert capsys.readouterr().err == line + "\n"
    assert getattr(args, dest) == kept


def test_flags_meant_to_repeat_still_repeat():
    parser = build_parser()
    args = parser.parse_args(["eval", "--model", "m", "--data", "d", "--adapter", "a=x", "--adapter", "b=y"])
    assert len(args.adapter) == 2
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--prompt", "q",
                              "--stop", "x", "--stop", "y"])
    assert args.prompt == ["p", "q"] and args.stop == ["x", "y"]
    args = parser.parse_args(["serve", "--model", "m", "--adapter", "a=x", "--adapter", "b=y"])
    assert len(args.adapter) == 2
    # Each parse starts afresh: a parser used twice does not remember the first parse's flags.
    for _ in range(2):
        args = parser.parse_args(["eval", "--model", "m", "--data", "d"])
        assert args.model == "m"
    assert not any(k.startswith("_graft") for k in vars(args))


def test_the_full_flag_and_its_underscore_spelling_still_work():
    parser = build_parser()
    args = parser.parse_args(["sft", "--model", "m", "--data", "d", "--train.max_steps", "5",
                              "--sft.packing=true"])
    assert getattr(args, "cfg:train.max_steps") == "5"
    assert getattr(args, "cfg:sft.packing") == "true"
