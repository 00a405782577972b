"""The scalar-head reward model: Bradley-Terry loss, and saving as an HF classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graftlm.models.heads import ScalarHeadModel, load_scalar_model, save_scalar_model
from graftlm.models.hf import load_model
from graftlm.objectives.configs import RewardModelConfig
from graftlm.objectives.dpo import collate_pairs
from graftlm.objectives.reward import RewardObjective
from tests.conftest import make_hf_model


def _reward_model(tmp_path):
    make_hf_model("llama", tmp_path / "base")
    return ScalarHeadModel.from_decoder(load_model(tmp_path / "base"), generator=torch.Generator().manual_seed(0))


def test_bradley_terry_loss_and_accuracy(tmp_path):
    model = _reward_model(tmp_path)
    examples = [{"chosen_input_ids": [5, 6, 7], "chosen_loss_mask": [0, 1, 1],
                 "rejected_input_ids": [5, 9], "rejected_loss_mask": [0, 1]},
                {"chosen_input_ids": [8, 3], "chosen_loss_mask": [0, 1],
                 "rejected_input_ids": [8, 4, 4, 4], "rejected_loss_mask": [0, 1, 1, 1]}]
    batch = collate_pairs(examples, pad_id=0)
    total, count, metrics = RewardObjective().loss(model, batch)
    with torch.no_grad():
        scores = [model(torch.tensor([ids]))[0] for e in examples
                  for ids in (e["chosen_input_ids"], e["rejected_input_ids"])]
    want = -F.logsigmoid(scores[0] - scores[1]) - F.logsigmoid(scores[2] - scores[3])
    assert count.item() == 2 and torch.allclose(total, want, atol=1e-5)
    assert metrics["rewards/accuracy"] == ((scores[0] > scores[1]).float() + (scores[2] > scores[3]).float()).item() / 2


def test_margin_and_centering_shape_the_loss_not_the_accuracy(tmp_path):
    # A pair's margin is subtracted from its score gap (TRL's margin column); a pair
    # without one in the same batch has margin 0. Accuracy still compares raw scores.
    model = _reward_model(tmp_path)
    examples = [{"chosen_input_ids": [5, 6, 7], "chosen_loss_mask": [0, 1, 1],
                 "rejected_input_ids": [5, 9], "rejected_loss_mask": [0, 1], "margin": 2.0},
                {"chosen_input_ids": [8, 3], "chosen_loss_mask": [0, 1],
                 "rejected_input_ids": [8, 4, 4, 4], "rejected_loss_mask": [0, 1, 1, 1]}]
    batch = collate_pairs(examples, pad_id=0)
    assert batch["margin"].tolist() == [2.0, 0.0]
    total, _, metrics = RewardObjective(RewardModelConfig(center_coef=0.5)).loss(model, batch)
    with torch.no_grad():
        c1, r1, c2, r2 = [model(torch.tensor([ids]))[0] for e in examples
                          for ids in (e["chosen_input_ids"], e["rejected_input_ids"])]
    want = (-F.logsigmoid(c1 - r1 - 2.0) - F.logsigmoid(c2 - r2)
            + 0.5 * ((c1 + r1) ** 2 + (c2 + r2) ** 2))
    assert torch.allclose(total, want, atol=1e-5)
    assert metrics["rewards/accuracy"] == ((c1 > r1).float() + (c2 > r2).float()).item() / 2


def test_saved_reward_model_loads_in_transformers_with_equal_scores(tmp_path):
    import transformers
    model = _reward_model(tmp_path).eval()
    save_scalar_model(model, tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    # Right-padded rows of different lengths: both pick the last non-pad token.
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 0, 0, 0], [3, 0, 0, 0, 0]])
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
        alone = model(ids[1:2, :2])
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert torch.allclose(ours[1], alone[0], atol=1e-5)
    again = load_scalar_model(tmp_path / "rm")
    with torch.no_grad():
        assert torch.equal(again(ids), ours)


def test_reward_adapter_is_peft_sequence_classification_and_merges(tmp_path):
    # LoRA on the backbone, the fresh score head trained in full: PEFT loads the adapter
    # onto the base language model as a sequence classifier with equal scores, and the
    # adapter, its merge and the merged reward model agree.
    import json

    import peft
    import pytest
    import transformers

    import graftlm.adapters as A
    from graftlm.cli import main
    from graftlm.errors import GraftError

    make_hf_model("llama", tmp_path / "base")
    head = ScalarHeadModel.from_decoder(load_model(tmp_path / "base"), pad_token_id=0, record_base=True)
    A.apply_adapters(head, A.AdapterConfig(r=4, modules_to_save=["score"]))
    with torch.no_grad():
        for p in A.adapter_params(head):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    A.save_adapter(head, tmp_path / "rm", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 0, 0, 0]])
    with torch.no_grad():
        ours = head.eval()(ids)
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "base", num_labels=1, pad_token_id=0, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "rm").eval()(
            input_ids=ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert torch.allclose(load_scalar_model(tmp_path / "rm")(ids), ours, atol=1e-5)  # as --ppo.reward reads it
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "rm"),
                 "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        assert torch.allclose(load_scalar_model(tmp_path / "merged")(ids), ours, atol=1e-5)
    # Given as a language model's adapter, it is refused naming how it is used: as a model.
    with pytest.raises(GraftError, match="a reward-model adapter") as refused:
        A.load_adapter(load_model(tmp_path / "base"), tmp_path / "rm")
    assert f"graft eval --model {tmp_path / 'rm'}" in str(refused.value)
