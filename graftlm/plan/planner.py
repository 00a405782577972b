"""`graft plan`: for each regime, memory, fit, largest batch, FLOPs, time, money, artefact.

Regimes share one cost model and differ in what they train and what they run besides:

| regime   | objective | trains          | extra                                   |
|----------|-----------|-----------------|-----------------------------------------|
| pretrain | clm       | every weight    | random init: needs billions of tokens   |
| cpt      | clm       | every weight    | continued pre-training of a base        |
| sft      | sft       | every weight    |                                         |
| dpo      | dpo       | every weight    | chosen + rejected; frozen reference copy |
| grpo     | grpo      | every weight    | rollouts (KV cache), reference copy     |
| ppo      | ppo       | every weight    | rollouts, reference copy, critic, reward model |
| lora     | sft       | adapters        | bf16 frozen base                        |
| qlora    | sft       | adapters        | NF4 frozen base, dequantized each pass  |
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

from graftlm.errors import GraftError
from graftlm.models.config import ModelConfig
from graftlm.plan.advice import assumed_goal, data_warnings, recommend
from graftlm.plan.compute import compute_cost, decode_ops
from graftlm.plan.hardware import Hardware
from graftlm.plan.memory import RunShape, adapter_params, largest_batch, memory_breakdown, trainable_params

REGIMES = {
    "pretrain": ("pre-training from scratch", "clm", "full"),
    "cpt": ("continued pre-training", "clm", "full"),
    "sft": ("full fine-tuning (SFT)", "sft", "full"),
    "dpo": ("full fine-tuning (DPO)", "dpo", "full"),
    "grpo": ("full fine-tuning (GRPO)", "grpo", "full"),
    # Its critic and reward model planned at the policy's shape (a reward model from
    # `graft reward` on the same base; the critic starts from it).
    "ppo": ("full fine-tuning (PPO)", "ppo", "full"),
    "lora": ("LoRA (SFT, {base} base)", "sft", "lora"),  # the base's storage dtype filled in
    "qlora": ("QLoRA (SFT, NF4 base)", "sft", "qlora"),
}
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> float | None:
    """'7B', '125m', '2.5e9', '1000000' -> a number; None when `text` is not a count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbgtKMBGT]?)\s*", str(text))
    if not match:
        return None
    return float(match.group(1)) * _SUFFIX[match.group(2).lower()]


def config_for_param_count(count: float, vocab_size: int = 32000) -> ModelConfig:
    """A Llama-shaped config of about `count` parameters (layers ~ hidden / 128)."""
    best = None
    for hidden in range(256, 16385, 128):
        heads = max(hidden // 128, 2)
        cfg = ModelConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=256 * round(hidden * 8 / 3 / 256),
                          num_layers=max(hidden // 128, 2), num_heads=heads, num_kv_heads=heads, max_seq_len=4096)
        gap = abs(cfg.num_params() - count)
        if best is None or gap < best[0]:
            best = (gap, cfg)
    return best[1]


def resolve_model(spec: str, vocab_size: int | None = None) -> tuple[ModelConfig, bool, str]:
    """(config, has weights, how the shape was found) for --model.

    `vocab_size` is the tokenizer's (or the data's): a preset takes it, as the trainer's
    `runs.build_model` gives it one, so the parameter count is the built model's; a model
    directory or config keeps its own vocabulary, which must hold the tokenizer's.
    """
    from graftlm.models.config import PRESETS
    count = parse_count(spec)
    # A preset's name ("125m", "1b") is the preset the trainer builds, not a parameter count.
    if count is not None and spec not in PRESETS and not Path(spec).exists():
        cfg = config_for_param_count(count, vocab_size or 32000)
        return cfg, False, (f"a Llama-shaped model of {cfg.num_params() / 1e9:.2f}B parameters (approximating "
                            f"{spec}, vocabulary {cfg.vocab_size})")
    from graftlm.models.config import resolve_model_config
    cfg = resolve_model_config(spec)
    path = Path(spec)
    has_weights = path.is_dir() and any(path.glob("*.safetensors"))
    if vocab_size and spec in PRESETS:
        return replace(cfg, vocab_size=vocab_size), has_weights, f"{spec} (vocabulary {vocab_size})"
    if vocab_size and vocab_size > cfg.vocab_size:
        raise GraftError(f"the tokenizer / data have {vocab_size} tokens but model '{spec}' has a "
                         f"vocabulary of {cfg.vocab_size}: use the model's own tokenizer")
    if spec in PRESETS:  # the preset's own vocabulary: say so, as a tokenizer's changes the count
        return cfg, has_weights, f"{spec} (vocabulary {cfg.vocab_size}, the preset's; --vocab-size or --tokenizer for yours)"
    return cfg, has_weights, spec


def _shard_directory(path: Path) -> dict | None:
    """A `graft prepare` directory's figures: its meta.json counts the tokens already."""
    from graftlm.data.shards import FORMAT
    from graftlm.errors import read_json
    meta_path = path / "meta.json"
    if not (path.is_dir() and meta_path.is_file()):
        return None
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    train = (meta.get("splits") or {}).get("train") or {}
    return {"format": FORMAT, "tokens": int(train.get("tokens", 0)), "documents": train.get("documents"),
            "vocab_size": meta.get("vocab_size"), "tokens_counted_with": "tokenizer (graft prepare)"}


def resolve_data(spec: str, objective: str | None = None, tokenizer=None) -> tuple[float, dict | None]:
    """(tokens, data-stats figures or None) for --data: a token count, a `graft prepare`
    directory, or files (counted with `tokenizer`, else estimated from their bytes)."""
    count = parse_count(spec)
    if count is not None and not Path(spec).exists():
        return count, None
    if not Path(spec).exists():
        raise GraftError(f"--data '{spec}': neither a token count (e.g. 2B, 500M) nor an existing path")
    shards = _shard_directory(Path(spec))
    if shards is not None:  # pre-training shards: the train split's tokens, counted when prepared
        return float(shards["tokens"]), shards
    from graftlm.data.stats import data_stats, prompt_stats
    stats = data_stats([spec], objective=objective, tokenizer=tokenizer)
    # What GRPO and PPO would sample from: rows with a prompt (text has none).
    stats["prompts"] = prompt_stats([spec], tokenizer) if stats["objective"] != "text" else None
    return float(stats["tokens"]), stats


@dataclass
class PlanOptions:
    seq_len: int | None = None  # None: what each regime's trainer uses by default
    batch_size: int | None = None  # None: likewise (`trainer_defaults`)
    precision: str = "bf16-autocast"
    activation_checkpointing: bool = False
    lora_r: int = 16
    epochs: float = 1.0
    price_per_hour: float | None = None
    goal: str | None = None
    budget: float | None = None
    sharding: str = "fsdp"
    grpo_iterations: int | None = None  # None: the trainer's default (`trainer_defaults`)


@lru_cache(maxsize=None)
def trainer_defaults(objective: str, context: int | None = None) -> dict:
    """What `graft <objective>` trains at when not told otherwise, in the plan's units.

    Read from the run's config dataclasses (`runs.run_config_class`: the train section and
    the objective's own, whose max_length, when set, is the row length), so the plan
    follows the trainer's defaults rather than keeping numbers of its own; the row length
    within the model's `context`, as a run picks it (`runs.requested_length`). An RL batch
    counts sampled sequences: group_size completions of each of train.batch_size prompts,
    each rollout trained on in `iterations` passes.
    """
    from graftlm.run_config import requested_length, run_config_class
    cfg = run_config_class(objective)()
    defaults = {"batch_size": cfg.train.batch_size, "seq_len": requested_length(cfg, context)}
    section = getattr(cfg, objective, None)
    sampling = getattr(section, "sampling", None)
    if sampling is not None:
        defaults.update(batch_size=cfg.train.batch_size * sampling.group_size, grpo_group=sampling.group_size,
                        grpo_completion_len=sampling.max_new_tokens,
                        grpo_iterations=getattr(section, "iterations", 1))
    return defaults


def regime_shape(cfg: ModelConfig, regime: str, hardware: Hardware, options: PlanOptions,
                 prompts: dict | None = None) -> RunShape:
    """The run a regime's trainer would make. An RL regime with `prompts` (the data's,
    `prompt_stats`) and no --seq-len: rollouts as long as the longest prompt and a whole
    completion, the widest micro-batch its memory must hold."""
    from graftlm.adapters.config import base_storage_dtype
    _, objective, parameterization = REGIMES[regime]
    defaults = trainer_defaults(objective, cfg.max_seq_len)
    seq_len = options.seq_len or defaults["seq_len"]
    rl = {k: defaults[k] for k in ("grpo_group", "grpo_completion_len", "grpo_iterations") if k in defaults}
    if options.grpo_iterations and objective == "grpo":
        rl["grpo_iterations"] = options.grpo_iterations
    if rl and prompts and options.seq_len is None:
        seq_len = prompts["length"]["max"] + rl["grpo_completion_len"]
    if seq_len > cfg.max_seq_len:  # a new model's context is made to fit its run, as build_model does
        cfg = replace(cfg, max_seq_len=seq_len)
    # --batch counts what --train.batch-size does: an RL batch's prompts, each sampled group_size times.
    given = options.batch_size * rl.get("grpo_group", 1) if options.batch_size else None
    return RunShape(model=cfg, objective=objective, parameterization=parameterization,
                    precision=options.precision, batch_size=given or defaults["batch_size"],
                    seq_len=seq_len, activation_checkpointing=options.activation_checkpointing,
                    lora_r=options.lora_r, **rl,
                    lora_base_dtype=base_storage_dtype("auto", options.precision),  # what the trainer does
                    devices=hardware.count, sharding=options.sharding)


def artifact_bytes(shape: RunShape) -> int:
    """What the run leaves behind: the model's safetensors, or the adapter's (float32)."""
    if shape.adapted:
        return adapter_params(shape) * 4
    return shape.model.num_params() * (2 if shape.precision == "bf16" else 4)


def rollouts(shape: RunShape, prompts: dict) -> dict:
    """What an RL run samples from the data's prompts in one epoch: group_size completions
    of each, every one its prompt and at most max_new_tokens sampled (completions that end
    sooner cost less: this is the most it can cost)."""
    prompt = prompts["length"]["mean"]
    length = prompt + shape.grpo_completion_len
    sequences = prompts["prompts"] * shape.grpo_group
    return {"prompts": prompts["prompts"], "group": shape.grpo_group, "prompt_tokens_mean": prompt,
            "completion_tokens_max": shape.grpo_completion_len, "sequences": sequences,
            "tokens": sequences * length, "mean_length": max(round(length), 2)}


def plan_regime(cfg: ModelConfig, regime: str, tokens: float, hardware: Hardware, options: PlanOptions,
                data_stats: dict | None = None) -> dict:
    """One regime's plan. `tokens` is the data's; from a data file's figures (`data_stats`)
    an RL regime is costed on the rollouts it samples from the file's prompts (`rollouts`),
    and DPO on both sequences of each preference pair (`pair_tokens`)."""
    prompts = (data_stats or {}).get("prompts")
    shape = regime_shape(cfg, regime, hardware, options, prompts)
    if shape.objective == "dpo" and (data_stats or {}).get("pair_tokens"):
        tokens = float(data_stats["pair_tokens"])
    memory = memory_breakdown(shape)
    checkpointed = memory_breakdown(replace(shape, activation_checkpointing=True))
    usable = hardware.device.usable_bytes
    sampled = rollouts(shape, prompts) if shape.samples_rollouts and prompts else None
    costed = shape
    if sampled:  # FLOPs at the rollouts' mean length; memory at the widest
        tokens = sampled["tokens"]
        costed = replace(shape, seq_len=sampled["mean_length"]) if options.seq_len is None else shape
    compute = compute_cost(costed, tokens, hardware, options.price_per_hour, options.epochs)
    return {
        "regime": regime,
        "description": REGIMES[regime][0].format(base="bf16" if shape.lora_base_dtype == "bfloat16" else "fp32"),
        "objective": shape.objective,
        "parameterization": shape.parameterization,
        "batch_size": shape.batch_size,  # sequences (an RL regime's: prompts x group_size)
        "group_size": shape.grpo_group if shape.samples_rollouts else None,
        "seq_len": shape.seq_len,
        "params_total": cfg.num_params(),
        "params_trainable": trainable_params(shape),
        "memory": memory.as_dict(),
        "peak_with_checkpointing": checkpointed.peak,
        "usable_bytes": usable,
        "fits": memory.peak <= usable,
        "fits_with_checkpointing": checkpointed.peak <= usable,
        # In --train.batch-size's units, as --batch: an RL regime's prompts (group_size sequences each).
        "largest_batch": largest_batch(shape, usable) // shape.grpo_group if shape.samples_rollouts
        else largest_batch(shape, usable),
        "largest_batch_with_checkpointing": largest_batch(replace(shape, activation_checkpointing=True), usable)
        // (shape.grpo_group if shape.samples_rollouts else 1),
        "tokens": tokens,  # of data, or an RL regime's rollouts (per epoch)
        "rollouts": sampled,
        "flops": compute.flops,
        "executed_flops": compute.executed_flops,
        "flops_detail": compute.detail,
        "time_s": compute.time_s,
        "time_detail": compute.time_detail,  # seconds: matmuls, and QLoRA's NF4 dequantization
        "dequant_detail": compute.dequant_detail,
        "generation_bound": compute.generation_bound,
        "decode_ops": decode_ops(shape) if shape.samples_rollouts else None,  # eager operators a decode step
        "cost_usd": compute.cost_usd,
        "artifact_bytes": artifact_bytes(shape),
        "artifact": "adapter" if shape.adapted else "model",
    }


def builds_random_weights(spec: str) -> bool:
    """Whether --model names a model graftlm builds with random weights (a preset or a
    graftlm YAML spec): one only pre-training can train, with no base to fine-tune."""
    from graftlm.models.config import PRESETS
    return spec in PRESETS or (Path(spec).suffix in (".yaml", ".yml") and Path(spec).is_file())


def _model_name(source: str) -> str:
    """'tiny (vocabulary 2048)' -> "preset 'tiny'", for the reasons."""
    from graftlm.models.config import PRESETS
    name = source.split(" (")[0]
    return f"preset '{name}'" if name in PRESETS else f"'{name}'" if name else "the model"


def make_plan(cfg: ModelConfig, tokens: float, hardware: Hardware, options: PlanOptions,
              has_base: bool = True, data_stats: dict | None = None, model_source: str = "",
              random_init: bool = False) -> dict:
    """Every regime, and the recommendation. `has_base`: weights were given; `random_init`:
    the model is built with random weights (a preset), so only pre-training can train it.
    GRPO and PPO sample from the data's prompts where it has some (`data_stats["prompts"]`)."""
    from graftlm.data.shards import FORMAT
    regimes = {name: plan_regime(cfg, name, tokens, hardware, options, data_stats) for name in REGIMES}
    stats = data_stats or {}
    pretraining_data = stats.get("format") == FORMAT
    choice, reasons = recommend(options.goal, tokens, cfg.num_params(), has_base,
                                {n: r["fits"] or r["fits_with_checkpointing"] for n, r in regimes.items()},
                                {n: r["cost_usd"] for n, r in regimes.items()}, options.budget,
                                adapter_params=regimes["lora"]["params_trainable"], random_init=random_init,
                                pretraining_data=pretraining_data, model=_model_name(model_source),
                                data_objective=stats.get("objective"))
    for name, result in regimes.items():
        result["data_warnings"] = data_warnings(name, tokens, cfg.num_params(), data_stats)
    if not regimes[choice]["fits"] and regimes[choice]["fits_with_checkpointing"]:
        reasons.append("turn on activation checkpointing (train.activation_checkpointing): "
                       "it fits only with it at this batch size")
    reasons += [f"data: {w}" for w in regimes[choice]["data_warnings"]]
    return {
        "model": {"source": model_source, "params": cfg.num_params(), "has_weights": has_base,
                  "random_init": random_init, "config": cfg.to_dict()},
        "data": {"tokens": tokens, "stats": data_stats},
        "hardware": {"name": hardware.label, "count": hardware.count, **asdict(hardware.device),
                     "peak_tflops": hardware.device.peak_flops(options.precision) / 1e12,  # at the plan's precision
                     "nf4_dequant_rate": hardware.device.dequant_rate().as_dict(),  # QLoRA's, and where from
                     "nf4_dequant_source": hardware.device.dequant_source,
                     "bandwidth": hardware.device.bandwidth, "bandwidth_source": hardware.device.bandwidth_source,
                     "op_overhead_us": hardware.device.op_seconds * 1e6},  # the catalogue's, else the fallback
        "options": asdict(options),
        "regimes": regimes,
        "recommendation": {"regime": choice, "description": regimes[choice]["description"], "reasons": reasons,
                           "goal": assumed_goal(options.goal, tokens, has_base, random_init, pretraining_data),
                           "goal_given": options.goal is not None},
    }
