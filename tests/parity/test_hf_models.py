"""graftlm's decoder against transformers, family by family (float32 on CPU)."""

import pytest
import torch

from graftlm.models.hf import load_model, save_model
from tests.conftest import FAMILIES, make_hf_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_model_loads_with_equal_logits(family, tmp_path):
    hf = make_hf_model(family, tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_model_loads_in_transformers_with_equal_logits(family, tmp_path):
    import transformers
    make_hf_model(family, tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(back).__name__.lower().startswith(family.replace("3", "").replace("tinyllama", "llama")
                                                  .replace("smollm2", "llama")[:5])
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_sharded_checkpoint_round_trip(tmp_path):
    import transformers
    make_hf_model("llama", tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    again = load_model(tmp_path / "sharded")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
        assert (back(ids).logits - ours(ids)).abs().max().item() <= 1e-4
