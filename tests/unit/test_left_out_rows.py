"""Nothing is left out silently: bad rows skipped and rows cut at the length limit are
counted, printed when a run starts and kept in summary.json; rows longer than a loaded
model's context are cut there (counted) instead of failing inside its forward; a new
model's context grows to the run's seq_len; a pre-training run longer than a loaded
model's context is refused before it starts."""

from __future__ import annotations

import json

import yaml

from graftlm.cli import main
from graftlm.models.hf import load_model
from tests.unit.test_sft_packing import _data

SFT = ["--train.max-steps", "1", "--train.batch-size", "2", "--train.precision", "fp32", "--train.eval-batches", "1",
       "--train.save-every", "0", "--tensorboard", "false"]


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_a_skipped_bad_row_and_cut_rows_are_counted_and_printed(tmp_path, capsys):
    path, _ = _data(tmp_path, n=150)
    lines = path.read_text().splitlines()
    lines.insert(7, '{"prompt": "broken"')  # one bad row of 151: under the 1% that stops a run
    path.write_text("\n".join(lines) + "\n")
    assert main(["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path),
                 "--out", str(tmp_path), "--name", "run", "--train.seq-len", "40", *SFT]) == 0
    data = _summary(tmp_path / "run")["data"]
    assert data["bad_rows_skipped"]["bad"] == 1 and data["bad_rows_skipped"]["of"] == 151
    assert "sft.jsonl:8" in data["bad_rows_skipped"]["first"]
    cut = data["length_limit"]
    assert cut["max_length"] == 40 and cut["truncated"] + cut.get("dropped_too_long", 0) > 0
    out = capsys.readouterr().out
    assert "{" not in out.split("done:")[0]  # said in words below (the counts are in summary.json)
    assert "warning: skipped 1 bad row of 151; the first: " in out and "sft.jsonl:8" in out
    dropped = cut.get("dropped_too_long", 0)
    lost = cut["truncated"] + dropped
    assert lost <= 150  # each row counted once
    assert f"warning: {lost} of 150 rows ({lost / 150:.0%}) were cut or dropped at 40 tokens " \
           f"({cut['truncated']} cut, {dropped} dropped); --sft.max-length raises the limit" in out


def test_too_many_bad_rows_name_the_flags(tmp_path, capsys):
    path, _ = _data(tmp_path, n=20)
    path.write_text(path.read_text() + "not json\n")
    assert main(["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path),
                 "--out", str(tmp_path), *SFT]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--sft.max_bad_fraction" in err and "--sft.errors raise" in err
    assert not (tmp_path / "sft-tiny").exists()  # a refused run leaves no directory behind


def test_contexts_grow_for_new_models_cut_loaded_ones_and_refuse_long_pretraining(tmp_path, capsys):
    path, _ = _data(tmp_path, n=40)
    tok = str(tmp_path / "tok")
    # A new model trained at 600 tokens gets a context of 600 (the tiny preset's is 512).
    assert main(["sft", "--model", "tiny", "--tokenizer", tok, "--data", str(path), "--out", str(tmp_path),
                 "--name", "new", "--train.seq-len", "600", *SFT]) == 0
    base = load_model(tmp_path / "new" / "final")
    assert base.config.max_seq_len == 600
    # Rows of a loaded model are cut at its context, however long seq_len asks.
    small = tmp_path / "small"
    config = json.loads((tmp_path / "new" / "final" / "config.json").read_text())
    (tmp_path / "new" / "final" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    small_dir = tmp_path / "new" / "final"
    assert main(["sft", "--model", str(small_dir), "--data", str(path), "--out", str(tmp_path),
                 "--name", "cut", "--train.seq-len", "4096", *SFT]) == 0
    assert _summary(tmp_path / "cut")["data"]["length_limit"]["max_length"] == 40
    # The warning does not offer a longer limit the model cannot take.
    warning = next(line for line in capsys.readouterr().out.splitlines() if "were cut or dropped at 40" in line)
    assert "raises the limit" not in warning and f"that is the context of model {small_dir}" in warning, warning
    # Pre-training windows are all seq_len long: past a loaded model's context, refused.
    assert main(["pretrain", "--model", str(small_dir), "--data", str(small), "--out", str(tmp_path),
                 "--train.seq-len", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.seq_len" in err and "max_position_embeddings 40" in err


def test_fine_tuning_rows_default_to_1024_tokens_within_the_context(tmp_path):
    from graftlm.trainer import TrainConfig

    path, tokenizer = _data(tmp_path, n=12)
    rows = path.read_text().splitlines()
    # One row of 300-500 tokens: the old default (train.seq_len 256) cut it.
    long = {"prompt": "say 12: the", "completion": " ".join(["the"] * 100)}
    assert 300 < len(tokenizer.encode(long["prompt"] + long["completion"])) < 500
    path.write_text("\n".join(rows + [json.dumps(long)]) + "\n")
    # The tiny preset's context is 512: a new model keeps it, and no row is cut.
    assert main(["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path),
                 "--out", str(tmp_path), "--name", "rows", *SFT]) == 0
    assert "length_limit" not in _summary(tmp_path / "rows").get("data", {})
    recorded = yaml.safe_load((tmp_path / "rows" / "config.yaml").read_text())
    assert recorded["train"]["seq_len"] == 512
    assert load_model(tmp_path / "rows" / "final").config.max_seq_len == 512
    # Without a model's context: TRL's max_length for rows, 256 for pre-training windows
    # (within a shorter context too); a length given is kept for every objective.
    train = TrainConfig()
    assert [train.seq_len_for(o) for o in ("sft", "dpo", "reward", "grpo", "clm")] == [1024, 1024, 1024, 256, 256]
    assert (train.seq_len_for("sft", 2048), train.seq_len_for("clm", 128)) == (1024, 128)
    assert TrainConfig(seq_len=64).seq_len_for("sft", 2048) == 64


def test_a_missing_model_directory_is_named_before_the_tokenizer(tmp_path, capsys):
    path, _ = _data(tmp_path, n=10)
    assert main(["sft", "--model", str(tmp_path / "nope"), "--data", str(path), "--out", str(tmp_path), *SFT]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "tokenizer" not in err


def test_an_unreadable_summary_in_the_run_directory_is_named(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_bytes(b"\xff\xfe\x00garbage")
    assert main(["pretrain", "--model", "tiny", "--data", str(tmp_path / "shards"), "--out", str(tmp_path),
                 "--name", "r"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "summary.json" in err and "UTF-8" in err


def test_a_reward_model_leaves_out_pairs_past_the_limit_and_says_so_when_none_is_left(tmp_path, capsys):
    """A reward model scores a pair at its last token: one cut at max_length would teach
    it to score text that never ends, so `graft reward` leaves such pairs out (TRL's
    RewardTrainer does too), counted; DPO keeps truncating. With none left, the one error
    line says how many went where and which flags keep them."""
    _, tokenizer = _data(tmp_path, n=1)
    pairs = [{"prompt": f"say {i}:", "chosen": "a b c d e f g h i j" * (1 + i % 3), "rejected": "b"}
             for i in range(30)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    common = ["--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path), "--out", str(tmp_path),
              *SFT]
    assert main(["reward", *common, "--name", "rm", "--reward.max-length", "50"]) == 0
    data = _summary(tmp_path / "rm")["data"]
    cut = data["length_limit"]
    assert cut["dropped_too_long"] == 20 and cut.get("truncated", 0) == 0
    # Its one held-out pair was long too: no validation, and the run says so.
    lost = "no held-out preference pair left for validation of 1 read: 1 longer than 50 tokens"
    out = capsys.readouterr().out
    assert data["validation_lost"].startswith(lost) and f"warning: {lost}" in out
    assert ("(0 cut, 20 dropped); --reward.max-length raises the limit (up to the model's context), or "
            "--reward.overflow truncate keeps their start") in out
    # Which tokens get a loss means nothing to a reward model (one score, at the last token).
    assert main(["reward", *common, "--name", "all", "--reward.train-on", "all"]) == 2
    assert "config field 'reward.train_on': a reward model is trained on one score per sequence" in \
        capsys.readouterr().err
    assert main(["dpo", *common, "--name", "dpo", "--dpo.max-length", "50"]) == 0
    cut = _summary(tmp_path / "dpo")["data"]["length_limit"]
    assert cut["truncated"] == 20 and cut.get("dropped_too_long", 0) == 0
    capsys.readouterr()
    assert main(["reward", *common, "--name", "none", "--reward.max-length", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{path}: no preference pair to train left of 29 read: 29 longer than 3 tokens "
                        "(--reward.max-length raises the limit, or --reward.overflow truncate keeps their start)")
    assert len(err.splitlines()) == 1
    # A validation file lost whole would leave the run without validation, unsaid: refused too.
    long_val = tmp_path / "val.jsonl"
    long_val.write_text("".join(json.dumps(p) + "\n" for p in pairs if len(p["chosen"]) > 20))
    assert main(["reward", *common, "--name", "val", "--reward.max-length", "50", "--reward.val-data",
                 str(long_val)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{long_val}: no validation preference pair left of 20 read: 20 longer than 50 tokens "
                        "(--reward.max-length raises the limit, or --reward.overflow truncate keeps their start)")
    assert not (tmp_path / "val").exists()
