"""What loading or applying an adapter says about its base: a PEFT adapter recorded on
another local directory, an architecture mismatch by field, a bf16 base on a CPU
without fast bf16."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

import graftlm.adapters as A
from graftlm.adapters import inject
from graftlm.errors import GraftError
from graftlm.models.hf import load_model, save_model
from tests.unit.test_adapters import tiny


def _peft_like(model, out, base_model_name_or_path):
    """An adapter as PEFT writes it: no graftlm identity in the weights' metadata."""
    A.apply_adapters(model, A.AdapterConfig(r=4))
    A.save_adapter(model, out)
    weights = out / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_model_name_or_path
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_load_model_records_its_directory(tmp_path):
    save_model(tiny(), tmp_path / "base")
    assert load_model(tmp_path / "base").source_dir == (tmp_path / "base").resolve()


def test_a_peft_adapter_recorded_on_another_local_directory_is_named_and_still_loads(tmp_path, capsys,
                                                                                  monkeypatch):
    save_model(tiny(seed=0), tmp_path / "base")
    save_model(tiny(seed=1), tmp_path / "other")  # same shapes, other weights: shapes cannot tell
    _peft_like(load_model(tmp_path / "other"), tmp_path / "ad", str(tmp_path / "other"))
    model = A.load_adapter(load_model(tmp_path / "base"), tmp_path / "ad")
    assert A.loaded_adapters(model) == ["default"]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert (f"names its base model as {(tmp_path / 'other').resolve()}, but it is loaded onto the model in "
            f"{(tmp_path / 'base').resolve()}") in err
    # The same directory by another spelling (relative, through a link) is the same base.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "base")
    for same in ("base", "./link", str(tmp_path / "link")):
        _peft_like(load_model(tmp_path / "base"), tmp_path / "ad", same)
        A.load_adapter(load_model(tmp_path / "link"), tmp_path / "ad")
        assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("recorded", ["Qwen/Qwen2.5-0.5B", None, "", "/nonexistent/model"],
                         ids=["hub-id", "null", "empty", "missing-dir"])
def test_a_peft_adapter_recorded_on_a_hub_id_or_nothing_says_nothing(recorded, tmp_path, capsys):
    save_model(tiny(), tmp_path / "base")
    _peft_like(load_model(tmp_path / "base"), tmp_path / "ad", recorded)
    A.load_adapter(load_model(tmp_path / "base"), tmp_path / "ad")
    assert capsys.readouterr().err == ""


def test_a_graftlm_adapter_checks_its_identity_not_the_directory(tmp_path, capsys):
    save_model(tiny(), tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "copy")
    model = A.apply_adapters(load_model(tmp_path / "base"), A.AdapterConfig(r=4))
    A.save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    A.load_adapter(load_model(tmp_path / "copy"), tmp_path / "ad")  # the same weights elsewhere
    assert capsys.readouterr().err == ""


def test_an_architecture_mismatch_names_the_fields(tmp_path):
    model = A.apply_adapters(tiny(), A.AdapterConfig(r=4))
    A.save_adapter(model, tmp_path / "ad")
    with pytest.raises(GraftError, match=r"different architecture \('graftlm_base_identity.architecture'\): "
                                         r"intermediate_size 128 \(adapter's base\) vs 192 \(this model\)$"):
        A.load_adapter(tiny(intermediate_size=192), tmp_path / "ad")
    with pytest.raises(GraftError, match=r"hidden_size 64 \(adapter's base\) vs 128 \(this model\), "
                                         r"intermediate_size 128 \(adapter's base\) vs 256 \(this model\), "
                                         r"head_dim 16 \(adapter's base\) vs 32 \(this model\)$"):
        A.load_adapter(tiny(hidden_size=128, intermediate_size=256), tmp_path / "ad")
    with pytest.raises(GraftError, match=r"tie_embeddings false \(adapter's base\) vs true \(this model\)"):
        A.load_adapter(tiny(tie_embeddings=True), tmp_path / "ad")


def test_an_adapter_recorded_with_only_the_hash_keeps_the_hash_message(tmp_path):
    model = A.apply_adapters(tiny(), A.AdapterConfig(r=4))
    A.save_adapter(model, tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    old = {key: value for key, value in A.base_identity(model).items() if key != "architecture"}
    save_file(load_file(weights), weights, metadata={"format": "pt", "graftlm_base_identity": json.dumps(old)})
    A.load_adapter(tiny(), tmp_path / "ad")  # its own base still takes it
    with pytest.raises(GraftError, match=r"'graftlm_base_identity.config_sha256' does not match this base model "
                                         r"\(the adapter was trained on a base with a different architecture: "
                                         r"[0-9a-f]{12} vs [0-9a-f]{12}\)"):
        A.load_adapter(tiny(intermediate_size=192), tmp_path / "ad")


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(inject, "_SAID", set(), raising=False)


def test_a_bf16_base_on_a_cpu_without_fast_bf16_is_warned_of_once(monkeypatch, capsys, fresh_warnings):
    monkeypatch.setattr("graftlm.placement.fast_bfloat16", lambda device_type: False)
    for name in ("a", "b"):
        A.apply_adapters(tiny(), A.AdapterConfig(r=4, base_dtype="bfloat16"), name=name)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert ("warning: --adapter.base-dtype bfloat16: this CPU has no AVX-512, AMX or Arm BF16, so every step runs "
            "many times slower than with a float32 base (its bf16 matrix products, 50x slower on an AVX2 CPU); "
            "--adapter.base-dtype auto or float32 keeps the frozen base in float32, at twice its memory") in err


@pytest.mark.parametrize("base_dtype, precision, fast", [
    ("bfloat16", None, True),  # a CPU with AVX-512 / AMX computes bf16 at speed
    ("float32", None, False),
    ("auto", "fp32", False),  # auto is float32 where the run computes in float32
    ("auto", "bf16-autocast", False),  # a bf16 run: resolve_precision has said it for --train.precision
    ("bfloat16", "bf16-autocast", False),
])
def test_no_bf16_base_warning_where_it_costs_nothing_or_was_said(base_dtype, precision, fast, monkeypatch, capsys,
                                                                 fresh_warnings):
    monkeypatch.setattr("graftlm.placement.fast_bfloat16", lambda device_type: fast)
    A.apply_adapters(tiny(), A.AdapterConfig(r=4, base_dtype=base_dtype), precision=precision)
    assert capsys.readouterr().err == ""
