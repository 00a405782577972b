"""Token shards: graft prepare / tokenizer train on real text, meta, dtype, splits, reader."""

import json

import numpy as np
import pytest

from graftlm.cli import main
from graftlm.data.shards import (assign_splits, chunk_text, check_tokenizer, open_shards,
                                 split_single_text, write_shards)
from graftlm.errors import GraftError
from graftlm.tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """A 200 kB slice of tinyshakespeare and a tokenizer trained on it with the CLI."""
    root = tmp_path_factory.mktemp("prep")
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:200_000]
    (root / "ts.txt").write_text(text)
    assert main(["tokenizer", "train", "--data", str(root / "ts.txt"), "--vocab-size", "400",
                 "--out", str(root / "tok")]) == 0
    return root, text


def test_prepare_single_text_holds_out_the_last_tenth(shakespeare, capsys):
    root, text = shakespeare
    assert main(["prepare", "--data", str(root / "ts.txt"), "--tokenizer", str(root / "tok"),
                 "--out", str(root / "shards")]) == 0
    assert "train:" in capsys.readouterr().out
    tok = load_tokenizer(root / "tok")
    shards = open_shards(root / "shards")
    meta = json.loads((root / "shards" / "meta.json").read_text())
    assert meta["format"] == "graftlm-shards-v1" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 400 and meta["eos_id"] == tok.eos_id
    assert len(meta["tokenizer"]["sha256"]) == 64
    train, val = shards.split("train"), shards.split("val")
    assert train[:].dtype == np.uint16 and len(train) == meta["splits"]["train"]["tokens"]
    # the val split is the end of the text, cut at a line boundary near 90%
    train_text, val_text = split_single_text(text, 0.1)
    assert train_text + val_text == text and train_text.endswith("\n")
    assert abs(len(train_text) / len(text) - 0.9) < 0.01
    assert meta["splits"]["val"]["bytes"] == len(val_text.encode())
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(text.encode())
    # exact ids of the whole text (chunked tokenization loses nothing), then EOS
    assert val[:].tolist() == tok.encode(val_text) + [tok.eos_id]
    assert train[:].tolist() == tok.encode(train_text) + [tok.eos_id]
    check_tokenizer(shards.meta, tok, model_vocab_size=512)


def test_chunked_tokenization_is_exact(shakespeare):
    _, text = shakespeare
    tok = load_tokenizer(shakespeare[0] / "tok")
    chunks = chunk_text(text, size=5000)
    assert len(chunks) > 10 and "".join(chunks) == text
    assert sum(tok.encode_batch(chunks), []) == tok.encode(text)


def test_many_documents_split_by_hash_with_eos_separators(tmp_path, shakespeare):
    tok = load_tokenizer(shakespeare[0] / "tok")
    docs = [f"Document number {i}: " + "to be or not to be " * (i % 5 + 1) for i in range(200)]
    meta = write_shards(assign_splits(iter(docs), val_fraction=0.2), tok, tmp_path / "s")
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] + val["documents"] == 200 and 20 < val["documents"] < 60
    tokens = open_shards(tmp_path / "s").split("train")[:]
    assert int((tokens == tok.eos_id).sum()) == train["documents"] and tokens[-1] == tok.eos_id
    # deterministic: the same documents in another order give the same validation set
    again = write_shards(assign_splits(reversed(docs), val_fraction=0.2), tok, tmp_path / "s2")
    assert again["splits"]["val"]["documents"] == val["documents"]
    assert again["splits"]["val"]["tokens"] == val["tokens"]


def test_val_docs_takes_the_last_documents():
    docs = ["a", "b", "c", "d"]
    assert list(assign_splits(iter(docs), val_docs=1)) == [("train", "a"), ("train", "b"),
                                                         ("train", "c"), ("val", "d")]
    assert [s for s, _ in assign_splits(iter(["x", "y"]), val_fraction=0.1)].count("val") == 1


def test_bad_split_arguments_are_refused_before_out_is_made(tmp_path, shakespeare, capsys):
    root, _ = shakespeare
    for flag, value in (("--val-fraction", "2"), ("--val-docs", "-1")):
        out = tmp_path / f"s{value}"
        assert main(["prepare", "--data", str(root / "ts.txt"), "--tokenizer", str(root / "tok"),
                     "--out", str(out), flag, value]) == 2
        assert flag[2:].replace("-", "_") in capsys.readouterr().err and not out.exists()


def test_prepare_from_jsonl_and_uint32_for_big_vocabularies(tmp_path, shakespeare):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"body": f"row {i} " * 5}) + "\n" for i in range(30)))
    tok = load_tokenizer(shakespeare[0] / "tok")
    tok.backend.add_tokens([f"<extra_{i}>" for i in range(65536)])
    tok.save(tmp_path / "bigtok")
    assert main(["prepare", "--data", str(path), "--tokenizer", str(tmp_path / "bigtok"),
                 "--out", str(tmp_path / "s"), "--text-field", "body", "--val-docs", "3"]) == 0
    shards = open_shards(tmp_path / "s")
    assert shards.meta["dtype"] == "uint32" and shards.split("val")[:].dtype == np.uint32
    assert shards.meta["splits"]["val"]["documents"] == 3


def test_mismatched_tokenizer_and_bad_input_are_errors(tmp_path, shakespeare, capsys):
    root, text = shakespeare
    other = train_tokenizer(iter([text[:50_000]]), 300)
    meta = write_shards(iter([("train", "abc"), ("val", "def")]), load_tokenizer(root / "tok"), tmp_path / "s")
    with pytest.raises(GraftError, match="tokenizer vocabulary has 300 tokens, the shards were made with 400"):
        check_tokenizer(open_shards(tmp_path / "s").meta, other)
    with pytest.raises(GraftError, match="model's vocabulary \\(256\\) is smaller"):
        check_tokenizer(meta, None, model_vocab_size=256)
    (tmp_path / "empty.txt").write_text("")
    assert main(["prepare", "--data", str(tmp_path / "empty.txt"), "--tokenizer", str(root / "tok"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "empty.txt: empty file" in capsys.readouterr().err
    assert main(["prepare", "--data", str(tmp_path / "nope*.txt"), "--tokenizer", str(root / "tok"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "matches no data file" in capsys.readouterr().err


def test_prepare_names_where_its_first_skipped_row_is(tmp_path, shakespeare, capsys):
    """`2 bad rows skipped` said nothing of where: the training commands name the first."""
    path = tmp_path / "d.jsonl"
    rows = [json.dumps({"text": f"row {i} " * 5}) for i in range(300)]
    rows.insert(41, "not json")
    path.write_text("\n".join(rows) + "\n")
    assert main(["prepare", "--data", str(path), "--tokenizer", str(shakespeare[0] / "tok"),
                 "--out", str(tmp_path / "s"), "--val-docs", "3"]) == 0
    assert f"; 1 bad row of 301 skipped; the first: {path}:42: invalid JSON" in capsys.readouterr().out


def test_a_few_documents_are_each_split_so_validation_holds_the_fraction_asked(tmp_path, shakespeare, capsys):
    """Two files, one held out whole by hash, put half the text (85% in a walkthrough)
    into validation. A few documents are now each cut at a line near 1 - val_fraction."""
    root, text = shakespeare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(text[:10_000])
    (corpus / "b.txt").write_text(text[10_000:80_000])
    assert main(["prepare", "--data", str(corpus), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "s")]) == 0
    splits = open_shards(tmp_path / "s").meta["splits"]
    share = splits["val"]["tokens"] / (splits["val"]["tokens"] + splits["train"]["tokens"])
    assert 0.08 < share < 0.12 and splits["val"]["documents"] == 2
    assert "warning" not in capsys.readouterr().out


def test_prepare_warns_when_validation_takes_far_more_than_asked(tmp_path, shakespeare, capsys):
    """Documents held out whole (here the last, --val-docs 1) can be most of the text."""
    root, text = shakespeare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(text[:10_000])
    (corpus / "b.txt").write_text(text[10_000:20_000])
    (corpus / "c.txt").write_text(text[20_000:80_000])
    assert main(["prepare", "--data", str(corpus), "--tokenizer", str(root / "tok"), "--out", str(tmp_path / "s"),
                 "--val-docs", "1"]) == 0
    out = capsys.readouterr().out
    val = open_shards(tmp_path / "s").meta["splits"]["val"]["tokens"]
    total = sum(s["tokens"] for s in open_shards(tmp_path / "s").meta["splits"].values())
    assert val / total > 0.5
    assert f"warning: validation holds {val / total:.0%} of the tokens (1 of 3 documents, held out whole)" in out
    assert main(["prepare", "--data", str(root / "ts.txt"), "--tokenizer", str(root / "tok"),
                 "--out", str(tmp_path / "one")]) == 0
    assert "warning" not in capsys.readouterr().out  # one document: split at its tenth
