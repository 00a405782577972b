"""Typed configs: recipes, dotted overrides and one-line errors naming the field."""

import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from graftlm.config import build_config
from graftlm.errors import ConfigError


@dataclass
class Optim:
    lr: float = 3e-4
    schedule: Literal["cosine", "wsd"] = "cosine"


@dataclass
class Run:
    model: str
    steps: int = 10
    tags: list[str] = field(default_factory=list)
    warmup: int | None = None
    compile: bool = False
    optim: Optim = field(default_factory=Optim)

    def validate(self):
        if self.steps <= 0:
            raise ConfigError(f"config field 'steps': must be positive, got {self.steps}")


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny\nsteps: 5\noptim:\n  lr: 0.01\n")
    cfg = build_config(Run, recipe, {"optim.lr": "1e-3", "compile": "true", "tags": "a,b",
                                     "warmup": "null"})
    assert (cfg.model, cfg.steps, cfg.optim.lr, cfg.compile, cfg.tags, cfg.warmup) == \
        ("tiny", 5, 1e-3, True, ["a", "b"], None)


@pytest.mark.parametrize("overrides, message", [
    ({"steps": "abc"}, "config field 'steps': expected an integer, got 'abc'"),
    ({"steps": "0"}, "config field 'steps': must be positive"),
    ({"optim.lr": "fast"}, "config field 'optim.lr': expected a number"),
    ({"optim.schedule": "linear"}, "config field 'optim.schedule': expected one of 'cosine', 'wsd'"),
    ({"optim.beta": "1"}, "unknown config field 'optim.beta'"),
    ({"optim.l": "1"}, "unknown config field 'optim.l' (did you mean 'optim.lr'? known: "),
    ({"compile": "maybe"}, "config field 'compile': expected true or false"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(Run, None, {"model": "tiny", **overrides})


def test_a_sections_own_check_names_the_field_by_its_path_even_left_at_defaults():
    from graftlm.runs import run_config_class
    with pytest.raises(ConfigError, match=r"^config field 'sft\.val_fraction': must be in \[0, 1\), got 1\.5$"):
        build_config(run_config_class("sft"), None, {"model": "tiny", "data": "d", "sft.val_fraction": "1.5"})
    with pytest.raises(ConfigError, match=r"^config field 'grpo\.sampling\.temperature'"):
        build_config(run_config_class("grpo"), None, {"model": "tiny", "data": "d", "grpo.sampling.temperature": "0"})
    # Never set on the command line, the ppo section is still checked: its reward is required.
    with pytest.raises(ConfigError, match=r"^config field 'ppo\.reward' is required"):
        build_config(run_config_class("ppo"), None, {"model": "tiny", "data": "d"})


def test_missing_required_field():
    with pytest.raises(ConfigError, match="config field 'model' is required"):
        build_config(Run, None, {})


def test_invalid_yaml_names_the_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: tiny\nsteps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        build_config(Run, recipe)


def test_unreadable_recipes_name_the_file(tmp_path):
    recipe = tmp_path / "weights.yaml"
    recipe.write_bytes(b"\x80\x81\xfe binary")
    with pytest.raises(ConfigError, match=r"weights.yaml: not a UTF-8 text file"):
        build_config(Run, recipe)
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read"):
        build_config(Run, tmp_path / "missing.yaml")


def test_chat_template_with_generation_markers_renders_like_plain():
    from graftlm.tokenizer import _compile_template
    marked = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "hi "}, {"role": "assistant", "content": "there"}]
    assert _compile_template(marked).render(messages=messages) == "hi there"


def test_the_default_learning_rate_follows_the_regime(tmp_path):
    from graftlm.adapters.config import AdapterConfig
    from graftlm.resuming import recorded_config
    from graftlm.runs import default_lr, run_config_class
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"")  # pre-trained weights

    def run(objective, model, adapter=None):
        cfg = run_config_class(objective)()
        cfg.model, cfg.adapter = str(model), adapter
        return cfg

    # Full fine-tuning of pre-trained weights: TRL's rates.
    assert [default_lr(run(o, base), {}) for o in ("sft", "reward", "ppo", "dpo", "grpo")] == \
        [2e-5, 1e-5, 3e-6, 1e-6, 1e-6]
    # Adapters, a model from scratch, pre-training: 3e-4.
    assert default_lr(run("dpo", base, AdapterConfig()), {}) == 3e-4
    assert default_lr(run("sft", "tiny"), {}) == 3e-4
    assert default_lr(run("clm", base), {}) == 3e-4
    # A resumed run keeps the rate it recorded, whatever today's default.
    (tmp_path / "config.yaml").write_text("optim:\n  lr: 0.0003\n")
    assert default_lr(run("dpo", base), recorded_config(tmp_path)) == 3e-4


def test_a_continued_run_takes_what_the_command_left_out_from_what_it_recorded():
    from graftlm.adapters.config import AdapterConfig
    from graftlm.config import flatten, to_dict, under_given
    from graftlm.runs import run_config_class

    cls = run_config_class("sft")
    run = cls(model="m", data="d")
    run.adapter = AdapterConfig(kind="lora", r=8)
    run.train.batch_size, run.optim.lr = 2, 1e-3
    recorded = {**flatten({"objective": "sft", **to_dict(run)}), "train.retired_field": 1}

    def continued(given, **typed):
        cfg = cls(model="m", data="d", **typed)
        cfg.train.max_steps = 50
        return under_given(cfg, recorded, given)

    # Left out: the recorded adapter, batch and rate; given: the longer run. A field this
    # version no longer has (and the `objective` line) is dropped, not refused.
    cfg = continued(["model", "data", "train.max_steps"])
    assert (cfg.adapter.kind, cfg.adapter.r, cfg.train.batch_size, cfg.optim.lr, cfg.train.max_steps) == \
        ("lora", 8, 2, 1e-3, 50)
    # A null recorded where the field has since taken a concrete default: the default.
    recorded["train.compile_activation_budget"] = None
    assert continued(["train.max_steps"]).train.compile_activation_budget == 1.0
    # One adapter field given: the others are still the recorded ones.
    cfg = continued(["adapter.r"], adapter=AdapterConfig(kind="lora", r=4))
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.train.batch_size) == (4, run.adapter.alpha, 2)
    # `--adapter full` gives the whole section.
    assert continued(["adapter"]).adapter is None
    # A run recorded without an adapter, continued with one: the command's section.
    recorded.update({"adapter": None})
    recorded = {k: v for k, v in recorded.items() if not k.startswith("adapter.")}
    cfg = continued(["adapter.kind"], adapter=AdapterConfig(kind="dora"))
    assert cfg.adapter.kind == "dora" and cfg.adapter.r == AdapterConfig().r
    assert continued([]).adapter is None


def test_changed_settings_list_real_changes_only():
    from graftlm.resuming import changed_settings
    recorded = {"data": "shards/", "optim.lr": 0.003, "train.schedule": "cosine"}
    assert changed_settings(recorded, {"data": "shards", "optim": {"lr": 0.002}, "train": {"schedule": "cosine"}}) \
        == ["optim.lr: 0.003 -> 0.002"]
    assert changed_settings(recorded, {"data": "other", "optim": {"lr": 0.003}, "train": {"schedule": "cosine"}}) \
        == ["data: shards/ -> other"]
    # A run recorded before grpo.reward became a list continues with the same reward, unsaid.
    assert changed_settings({"grpo.reward": "gsm8k"}, {"grpo": {"reward": ["gsm8k"]}}) == []
    assert changed_settings({"grpo.reward": "gsm8k"}, {"grpo": {"reward": ["gsm8k", "regex:a"]}}) \
        == ["grpo.reward: gsm8k -> ['gsm8k', 'regex:a']"]
    # A field added since the run recorded its settings, at its default (the behaviour it
    # had), is no change; given another value, it is one.
    defaults = {"grpo": {"beta": 0.04, "loss_type": "dapo"}}
    assert changed_settings({"grpo.beta": 0.1}, {"grpo": {"beta": 0.1, "loss_type": "dapo"}}, defaults) == []
    assert changed_settings({"grpo.beta": 0.1}, {"grpo": {"beta": 0.1, "loss_type": "grpo"}}, defaults) \
        == ["grpo.loss_type: dapo (not recorded: the default) -> grpo"]


def test_grpo_loss_options_take_trls_names_and_bad_values_name_the_field():
    from graftlm.config import flatten, to_dict, under_given
    from graftlm.resuming import changed_settings
    from graftlm.runs import run_config_class

    cls = run_config_class("grpo")
    base = {"model": "tiny", "data": "d"}
    cfg = build_config(cls, None, {**base, "grpo.loss_type": "dr_grpo", "grpo.importance_sampling_level": "sequence",
                                   "grpo.scale_rewards": "none"})
    assert (cfg.grpo.loss_type, cfg.grpo.importance_sampling_level, cfg.grpo.scale_rewards) == \
        ("dr_grpo", "sequence", False)
    # graftlm's true / false and TRL's group / none, from the command line or YAML, read as
    # the bool they mean (config.yaml records one spelling).
    for given, kept in (("false", False), ("true", True), (True, True), ("group", True), ("none", False)):
        assert build_config(cls, None, {**base, "grpo.scale_rewards": given}).grpo.scale_rewards is kept
    for field_, value in (("loss_type", "cispo"), ("importance_sampling_level", "tokens"),
                          ("scale_rewards", "batch")):
        with pytest.raises(ConfigError, match=rf"^config field 'grpo\.{field_}': expected .*, got '{value}'$"):
            build_config(cls, None, {**base, f"grpo.{field_}": value})
    # A run recorded before these fields continues as it trained: dapo, per-token ratio,
    # its recorded `scale_rewards: true`, and the plain k3 KL; none of them listed as a change.
    recorded = flatten({"objective": "grpo", **to_dict(cls(**base))})
    for key in ("grpo.loss_type", "grpo.importance_sampling_level", "grpo.kl_bias_correction"):
        del recorded[key]
    cfg = under_given(cls(**base), recorded, ["train.max_steps"])
    assert (cfg.grpo.loss_type, cfg.grpo.importance_sampling_level, cfg.grpo.scale_rewards,
            cfg.grpo.kl_bias_correction) == ("dapo", "token", True, False)
    assert changed_settings(recorded, {"objective": "grpo", **to_dict(cfg)}, to_dict(cls())) == []
    assert build_config(cls, None, {**base, "grpo.kl_bias_correction": "true"}).grpo.kl_bias_correction is True


def test_an_extended_run_says_when_its_schedule_moves_the_rate_at_once():
    from graftlm.optim import lr_at
    from graftlm.resuming import schedule_jump
    from graftlm.runs import run_config_class
    cfg = run_config_class("clm")(model="tiny", data="shards")
    cfg.train.max_steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule = 40, 3e-3, 0, "cosine"
    note = schedule_jump({"train.max_steps": 30}, cfg, 30)
    last, following = lr_at(29, 30, cfg.optim), lr_at(30, 40, cfg.optim)
    assert following > 2 * last  # cosine over 30 steps ends at its floor; over 40 it is not there yet
    planned = lr_at(30, 30, cfg.optim)
    assert note == (f"note: the cosine learning-rate schedule now spans 40 steps, as if planned for them: the rate "
                    f"goes from {last:.3g} at step 30 to {following:.3g} at step 31, where the run as planned "
                    f"would use {planned:.3g}")
    # Resumed unchanged, a short schedule's own fall from one step to the next is no note.
    cfg.train.max_steps = 8
    assert lr_at(4, 8, cfg.optim) < 0.8 * lr_at(3, 8, cfg.optim)
    assert schedule_jump({"train.max_steps": 8}, cfg, 4) is None
    cfg.optim.schedule = "constant"
    assert schedule_jump({"train.max_steps": 30}, cfg, 30) is None  # nothing moves
    assert schedule_jump({"train.max_steps": 40}, cfg, 30) is None  # the same length: not extended
    # Another lr: the rate comes from the one the last step used (the recorded), not the new one's.
    recorded = {"train.max_steps": 40, "optim.lr": 3e-3, "optim.schedule": "constant"}
    cfg.optim.lr = 1e-3
    cfg.train.max_steps = 40
    assert schedule_jump(recorded, cfg, 30) == ("note: with the changed --optim settings the rate goes from "
                                                 "0.003 at step 30 to 0.001 at step 31, where the run as planned "
                                                 "would use 0.003")


def test_a_runs_default_name_names_the_model_it_starts_from(tmp_path):
    """Every fine-tuning of a run's model was named `sft-final`: a second experiment from
    another run's final/ collided with the first (refused as a changed model)."""
    from graftlm.runs import run_config_class, run_directory
    base = tmp_path / "runs" / "base" / "final"
    base.mkdir(parents=True)
    (base.parent / "summary.json").write_text("{}")
    plain = tmp_path / "Qwen2.5-0.5B"
    plain.mkdir()
    named = {model: run_directory(run_config_class("sft")(model=str(model), data="d", out="runs")).name
             for model in (base, str(base) + "/", plain, "tiny", tmp_path / "model.yaml")}
    assert list(named.values()) == ["sft-base", "sft-base", "sft-Qwen2.5-0.5B", "sft-tiny", "sft-model"]


def test_a_section_given_in_part_keeps_its_parents_default_for_the_rest(tmp_path):
    """PPOConfig.sampling defaults to SamplingConfig(group_size=1); a ppo.sampling field given
    on the command line or in a recipe built the section from SamplingConfig's own defaults,
    and PPO sampled 4 completions per prompt."""
    from graftlm.runs import run_config_class

    cls = run_config_class("ppo")
    base = {"model": "tiny", "data": "d", "ppo.reward": "rm"}
    assert build_config(cls, None, base).ppo.sampling.group_size == 1
    for given in ({"ppo.sampling.temperature": "1.0"}, {"ppo.sampling.compile": "true"}):
        sampling = build_config(cls, None, {**base, **given}).ppo.sampling
        assert sampling.group_size == 1, given
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text("ppo:\n  sampling:\n    temperature: 0.7\n")
    sampling = build_config(cls, recipe, base).ppo.sampling
    assert (sampling.group_size, sampling.temperature) == (1, 0.7)
    assert build_config(cls, None, {**base, "ppo.sampling.group_size": "3"}).ppo.sampling.group_size == 3
    # GRPO's section is SamplingConfig's own defaults.
    grpo = build_config(run_config_class("grpo"), None, {"model": "tiny", "data": "d",
                                                         "grpo.sampling.temperature": "0.7"})
    assert grpo.grpo.sampling.group_size == 4
    # A value __post_init__ makes concrete is still made from what is given (simpo's beta).
    assert build_config(run_config_class("dpo"), None, {"model": "tiny", "data": "d", "dpo.loss": "simpo"}).dpo.beta \
        == 2.0


def test_a_resume_reads_synonyms_recorded_before_as_the_spelling_recorded_now():
    """A run that recorded scale_rewards 'group' or 'none' (before they were read as true /
    false) resumes, and given either spelling anew, no change is listed; a field recorded
    before it existed is shown at the default the run trained with."""
    from graftlm.config import as_read_now, flatten, to_dict, under_given
    from graftlm.resuming import changed_settings
    from graftlm.runs import run_config_class

    cls = run_config_class("grpo")
    base = {"model": "tiny", "data": "d"}
    for recorded_as, given in (("group", "true"), ("none", "false"), ("group", "group")):
        recorded = flatten({"objective": "grpo", **to_dict(cls(**base))})
        recorded["grpo.scale_rewards"] = recorded_as
        del recorded["grpo.loss_type"]
        recorded = as_read_now(cls(**base), recorded)
        cfg = build_config(cls, None, {**base, "grpo.scale_rewards": given, "grpo.loss_type": "grpo"})
        cfg = under_given(cfg, recorded, ["grpo.scale_rewards", "grpo.loss_type"])
        assert changed_settings(recorded, {"objective": "grpo", **to_dict(cfg)}, to_dict(cls())) == \
            ["grpo.loss_type: dapo (not recorded: the default) -> grpo"]
        # Left out on the command line, the recorded synonym continues as its bool.
        assert under_given(cls(**base), recorded, []).grpo.scale_rewards is (recorded_as == "group")
