"""`graft merge`: an HF model that transformers loads, with the held-out loss reported."""

import re

import pytest
import torch

import graftlm.adapters as A
from graftlm.adapters_cli import heldout_loss
from graftlm.cli import main
from graftlm.models.hf import load_model
from graftlm.tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import SHARED_DATA, make_hf_model


@pytest.fixture
def base_dir(tmp_path):
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:6000]
    make_hf_model("llama", tmp_path / "base", vocab_size=320)
    train_tokenizer(iter([text]), vocab_size=320).save(tmp_path / "base")
    return tmp_path / "base"


def _adapter(base_dir, out, kind):
    model = A.apply_adapters(load_model(base_dir), A.AdapterConfig(kind=kind, r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in A.adapter_params(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    A.save_adapter(model, out, base_model_name_or_path=str(base_dir))
    return model


@pytest.mark.parametrize("kind", ["lora", pytest.param("qlora", marks=pytest.mark.slow)])
def test_graft_merge_writes_a_transformers_model(kind, base_dir, tmp_path, capsys):
    import transformers
    model = _adapter(base_dir, tmp_path / "ad", kind)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(ids)
    eval_file = tmp_path / "heldout.txt"
    eval_file.write_text((SHARED_DATA / "tinyshakespeare.txt").read_text()[-4000:])
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "merged"), "--eval-data", str(eval_file)]) == 0
    printed = capsys.readouterr().out
    as_trained, _, change = _losses(printed, "float32")
    assert str(eval_file) in printed and abs(change) < (1e-4 if kind == "lora" else 0.05)
    assert ("NF4 base dequantized" in printed) == (kind == "qlora")
    # A QLoRA adapter is merged into the 4-bit base it was trained on, so the change above
    # is about 0 by construction; the report also gives the adapter on the full-precision
    # base, which merging into the original weights would give instead.
    assert ("4-bit base + adapter (as trained)" in printed) == (kind == "qlora")
    # The base's own loss beside them: whether the adapter helped on this text.
    said = float(re.search(r"base alone ([0-9.]+);", printed).group(1))
    assert said == pytest.approx(_heldout_loss(load_model(base_dir), base_dir, eval_file), abs=1e-4)
    assert said != pytest.approx(as_trained, abs=1e-3)
    if kind == "qlora":
        on_full_base = _heldout_loss(A.load_adapter(load_model(base_dir), tmp_path / "ad", kind="lora"), base_dir,
                                     eval_file)
        said = float(re.search(r"the adapter on the full-precision base[^:]*: ([0-9.]+)", printed).group(1))
        assert said == pytest.approx(on_full_base, abs=1e-4) and said != pytest.approx(as_trained, abs=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        merged = hf(ids).logits
    tolerance = 1e-4 if kind == "lora" else 0.05 * adapted.abs().max().item()
    assert (merged - adapted).abs().max().item() <= tolerance


def _losses(printed: str, dtype: str) -> tuple[float, float, float]:
    """(as trained, as written, change) from graft merge's held-out loss line."""
    found = re.search(rf"\(as trained\) ([0-9.]+) -> merged, as written \({dtype}\) ([0-9.]+) \(change ([-+][0-9.]+)\)",
                      printed)
    return tuple(map(float, found.groups()))


def _heldout_loss(model, base_dir, eval_file) -> float:
    """The loss graft merge measures: its default 8192 tokens, in rows of the base's context."""
    tokens = load_tokenizer(base_dir).encode(eval_file.read_text())[:8192]
    return heldout_loss(model, tokens, load_model(base_dir).config.max_seq_len)


def test_graft_merge_reports_the_loss_of_the_weights_it_writes(base_dir, tmp_path, capsys):
    """With --dtype bfloat16 it reported the float32 merged model's loss, not that of the
    bf16 weights it wrote: the model written is now read back and measured."""
    _adapter(base_dir, tmp_path / "ad", "lora")
    eval_file = tmp_path / "heldout.txt"
    eval_file.write_text((SHARED_DATA / "tinyshakespeare.txt").read_text()[-4000:])
    merge = ["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "ad"), "--eval-data", str(eval_file)]
    assert main([*merge, "--out", str(tmp_path / "m32")]) == 0
    _, in_float32, _ = _losses(capsys.readouterr().out, "float32")
    assert main([*merge, "--out", str(tmp_path / "m16"), "--dtype", "bfloat16"]) == 0
    as_trained, as_written, change = _losses(capsys.readouterr().out, "bfloat16")
    assert {p.dtype for p in load_model(tmp_path / "m16", dtype=None).parameters()} == {torch.bfloat16}
    assert as_written == pytest.approx(_heldout_loss(load_model(tmp_path / "m16"), base_dir, eval_file), abs=1e-4)
    assert as_written != in_float32 and change == pytest.approx(as_written - as_trained, abs=2e-4)


def test_graft_merge_default_text_and_wrong_base(base_dir, tmp_path, capsys):
    _adapter(base_dir, tmp_path / "ad", "lora")
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "m")]) == 0
    assert "built-in English passage" in capsys.readouterr().out
    make_hf_model("llama", tmp_path / "other", vocab_size=320, seed=7)
    assert main(["merge", "--model", str(tmp_path / "other"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "m2")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the other base's save progress
    assert error.startswith("graft merge: error:") and "other weights" in error and "--allow-other-base" in error
    assert main(["merge", "--model", str(tmp_path / "other"), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "m2"), "--allow-other-base", "--eval-tokens", "0"]) == 0
    assert (tmp_path / "m2" / "model.safetensors").exists()


def test_graft_merge_refuses_to_write_over_its_inputs_or_a_full_directory(base_dir, tmp_path, capsys):
    _adapter(base_dir, tmp_path / "ad", "lora")
    base_files = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    merge = ["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "ad"), "--eval-tokens", "0"]
    for out, said in ((base_dir, "is the base model directory"), (tmp_path / "ad", "adapter directory"),
                      (tmp_path / "ad" / "merged", "adapter directory")):
        assert main([*merge, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and said in err and len(err.strip().splitlines()) == 1
        assert main([*merge, "--out", str(out), "--overwrite"]) == 2  # never, even when asked
        capsys.readouterr()
    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == base_files
    assert not (tmp_path / "ad" / "merged").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert main([*merge, "--out", str(full)]) == 2
    assert "--overwrite" in capsys.readouterr().err and not (full / "config.json").exists()
    assert main([*merge, "--out", str(full), "--overwrite"]) == 0
    assert (full / "model.safetensors").exists() and (full / "notes.txt").read_text() == "mine"


def test_graft_merge_says_why_the_loss_is_not_measured(base_dir, tmp_path, capsys):
    _adapter(base_dir, tmp_path / "ad", "lora")
    merge = ["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "ad")]
    assert main([*merge, "--out", str(tmp_path / "m"), "--eval-tokens", "0"]) == 0
    printed = capsys.readouterr().out
    assert "not measured (--eval-tokens 0" in printed and "tokenizer.json" not in printed
    assert main([*merge, "--out", str(tmp_path / "m2"), "--eval-tokens", "-1"]) == 2
    assert "--eval-tokens: must be 0 (no loss check) or >= 2, got -1" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main([*merge, "--out", str(tmp_path / "m3"), "--eval-data", str(empty)]) == 2
    assert "empty.txt: under 2 tokens" in capsys.readouterr().err
