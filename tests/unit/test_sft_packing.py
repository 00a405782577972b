"""`sft.packing`: packed and unpacked SFT give the same summed loss and token count through
the real data set, loader and objective; `graft sft --sft.packing true` runs end to end and
reports its packing efficiency."""

from __future__ import annotations

import json
import re

import torch

from graftlm.cli import main
from graftlm.data.loader import iterate_once
from graftlm.models import Decoder, ModelConfig
from graftlm.objectives.sft import PackedRows, SFTObjective, build_dataset
from graftlm.runs import run_config_class

WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa lambda mu".split()


def _data(tmp_path, n=23):
    from graftlm.tokenizer import train_tokenizer

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):  # prompts and completions of varied lengths
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (int(torch.randint(1, 12, (1,), generator=g)),),
                                                  generator=g)]
        rows.append({"prompt": f"say {i}: " + " ".join(words[:3]), "completion": " ".join(words)})
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = train_tokenizer(iter([" ".join(WORDS) + " say 0 1 2 3 4 5 6 7 8 9:"] * 20), 300)
    tokenizer.save(tmp_path / "tok")
    return tmp_path / "sft.jsonl", tokenizer


def _epoch_loss(cfg, tokenizer, model):
    data = build_dataset(cfg, tokenizer)
    total = torch.zeros((), dtype=torch.float64)
    count, tokens = 0, 0
    objective = SFTObjective(cfg.sft)
    with torch.no_grad():
        for batch in iterate_once(data.train, batch_size=3):
            part, n, metrics = objective.loss(model, batch)
            total += part.double()
            count += int(n)
            tokens += metrics["tokens"]
    return data, total.item(), count, tokens


def test_packed_and_unpacked_sft_give_the_same_summed_loss_and_count(tmp_path):
    path, tokenizer = _data(tmp_path)
    model = Decoder(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128))
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    config = run_config_class("sft")
    common = dict(model="x", data=str(path))
    plain = config(**common)
    plain.train.seq_len = 96
    plain.sft.val_fraction = 0.0
    packed = config(**common)
    packed.train.seq_len = 96
    packed.sft.val_fraction = 0.0
    packed.sft.packing = True

    plain_data, plain_loss, plain_count, plain_tokens = _epoch_loss(plain, tokenizer, model)
    packed_data, packed_loss, packed_count, packed_tokens = _epoch_loss(packed, tokenizer, model)
    assert isinstance(packed_data.train, PackedRows) and len(packed_data.train) < len(plain_data.train) / 2
    assert packed_count == plain_count > 0 and packed_tokens == plain_tokens
    assert abs(packed_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    assert abs(packed_loss / packed_count - plain_loss / plain_count) <= 1e-5

    stats = packed_data.stats["packing"]
    assert stats["rows"] == len(plain_data.train) and stats["sequences"] == len(packed_data.train)
    assert stats["rows_per_sequence"] == stats["rows"] / stats["sequences"]
    assert abs(stats["padding_fraction"] - (1 - plain_tokens / (96 * stats["sequences"]))) < 1e-12
    assert plain_data.stats == {} and packed_data.identity["packing"] is True


def test_graft_sft_with_packing_runs_and_reports_efficiency(tmp_path, capsys):
    path, _ = _data(tmp_path, n=40)
    assert main(["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path),
                 "--out", str(tmp_path), "--name", "p", "--sft.packing", "true", "--train.seq-len", "192",
                 "--train.max-steps", "2", "--train.batch-size", "2", "--train.precision", "fp32",
                 "--train.eval-batches", "1", "--train.save-every", "0", "--tensorboard", "false"]) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    packing = summary["data"]["packing"]
    assert summary["steps"] == 2 and packing["rows_per_sequence"] > 2 and 0 <= packing["padding_fraction"] < 0.5
    assert re.search(r"^packing: \d+ rows into \d+ sequences \([\d.]+ rows each, [\d.]+% padding\)$",
                     capsys.readouterr().out, re.M)
    records = [json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and all(r["loss"] > 0 for r in records if "loss" in r)
