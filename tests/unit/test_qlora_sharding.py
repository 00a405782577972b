"""QLoRA's NF4 weights under FSDP2: torchao splits each packed inner tensor evenly over
the ranks, so the quantization leaves a multiple of 8 scaler blocks where it can, and a
layer that cannot be split is refused before wrapping with a one-line error naming it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graftlm.adapters.qlora import NF4_BLOCK, _scaler_block, check_shardable, quantize_linear_
from graftlm.errors import GraftError


@pytest.mark.parametrize("shape", [(64, 64), (176, 64), (64, 176), (4096, 4096), (11008, 4096), (512, 64)])
def test_scaler_blocks_split_over_up_to_eight_ranks(shape):
    n_blocks = shape[0] * shape[1] // NF4_BLOCK
    size = _scaler_block(n_blocks)
    assert size <= 256 and n_blocks % size == 0
    assert (n_blocks // size) % 8 == 0, (shape, size)


def test_large_layers_keep_qloras_scaler_block_of_256():
    assert _scaler_block(4096 * 4096 // NF4_BLOCK) == 256


def quantized(out_features: int, in_features: int) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=False)
    quantize_linear_(layer)
    return layer


def test_shardable_weight_passes_and_an_unshardable_one_is_named():
    check_shardable(quantized(64, 64).weight, 2, "layers.0.self_attn.q_proj")
    check_shardable(quantized(64, 64).weight, 8, "layers.0.self_attn.q_proj")
    with pytest.raises(GraftError) as error:
        check_shardable(quantized(64, 64).weight, 3, "layers.0.mlp.up_proj")
    message = str(error.value)
    assert "layers.0.mlp.up_proj" in message and "3 ranks" in message and "\n" not in message


def test_fsdp_wrap_refuses_an_unshardable_qlora_model_before_sharding():
    from graftlm import parallel
    from graftlm.adapters import AdapterConfig, apply_adapters
    from graftlm.models.config import preset
    from graftlm.models.transformer import Decoder

    model = Decoder(preset("tiny"))
    apply_adapters(model, AdapterConfig(kind="qlora", r=4))
    parallel._check_nf4_shardable(model, 2)  # the tiny preset splits over 2 ranks
    with pytest.raises(GraftError, match="qlora under --parallel fsdp: layer 'layers.0.self_attn"):
        parallel._check_nf4_shardable(model, 3)
