"""graftlm's reward-model loss, gradients and metrics against TRL 1.16's RewardTrainer.

TRL's `RewardTrainer.compute_loss(model, inputs)` runs a transformers
`LlamaForSequenceClassification` (num_labels 1) on [chosen; rejected] from its
`DataCollatorForPreference` and takes the mean of -log sigmoid(r_c - r_r - margin), plus
`center_rewards_coefficient` x the mean of (r_c + r_r)^2. We build a bare trainer with only
the attributes that method reads and give it one saved classifier; graftlm loads the same
directory (`load_scalar_model`) and runs `RewardObjective` on the same token ids.

Where the two could differ, and why they do not:
- The scored position. TRL pads on the right with the tokenizer's pad id and leaves the
  choice to transformers, which reads the rightmost token that is not `pad_token_id`;
  `ScalarHeadModel` applies that rule. So where pad == eos (TRL's fallback for a tokenizer
  without a pad token) both take a trailing EOS for padding and score the token before it:
  the `pad_is_eos` case.
- Padding. Rows of different lengths are padded on the right in both; TRL passes an
  attention mask and graftlm none, which is the same under causal attention, as nothing
  after a row's last token can change it.
- Margin. TRL's optional `margin` column is a pair's optional `margin` field here; a pair
  without one has margin 0, the same loss as TRL without the column. TRL's `accuracy` and
  `margin` metrics ignore it (raw r_c > r_r), and so do graftlm's `rewards/*`.
- One deliberate difference, in the gradient of the pad id's embedding row (see below).
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from graftlm.data.render import RenderedPair
from graftlm.models.heads import load_scalar_model
from graftlm.objectives.configs import RewardModelConfig
from graftlm.objectives.dpo import PreferencePairs
from graftlm.objectives.reward import RewardObjective
from tests.conftest import make_hf_model

EOS = 2  # the tiny models' eos_token_id


def _pairs(eos: int | None):
    """(prompt, chosen, rejected) ids; sometimes chosen is the longer one, sometimes rejected."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for prompt_len, c_len, r_len in ((5, 4, 7), (3, 6, 2), (8, 3, 3), (1, 9, 1), (4, 2, 5)):
        prompt, chosen, rejected = (torch.randint(3, 256, (n,), generator=g).tolist()
                                    for n in (prompt_len, c_len, r_len))
        if eos is not None:  # as TRL adds EOS to plain text; one prompt holds an EOS mid-sequence too
            chosen, rejected = chosen + [eos], rejected + [eos]
            prompt = prompt[:1] + [eos] + prompt[1:]
        pairs.append((prompt, chosen, rejected))
    return pairs


def _classifier_dir(tmp_path, pad_id: int):
    """A tiny transformers LlamaForSequenceClassification (num_labels 1), saved."""
    import transformers
    make_hf_model("llama", tmp_path / "base")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", num_labels=1, pad_token_id=pad_id, dtype=torch.float32)
    with torch.no_grad():  # scores of order 1, so pairs are ranked both ways and the loss is far from ln 2
        hf.score.weight.copy_(torch.randn(hf.score.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    hf.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm"


def _bare_trl_trainer(model, center: float | None):
    from trl import RewardTrainer

    trainer = object.__new__(RewardTrainer)
    fake_accelerator = types.SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    attrs = dict(accelerator=fake_accelerator, model=model,
                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                 _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(center_rewards_coefficient=center))
    # `model` is a property of transformers' Trainer; set the instance dict directly.
    for key, value in attrs.items():
        trainer.__dict__[key] = value
    return trainer


CASES = {  # name: (pad id, margins or None, center_rewards_coefficient or None)
    "bradley_terry": (0, None, None),
    "margin": (0, [0.5, -1.0, 2.0, 0.0, 1.5], None),
    "center": (0, None, 0.1),
    "margin_and_center": (0, [1.0, 0.25, -0.5, 3.0, 0.0], 0.05),
    "pad_is_eos": (EOS, [0.5, 1.0, 0.0, -1.0, 2.0], 0.01),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reward_loss_gradients_and_metrics_match_trl(case, tmp_path):
    import transformers
    from trl.trainer.reward_trainer import DataCollatorForPreference

    pad_id, margins, center = CASES[case]
    pairs = _pairs(EOS if pad_id == EOS else None)
    rm_dir = _classifier_dir(tmp_path, pad_id)

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32)
    hf.train()  # no dropout in these configs; TRL reads .training for its metrics
    rows = [{"chosen_ids": p + c, "rejected_ids": p + r} for p, c, r in pairs]
    if margins is not None:
        rows = [{**row, "margin": m} for row, m in zip(rows, margins)]
    trainer = _bare_trl_trainer(hf, center)
    trl_loss = trainer.compute_loss(hf, DataCollatorForPreference(pad_token_id=pad_id)(rows))
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    model = load_scalar_model(rm_dir).train()
    assert model.pad_token_id == pad_id
    rendered = [RenderedPair(p, c, [True] * len(c), r, [True] * len(r),
                             margin=margins[i] if margins is not None else 0.0)
                for i, (p, c, r) in enumerate(pairs)]
    data = PreferencePairs(rendered, pad_id)
    batch = data.collate([data[i] for i in range(len(data))])
    objective = RewardObjective(RewardModelConfig(center_coef=center or 0.0))
    loss_sum, count, metrics = objective.loss(model, batch)
    loss = loss_sum / count
    loss.backward()

    assert count.item() == len(pairs)
    assert abs(loss.item() - trl_loss.item()) <= 1e-5, (loss.item(), trl_loss.item())
    assert metrics["rewards/accuracy"] == trl_metrics["accuracy"]
    assert abs(metrics["rewards/margin"] - trl_metrics["margin"]) <= 1e-5
    mean_reward = (metrics["rewards/chosen"] + metrics["rewards/rejected"]) / 2
    assert abs(mean_reward - trl_metrics["mean_reward"]) <= 1e-5
    # The pairs are informative: ranked both ways, so accuracy could tell a swapped pair.
    assert 0 < metrics["rewards/accuracy"] < 1, metrics

    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    checked = 0
    for name, p in model.named_parameters():
        got, want = p.grad, hf_grads[name]  # same names: model.* backbone, score.weight head
        assert got is not None and want is not None, name
        if name == "model.embed_tokens.weight":
            # Deliberate difference: transformers builds the embedding with padding_idx =
            # config.pad_token_id, so the pad id's row never gets a gradient. graftlm trains
            # every row the loss reaches: with pad == eos that row is EOS, a real token that
            # ends every row, and right padding already keeps pad positions out of every score.
            assert not want[pad_id].any()
            if pad_id == EOS:
                assert got[pad_id].abs().max().item() > 1e-4
            keep = torch.arange(got.shape[0]) != pad_id
            got, want = got[keep], want[keep]
        assert (got - want).abs().max().item() <= 1e-5, name
        checked += 1
    assert checked == len(hf_grads)
    assert max(p.grad.abs().max().item() for p in model.parameters()) > 1e-4
