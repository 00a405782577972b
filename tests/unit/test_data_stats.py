"""graft data stats / data_stats and graft data inspect."""

import json

import pytest

from graftlm.cli import main
from graftlm.data.stats import data_stats
from graftlm.data.render import Renderer
from graftlm.tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:100_000]
    return train_tokenizer(iter([text]), 400).save(tmp_path_factory.mktemp("tok") / "tok")


def write(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_stats_counts_duplicates_bad_and_untrained_rows(tmp_path, tok_dir):
    base = "the quick brown fox jumps over the lazy dog and then runs far away into the woods"
    rows = [{"prompt": f"question {i} about foxes and dogs", "completion": f"answer {i} " * (i + 1)}
            for i in range(20)]
    rows += [rows[0], rows[1]]  # exact duplicates
    rows += [{"prompt": base, "completion": "yes"}, {"prompt": base + " today", "completion": "yes"}]
    rows += [{"prompt": "x", "completion": ""}, "{bad json"]
    rows += [{"prompt": "word " * 200, "completion": "z"}]  # trains nothing once truncated: lost to the limit
    path = write(tmp_path, rows)
    stats = data_stats(path, tokenizer=tok_dir, max_length=96)
    assert stats["objective"] == "sft"
    assert (stats["rows"], stats["valid"], stats["bad"]) == (27, 25, 2)
    assert stats["exact_duplicates"] == 2 and stats["near_duplicates"] == 1
    assert stats["too_long_dropped"] == 1 and stats["untrained_rows"] == 0 and stats["truncated"] >= 1
    assert stats["length"]["max"] <= 96 and stats["length"]["min"] <= stats["length"]["p50"] <= stats["length"]["p90"]
    assert stats["tokens"] >= 25 * stats["length"]["min"]
    estimate = data_stats(path)
    assert estimate["tokens_counted_with"].startswith("estimate") and estimate["untrained_rows"] is None


def test_stats_cli_json_on_gsm8k(tmp_path, capsys):
    assert main(["data", "stats", "--data", str(SHARED_DATA / "gsm8k_test.jsonl"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 1319 and stats["bad"] == 0 and stats["objective"] == "sft"


def test_inspect_marks_trained_tokens_and_warns(tmp_path, tok_dir, capsys):
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello"}]},
                            {"text": "plain words"}])
    assert main(["data", "inspect", "--data", str(path), "--model", str(tok_dir), "--plain"]) == 0
    out = capsys.readouterr()
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello<|im_end|>\n]]" in out.out
    assert "warning" not in out.err
    # a row cut inside the reply, before its end-of-turn, and one cut before the reply: warned
    row = Renderer(load_tokenizer(tok_dir)).render_full(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    first_trained = row.loss_mask.index(True)
    assert main(["data", "inspect", "--data", str(path), "--model", str(tok_dir), "--plain",
                 "--max-length", str(first_trained + 2)]) == 0
    assert "trains no EOS / end-of-turn token" in capsys.readouterr().err
    assert main(["data", "inspect", "--data", str(path), "--model", str(tok_dir), "--plain",
                 "--max-length", str(first_trained)]) == 0
    assert "warning: row trains no token" in capsys.readouterr().err


def test_inspect_preference_row_of_hh_rlhf(tok_dir, capsys):
    assert main(["data", "inspect", "--data", str(SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz"),
                 "--model", str(tok_dir), "--row", "1", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "## prompt" in out and "## chosen" in out and "[[Sounds like alcohol" in out


def test_preference_stats_say_what_dpo_trains(tmp_path, capsys):
    """A pair's tokens are its longer sequence; DPO trains on both (prompt + each reply)."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p" * 40, "chosen": "c" * 20, "rejected": "r" * 8}) + "\n")
    assert main(["data", "stats", "--data", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "15, each pair's longer sequence" in out and "tokens DPO trains │ 27 (both sequences of each pair)" in out
