"""Bad model directories give one clear GraftError naming the file or field."""

import json
import pickle

import pytest
import torch

from graftlm.adapters.peft_format import read_adapter_config
from graftlm.errors import GraftError
from graftlm.models.hf import load_model, read_safetensors, save_model
from graftlm.models.config import preset
from graftlm.models.transformer import Decoder


@pytest.fixture
def saved(tmp_path):
    model = Decoder(preset("tiny"))
    model.init_weights()
    return save_model(model, tmp_path / "m")


def test_missing_directory(tmp_path):
    with pytest.raises(GraftError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraftError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_unsupported_architecture_lists_supported(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GraftError, match=r"'gpt2' is not supported \(supported: llama, mistral, qwen2, qwen3\)"):
        load_model(saved)


def test_remote_code_is_refused(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GraftError, match="remote code"):
        load_model(saved)


def test_an_o_proj_bias_is_named_as_what_is_unsupported(saved):
    """transformers' Llama / Qwen3 `attention_bias` adds an o_proj bias graftlm has no place
    for: refused naming the field (it said the config did not match the weights), and a
    graftlm model with q/k/v biases is not saved as a Llama that would grow a random one."""
    cfg = json.loads((saved / "config.json").read_text())
    cfg["attention_bias"] = True
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GraftError, match=r"field 'attention_bias' true is not supported for llama \(its o_proj"):
        load_model(saved)
    with pytest.raises(GraftError, match="set model_type: qwen2 to save this model"):
        save_model(Decoder(preset("tiny", attention_bias=True)), saved.parent / "biased")


def test_wrong_field_type_names_the_field(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["hidden_size"] = "64"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GraftError, match="config.json: field 'hidden_size' must be an integer"):
        load_model(saved)


def test_invalid_json_names_the_line(saved):
    (saved / "config.json").write_text('{\n "model_type": "llama",\n oops\n}')
    with pytest.raises(GraftError, match=r"config.json:3: invalid JSON"):
        load_model(saved)


def test_json_that_is_not_an_object_is_named(saved, tmp_path):
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(GraftError, match=r"config.json: expected a JSON object, got list"):
        load_model(saved)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('"lora"')
    with pytest.raises(GraftError, match=r"adapter_config.json: expected a JSON object, got str"):
        read_adapter_config(adapter)


def test_binary_json_files_are_named_not_decoded(saved, tmp_path):
    # A weights file copied over a JSON one: one line naming it, not a UnicodeDecodeError.
    (saved / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(GraftError, match=r"config.json: not a UTF-8 text file"):
        load_model(saved)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(GraftError, match=r"adapter_config.json: not a UTF-8 text file"):
        read_adapter_config(adapter)


def test_truncated_safetensors(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GraftError, match="model.safetensors: corrupt or truncated"):
        load_model(saved)


def test_header_larger_than_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10_000).to_bytes(8, "little") + b"{}")
    with pytest.raises(GraftError, match="header of 10000 bytes is larger than the file"):
        read_safetensors(path)


def test_an_empty_file_is_called_empty(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(GraftError, match=r"empty.safetensors: empty file \(0 bytes\), not a safetensors file$"):
        read_safetensors(tmp_path / "empty.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(GraftError, match=r"short.safetensors: corrupt safetensors file \(2 bytes, shorter"):
        read_safetensors(tmp_path / "short.safetensors")


def test_non_finite_weights_are_refused_naming_the_file_and_tensor(saved):
    """A corrupted body (no checksum in safetensors) loaded silently: generate printed
    nothing and sft blamed the learning rate."""
    from safetensors.torch import load_file, save_file
    path = saved / "model.safetensors"
    state = load_file(path)
    name = "model.layers.1.mlp.up_proj.weight"
    state[name].view(-1)[:7] = float("nan")
    state[name].view(-1)[7:10] = float("-inf")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(GraftError, match=rf"model.safetensors: tensor '{name}' has 10 non-finite values "
                                         rf"\(NaN or Inf\) of {state[name].numel():,}: the file is corrupt"):
        load_model(saved)


def test_overlapping_offsets(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 12)
    with pytest.raises(GraftError, match="overlap.safetensors: corrupt"):
        read_safetensors(path)


def test_pickle_weights_are_refused_and_never_run(saved, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(GraftError, match="pickle"):
        load_model(saved)
    assert not marker.exists()


def test_shape_mismatch_names_the_tensor(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 32
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GraftError, match="gate_proj.weight' has shape"):
        load_model(saved)


def test_round_trip_is_exact(saved):
    model = load_model(saved)
    again = load_model(save_model(model, saved.parent / "again"))
    ids = torch.randint(0, 512, (2, 9))
    assert torch.equal(model(ids), again(ids))


def test_bad_shard_index_names_the_file(tmp_path):
    model = Decoder(preset("tiny"))
    model.init_weights()
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = out / "model.safetensors.index.json"
    assert len(json.loads(index.read_text())["weight_map"]) > 1 and load_model(out) is not None
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(GraftError, match=r"index.json: not a valid shard index \(no 'weight_map' object\)"):
        load_model(out)
    index.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(GraftError, match=r"index.json: not a UTF-8 text file"):
        load_model(out)


@pytest.mark.parametrize("command", ["sft", "dpo", "grpo"])
def test_fine_tuning_a_directory_without_weights_is_refused(saved, command, capsys):
    """config.json + tokenizer but no safetensors trained from random weights without a word."""
    from graftlm.cli import main
    (saved / "model.safetensors").unlink()
    assert main([command, "--model", str(saved), "--data", "rows.jsonl", "--out", str(saved.parent)]) == 2
    err = capsys.readouterr().err
    assert f"{saved}: no model.safetensors" in err and f"{command} fine-tunes a model's weights" in err
    (saved / "pytorch_model.bin").write_bytes(pickle.dumps({"never": "read"}))
    assert main([command, "--model", str(saved), "--data", "rows.jsonl", "--out", str(saved.parent)]) == 2
    assert "has only pickle weights" in capsys.readouterr().err


def test_pretraining_a_config_directory_says_it_starts_from_random_weights(saved):
    from graftlm.runs import _check_weightless_directory, run_config_class
    (saved / "model.safetensors").unlink()
    notes = []
    _check_weightless_directory(run_config_class("clm")(model=str(saved), data="shards"), warn=notes.append)
    assert notes == [f"note: {saved} has a config but no weights: pre-training starts from random weights "
                     "in its architecture"]
    (saved / "pytorch_model.bin").write_bytes(b"x")  # weights there, as a pickle: refused, not ignored
    with pytest.raises(GraftError, match="has only pickle weights"):
        _check_weightless_directory(run_config_class("clm")(model=str(saved), data="shards"))
