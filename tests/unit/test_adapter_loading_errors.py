"""Loading adapters that do not fit: a QLoRA adapter beside others on one base, a typo
among target names, a malformed `adapter_config.json`, DoRA without its magnitudes, a
tensor for a module the base lacks. Each is one `GraftError` naming what is wrong."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftlm.adapters as A
from graftlm.adapters import qlora
from graftlm.errors import ConfigError, GraftError
from graftlm.models import Decoder, ModelConfig

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def tiny():
    """The same base every call; wide enough for NF4's blocks (QLoRA)."""
    model = Decoder(ModelConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2,
                                num_heads=4, num_kv_heads=2, max_seq_len=32))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def saved_adapter(out, kind="lora", **fields):
    """An adapter of `kind` trained (randomized) on `tiny()`, saved in PEFT's format."""
    model = A.apply_adapters(tiny(), A.AdapterConfig(kind=kind, r=4, **fields))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in A.adapter_params(model):
            param.add_(torch.randn(param.shape, generator=g) * 0.3)
    return A.save_adapter(model, out)


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    for field, value in changes.items():
        if value is None:
            del config[field]
        else:
            config[field] = value
    path.write_text(json.dumps(config))
    return path


def as_made_by_peft(adapter_dir, rename=None):
    """Drop graftlm's metadata (kind, base identity), renaming tensors by `rename`."""
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = {(rename(key) if rename else key): t for key, t in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})


def nf4_weights(model):
    return sum(qlora.is_nf4(p) for p in model.parameters())


# --- QLoRA and other adapters on one base -------------------------------------------------

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {kind: saved_adapter(root / kind, kind) for kind in ("lora", "dora", "qlora")}


@pytest.mark.parametrize("other", ["lora", "dora"])
def test_a_qlora_adapter_beside_another_is_refused_and_leaves_the_base_as_it_was(adapters, other):
    model = A.load_adapter(tiny(), adapters[other], name="first")
    with torch.no_grad():
        before = model(IDS)
    with pytest.raises(GraftError) as refused:
        A.load_adapter(model, adapters["qlora"], name="q")
    message = str(refused.value)
    assert message.startswith(f"{adapters['qlora']}: adapter 'q' is a QLoRA adapter, which quantizes the model's "
                              f"base to 4-bit NF4 in place, but {'DoRA' if other == 'dora' else 'LoRA'} adapter "
                              "'first' is on that base: the 4-bit base would change its outputs")
    assert "a separate `graft serve`" in message and "`graft merge`" in message
    assert A.loaded_adapters(model) == ["first"] and nf4_weights(model) == 0
    with torch.no_grad():
        assert torch.equal(model(IDS), before)


def test_an_adapter_trained_on_the_full_base_is_refused_on_a_quantized_one(adapters):
    model = A.load_adapter(tiny(), adapters["qlora"], name="q")
    with pytest.raises(GraftError, match=r"lora: adapter 'l' is a LoRA adapter, but this model's base is quantized "
                                         r"to 4-bit NF4 for QLoRA adapter 'q': an adapter trained on the "
                                         r"full-precision base would run on 4-bit weights; .*separate `graft serve`"):
        A.load_adapter(model, adapters["lora"], name="l")
    A.unload_adapter(model, "q")  # the base stays NF4
    with pytest.raises(GraftError, match=r"quantized to 4-bit NF4 by a QLoRA adapter loaded before"):
        A.apply_adapters(model, A.AdapterConfig(kind="dora", r=2), name="d")
    assert A.loaded_adapters(model) == []


def test_several_qlora_adapters_share_one_quantized_base(adapters):
    model = A.load_adapter(tiny(), adapters["qlora"], name="q1")
    A.load_adapter(model, adapters["qlora"], name="q2")
    A.apply_adapters(model, A.AdapterConfig(kind="qlora", r=2), name="q3")
    assert A.loaded_adapters(model) == ["q1", "q2", "q3"]


def test_apply_adapters_refuses_qlora_beside_several_others():
    model = A.apply_adapters(tiny(), A.AdapterConfig(r=2), name="a")
    A.apply_adapters(model, A.AdapterConfig(kind="dora", r=2), name="b")
    with pytest.raises(GraftError, match=r"^adapters: adapter 'c' is a QLoRA adapter, .*but adapters 'a' \(LoRA\), "
                                         r"'b' \(DoRA\) are on that base: .* change their outputs"):
        A.apply_adapters(model, A.AdapterConfig(kind="qlora", r=2), name="c")
    assert nf4_weights(model) == 0


# --- target names ---------------------------------------------------------------------------

def test_a_typo_among_target_names_is_named_with_the_layers_there_are():
    with pytest.raises(ConfigError, match=r"^config field 'adapter.target_modules': 'v_prj' matches no linear layer "
                                          r"of the model \(its linear layers: q_proj, k_proj, v_proj, o_proj, "
                                          r"gate_proj, up_proj, down_proj, lm_head\)$"):
        A.apply_adapters(tiny(), A.AdapterConfig(target_modules=["q_proj", "v_prj"]))


def test_a_target_name_trained_in_full_is_no_typo():
    model = A.apply_adapters(tiny(), A.AdapterConfig(target_modules=["q_proj", "lm_head"],
                                                     modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, A.lora.ModulesToSave)


# --- a malformed adapter_config.json --------------------------------------------------------

@pytest.mark.parametrize("changes, error", [
    (dict(r=None), "field 'r' is missing"),
    (dict(r="sixteen"), "field 'r' must be a positive integer, got 'sixteen'"),
    (dict(r=0), "field 'r' must be a positive integer, got 0"),
    (dict(r=4.5), "field 'r' must be a positive integer, got 4.5"),
    (dict(lora_alpha="big"), "field 'lora_alpha' must be a positive number, got 'big'"),
    (dict(lora_dropout=1.5), r"field 'lora_dropout' must be a number in \[0, 1\), got 1.5"),
    (dict(use_rslora="yes"), "field 'use_rslora' must be true or false, got 'yes'"),
    (dict(target_modules=5), "field 'target_modules' must be a list of names or one regex, got 5"),
    (dict(target_modules="(q_proj"), "invalid regex"),
    (dict(modules_to_save="lm_head"), "field 'modules_to_save' must be a list of names, got 'lm_head'"),
])
def test_a_bad_config_field_is_named_with_its_file(tmp_path, changes, error):
    path = edit_config(saved_adapter(tmp_path / "ad"), **changes)
    with pytest.raises(GraftError, match=f"^{re.escape(str(path))}: .*{error}") as refused:
        A.load_adapter(tiny(), tmp_path / "ad")
    assert "a different base" not in str(refused.value)


# --- DoRA, and tensors the base has no module for ------------------------------------------

def test_use_dora_without_dora_is_refused(tmp_path):
    path = edit_config(saved_adapter(tmp_path / "ad"), use_dora=True)
    with pytest.raises(GraftError, match=f"^{re.escape(str(path))}: field 'use_dora' is true, but 'graftlm_kind' "
                                         "in its weights' metadata says lora$"):
        A.load_adapter(tiny(), tmp_path / "ad")
    as_made_by_peft(tmp_path / "ad")  # PEFT's own: the missing magnitudes tell
    with pytest.raises(GraftError, match=r"adapter_model.safetensors: adapter_config.json says 'use_dora': true, "
                                         r"but tensor '.*lora_A.weight' has no DoRA magnitude beside it"):
        A.load_adapter(tiny(), tmp_path / "ad")


def test_dora_magnitudes_in_an_adapter_that_is_not_dora_are_refused(tmp_path):
    saved_adapter(tmp_path / "ad", "dora")
    as_made_by_peft(tmp_path / "ad")
    edit_config(tmp_path / "ad", use_dora=False)
    with pytest.raises(GraftError, match=r"tensor '.*lora_magnitude_vector' is a DoRA magnitude, but "
                                         r"adapter_config.json does not say 'use_dora': true"):
        A.load_adapter(tiny(), tmp_path / "ad")


def test_a_tensor_for_a_module_the_base_lacks_is_named_as_missing(tmp_path):
    saved_adapter(tmp_path / "ad", target_modules=["q_proj"])
    as_made_by_peft(tmp_path / "ad", rename=lambda key: key.replace("layers.1.self_attn.q_", "layers.1.self_attn.qq_"))
    with pytest.raises(GraftError, match=r"names module 'model.layers.1.self_attn.qq_proj', which this base model "
                                         r"does not have"):
        A.load_adapter(tiny(), tmp_path / "ad")


# --- the kind's choices ---------------------------------------------------------------------

def test_a_bad_adapter_kind_lists_full_among_the_choices():
    from graftlm.cli import build_parser
    from graftlm.train_cli import config_for
    args = build_parser().parse_args(["sft", "--model", "tiny", "--data", "d.jsonl", "--adapter", "Lora"])
    with pytest.raises(ConfigError, match=r"expected one of lora, qlora, dora, or full .*got 'Lora'"):
        config_for(args)


def test_a_model_directory_given_as_an_adapter_says_to_pass_it_as_the_model(tmp_path):
    from graftlm.models.hf import save_model
    save_model(tiny(), tmp_path / "model")
    with pytest.raises(GraftError, match=r"model.*is a model directory, not an adapter .*pass it as --model"):
        A.load_adapter(tiny(), tmp_path / "model")
