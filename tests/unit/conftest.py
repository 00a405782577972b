"""Fixtures shared by unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tokenizer():
    """A tokenizer that knows digits (the RL objective tests' prompts copy them)."""
    from graftlm.tokenizer import train_tokenizer
    return train_tokenizer(iter(["copy: 0 1 2 3 4 5 6 7 8 9"] * 10), 280)
