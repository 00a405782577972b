"""graftlm adapters against PEFT 0.21 on the same tiny transformers model (float32, CPU).

Every adapter gets random non-zero B (and magnitudes) so that a wrong scale, a skipped
layer or a swapped tensor shows in the logits.
"""

import json

import peft
import pytest
import torch

import graftlm.adapters as A
from graftlm.errors import GraftError
from graftlm.models.hf import load_model
from tests.conftest import make_hf_model

IDS = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(3))


def _randomize_graft(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.adapter_params(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _randomize_peft(peft_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("cfg", [
    dict(kind="lora", r=4, alpha=8),
    dict(kind="dora", r=4, alpha=8),
    dict(kind="lora", r=8, alpha=4, rslora=True),
    dict(kind="lora", r=4, alpha=8, target_modules=[r".*\.(q_proj|v_proj)"]),
    dict(kind="lora", r=4, alpha=8, target_modules=["up_proj", "o_proj"], modules_to_save=["lm_head"]),
], ids=["lora", "dora", "rslora", "regex", "names+lm_head"])
def test_graftlm_adapter_loads_in_peft(cfg, tmp_path):
    hf = make_hf_model("qwen2", tmp_path / "hf")
    ours = A.apply_adapters(load_model(tmp_path / "hf"), A.AdapterConfig(**cfg))
    _randomize_graft(ours)
    A.save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "hf"))
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    # graftlm's own fields are in the weights' metadata, not among PEFT's (which warns of unknown ones)
    assert not [key for key in saved if key.startswith("graftlm")]
    assert A.read_adapter_config(tmp_path / "ad")["graftlm_base_identity"]["weights_sample"]
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    assert (_logits(theirs) - _logits(ours)).abs().max().item() <= 1e-4
    # Same layers targeted as PEFT's own matching of the saved target_modules.
    theirs_targets = {n.removeprefix("base_model.model.model.").removeprefix("base_model.model.")
                      for n, _ in theirs.named_modules() if n.endswith("lora_A")}
    ours_targets = {n.removesuffix(".lora_A") for n, _ in ours.named_modules() if n.endswith("lora_A")}
    assert {t.removesuffix(".lora_A") for t in theirs_targets} == ours_targets


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_made_adapter_loads_in_graftlm(use_dora, tmp_path):
    hf = make_hf_model("llama", tmp_path / "hf")
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_dora=use_dora,
                          task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, cfg)
    _randomize_peft(theirs)
    theirs.eval().save_pretrained(tmp_path / "ad")
    ours = A.load_adapter(load_model(tmp_path / "hf"), tmp_path / "ad")
    n_lora = sum(1 for n, _ in ours.named_modules() if n.endswith("lora_A"))
    assert n_lora == 2 * 7  # all-linear: 7 linear layers per block, never lm_head
    assert (_logits(theirs) - _logits(ours)).abs().max().item() <= 1e-4


def test_peft_adapter_made_on_another_local_directory_is_named(tmp_path, capsys):
    import shutil

    import transformers
    make_hf_model("llama", tmp_path / "hf")
    shutil.copytree(tmp_path / "hf", tmp_path / "copy")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # PEFT records this directory
    peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"]
    capsys.readouterr()
    A.load_adapter(load_model(tmp_path / "hf"), tmp_path / "ad")
    assert "warning" not in capsys.readouterr().err
    A.load_adapter(load_model(tmp_path / "copy"), tmp_path / "ad")  # loads, as in PEFT, but is named
    assert (f"names its base model as {(tmp_path / 'hf').resolve()}, but it is loaded onto the model in "
            f"{(tmp_path / 'copy').resolve()}") in capsys.readouterr().err


def test_all_linear_and_rslora_match_peft_config(tmp_path):
    hf = make_hf_model("llama", tmp_path / "hf")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True,
                                                     target_modules="all-linear"))
    _randomize_peft(theirs, seed=5)
    theirs.eval().save_pretrained(tmp_path / "ad")
    ours = A.load_adapter(load_model(tmp_path / "hf"), tmp_path / "ad")
    layer = ours.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(4 / 8 ** 0.5)
    assert (_logits(theirs) - _logits(ours)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_matches_peft_merge_and_unmerge_restores(kind, tmp_path):
    hf = make_hf_model("llama", tmp_path / "hf")
    base = load_model(tmp_path / "hf")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    ours = A.apply_adapters(base, A.AdapterConfig(kind=kind, r=4, alpha=8))
    _randomize_graft(ours)
    adapted = _logits(ours)
    A.merge(ours)
    assert (_logits(ours) - adapted).abs().max().item() <= 1e-4
    A.unmerge(ours)
    for name, layer in ours.named_modules():
        if hasattr(layer, "base_layer"):
            assert (layer.base_layer.weight - base_state[name + ".weight"]).abs().max().item() <= 1e-6
    A.save_adapter(ours, tmp_path / "ad")
    merged_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").merge_and_unload()
    merged_ours = A.merge_and_unload(ours)
    assert not A.has_adapters(merged_ours) and type(merged_ours).__name__ == "Decoder"
    assert (_logits(merged_ours) - adapted).abs().max().item() <= 1e-4
    assert (_logits(merged_peft) - _logits(merged_ours)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("extra, message", [
    (dict(target_modules=["q_proj"], lora_bias=True), "field 'lora_bias' is True; graftlm supports only False"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "LoRA on an embedding layer"),
], ids=["lora_bias", "embedding"])
def test_peft_features_graftlm_lacks_are_named(extra, message, tmp_path):
    hf = make_hf_model("llama", tmp_path / "hf")
    peft.get_peft_model(hf, peft.LoraConfig(r=4, task_type="CAUSAL_LM", **extra)).save_pretrained(tmp_path / "ad")
    with pytest.raises(GraftError, match=message):
        A.load_adapter(load_model(tmp_path / "hf"), tmp_path / "ad")
