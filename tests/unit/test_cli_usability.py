"""What a user sees on the command line: list values, unknown options, refused combinations
and the one-line errors of `graft sft|eval|serve` (no run longer than a parse or a load)."""

import pytest

from graftlm.adapters.config import select_targets
from graftlm.cli import build_parser, main
from graftlm.models import Decoder, ModelConfig
from graftlm.train_cli import config_for


def sft_config(*flags):
    args = build_parser().parse_args(["sft", "--model", "tiny", "--data", "d.jsonl", *flags])
    return config_for(args)[0]


def tiny_model():
    return Decoder(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, max_seq_len=32))


@pytest.mark.parametrize("flags", [["q_proj,v_proj"], ["q_proj", "v_proj"], ["q_proj,", "v_proj"]])
def test_a_comma_separated_list_of_names_is_that_list(flags):
    cfg = sft_config("--adapter", "lora", "--adapter.target_modules", *flags,
                     "--adapter.modules_to_save", "lm_head,embed_tokens")
    assert cfg.adapter.modules_to_save == ["lm_head", "embed_tokens"]
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    chosen = select_targets(tiny_model(), cfg.adapter)
    assert chosen == [f"layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]


def test_a_regex_with_a_comma_stays_one_regex(tmp_path):
    regex = r"model\.layers\.[0-9]{1,2}\.self_attn\.(q|v)_proj"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"adapter:\n  target_modules: '{regex}'\n")
    for cfg in (sft_config("--adapter.target-modules", regex), sft_config("--recipe", str(recipe))):
        assert cfg.adapter.targets == regex
        assert len(select_targets(tiny_model(), cfg.adapter)) == 4


def test_serve_refuses_a_bad_adapter_name_in_one_line_naming_the_flag(capsys):
    from graftlm.cli import main
    assert main(["serve", "--model", "no-such-model", "--adapter", "a/b=some/adapter"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graft serve: error: --adapter a/b=some/adapter: adapter name must be")
    assert err.count("\n") == 1


def test_adapters_on_a_preset_are_refused_before_anything_runs(tmp_path, capsys):
    """A preset's random base is neither trained nor saved: its adapter could never be used
    (it recorded its base as 'tiny', which `graft merge` cannot load)."""
    from graftlm.cli import main
    from tests.unit.test_sft_packing import _data
    path, _ = _data(tmp_path, n=8)
    assert main(["sft", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(path),
                 "--out", str(tmp_path / "runs"), "--adapter", "lora"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--adapter lora: model 'tiny' has no weights" in err and "pass a model directory" in err
    assert not (tmp_path / "runs").exists()


def test_an_adapter_directory_given_as_a_model_says_how_to_use_it(tmp_path):
    import json

    from graftlm.errors import GraftError
    from graftlm.models.hf import load_model, resolve_model_config
    adapter = tmp_path / "final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "b"}))
    for load in (resolve_model_config, load_model):
        with pytest.raises(GraftError, match=r"is a PEFT adapter .*its base: b.*--adapter NAME=DIR.*graft merge"):
            load(str(adapter))


@pytest.mark.parametrize("argv, line", [
    (["sft", "--model", "m", "--data", "d", "--adapter.rr", "8"],
     "graft sft: error: unknown option --adapter.rr (did you mean --adapter.r?)"),
    (["data", "inspect", "--data", "d", "--model", "m", "--rwo=3"],
     "graft data inspect: error: unknown option --rwo (did you mean --row?)"),
    (["eval", "--model", "m", "--data", "d", "extra"], "graft eval: error: unexpected argument 'extra'"),
    # a field's own name under another section, or another tool's name for it
    (["sft", "--model", "m", "--data", "d", "--lr", "1e-4"],
     "graft sft: error: unknown option --lr (did you mean --optim.lr?)"),
    (["sft", "--model", "m", "--data", "d", "--optim.learning-rate", "1e-4"],
     "graft sft: error: unknown option --optim.learning-rate (did you mean --optim.lr?)"),
    (["sft", "--model", "m", "--data", "d", "--gradient_accumulation_steps", "4"],
     "graft sft: error: unknown option --gradient_accumulation_steps (did you mean --train.grad-accum?)"),
    (["sft", "--model", "m", "--data", "d", "--max-length", "512"],
     "graft sft: error: unknown option --max-length (did you mean --sft.max-length?)"),
])
def test_an_unknown_option_is_named_by_its_command_with_the_closest_one(argv, line, capsys):
    from graftlm.cli import main
    assert main(argv) == 2
    assert capsys.readouterr().err == line + "\n"


def test_adapter_kind_full_with_adapter_fields_is_refused(tmp_path):
    from graftlm.errors import ConfigError
    with pytest.raises(ConfigError, match=r"kind 'full' .* --adapter\.r is given"):
        sft_config("--adapter", "full", "--adapter.r", "8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("adapter:\n  kind: full\n  r: 8\n")
    with pytest.raises(ConfigError, match=r"kind 'full' .* adapter\.r in .*recipe\.yaml is given"):
        sft_config("--recipe", str(recipe))
    recipe.write_text("adapter:\n  kind: full\n")
    assert sft_config("--recipe", str(recipe)).adapter is None
    # The command line wins over a recipe: a LoRA recipe is run in full with --adapter full.
    recipe.write_text("adapter:\n  kind: lora\n  r: 8\n")
    assert sft_config("--recipe", str(recipe), "--adapter", "full").adapter is None
    assert sft_config("--recipe", str(recipe)).adapter.r == 8


def test_help_lists_full_as_an_adapter_kind():
    sft = build_parser()._subparsers._group_actions[0].choices["sft"]
    kind = next(a for a in sft._actions if "--adapter.kind" in a.option_strings)
    assert "or full" in kind.help


def test_a_refused_resume_names_only_the_adapter_fields_that_changed():
    from pathlib import Path

    from graftlm import checkpoint as ckpt
    from graftlm.resuming import run_identity
    saved = run_identity(sft_config("--adapter.r", "8"), {"data": "d"}, 1)
    current = run_identity(sft_config("--adapter.r", "4", "--adapter.alpha", "8"), {"data": "d"}, 1)
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.check_identity(saved, current, False, Path("step-2"))
    assert "(adapter.alpha: 32.0 -> 8.0; adapter.r: 8 -> 4)" in str(refused.value)
    # Another rank cannot load the saved adapter: --allow-config-change is not offered, nor taken.
    assert "--fresh starts the run over" in str(refused.value) and "allow-config-change" not in str(refused.value)
    with pytest.raises(ckpt.CheckpointError, match="another shape now"):
        ckpt.check_identity(saved, current, True, Path("step-2"))
    # Another alpha alone can (a scale): allowed when asked.
    alpha = run_identity(sft_config("--adapter.r", "8", "--adapter.alpha", "8"), {"data": "d"}, 1)
    with pytest.raises(ckpt.CheckpointError, match="pass --allow-config-change"):
        ckpt.check_identity(saved, alpha, False, Path("step-2"))
    ckpt.check_identity(saved, alpha, True, Path("step-2"), warn=lambda line: None)
    # A checkpoint that recorded the whole section (older graftlm) still resumes.
    old = {**{k: v for k, v in saved.items() if not k.startswith("adapter")},
           "adapter": {k.removeprefix("adapter."): v for k, v in saved.items() if k.startswith("adapter.")}}
    ckpt.check_identity(old, run_identity(sft_config("--adapter.r", "8"), {"data": "d"}, 1, old), False, Path("s"))
    # A full run's identity is what it always was.
    assert run_identity(sft_config(), {}, 1)["adapter"] is None


def test_a_resumed_adapter_run_refuses_other_base_weights_at_its_model_path():
    """A resume reads the frozen base from --model again: other weights there (same
    shapes) would train the rest of the adapter on another base without a word."""
    from pathlib import Path

    import torch

    from graftlm import checkpoint as ckpt
    from graftlm.adapters import AdapterConfig, apply_adapters
    from graftlm.resuming import run_identity
    cfg = sft_config("--adapter.r", "8")

    def adapted(seed: int):
        model = tiny_model()
        model.init_weights(torch.Generator().manual_seed(seed))
        return apply_adapters(model, AdapterConfig(kind="lora", r=8))

    saved = run_identity(cfg, {"data": "d"}, 1, None, adapted(0))
    ckpt.check_identity(saved, run_identity(cfg, {"data": "d"}, 1, saved, adapted(0)), False, Path("s"))
    with pytest.raises(ckpt.CheckpointError, match=r"\(adapter_base_weights: '[0-9a-f]{16}' -> '[0-9a-f]{16}'\)"):
        ckpt.check_identity(saved, run_identity(cfg, {"data": "d"}, 1, saved, adapted(1)), False, Path("s"))
    # A checkpoint from before the base was recorded resumes as it did.
    older = {k: v for k, v in saved.items() if k != "adapter_base_weights"}
    ckpt.check_identity(older, run_identity(cfg, {"data": "d"}, 1, older, adapted(1)), False, Path("s"))


def test_allow_config_change_help_names_the_adapter():
    sft = build_parser()._subparsers._group_actions[0].choices["sft"]
    allow = next(a for a in sft._actions if "--allow-config-change" in a.option_strings)
    assert "adapter" in allow.help


@pytest.mark.parametrize("command", [["eval", "--data", "d.jsonl"], ["generate", "--prompt", "hi"]])
def test_a_run_directory_given_as_model_points_to_its_final(tmp_path, capsys, command):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "answer": "1"}\n')
    assert main([command[0], "--model", str(tmp_path / "run"),
                 *[str(tmp_path / a) if a.endswith(".jsonl") else a for a in command[1:]]]) != 0
    err = capsys.readouterr().err
    assert f"it is a run directory, whose model is {tmp_path / 'run' / 'final'}: pass that" in err


def test_an_output_path_that_cannot_be_a_directory_is_one_line(tmp_path, capsys):
    """--out naming a file (or a path through one) was a NotADirectoryError traceback."""
    (tmp_path / "afile").write_text("hi")
    out = tmp_path / "afile"
    assert main(["sft", "--model", "tiny", "--data", "d.jsonl", "--out", str(out), "--name", "r"]) == 2
    assert f"--out/--name {out / 'r'}: cannot be a directory ({out} is a file)" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--data", "d.txt", "--vocab-size", "300", "--out", str(out)]) == 2
    assert f"--out {out}: exists and is not a directory" in capsys.readouterr().err
    assert main(["prepare", "--data", "d.txt", "--tokenizer", "tok", "--out", str(out / "shards")]) == 2
    assert "cannot be a directory" in capsys.readouterr().err


def test_the_demo_never_replaces_a_directory_it_did_not_write(tmp_path, capsys):
    """`graft demo --out .` deleted the working directory: the demo replaces its --out."""
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "holds notes.txt, which the demo did not write" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_regex_that_matches_nothing_says_what_it_is_matched_against():
    """The hint named the short spelling ('layers.0.mlp.up_proj') that made the regex miss."""
    from graftlm.errors import ConfigError
    cfg = sft_config("--adapter", "lora", "--adapter.target-modules", r"layers\.0\..*").adapter
    with pytest.raises(ConfigError, match=r"a regex must match a whole name as Hugging Face spells it, such as "
                                          r"'model\.layers\.0\.self_attn\.q_proj'"):
        select_targets(tiny_model(), cfg)
    cfg.target_modules = [r".*layers\.0\..*"]
    assert len(select_targets(tiny_model(), cfg)) == 7


def test_a_rank_no_targeted_layer_can_take_is_refused_before_it_is_built():
    """r=100000 on a 128-wide model built 935M parameters and was killed for memory."""
    from graftlm.errors import ConfigError
    cfg = sft_config("--adapter", "lora", "--adapter.r", "100000").adapter
    with pytest.raises(ConfigError, match=r"'adapter\.r': 100000 is above the rank of every targeted layer "
                                          r"\(at most 32,"):
        select_targets(tiny_model(), cfg)
    cfg.r = 32  # as large as the widest layer takes: allowed, as PEFT allows it
    assert select_targets(tiny_model(), cfg)


def test_the_demos_stage_panels_wrap_their_text_whole(capsys):
    """Piped to a file, the stage panels lost their last words: soft wrap cropped them."""
    from graftlm.console import table_console
    from graftlm.demo import STAGES, _stage
    for number, key in enumerate(STAGES, 1):
        _stage(table_console(), key, number)
        printed = " ".join(word for line in capsys.readouterr().out.splitlines() for word in line.strip("│ ").split())
        assert " ".join(STAGES[key][1].split()) in printed


def test_fine_tuning_a_preset_or_a_config_file_says_it_starts_from_random_weights(tmp_path, capsys):
    """`graft sft --model runs/base/final/config.json` trained random weights (loss ln V)
    without a word; the weights beside the config were never loaded."""
    from graftlm.cli import main
    from graftlm.models.hf import save_model
    from graftlm.models.transformer import Decoder
    from graftlm.models.config import preset
    from tests.unit.test_sft_packing import _data
    path, tokenizer = _data(tmp_path, n=8)
    base = tmp_path / "base"
    save_model(Decoder(preset("tiny", vocab_size=tokenizer.vocab_size)), base)
    common = ["--tokenizer", str(tmp_path / "tok"), "--data", str(path), "--out", str(tmp_path / "runs"),
              "--train.max-steps", "1", "--train.eval-every", "0", "--tensorboard", "false"]
    assert main(["sft", "--model", str(base / "config.json"), "--name", "a", *common]) == 0
    out = capsys.readouterr().out
    assert (f"note: --model {base / 'config.json'} is a config file: sft starts from random weights, not the "
            f"ones beside it; to fine-tune those, pass the directory: --model {base}") in out
    assert main(["sft", "--model", "tiny", "--name", "b", *common]) == 0
    assert "note: --model tiny is a preset: sft starts from random weights" in capsys.readouterr().out
    assert main(["sft", "--model", str(base), "--name", "c", *common]) == 0
    assert "random weights" not in capsys.readouterr().out


def test_a_fine_tuned_bf16_base_is_saved_in_bf16_unless_told(tmp_path, capsys):
    """final/ of a bf16 base was float32 (its master weights): twice the base's size, and
    config.json said float32. transformers saves a model loaded in its own dtype in that."""
    import torch

    from graftlm.cli import main
    from graftlm.models.config import preset
    from graftlm.models.hf import load_model, save_model, stored_dtype
    from graftlm.models.transformer import Decoder
    from tests.unit.test_sft_packing import _data
    path, tokenizer = _data(tmp_path, n=8)
    base = tmp_path / "base"
    model = Decoder(preset("tiny", vocab_size=tokenizer.vocab_size))
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, base, dtype=torch.bfloat16)
    assert stored_dtype(base) == torch.bfloat16
    common = ["--model", str(base), "--tokenizer", str(tmp_path / "tok"), "--data", str(path), "--out",
              str(tmp_path / "runs"), "--train.max-steps", "1", "--train.eval-every", "0", "--tensorboard", "false"]
    assert main(["sft", "--name", "same", *common]) == 0
    assert ", bfloat16)" in capsys.readouterr().out
    final = tmp_path / "runs" / "same" / "final"
    assert stored_dtype(final) == torch.bfloat16 and load_model(final, dtype=None).lm_head.weight.dtype == torch.bfloat16
    assert main(["sft", "--name", "wide", "--train.save-dtype", "float32", *common]) == 0
    assert stored_dtype(tmp_path / "runs" / "wide" / "final") == torch.float32
