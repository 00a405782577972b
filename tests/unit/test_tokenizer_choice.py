"""Which tokenizer a command gets, and what it says: a tokenizer other than the model's
own, a tokenizer.json given as a file, a vocabulary that fell short of the size asked for."""

import json
import shutil

import pytest

from graftlm.cli import main
from graftlm.errors import GraftError
from graftlm.runs import find_tokenizer, run_config_class
from graftlm.tokenizer import load_tokenizer, train_tokenizer

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


def test_a_tokenizer_json_given_as_a_file_names_its_directory(dirs):
    with pytest.raises(GraftError, match=rf"^{dirs / 'model' / 'tokenizer.json'}: is a file: pass its "
                                         rf"directory {dirs / 'model'}/$"):
        load_tokenizer(dirs / "model" / "tokenizer.json")
    with pytest.raises(GraftError, match="tokenizer_config.json: is a file: pass its directory"):
        load_tokenizer(dirs / "model" / "tokenizer_config.json")


def test_tokenizer_train_says_when_the_vocabulary_falls_short(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("x")
    assert main(["tokenizer", "train", "--data", str(tmp_path / "one.txt"), "--vocab-size", "4000",
                 "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert ("warning: 261 tokens, short of the 4,000 asked for: the text (1 character) has no more pairs of "
            "tokens to merge, each of its words is one token already; train on more text for that vocabulary") in out
    (tmp_path / "more.txt").write_text(" ".join(TEXT * 3))
    assert main(["tokenizer", "train", "--data", str(tmp_path / "more.txt"), "--vocab-size", "270",
                 "--out", str(tmp_path / "tok2")]) == 0
    assert "warning" not in capsys.readouterr().out


def test_tokenizer_train_on_whitespace_says_there_is_no_text(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    assert main(["tokenizer", "train", "--data", str(tmp_path / "blank.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 2
    assert f"{tmp_path / 'blank.txt'}: no text (only whitespace)" in capsys.readouterr().err
