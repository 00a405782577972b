"""Inference-only fused q/k/v and gate/up projections: the same outputs as the separate
linears, kept in step with in-place weight changes, never used for training or adapters."""

import torch

from graftlm.adapters import AdapterConfig, apply_adapters
from graftlm.models.config import preset
from graftlm.models.transformer import Decoder, FusedProjection


def _model(**overrides):
    model = Decoder(preset("tiny", **overrides)).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids)


def _count_fused_calls(monkeypatch) -> list:
    calls, original = [], FusedProjection.__call__
    monkeypatch.setattr(FusedProjection, "__call__", lambda self, x: calls.append(1) or original(self, x))
    return calls


def test_fused_equals_separate_with_qkv_bias(monkeypatch):
    model = _model(attention_bias=True)
    with torch.no_grad():
        for block in model.layers:  # non-zero biases, so their concatenation is checked
            block.self_attn.q_proj.bias.normal_()
            block.self_attn.v_proj.bias.normal_()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    separate = _logits(model, ids)
    model.fuse_projections()
    calls = _count_fused_calls(monkeypatch)
    fused = _logits(model, ids)
    assert len(calls) == 2 * model.config.num_layers
    torch.testing.assert_close(fused, separate, rtol=0, atol=1e-5)


def test_fused_weights_follow_in_place_updates():
    model = _model()
    model.fuse_projections()
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids)
    with torch.no_grad():  # as an optimizer step between two rollouts would
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = _logits(model, ids)
    model.fuse_projections(False)
    torch.testing.assert_close(after, _logits(model, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(before, after)


def test_training_and_adapters_bypass_the_fused_copy(monkeypatch):
    model = _model()
    model.fuse_projections()
    calls = _count_fused_calls(monkeypatch)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    model.train()
    model(ids).sum().backward()  # gradients need the real parameters
    assert not calls and model.layers[0].self_attn.q_proj.weight.grad is not None

    apply_adapters(model, AdapterConfig(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero adapter, which a stale fused copy would ignore
    with_adapter = _logits(model.eval(), ids)
    assert not calls
    assert not torch.allclose(with_adapter, _logits(_model(), ids))
