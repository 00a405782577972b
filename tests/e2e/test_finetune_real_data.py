"""`graft sft|dpo|reward|grpo` on the real data sets, as a user runs them, on a tiny model."""

from __future__ import annotations

import json

import pytest
import yaml

from graftlm.cli import main
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow
COMMON = ["--train.max-steps", "2", "--train.batch-size", "2", "--train.seq-len", "192",
          "--train.precision", "fp32", "--train.eval-batches", "1", "--train.save-every", "0",
          "--tensorboard", "false"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from graftlm.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("real")
    rows = [json.loads(line) for line in (SHARED_DATA / "gsm8k_train.jsonl").read_text().splitlines()[:500]]
    train_tokenizer(iter(r["question"] + r["answer"] for r in rows), 400).save(root / "tok")
    return root


def _run(root, command, *argv):
    assert main([command, *[str(a) for a in argv], "--out", str(root / "runs"), *COMMON]) == 0
    summary = json.loads((root / "runs" / argv[argv.index("--name") + 1] / "summary.json").read_text())
    assert summary["objective"] == command and summary["steps"] == 2
    return root / "runs" / argv[argv.index("--name") + 1]


def test_sft_dpo_reward_grpo_on_real_data(tokenizer_dir):
    import torch
    import transformers

    root = tokenizer_dir
    sft = _run(root, "sft", "--model", "tiny", "--tokenizer", root / "tok", "--name", "sft",
               "--data", SHARED_DATA / "gsm8k_train.jsonl")
    hh = SHARED_DATA / "hh_rlhf_harmless_test.jsonl.gz"
    dpo = _run(root, "dpo", "--model", sft / "final", "--data", hh, "--name", "dpo")
    metrics = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert any("train_rewards/accuracy" in m and "train_logps/chosen" in m for m in metrics)
    # No --optim.lr: a full-weight DPO of pre-trained weights takes TRL's rate, not 3e-4.
    assert yaml.safe_load((dpo / "config.yaml").read_text())["optim"]["lr"] == 1e-6
    rm = _run(root, "reward", "--model", sft / "final", "--data", hh, "--name", "rm")
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(rm / "final")
    assert classifier.config.num_labels == 1
    with torch.no_grad():
        assert classifier(torch.tensor([[5, 6, 7]])).logits.shape == (1, 1)
    # With an adapter the head trains in full beside it; the adapter is a reward as it is.
    rm_lora = _run(root, "reward", "--model", sft / "final", "--data", hh, "--name", "rm-lora", "--adapter", "lora")
    config = json.loads((rm_lora / "final" / "adapter_config.json").read_text())
    assert yaml.safe_load((rm_lora / "config.yaml").read_text())["optim"]["lr"] == 3e-4  # an adapter's
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    from graftlm.rewards import build_reward
    scores = build_reward(str(rm_lora / "final"))(["Sure.", "No."], ["Hi", "Hi"], [{}, {}])
    assert main(["merge", "--model", str(sft / "final"), "--adapter", str(rm_lora / "final"),
                 "--out", str(root / "rm-merged")]) == 0
    merged = build_reward(str(root / "rm-merged"))(["Sure.", "No."], ["Hi", "Hi"], [{}, {}])
    assert scores == pytest.approx(merged, abs=1e-4)
    from graftlm.eval import evaluate
    accuracy = evaluate(rm_lora / "final", hh, max_rows=4)["metrics"]["reward model"]["pairwise_accuracy"]
    assert accuracy == evaluate(root / "rm-merged", hh, max_rows=4)["metrics"]["reward model"]["pairwise_accuracy"]
    grpo = _run(root, "grpo", "--model", sft / "final", "--data", SHARED_DATA / "gsm8k_train.jsonl",
                "--name", "grpo", "--grpo.reward", "gsm8k", "--grpo.sampling.group-size", 2,
                "--grpo.sampling.max-new-tokens", 8)
    records = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert any({"train_reward/mean", "train_reward/std", "train_kl", "train_completion_length",
                "train_time/generation_s", "train_time/train_s"} <= set(r) for r in records)
