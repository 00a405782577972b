"""Every command's --help renders as help: a stray '%' in a config field's help text made
argparse print its own internals (a dict of the action) in place of the rest."""

from __future__ import annotations

import pytest

from graftlm.cli import build_parser


def _subcommands():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    return sorted(choices.items())


@pytest.mark.parametrize("name", [name for name, _ in _subcommands()])
def test_help_renders_without_argparse_internals(name):
    parser = dict(_subcommands())[name]
    text = parser.format_help()
    assert "'option_strings'" not in text and "%(" not in text, text[-2000:]
