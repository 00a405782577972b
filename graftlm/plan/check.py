"""`graft plan --check RUN_DIR`: the plan's prediction for exactly that run, beside what
the run measured (summary.json), with predicted / measured for each figure (`ratio`;
`error` = ratio - 1). Time predicted for `--hardware` of another kind than the run's
device (an H100 for a CPU run) is what the run would take there: not compared.
`notes` say what the measured time holds that the prediction does not (`_time_notes`).

The run's shape comes from its config.yaml (objective, adapter, batch, sequence length,
precision, activation checkpointing, world size) and its model from `final/config.json`
when the run saved a model, else from the model spec, with the vocabulary solved from
the recorded parameter count (a preset takes the tokenizer's vocabulary).

Measured peak memory is `peak_tensor_bytes` when the run recorded it (live tensor bytes,
the plan's own definition: the trainer counts them on one step of a CPU run), else
`peak_memory_bytes`: on CUDA the allocator's peak, which agrees; on CPU (a compiled or
multi-rank run, or one before the tracked step existed) the process's peak RSS, which
also holds the interpreter and libraries, so the prediction falls short by a few
hundred MB.

Predicted time is the FLOPs of all the work the run did (`compute.flops_detail`, as
`graft plan` counts it: the policy's forward and backward, DPO's, GRPO's and PPO's
reference forward, GRPO's and PPO's generation, PPO's critic forward and backward and
its reward model's forward) at a peak and MFU (generation at the memory bandwidth
where its decode steps' reads are slower: `compute.generation_seconds`), plus, for QLoRA, the NF4 dequantization
of the frozen base (`compute.dequant_seconds`) over the run's micro-batches (steps x
grad_accum), at the rate the run recorded (summary.json `nf4_dequant`); a run from
before that key is predicted at this machine's rate, as measured on it (and said so).
The FLOPs row compares the policy's training FLOPs alone: what the trainer counts.
A GRPO or PPO run's rows are its rollouts, prompt + completion, whatever train.seq_len
is: their work is predicted at their mean length (tokens / sequences trained), since
generation costs per rollout. A PPO run's critic and a GRPO or PPO run's reward model
take their shapes from the directories its config names (`ppo.value_model`, else the
reward) where they are still there to read, else the policy's.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import yaml

from graftlm.errors import GraftError
from graftlm.models.config import ModelConfig
from graftlm.metrics import DequantRate
from graftlm.plan.compute import (DEQUANT, dequant_passes, dequant_seconds, flops_detail, generation_seconds,
                                  passes_per_sequence)
from graftlm.plan.hardware import Device, Hardware, load_catalogue
from graftlm.plan.memory import RunShape, memory_breakdown

_OBJECTIVES = {"clm": "clm", "sft": "sft", "dpo": "dpo", "grpo": "grpo", "reward": "sft", "ppo": "ppo"}
# Predicted / measured time under this: a note says what the prediction cannot see.
SLOW_RUN_RATIO = 0.2


def _uses_reference(config: dict) -> bool:
    """Whether the run's loss ran a reference forward (objectives/dpo.py, grpo.py, ppo.py),
    by its config.yaml, where a field it lacks takes the objective's default."""
    from graftlm.objectives.dpo import REFERENCE_FREE, DPOConfig
    from graftlm.objectives.grpo import GRPOConfig
    from graftlm.objectives.ppo import PPOConfig
    objective = config.get("objective")
    section = config.get(objective) or {}
    if objective == "dpo":
        return section.get("loss", DPOConfig.loss) not in REFERENCE_FREE
    if objective == "grpo":
        return float(section.get("beta", GRPOConfig.beta)) > 0
    if objective == "ppo":
        return float(section.get("kl_coef", PPOConfig.kl_coef)) > 0
    return False


def _scalar_model_shape(spec: str | None) -> ModelConfig | None:
    """The shape of the scalar-head model directory `spec` (a reward model or a value model
    from `graft reward`), or None where there is none to read: a reward function, a
    directory moved since, or a reward model's adapter (whose base is the policy's, usually)."""
    if not spec or not (Path(spec) / "config.json").is_file():
        return None
    from graftlm.models.heads import is_scalar_model_dir
    if not is_scalar_model_dir(spec):
        return None
    from graftlm.models.config import read_hf_config
    try:
        return read_hf_config(Path(spec) / "config.json")
    except GraftError:
        return None


def _rl_models(config: dict) -> dict:
    """RunShape fields of an RL run's reward model (GRPO, PPO) and PPO's critic
    (objectives/ppo.build_critic: the value model, else the reward model when it is a
    directory, else a copy of the policy)."""
    objective = config.get("objective")
    if objective not in ("grpo", "ppo"):
        return {}
    section = config.get(objective) or {}
    from graftlm.rewards import names_a_model
    # GRPO's rewards are a list (several summed): the plan counts the first that is a model.
    given = section.get("reward") or []
    rewards = [str(r) for r in (given if isinstance(given, list) else [given])]
    reward = next((r for r in rewards if names_a_model(r)), "")
    is_model = bool(reward)
    reward_shape = _scalar_model_shape(reward) if is_model else None
    fields = {"reward_model": reward_shape, "reward_is_model": is_model}
    if objective == "ppo":
        value_model = section.get("value_model")
        fields["critic_model"] = _scalar_model_shape(str(value_model)) if value_model else reward_shape
    return fields


def _read(path: Path, loader):
    try:
        return loader(path.read_text())
    except OSError as e:
        raise GraftError(f"{path}: cannot read ({e.strerror}); is this a finished run directory?") from None
    except (ValueError, yaml.YAMLError) as e:
        raise GraftError(f"{path}: not valid ({e})") from None


def _model_config(run_dir: Path, config: dict, summary: dict) -> ModelConfig:
    final = run_dir / "final" / "config.json"
    if final.exists():
        from graftlm.models.config import read_hf_config
        return read_hf_config(final)
    from graftlm.models.hf import resolve_model_config
    spec = str(config.get("model", ""))
    cfg = resolve_model_config(spec)
    if Path(spec).is_dir() or spec.endswith(".json"):
        return cfg  # an HF model: its config holds the vocabulary the run used
    # A preset or a YAML spec takes the tokenizer's vocabulary: solved from the count of
    # the base's parameters (an adapter run's total also holds what it trained).
    params = summary.get("params_total") or 0
    if config.get("adapter"):
        params -= summary.get("params_trainable") or 0
    per_vocab = cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    vocab = (params - cfg.num_params(include_embeddings=False)) // per_vocab
    return replace(cfg, vocab_size=int(vocab)) if vocab > 0 else cfg


def run_shape(run_dir: Path) -> tuple[RunShape, dict]:
    run_dir = Path(run_dir)
    config = _read(run_dir / "config.yaml", yaml.safe_load)
    summary = _read(run_dir / "summary.json", json.loads)
    train = config.get("train", {})
    adapter = config.get("adapter") or {}
    cfg = _model_config(run_dir, config, summary)
    seq_len = int(train.get("seq_len", 256))
    if seq_len > cfg.max_seq_len:
        cfg = replace(cfg, max_seq_len=seq_len)
    parallel = config.get("parallel", {})
    precision = train.get("precision", "bf16-autocast")
    # An RL micro-batch trains group_size sampled completions of each of its prompts:
    # the plan's batch counts those sequences.
    sampling = (config.get(config.get("objective", "")) or {}).get("sampling") or {}
    group = int(sampling.get("group_size", 1))
    rl = {"grpo_group": group, "grpo_completion_len": int(sampling.get("max_new_tokens", 256)),
          "grpo_iterations": int((config.get("grpo") or {}).get("iterations", 1))} if sampling else {}
    from graftlm.adapters.config import base_storage_dtype
    shape = RunShape(
        model=cfg, objective=_OBJECTIVES.get(config.get("objective", "sft"), "sft"),
        parameterization=adapter.get("kind", "full") if adapter else "full",
        precision=precision, batch_size=int(train.get("batch_size", 1)) * group, **rl,
        seq_len=seq_len, grad_accum=int(train.get("grad_accum", 1)),
        activation_checkpointing=bool(train.get("activation_checkpointing", False)),
        lora_r=int(adapter.get("r", 16)), lora_targets=adapter.get("target_modules", "all-linear"),
        # Runs from before "auto" recorded float32, the default then.
        lora_base_dtype=base_storage_dtype(adapter.get("base_dtype", "float32"), precision),
        devices=int(summary.get("world_size", 1)), sharding="fsdp" if parallel.get("mode") == "fsdp" else "ddp",
        device_type=str(summary.get("device") or "cuda").split(":")[0],
        scalar_head=config.get("objective") == "reward", uses_reference=_uses_reference(config),
        **_rl_models(config))
    if shape.parameterization == "dora":
        shape = replace(shape, parameterization="lora")
    return shape, summary


def _dequant_rate(summary: dict, shape: RunShape, hardware: Hardware | None,
                  catalogue: dict[str, Device]) -> tuple[DequantRate, str]:
    """The NF4 dequantization rate to predict a QLoRA run's time at, and where it came from."""
    if hardware is not None:
        return hardware.device.dequant_rate(), f"{hardware.label}'s, {hardware.device.dequant_source}"
    recorded = DequantRate.from_dict(summary.get("nf4_dequant"))
    if recorded is not None:
        fixed = f", {recorded.seconds_per_call * 1e6:.0f} us per weight" if recorded.seconds_per_call else ""
        return recorded, f"the run's recorded rate{fixed}"
    import torch
    from graftlm.metrics import nf4_dequant_rate
    if shape.device_type == "cuda" and torch.cuda.is_available():
        return nf4_dequant_rate(torch.device("cuda"), measure=False), "the run recorded none: this machine's GPU, as measured on it"
    if shape.device_type != "cpu":  # a GPU run checked where there is none: a typical card's
        return catalogue["h100"].dequant_rate(), "the run recorded none: an H100's, from its memory bandwidth"
    return nf4_dequant_rate(torch.device("cpu"), measure=False), "the run recorded none: this CPU's, as measured on it"


def _as_trained(shape: RunShape, summary: dict) -> RunShape:
    """A GRPO or PPO run's shape at its rollouts' mean length: tokens / sequences trained
    (every micro-batch of every step trains batch_size of them on each device). Other runs,
    and one that recorded no steps, as they are."""
    sequences = int(summary.get("steps") or 0) * shape.grad_accum * shape.batch_size * shape.devices
    if not shape.samples_rollouts or not sequences:
        return shape
    return replace(shape, seq_len=max(round(float(summary.get("tokens") or 0) / sequences), 2))


def check_run(run_dir: Path, hardware: Hardware | None, catalogue: dict[str, Device] | None = None) -> dict:
    """Predicted and measured figures of one run, with relative errors.

    Time is predicted from `hardware` (catalogue peak and MFU) when given, else from the
    peak FLOP/s the run recorded for its device at the MFU the catalogue expects of such
    a device (its `cpu` entry for a CPU run, `h100` for a GPU run).
    """
    shape, summary = run_shape(run_dir)
    # A counted peak comes with the width its step's batches were padded to (SFT / DPO
    # rows are often shorter than seq_len): the memory is predicted for that width.
    memory_seq_len = summary.get("peak_tensor_seq_len") if summary.get("peak_tensor_bytes") else None
    memory = memory_breakdown(replace(shape, seq_len=memory_seq_len) if memory_seq_len else shape)
    tokens = float(summary.get("tokens", 0))
    trained = _as_trained(shape, summary)
    work = flops_detail(trained, tokens)  # the trainer counted every pass's tokens, as `tokens` here is
    measured_peak = summary.get("peak_tensor_bytes") or summary.get("peak_memory_bytes")
    # On CPU without a counted step (compiled, multi-rank), the peak is the process's RSS:
    # interpreter and libraries too (hundreds of MB), which a tensor prediction cannot match.
    memory_compared = bool(summary.get("peak_tensor_bytes")) or shape.device_type != "cpu"
    if hardware is not None:
        device = hardware.device
        assumed_mfu = device.mfu
        rate = device.peak_flops(shape.precision) * assumed_mfu * hardware.count
        assumed = f"{hardware.label} at MFU {assumed_mfu:.0%}"
    else:  # the device's peak FLOP/s as the run recorded it, at the catalogue's typical MFU
        catalogue = catalogue or load_catalogue()
        device = catalogue["cpu" if shape.device_type == "cpu" else "h100"]
        assumed_mfu = device.mfu
        rate = float(summary.get("peak_flops") or 0) * assumed_mfu * shape.devices
        assumed = f"the run's recorded peak FLOP/s at MFU {assumed_mfu:.0%}"
    generation_s = 0.0
    if work.get("generation") and rate:  # decoding at the FLOPs' or the reads' pace (compute.py)
        generation_s, _ = generation_seconds(trained, tokens / passes_per_sequence(shape), rate / shape.devices,
                                             device)
        assumed += (f", sampling at {device.bandwidth / 1e9:.3g} GB/s where its reads are slower, plus "
                    f"{device.op_seconds * 1e6:.3g} us per eager operator")
    dequant_s, dequant_assumed = None, ""
    if dequant_passes(shape):
        dequant_rate, source = _dequant_rate(summary, shape, hardware, catalogue or load_catalogue())
        micro_batches = int(summary.get("steps", 0)) * shape.grad_accum
        dequant_s = sum(dequant_seconds(trained, micro_batches, dequant_rate).values())
        dequant_assumed = f", plus {DEQUANT} at {dequant_rate.params_per_s:.3g} params/s ({source})"
    time_s = ((sum(work.values()) - work.get("generation", 0.0)) / rate + generation_s + (dequant_s or 0.0)
              if rate else None)
    # A prediction for another kind of device (an H100's time for a CPU run) is what the run
    # would take there: set beside the measurement, never compared with it.
    time_compared = hardware is None or hardware.device.kind == ("cpu" if shape.device_type == "cpu" else "gpu")
    rows = {
        "peak memory (bytes)": (memory.peak, measured_peak, memory_compared),
        "FLOPs": (work["train"], summary.get("flops"), True),  # what the trainer counts: the policy's
        "time (s)": (time_s, summary.get("train_time_s") or summary.get("wall_time_s"), time_compared),
        **({"time: NF4 dequantization (s)": (dequant_s, None, time_compared)} if dequant_s is not None else {}),
        "tokens/s": (tokens / time_s if time_s else None, summary.get("tokens_per_s"), time_compared),
    }
    figures = {}
    for name, (predicted, measured, compared) in rows.items():
        both = compared and predicted is not None and bool(measured)
        figures[name] = {"predicted": predicted, "measured": measured,
                         # error = (predicted - measured) / measured: + when the plan says more
                         "error": (predicted - measured) / measured if both else None,
                         "ratio": predicted / measured if both else None, "compared": compared}
    notes = []
    if not time_compared:
        notes.append(f"time and tokens/s: what this run would take on {hardware.label}; it trained on "
                     f"{summary.get('device')}, so they are not compared")
    else:
        notes += _time_notes(run_dir, shape, summary, time_s, generation_s)
        ratio = figures["time (s)"]["ratio"]
        if ratio is not None and ratio < SLOW_RUN_RATIO and not notes and summary.get("mfu"):
            notes.append(f"the run reached MFU {summary['mfu']:.2%} where the prediction assumes {assumed_mfu:.0%}: "
                         "its steps were evenly slow, as on a device shared with other work throughout, or for a "
                         "model this small, whose steps go to what FLOPs do not count (Python, per-operation "
                         "dispatch, small matrix products); the time measures the host more than the plan")
    return {"run": str(run_dir), "objective": "reward" if shape.scalar_head else shape.objective,
            "parameterization": shape.parameterization,
            "device": summary.get("device"), "assumed": assumed + dequant_assumed,
            "time_compared": time_compared, "notes": notes, "flops_detail": work,
            "memory_measured_as": "peak_tensor_bytes" if summary.get("peak_tensor_bytes") else "peak_memory_bytes",
            "memory_seq_len": memory_seq_len or shape.seq_len, "seq_len": shape.seq_len,
            "figures": figures}


def _generation_note(run_dir: Path, shape: RunShape, predicted_share: float) -> str | None:
    """An RL run whose sampling took a far larger share of its steps' time than the
    prediction gives it: on a CPU a small model's decoding also goes to small matrix
    products and per-row work beyond the operators' assumed overhead."""
    if not shape.samples_rollouts:
        return None
    spent = {"generation": 0.0, "all": 0.0}
    for record in _metric_records(run_dir):
        times = {k: v for k, v in record.items() if k.startswith("train_time/") and isinstance(v, (int, float))}
        spent["generation"] += times.get("train_time/generation_s", 0.0)
        spent["all"] += sum(times.values())
    measured = spent["generation"] / spent["all"] if spent["all"] else 0.0
    if measured < 0.2 or measured < 1.5 * predicted_share:
        return None
    return (f"sampling took {measured:.0%} of the steps' time but {predicted_share:.0%} of the predicted time "
            "(its FLOPs or its reads of the weights, and the eager operators each token dispatches at the "
            "assumed overhead): a small model's token-at-a-time decoding also goes to work neither counts (small "
            "matrix products far below the device's peak, Python per row), so the plan's time for this model's GRPO "
            "and PPO runs is low by about that much; op_overhead_us in a --hardware-file sets the overhead")


def _compiled_sampling(run_dir: Path) -> bool:
    """Whether an RL run compiled its rollouts' decode step (`--grpo|ppo.sampling.compile`)."""
    config = _read(Path(run_dir) / "config.yaml", yaml.safe_load)
    section = config.get(config.get("objective", "")) or {}
    return bool((section.get("sampling") or {}).get("compile"))


def _metric_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (a line that does not read is passed over)."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _median_step_mfu(run_dir: Path) -> float | None:
    """The median MFU of the run's logged training steps (metrics.jsonl), or None."""
    values = [float(r["mfu"]) for r in _metric_records(run_dir) if "step" in r and isinstance(r.get("mfu"), (int, float))]
    return statistics.median(values) if len(values) >= 3 else None


def _time_notes(run_dir: Path, shape: RunShape, summary: dict, time_s: float | None,
                generation_s: float) -> list[str]:
    """What the measured time holds that the prediction does not: matrix products in a
    half precision this CPU emulates, an RL run's token-by-token sampling, and steps
    slowed by other work on the device."""
    notes = []
    if shape.device_type == "cpu" and shape.precision in ("bf16", "bf16-autocast"):
        from graftlm.placement import fast_bfloat16
        recorded = summary.get("fast_bf16")  # runs record it; older ones are judged by this machine
        if not (recorded if isinstance(recorded, bool) else fast_bfloat16("cpu")):
            where = ("its CPU had" if isinstance(recorded, bool) else
                     "this machine's CPU has") + " no fast bf16 (no AVX-512, AMX or Arm BF16)"
            notes.append(f"the run computed in {shape.precision} on a CPU, and {where}: "
                         + ("" if isinstance(recorded, bool) else "if it trained here, ")
                         + "its matrix products ran in PyTorch's emulated bf16, many times slower (50x on an AVX2 "
                         "CPU) than the native rate the predicted time assumes; --train.precision auto trains in "
                         "fp32 there")
    if shape.samples_rollouts and _compiled_sampling(run_dir):
        # Its measured sampling holds the compile, so its share says nothing of eager decoding.
        notes.append("the run compiled its rollouts' decode step (sampling.compile): the prediction times eager "
                     "decoding, whose per-operator overhead a compiled step mostly removes, and leaves out the "
                     "compile itself (tens of seconds, in the first step's sampling)")
    else:
        generation = _generation_note(run_dir, shape, generation_s / time_s if time_s else 0.0)
        if generation:
            notes.append(generation)
    median = _median_step_mfu(run_dir)
    mfu = summary.get("mfu")
    peak = float(summary.get("peak_flops") or 0) * shape.devices
    if median and mfu and mfu < median / 2 and peak:
        at_median = float(summary.get("flops") or 0) / (peak * median)
        versus = f"; predicted / that: {time_s / at_median:.3g}x" if time_s and at_median else ""
        notes.append(f"the run's steps were uneven: its median step reached MFU {median:.0%}, its steps together "
                     f"{mfu:.0%}, so other work likely held the device; at its median step's pace the steps would "
                     f"take {at_median:.3g} s{versus}")
    return notes
