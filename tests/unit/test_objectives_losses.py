"""SFT, DPO variants, reward, GRPO and PPO losses on hand-checkable cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from graftlm.models import Decoder, ModelConfig
from graftlm.objectives.dpo import DPOConfig, preference_losses
from graftlm.objectives.grpo import clipped_surrogate, group_advantages, k3_kl
from graftlm.objectives.ppo import gae
from graftlm.objectives.sft import SFTObjective


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = Decoder(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                num_heads=4, num_kv_heads=2, max_seq_len=64, pad_token_id=0))
    model.init_weights()
    return model


def test_sft_loss_is_masked_cross_entropy():
    model = _tiny()
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 7:9] = True
    total, count, _ = SFTObjective().loss(model, {"input_ids": ids, "loss_mask": mask})
    logits = model(ids)
    labels = ids.masked_fill(~mask, -100)[:, 1:]
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels.reshape(-1), reduction="sum")
    assert count.item() == 6 + 2
    assert torch.allclose(total, want, atol=1e-4)


def test_sft_packed_rows_never_predict_across_documents():
    model = _tiny()
    ids = torch.randint(1, 64, (1, 8))
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    mask = torch.ones(1, 8, dtype=torch.bool)
    total, count, _ = SFTObjective().loss(model, {"input_ids": ids, "loss_mask": mask,
                                                  "document_ids": docs, "position_ids": positions})
    assert count.item() == 6  # 3 targets per document; the boundary target is not trained
    alone = sum(SFTObjective().loss(model, {"input_ids": ids[:, s:s + 4], "loss_mask": mask[:, :4]})[0]
                for s in (0, 4))
    assert torch.allclose(total, alone, atol=1e-4)


def _pair_logps():
    # chosen/rejected sequence log-prob sums, lengths, reference sums
    return (torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -3.0]), torch.tensor([2, 3]), torch.tensor([4, 1]),
            torch.tensor([-4.5, -6.0]), torch.tensor([-4.0, -3.5]))


def test_sigmoid_loss_with_label_smoothing_by_hand():
    c, r, cl, rl, rc, rr = _pair_logps()
    losses, reward_c, reward_r = preference_losses(DPOConfig(beta=0.5, label_smoothing=0.1), c, r, cl, rl, rc, rr)
    # pair 0: ratios 0.5 and -1.0 -> logits 0.5 * 1.5 = 0.75
    logit = 0.75
    want = -0.9 * math.log(1 / (1 + math.exp(-logit))) - 0.1 * math.log(1 / (1 + math.exp(logit)))
    assert losses[0].item() == pytest.approx(want, abs=1e-6)
    assert reward_c[0].item() == pytest.approx(0.25) and reward_r[0].item() == pytest.approx(-0.5)


def test_ipo_averages_log_ratios_per_token():
    c, r, cl, rl, rc, rr = _pair_logps()
    losses, _, _ = preference_losses(DPOConfig(loss="ipo", beta=0.25), c, r, cl, rl, rc, rr)
    # pair 1: chosen ratio 0 over 3 tokens, rejected ratio 0.5 over 1 -> delta -0.5; target 2
    assert losses[1].item() == pytest.approx((-0.5 - 2.0) ** 2)


def test_simpo_is_reference_free_and_length_normalised():
    c, r, cl, rl, *_ = _pair_logps()
    losses, reward_c, _ = preference_losses(DPOConfig(loss="simpo", beta=2.0, simpo_gamma=0.5), c, r, cl, rl)
    logit = 2.0 * (-4.0 / 2 - -5.0 / 4) - 0.5
    assert losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-logit))), abs=1e-6)
    assert reward_c[0].item() == pytest.approx(2.0 * -2.0)


def test_orpo_is_pooled_token_nll_plus_odds_ratio_term():
    c, r, cl, rl, *_ = _pair_logps()
    losses, _, _ = preference_losses(DPOConfig(loss="orpo", beta=0.1), c, r, cl, rl)

    def log_odds(p):
        return p - math.log1p(-math.exp(p))

    # NLL: the mean over all chosen tokens of the batch (10 / 5). Here the per-pair means
    # agree (4/2, 6/3); below they differ (1/1, 9/3): pooled 10/4, not their mean 2.
    odds = [-math.log(1 / (1 + math.exp(-(log_odds(pc) - log_odds(pr))))) for pc, pr in ((-2.0, -1.25), (-2.0, -3.0))]
    assert losses.mean().item() == pytest.approx(10 / 5 + 0.1 * sum(odds) / 2, abs=1e-6)
    losses, _, _ = preference_losses(DPOConfig(loss="orpo", beta=0.1), torch.tensor([-1.0, -9.0]), r,
                                     torch.tensor([1, 3]), rl)
    odds = [-math.log(1 / (1 + math.exp(-(log_odds(pc) - log_odds(pr))))) for pc, pr in ((-1.0, -1.25), (-3.0, -3.0))]
    assert losses.mean().item() == pytest.approx(10 / 4 + 0.1 * sum(odds) / 2, abs=1e-6)


def test_group_advantages_normalise_within_groups_and_drop_skipped():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, float("nan"), 0.0])
    adv, valid = group_advantages(rewards, group_size=4, eps=0.0)
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std()
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / std)
    assert valid.tolist() == [True] * 4 + [False] * 4 and adv[4:].abs().sum() == 0
    same, _ = group_advantages(torch.ones(4), 4)
    assert same.abs().sum() == 0  # a group that agrees teaches nothing


def test_a_completion_no_reward_applies_to_is_left_out_of_its_groups_baseline():
    """As TRL 1.16: an unscorable completion (every reward returned None) is neither in
    its group's mean nor its std, and its advantage is 0. Counted as a 0 score, it made
    the group's mean 2.25 and the completion scored 1 look above it (+)."""
    rewards = torch.tensor([1.0, 0.0, 3.0, 5.0, 2.0, 0.0, 0.0, 0.0])
    unscorable = torch.tensor([False, True, False, False, False, True, True, True])
    adv, valid = group_advantages(rewards, group_size=4, eps=0.0, unscorable=unscorable)
    assert torch.allclose(adv[:4], torch.tensor([-1.0, 0.0, 0.0, 1.0]))  # mean 3, std 2 over {1, 3, 5}
    assert valid.all()
    alone, _ = group_advantages(rewards[4:], group_size=4, unscorable=unscorable[4:])
    assert alone.abs().sum() == 0  # one scored completion alone: nothing to compare it with
    unscaled, _ = group_advantages(rewards, 4, scale=False, unscorable=unscorable)
    assert torch.allclose(unscaled[:4], torch.tensor([-2.0, 0.0, 0.0, 2.0]))
    counted_as_zero, _ = group_advantages(rewards, 4, eps=0.0)
    assert counted_as_zero[0] < 0 < adv[3] and counted_as_zero[1] < 0


def test_k3_kl_and_clipped_surrogate_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.5])
    kl = k3_kl(logp, ref)
    assert kl[0].item() == 0.0 and kl[1].item() == pytest.approx(math.exp(0.5) - 0.5 - 1)
    old = torch.tensor([-1.0, -1.0])
    new = torch.tensor([-1.0 + math.log(1.5), -1.0 + math.log(0.5)])
    loss, clipped = clipped_surrogate(new, old, torch.tensor([1.0, -1.0]), 0.2, 0.2)
    # ratio 1.5 with A=1 is clipped to 1.2; ratio 0.5 with A=-1 is clipped to 0.8
    assert loss.tolist() == pytest.approx([-1.2, 0.8]) and clipped.tolist() == [True, True]


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.5
    d1 = 0.0 + 0.5 - 0.25
    d0 = 0.0 + 0.25 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    assert adv[0].tolist() == pytest.approx([d0 + 0.5 * a1, a1, a2, 0.0])
