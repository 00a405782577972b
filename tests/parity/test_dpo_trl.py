"""graftlm's DPO loss (sigmoid and IPO) and its gradients against TRL 1.16's DPOTrainer.

TRL computes the loss in `DPOTrainer._compute_loss(model, inputs, return_outputs)` from a
transformers model patched with its fused LM head. We build a bare trainer instance
with only the attributes that method reads, run it on a tiny transformers Llama, and
run graftlm's objective on the same weights loaded into graftlm's decoder, with the
reference log-probs precomputed by graftlm from a second (perturbed) model.
"""

from __future__ import annotations

import types
from collections import defaultdict
from contextlib import nullcontext

import pytest
import torch

from graftlm.models.hf import load_model
from graftlm.objectives.dpo import DPOConfig, DPOObjective, collate_pairs, concatenated, sequence_logps
from tests.conftest import make_hf_model


def _pairs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for prompt_len, c_len, r_len in ((5, 4, 7), (3, 6, 2), (8, 3, 3)):
        prompt = torch.randint(3, 256, (prompt_len,), generator=g).tolist()
        chosen = torch.randint(3, 256, (c_len,), generator=g).tolist()
        rejected = torch.randint(3, 256, (r_len,), generator=g).tolist()
        pairs.append((prompt, chosen, rejected))
    return pairs


def _graft_batch(pairs):
    examples = []
    for p, c, r in pairs:
        examples.append({"chosen_input_ids": p + c, "chosen_loss_mask": [0] * len(p) + [1] * len(c),
                         "rejected_input_ids": p + r, "rejected_loss_mask": [0] * len(p) + [1] * len(r)})
    return collate_pairs(examples, pad_id=0)


def _trl_inputs(pairs):
    """TRL's concatenated batch: [chosen; rejected], right-padded, with completion_mask."""
    rows = [(p + c, [0] * len(p) + [1] * len(c)) for p, c, _ in pairs]
    rows += [(p + r, [0] * len(p) + [1] * len(r)) for p, _, r in pairs]
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    completion = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        completion[i, :len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def _bare_trl_trainer(model, ref_model, loss_type: str, beta: float):
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(ref_model)
    trainer = object.__new__(DPOTrainer)
    fake_accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), autocast=nullcontext, gather=lambda t: t, gather_for_metrics=lambda t: t,
        unwrap_model=lambda m: m)
    attrs = dict(accelerator=fake_accelerator, model=model, ref_model=ref_model, ld_alpha=None,
                 precompute_ref_logps=False, f_divergence_type="reverse_kl", loss_types=[loss_type],
                 loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
                 aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                 _total_train_tokens=0, _tp_size=1,
                 args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    # `model` is a property of transformers' Trainer; set the instance dict directly.
    for key, value in attrs.items():
        trainer.__dict__[key] = value
    return trainer


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.1), ("ipo", 0.5)])
def test_dpo_loss_and_gradients_match_trl(loss_type, beta, tmp_path):
    import transformers
    make_hf_model("llama", tmp_path / "policy", seed=0)
    make_hf_model("llama", tmp_path / "ref", seed=1)
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32).eval()
    hf_policy.train()  # no dropout in these configs; TRL reads .training for its metrics
    pairs = _pairs()

    trainer = _bare_trl_trainer(hf_policy, hf_ref, loss_type, beta)
    trl_loss = trainer._compute_loss(hf_policy, _trl_inputs(pairs), return_outputs=False)
    trl_loss.backward()

    policy = load_model(tmp_path / "policy").train()
    reference = load_model(tmp_path / "ref")
    batch = _graft_batch(pairs)
    with torch.no_grad():
        ids, mask = concatenated(batch)
        ref_logps, _ = sequence_logps(reference, ids, mask)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_logps.chunk(2)
    objective = DPOObjective(DPOConfig(loss=loss_type, beta=beta))
    loss_sum, count, metrics = objective.loss(policy, batch)
    loss = loss_sum / count
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= 1e-5, (loss.item(), trl_loss.item())
    # Implicit rewards agree with TRL's logged ones too.
    assert abs(metrics["rewards/margin"] - trainer._metrics["train"]["rewards/margins"][-1]) <= 1e-5
    assert abs(metrics["logps/chosen"] - trainer._metrics["train"]["logps/chosen"][-1]) <= 1e-4
    hf_grads = {name: p.grad for name, p in hf_policy.named_parameters()}
    checked = 0
    for name, p in policy.named_parameters():
        hf_name = name if name.startswith("lm_head") else "model." + name
        want = hf_grads[hf_name]
        assert p.grad is not None and want is not None, name
        assert (p.grad - want).abs().max().item() <= 1e-5, name
        checked += 1
    assert checked == len(hf_grads)
    assert trl_loss.item() > 0 and max(p.grad.abs().max().item() for p in policy.parameters()) > 1e-4
