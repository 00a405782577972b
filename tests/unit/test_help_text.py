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


def test_help_shows_a_sections_default_as_its_parent_makes_it():
    """PPO's sampling section defaults to group_size 1 (its field's default_factory), not
    SamplingConfig's 4; --help showed 4."""
    import re

    def group_size_default(command: str) -> str:
        parser = dict(_subcommands())[command]
        action = next(a for a in parser._actions if f"--{command}.sampling.group-size" in a.option_strings)
        return re.search(r"default: (\S+)\)$", action.help)[1]

    assert (group_size_default("ppo"), group_size_default("grpo")) == ("1", "4")
