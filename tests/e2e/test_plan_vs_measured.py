"""`graft plan` against measurement: real training steps of the trainer on CPU.

For full fine-tuning, LoRA and QLoRA on tiny models of three sizes, one optimizer step
of `graftlm.trainer.Trainer` (SFT objective, fused AdamW, gradient clipping) runs under
`TensorMemoryTracker` and `FlopCounterMode`:
- peak memory: the largest total of live tensor bytes during the step (weights,
  optimizer states, gradients, activations, temporaries), after a first step has
  created the optimizer states; the plan predicts the same quantity (plan/memory.py);
- FLOPs: the matmul FLOPs of forward + backward, counted by torch, against the plan's
  executed FLOPs (model FLOPs plus the logits the chunked log-probs recompute). Torch
  has no formula for the CPU flash-attention kernel, so we add one (causal attention
  multiplies each query with its (T + 1) / 2 keys on average, the convention of the
  shared FLOPs function), nor for the in-place `addmm_` of the fused LoRA linear.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from graftlm.adapters.config import AdapterConfig
from graftlm.adapters.inject import apply_adapters
from graftlm.data.loader import ResumableLoader
from graftlm.models.config import ModelConfig
from graftlm.models.transformer import Decoder
from graftlm.objectives.sft import SFTObjective
from graftlm.optim import OptimConfig
from graftlm.plan.compute import executed_flops_per_token
from graftlm.plan.measure import TensorMemoryTracker
from graftlm.plan.memory import RunShape, memory_breakdown
from graftlm.trainer import TrainConfig, Trainer

SIZES = {
    "xs": dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2),
    "s": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4, num_kv_heads=2),
    "m": dict(vocab_size=1024, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6, num_kv_heads=2),
}
REGIMES = {"full": None, "lora": "lora", "qlora": "qlora"}


class RandomTokens:
    def __init__(self, vocab: int, seq_len: int, rows: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (rows, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def _causal_flash_flops(query_shape, key_shape, *args, **kwargs) -> int:
    b, heads, t_q, d = query_shape
    t_k = key_shape[2]
    return 2 * 2 * b * heads * d * t_q * (t_k + 1) // 2


def _causal_flash_backward_flops(grad_out_shape, query_shape, key_shape, *args, **kwargs) -> int:
    return 2 * _causal_flash_flops(query_shape, key_shape)


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# Operators torch's FlopCounterMode has no formula for: the CPU flash-attention kernel,
# and the in-place addmm_ the fused LoRA linear adds its update with.
UNCOUNTED_BY_TORCH = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _causal_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _causal_flash_backward_flops,
    torch.ops.aten.addmm_: _addmm_inplace_flops,
}


def measure(size: str, regime: str, precision: str, batch: int = 4, seq_len: int = 64):
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=seq_len, **SIZES[size])
    model = Decoder(cfg)
    model.init_weights()
    if REGIMES[regime]:
        apply_adapters(model, AdapterConfig(kind=regime, r=8, base_dtype="bfloat16"))
    loader = ResumableLoader(RandomTokens(cfg.vocab_size, seq_len), batch)
    train = TrainConfig(max_steps=10, batch_size=batch, seq_len=seq_len, precision=precision)
    trainer = Trainer(model, SFTObjective(), loader, train, OptimConfig(), device=torch.device("cpu"),
                      trainable_only=regime != "full", tensorboard=False)
    trainer.train_step()  # creates the optimizer states
    tracker = TensorMemoryTracker()
    with tracker:
        tracker.track(list(model.parameters()), trainer.optimizer.state_dict()["state"])
        assert trainer.train_step() is not None
    counter = FlopCounterMode(display=False, custom_mapping=UNCOUNTED_BY_TORCH)
    with counter:
        trainer.train_step()
    shape = RunShape(model=cfg, objective="sft", parameterization=regime, precision=precision,
                     batch_size=batch, seq_len=seq_len, lora_r=8, lora_base_dtype="bfloat16", device_type="cpu")
    return shape, tracker.peak, counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("regime", list(REGIMES))
def test_predicted_peak_memory_and_flops_match_a_measured_step(size, regime):
    warnings.filterwarnings("ignore")
    precision = "bf16-autocast" if size == "s" else "fp32"
    shape, measured_peak, counted_flops = measure(size, regime, precision)
    predicted = memory_breakdown(shape)
    assert abs(predicted.peak - measured_peak) / measured_peak < 0.15, \
        f"{regime}/{size}: predicted peak {predicted.peak} vs measured {measured_peak} ({predicted})"
    predicted_flops = executed_flops_per_token(shape) * shape.tokens
    assert abs(predicted_flops - counted_flops) / counted_flops < 0.05, \
        f"{regime}/{size}: predicted {predicted_flops:.4g} FLOPs vs counted {counted_flops:.4g}"


def test_a_reward_models_flops_count_its_score_head_not_the_vocabulary():
    # A vocabulary 4x the blocks' size: counting the LM head the reward model does not have
    # (as runs and the plan did) reads several times the FLOPs, and MFU with them.
    from graftlm.models.heads import ScalarHeadModel
    cfg = ModelConfig(max_seq_len=64, **{**SIZES["xs"], "vocab_size": 4096})
    decoder = Decoder(cfg)
    decoder.init_weights()
    model = ScalarHeadModel.from_decoder(decoder, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(1, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False, custom_mapping=UNCOUNTED_BY_TORCH)
    with counter:
        model(ids).sum().backward()
    shape = RunShape(model=cfg, seq_len=64, precision="fp32", device_type="cpu", scalar_head=True)
    predicted = executed_flops_per_token(shape) * ids.numel()
    counted = counter.get_total_flops()
    assert abs(predicted - counted) / counted < 0.05, f"predicted {predicted:.4g} FLOPs vs counted {counted:.4g}"
