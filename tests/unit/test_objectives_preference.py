"""Preference objectives: DPO and reward-model validation report held-out reward accuracy and
margin beside val_loss; SimPO's beta defaults to 2.0."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from graftlm.config import build_config
from graftlm.data.loader import ResumableLoader
from graftlm.data.render import RenderedPair
from graftlm.models import Decoder, ModelConfig
from graftlm.objectives.dpo import DPOConfig, DPOObjective, PreferencePairs
from graftlm.optim import OptimConfig
from graftlm.runs import run_config_class
from graftlm.trainer import TrainConfig, Trainer

from tests.conftest import SHARED_DATA


def _tiny(seed=0):
    model = Decoder(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                num_heads=4, num_kv_heads=2, max_seq_len=64, pad_token_id=0))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(1, 64, (k,), generator=g).tolist()

    pairs = []
    for i in range(n):
        c, r = ids(2 + i % 3), ids(4 - i % 3)
        pairs.append(RenderedPair(ids(3), c, [True] * len(c), r, [True] * len(r)))
    return PreferencePairs(pairs, pad_id=0)


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_dpo_validation_reports_reward_accuracy_and_margin_over_the_whole_split(loss):
    model, reference, g = _tiny(0), _tiny(1), torch.Generator().manual_seed(1)
    with torch.no_grad():  # a policy near its reference: some pairs won, some lost
        for p, q in zip(model.parameters(), reference.parameters()):
            p.copy_(q + 0.3 * torch.randn(q.shape, generator=g))
    objective = DPOObjective(DPOConfig(loss=loss))
    val = _pairs(5)
    # The reference's log-probs, precomputed, as a data set may carry them.
    full = val.collate([val[i] for i in range(5)])
    from graftlm.objectives.dpo import concatenated, sequence_logps
    with torch.no_grad():
        ref = sequence_logps(reference, *concatenated(full))[0].chunk(2)

    class WithReference(PreferencePairs):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "ref_chosen_logps": ref[0][i].item(),
                    "ref_rejected_logps": ref[1][i].item()}

    val = WithReference(val.pairs, 0)
    full = val.collate([val[i] for i in range(5)])
    with torch.no_grad():
        _, _, want = objective.loss(model.eval(), full)  # all 5 pairs in one batch
    train = TrainConfig(max_steps=1, batch_size=2, precision="fp32", eval_batches=0)
    trainer = Trainer(model, objective, ResumableLoader(val, 2), train, OptimConfig(),
                      device=torch.device("cpu"), val_dataset=val, tensorboard=False)
    result = trainer.evaluate()  # batches of 2, 2 and 1: each weighs by its pairs
    assert set(result) == {"step", "val_loss", "val_rewards/accuracy", "val_rewards/margin"}
    assert result["val_rewards/accuracy"] == pytest.approx(want["rewards/accuracy"], abs=1e-6)
    assert result["val_rewards/margin"] == pytest.approx(want["rewards/margin"], abs=1e-6)
    assert 0 < want["rewards/accuracy"] < 1 and want["rewards/margin"] != 0  # a case that tells
    stats = trainer.stats()
    assert stats["final_val_rewards/accuracy"] == result["val_rewards/accuracy"]
    assert stats["final_val_rewards/margin"] == result["val_rewards/margin"]


def test_reward_model_validation_reports_pairwise_accuracy_and_margin():
    from graftlm.models.heads import ScalarHeadModel
    from graftlm.objectives.reward import RewardObjective

    model = ScalarHeadModel.from_decoder(_tiny(0), pad_token_id=0, generator=torch.Generator().manual_seed(0))
    val = _pairs(5, seed=1)
    with torch.no_grad():
        _, _, want = RewardObjective().loss(model.eval(), val.collate([val[i] for i in range(5)]))
    train = TrainConfig(max_steps=1, batch_size=2, precision="fp32", eval_batches=0)
    result = Trainer(model, RewardObjective(), ResumableLoader(val, 2), train, OptimConfig(),
                     device=torch.device("cpu"), val_dataset=val, tensorboard=False).evaluate()
    assert 0 < want["rewards/accuracy"] < 1
    assert result["val_rewards/accuracy"] == pytest.approx(want["rewards/accuracy"], abs=1e-6)
    assert result["val_rewards/margin"] == pytest.approx(want["rewards/margin"], abs=1e-6)


def test_graft_dpo_logs_validation_accuracy_in_metrics_and_summary(tmp_path, capsys):
    from graftlm.cli import main
    from graftlm.tokenizer import train_tokenizer

    rows = [json.loads(line) for line in gzip.open(SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz", "rt")]
    rows = [r for r in rows if len(r["chosen"]) + len(r["rejected"]) < 500
            and all(r[k].rsplit("Assistant:", 1)[-1].strip() for k in ("chosen", "rejected"))][:24]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_tokenizer(iter(r["chosen"] for r in rows), 300).save(tmp_path / "tok")
    assert main(["dpo", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data",
                 str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path), "--name", "d", "--dpo.val-fraction", "0.25",
                 "--train.max-steps", "2", "--train.batch-size", "2", "--train.eval-every", "1",
                 "--train.eval-batches", "0", "--train.seq-len", "128", "--train.precision", "fp32",
                 "--train.save-every", "0", "--tensorboard", "false"]) == 0
    records = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [1, 2]
    assert all(0 <= r["val_rewards/accuracy"] <= 1 and "val_rewards/margin" in r for r in vals)
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["final_val_rewards/accuracy"] == vals[-1]["val_rewards/accuracy"]
    assert summary["final_val_rewards/margin"] == vals[-1]["val_rewards/margin"]
    # And on the console, beside val_loss: `step 2: val_loss 0.6931, val_acc 50%, val_margin 0.001`.
    out = capsys.readouterr().out.splitlines()
    assert "dpo: loss sigmoid, beta 0.1" in out  # the settings it trains with, said as it starts
    line = next(line for line in out if line.startswith("step 2: val_loss"))
    assert f"val_acc {vals[-1]['val_rewards/accuracy']:.0%}" in line and ", val_margin " in line, line


def test_simpo_beta_defaults_to_2_and_an_explicit_beta_wins():
    def dpo(**overrides):
        base = {"model": "tiny", "data": "pairs.jsonl"}
        return build_config(run_config_class("dpo"), overrides={**base, **overrides}).dpo

    assert dpo(**{"dpo.loss": "simpo"}).beta == 2.0
    assert dpo(**{"dpo.loss": "simpo", "dpo.beta": "0.1"}).beta == 0.1  # given: kept, even at the old default
    from graftlm.objectives import get_spec
    cfg = build_config(run_config_class("dpo"), overrides={"model": "tiny", "data": "p.jsonl", "dpo.loss": "simpo"})
    assert get_spec("dpo").describe(cfg) == "dpo: loss simpo, beta 2, gamma 0.5"  # printed as a run starts
    assert dpo(**{"dpo.loss": "simpo", "dpo.beta": "2.5"}).beta == 2.5
    for loss in ("sigmoid", "ipo", "orpo"):
        assert dpo(**{"dpo.loss": loss}).beta == 0.1
    assert DPOConfig(loss="simpo").beta == 2.0 and DPOConfig().beta == 0.1  # the Python API too
    assert build_config(run_config_class("dpo"), recipe={"model": "tiny", "data": "p.jsonl",
                                                         "dpo": {"loss": "simpo", "beta": 0.5}}).dpo.beta == 0.5


def test_dpo_help_names_the_simpo_default(capsys):
    from graftlm.cli import main

    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "2.0 for simpo" in text
