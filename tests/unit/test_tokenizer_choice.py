"""Which tokenizer a training command gets, and what it says of one other than the model's own."""

import json
import shutil

import pytest

from graftlm.runs import find_tokenizer, run_config_class
from graftlm.tokenizer import train_tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog. " * 4, "hello world, say yes or no. " * 4]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A model directory's tokenizer files (no weights needed to choose a tokenizer) and
    another tokenizer."""
    root = tmp_path_factory.mktemp("tokchoice")
    train_tokenizer(iter(TEXT * 5), vocab_size=300).save(root / "model")
    train_tokenizer(iter(["0 1 2 3 4 5 6 7 8 9"] * 5), vocab_size=270).save(root / "other")
    return root


def _chosen(model, tokenizer, data):
    warnings = []
    cfg = run_config_class("sft")(model=str(model), data=str(data), tokenizer=tokenizer and str(tokenizer))
    return find_tokenizer(cfg, data, warn=warnings.append), warnings


def test_a_tokenizer_other_than_the_models_own_is_warned_about(dirs, tmp_path):
    tok, warnings = _chosen(dirs / "model", dirs / "other", tmp_path)
    assert tok.path == dirs / "other"
    assert warnings == [f"warning: --tokenizer {dirs / 'other'} differs from --model {dirs / 'model'}'s own "
                        "tokenizer.json (270 tokens vs the model's 300): the run trains with it and saves it "
                        "in final/"]


def test_the_models_own_tokenizer_or_a_copy_of_it_is_not(dirs, tmp_path):
    assert _chosen(dirs / "model", None, tmp_path)[1] == []
    assert _chosen(dirs / "model", dirs / "model", tmp_path)[1] == []
    shutil.copytree(dirs / "model", tmp_path / "copy")
    assert _chosen(dirs / "model", tmp_path / "copy", tmp_path)[1] == []
    # The same tokenizer written with other whitespace is the same tokenizer.
    text = json.loads((dirs / "model" / "tokenizer.json").read_text())
    (tmp_path / "copy" / "tokenizer.json").write_text(json.dumps(text, indent=4))
    assert _chosen(dirs / "model", tmp_path / "copy", tmp_path)[1] == []


def test_the_same_vocabulary_with_other_settings_is_warned_about(dirs, tmp_path):
    shutil.copytree(dirs / "model", tmp_path / "lower")
    text = json.loads((dirs / "model" / "tokenizer.json").read_text())
    text["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "lower" / "tokenizer.json").write_text(json.dumps(text))
    [warning] = _chosen(dirs / "model", tmp_path / "lower", tmp_path)[1]
    assert "(the same vocabulary, other merges or settings)" in warning


def test_a_data_sets_recorded_tokenizer_other_than_the_models_is_warned_about(dirs, tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": {"path": str(dirs / "other")}}))
    tok, warnings = _chosen(dirs / "model", None, tmp_path)
    assert tok.path == dirs / "other"
    assert warnings and warnings[0].startswith(f"warning: tokenizer {dirs / 'other'} ({tmp_path / 'meta.json'}) "
                                               f"differs from --model {dirs / 'model'}'s own tokenizer.json")
