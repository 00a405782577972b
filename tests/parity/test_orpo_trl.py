"""graftlm's ORPO loss and gradients against TRL 1.16's `trl.experimental.orpo.ORPOTrainer`.

TRL's `get_batch_loss_metrics(model, batch)` runs a transformers model on the padded
chosen / rejected batch; we build a bare trainer with only the attributes it reads. TRL
puts its NLL term on every attended token of the chosen sequence (prompt included),
graftlm only on the completion (as the paper does): with a one-token prompt, which is
never a target, the two coincide, so the pairs here have one. Completions of unequal
lengths tell a pooled per-token mean from a mean of per-pair means.
"""

from __future__ import annotations

import types

import pytest
import torch

from graftlm.models.hf import load_model
from graftlm.objectives.dpo import DPOConfig, DPOObjective, collate_pairs
from tests.conftest import make_hf_model


def _pairs():
    g = torch.Generator().manual_seed(0)
    pairs = []
    for c_len, r_len in ((4, 7), (9, 2), (2, 3)):
        prompt = [1]
        pairs.append((prompt, torch.randint(3, 256, (c_len,), generator=g).tolist(),
                      torch.randint(3, 256, (r_len,), generator=g).tolist()))
    return pairs


def _trl_batch(pairs):
    batch = {}
    for side, index in (("chosen", 1), ("rejected", 2)):
        rows = [pair[0] + pair[index] for pair in pairs]
        length = max(map(len, rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        attention = torch.zeros(len(rows), length, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (row, pair) in enumerate(zip(rows, pairs)):
            ids[i, :len(row)] = torch.tensor(row)
            attention[i, :len(row)] = 1
            labels[i, len(pair[0]):len(row)] = torch.tensor(row[len(pair[0]):])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
    return batch


def _bare_trl_trainer(beta: float):
    from trl.experimental.orpo import ORPOTrainer

    trainer = object.__new__(ORPOTrainer)
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t)
    attrs = dict(accelerator=accelerator, is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False,
                 beta=beta)
    for key, value in attrs.items():
        trainer.__dict__[key] = value
    return trainer


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_and_gradients_match_trl(beta, tmp_path):
    import transformers
    make_hf_model("llama", tmp_path / "policy", seed=0)
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    hf_policy.train()
    pairs = _pairs()

    trl_loss, trl_metrics = _bare_trl_trainer(beta).get_batch_loss_metrics(hf_policy, _trl_batch(pairs))
    trl_loss.backward()

    policy = load_model(tmp_path / "policy").train()
    examples = [{"chosen_input_ids": p + c, "chosen_loss_mask": [0] * len(p) + [1] * len(c),
                 "rejected_input_ids": p + r, "rejected_loss_mask": [0] * len(p) + [1] * len(r)}
                for p, c, r in pairs]
    loss_sum, count, metrics = DPOObjective(DPOConfig(loss="orpo", beta=beta)).loss(
        policy, collate_pairs(examples, pad_id=0))
    loss = loss_sum / count
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= 1e-5, (loss.item(), trl_loss.item())
    assert abs(metrics["rewards/margin"] - trl_metrics["rewards/margins"]) <= 1e-5
    hf_grads = {name: p.grad for name, p in hf_policy.named_parameters()}
    for name, p in policy.named_parameters():
        want = hf_grads[name if name.startswith("lm_head") else "model." + name]
        assert (p.grad - want).abs().max().item() <= 1e-5, name
    # A mean of per-pair NLL means would differ: the test can tell the two apart.
    per_pair = sum(-_mean_logp(policy, p, c) for p, c, _ in pairs) / len(pairs)
    pooled = -sum(_sum_logp(policy, p, c) for p, c, _ in pairs) / sum(len(c) for _, c, _ in pairs)
    assert abs(per_pair - pooled) > 1e-3


def _sum_logp(model, prompt, completion):
    from graftlm.objectives.dpo import sequence_logps
    with torch.no_grad():
        ids = torch.tensor([prompt + completion])
        mask = torch.tensor([[False] * len(prompt) + [True] * len(completion)])
        return sequence_logps(model, ids, mask)[0].item()


def _mean_logp(model, prompt, completion):
    return _sum_logp(model, prompt, completion) / len(completion)
