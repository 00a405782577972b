"""Fit the activation coefficients of `graftlm/plan/memory.py` to measured tensor bytes.

For each mode (parameterization x precision x frozen-base dtype) this builds tiny
Decoders of 1 and 2 layers over a few shapes, runs one training step under
`TensorMemoryTracker`, and fits, by least squares:
  bytes per token per layer  = a_h*h + a_kv*kv + a_i*i + a_nh*heads + a_r*r*targets + a_0
  bytes per token elsewhere  = b_h*h + b_hd*head_dim + b_0
  logits transient           = c * chunk * vocab * 4
Run it after changing the Decoder, the adapters or torch, and paste the printed table
into ACTIVATION_COEFFS. Usage: python scripts/calibrate_plan_memory.py
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from graftlm.adapters.config import AdapterConfig
from graftlm.adapters.inject import apply_adapters
from graftlm.models.config import ModelConfig
from graftlm.models.transformer import Decoder
from graftlm.objectives.logprobs import shift_targets
from graftlm.plan.measure import TensorMemoryTracker

SHAPES = [dict(), dict(h=128), dict(i=384), dict(nh=8, nkv=4), dict(nkv=4), dict(r=16), dict(B=4)]
MODES = [("full", p, None) for p in ("fp32", "bf16-autocast", "bf16")] + [
    (k, p, b) for k in ("lora", "qlora") for p in ("fp32", "bf16-autocast") for b in ("float32", "bfloat16")]


def measure(kind, precision, base, layers, h=64, i=192, nh=4, nkv=2, V=512, B=2, T=64, r=8):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=h, intermediate_size=i, num_layers=layers,
                      num_heads=nh, num_kv_heads=nkv, max_seq_len=512)
    model = Decoder(cfg)
    if precision == "bf16":
        model.to(torch.bfloat16)
    if kind != "full":
        apply_adapters(model, AdapterConfig(kind=kind, r=r, base_dtype=base))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    x = torch.randint(0, V, (B, T))

    def step(tracker=None):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = -model(x, targets=shift_targets(x)).mean()
        after_forward = tracker.live if tracker else 0
        loss.backward()
        opt.step()
        return after_forward

    step()
    tracker = TensorMemoryTracker()
    with tracker:
        tracker.track(list(model.parameters()), opt.state_dict()["state"])
        base_bytes = tracker.live
        after_forward = step(tracker)
    n_lin = sum(m.in_features + m.out_features for n, m in model.named_modules()
                if type(m).__name__ == "LoraLinear")
    return dict(act=after_forward - base_bytes, transient=tracker.peak - after_forward,
                tokens=B * T, lora_io=n_lin, cfg=cfg, r=r, V=V)


def fit(kind, precision, base):
    layer_rows, layer_y, rest_rows, rest_y, const_rows, transients = [], [], [], [], [], []
    for shape in SHAPES:
        one = measure(kind, precision, base, 1, **shape)
        shape2 = dict(shape, B=shape.get("B", 2) * 2)
        two, two_b = measure(kind, precision, base, 2, **shape), measure(kind, precision, base, 2, **shape2)
        cfg = one["cfg"]
        # act = tokens * per_token + constant (weight copies); two batch sizes separate them
        per_token_2 = (two_b["act"] - two["act"]) / (two_b["tokens"] - two["tokens"])
        const_rows.append(two["act"] - per_token_2 * two["tokens"])
        one_b = measure(kind, precision, base, 1, **shape2)
        per_token_1 = (one_b["act"] - one["act"]) / (one_b["tokens"] - one["tokens"])
        targets = 7 if kind != "full" else 0
        layer_rows.append([cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size,
                           cfg.num_heads, one["r"] * targets, 1])
        layer_y.append(per_token_2 - per_token_1)
        rest_rows.append([cfg.hidden_size, cfg.head_dim, 1])
        rest_y.append(2 * per_token_1 - per_token_2)
        transients.append(two["transient"] / (min(two["tokens"], 1024) * two["V"] * 4))
    a = np.linalg.lstsq(np.array(layer_rows, float), np.array(layer_y), rcond=None)[0]
    b = np.linalg.lstsq(np.array(rest_rows, float), np.array(rest_y), rcond=None)[0]
    return a, b, float(np.median(transients)), const_rows


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    for mode in MODES:
        a, b, c, consts = fit(*mode)
        print(f"{mode}: layer(h, kv, i, heads, r*targets, 1)={np.round(a, 2).tolist()} "
              f"rest(h, head_dim, 1)={np.round(b, 2).tolist()} logits_x={c:.2f} "
              f"constant_bytes={[int(x) for x in consts[:2]]}")
