"""From a run config to a finished run directory: the one entry point of every training
command (`graft pretrain|sft|dpo|reward|grpo|ppo`).

`run_training(cfg)` resolves the run directory (resume / fresh / refuse), builds the
model (preset or config: random init; HF directory: its weights), injects adapters when
`adapter` is set, asks the objective's spec for data and loss, trains with `Trainer`,
and writes `final/` (an HF model dir, or a PEFT adapter dir) and `summary.json`.

Design choices:
- The objective decides nothing here but its data and loss (`objectives.get_spec`);
  the parameterization is `cfg.adapter` (None: full training); parallelism comes from
  `parallel.py`. None of them knows about the others.
- A preset is a shape without a vocabulary: its vocabulary follows the tokenizer (or
  the data). A config file or HF directory is taken as is, and a tokenizer or data
  with more tokens than its vocabulary is an error.
- A run directory with checkpoints is resumed automatically; a finished run (a
  `summary.json` reaching `max_steps`) is never overwritten without `--fresh`.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import random
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch import nn

from graftlm.adapters.config import AdapterConfig
from graftlm.adapters.lora import LoraLinear, ModulesToSave
from graftlm.config import from_dict, to_dict
from graftlm.data.loader import ResumableLoader
from graftlm.errors import ConfigError, GraftError, make_directory
from graftlm.metrics import nf4_dequant_rate, peak_flops
from graftlm.models.config import PRESETS
from graftlm.objectives import ObjectiveSpec, get_spec
from graftlm.optim import DEFAULT_LR, FINE_TUNING_LR
from graftlm.placement import fast_bfloat16, resolve_precision
from graftlm.report import write_report_or_warn
from graftlm.resuming import (RunLock, changed_settings, prepare_run_directory, refuse_changed_settings,
                              run_identity, saved_identity, schedule_jump)
from graftlm.run_config import (RunConfig, name_of_model_dir, requested_length,  # noqa: F401 (defined without torch)
                                run_config_class)
from graftlm.trainer import Trainer


# -- run directory --------------------------------------------------------------------------

def run_directory(cfg: RunConfig) -> Path:
    """`out/name`; without --name, `<objective>-<model>` with the model named as commands
    name it (a run's `final/` by its run: `runs/base/final` -> `sft-base`, where every
    fine-tuning of a run's model was `sft-final`, and a second one collided with the first)."""
    model = Path(cfg.model.rstrip("/"))
    name = name_of_model_dir(model) if model.is_dir() else model.name.removesuffix(".json").removesuffix(".yaml")
    return Path(cfg.out) / (cfg.name or f"{cfg.objective}-{name}")


# -- model, tokenizer, adapters ---------------------------------------------------------------

def find_tokenizer(cfg: RunConfig, data_dir: Path, warn=lambda line: None):
    """The run's tokenizer: --tokenizer, else the one the shards were made with, else the
    model directory's own. `warn` is told when it is not the model directory's own
    tokenizer.json but another (it pairs the model's embeddings with other tokens, and goes
    to final/)."""
    from graftlm.tokenizer import load_tokenizer
    candidates = [cfg.tokenizer] if cfg.tokenizer else []
    meta = data_dir / "meta.json"
    if not cfg.tokenizer and meta.is_file():
        recorded = (json.loads(meta.read_text()).get("tokenizer") or {}).get("path")
        if recorded:  # as recorded (relative to where `graft prepare` ran), or to the data
            candidates += [recorded, str(data_dir / recorded)]
    if not cfg.tokenizer and Path(cfg.model).is_dir():
        candidates.append(cfg.model)
    for candidate in candidates:
        if candidate == cfg.tokenizer or (Path(candidate) / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(candidate)
            difference = _other_than_models_tokenizer(cfg.model, tokenizer)
            if difference:
                name = f"--tokenizer {candidate}" if candidate == cfg.tokenizer else f"tokenizer {candidate} ({meta})"
                warn(f"warning: {name} differs from --model {cfg.model}'s own tokenizer.json ({difference}): "
                     "the run trains with it and saves it in final/")
            return tokenizer
    return None


def _other_than_models_tokenizer(model: str, tokenizer) -> str | None:
    """How `tokenizer` differs from model directory `model`'s own tokenizer.json, in words;
    None when it is that file, an identical one, or the model directory has none."""
    from tokenizers import Tokenizer as Backend

    own = Path(model) / "tokenizer.json"
    if tokenizer.path is None or not own.is_file():
        return None
    theirs = Path(tokenizer.path) / "tokenizer.json"
    if own.resolve() == theirs.resolve() or own.read_bytes() == theirs.read_bytes():
        return None
    try:
        own_backend = Backend.from_file(str(own))
    except Exception:  # tokenizers raises plain Exception subclasses
        return "the model's own cannot be read"
    if own_backend.to_str() == tokenizer.backend.to_str():  # the same tokenizer, written differently
        return None
    own_vocab, their_vocab = own_backend.get_vocab(), tokenizer.backend.get_vocab()
    if own_vocab == their_vocab:
        return "the same vocabulary, other merges or settings"
    return f"{len(their_vocab):,} tokens vs the model's {len(own_vocab):,}" + (
        ", other tokens or ids" if len(own_vocab) == len(their_vocab) else "")


def _from_weights(cfg: RunConfig) -> bool:
    return Path(cfg.model).is_dir() and any(Path(cfg.model).glob("*.safetensors"))


def _check_weightless_directory(cfg: RunConfig, warn=print) -> None:
    """A model directory without safetensors weights (a download that fetched config and
    tokenizer only, or weights as a pickle) used to train from random weights without a
    word. Fine-tuning refuses it, naming what is there; pre-training says that it starts
    from random weights in that architecture (a config directory is a way to name one)."""
    from graftlm.models.hf import weight_files
    directory = Path(cfg.model)
    if not directory.is_dir() or _from_weights(cfg):
        return
    if cfg.objective != "clm" or any(next(directory.glob(pattern), None) for pattern in ("*.bin", "*.pt")):
        try:
            weight_files(directory)  # names a pickle, or the missing model.safetensors
        except GraftError as e:
            raise ConfigError(f"--model: {e}" + ("" if cfg.objective == "clm" else
                              f"; {cfg.objective} fine-tunes a model's weights: pass a directory that has "
                              "them, or pre-train one with graft pretrain")) from None
    warn(f"note: {directory} has a config but no weights: pre-training starts from random weights "
         "in its architecture")


def _note_random_start(cfg: RunConfig, warn=print) -> None:
    """Fine-tuning a preset or a config file trains random weights: allowed (tests and
    quick trials do it), but said, since it is rarely what was meant; a config.json whose
    directory holds the weights names that directory."""
    model = Path(cfg.model)
    if cfg.objective == "clm" or model.is_dir():  # a weightless directory: `_check_weightless_directory`
        return
    if model.is_file() and any(model.parent.glob("*.safetensors")):
        warn(f"note: --model {cfg.model} is a config file: {cfg.objective} starts from random weights, not the "
             f"ones beside it; to fine-tune those, pass the directory: --model {model.parent}")
    else:
        what = "a preset" if cfg.model in PRESETS else "a config"
        warn(f"note: --model {cfg.model} is {what}: {cfg.objective} starts from random weights; to fine-tune a "
             "trained model, pass its directory (a run's final/, or a Hugging Face model's)")


def loaded_context(cfg: RunConfig) -> int | None:
    """The context (max_position_embeddings) of a model loaded from weights; None for a
    new model, whose context is made to fit the run (`build_model`)."""
    if not _from_weights(cfg):
        return None
    from graftlm.models.hf import resolve_model_config
    return resolve_model_config(cfg.model).max_seq_len


def build_model(cfg: RunConfig, vocab_size: int | None, tokenizer, device: torch.device):
    from graftlm.models.hf import load_model, resolve_model_config
    from graftlm.models.transformer import Decoder

    model_cfg = resolve_model_config(cfg.model)
    from_weights = _from_weights(cfg)
    if not from_weights:  # a new model's context is what it is trained at, at least
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, requested_length(cfg)))
    if cfg.model in PRESETS and vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    elif vocab_size and vocab_size > model_cfg.vocab_size:
        raise GraftError(f"the tokenizer / data have {vocab_size} tokens but model '{cfg.model}' has a "
                         f"vocabulary of {model_cfg.vocab_size}: use the model's own tokenizer")
    if tokenizer is not None:
        for attr, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                            ("pad_token_id", tokenizer.token_id(tokenizer.pad_token))):
            if getattr(model_cfg, attr) is None and value is not None:
                setattr(model_cfg, attr, value)
    if from_weights:
        model = load_model(cfg.model, dtype=torch.float32, device=device)
        model.config.bos_token_id, model.config.eos_token_id = model_cfg.bos_token_id, model_cfg.eos_token_id
        model.config.pad_token_id = model_cfg.pad_token_id
    else:
        model = Decoder(model_cfg)
        model.init_weights(torch.Generator().manual_seed(cfg.seed))
        model.to(device)
        model.reset_rope(device)
    if cfg.train.precision == "bf16":
        model.to(torch.bfloat16)
    return model.train()


def final_dtype(cfg: RunConfig) -> torch.dtype | None:
    """The dtype final/'s weights are written in: --train.save-dtype, else a pre-trained
    base's own (a bf16 base fine-tuned over float32 master weights was saved at twice its
    size), else as trained (None)."""
    if cfg.train.save_dtype is not None:
        return getattr(torch, cfg.train.save_dtype)
    if not _from_weights(cfg):
        return None
    from graftlm.models.hf import stored_dtype
    return stored_dtype(Path(cfg.model))


def apply_parameterization(model, cfg: RunConfig):
    if cfg.adapter is None:
        return model
    from graftlm.adapters import apply_adapters
    return apply_adapters(model, cfg.adapter, precision=cfg.train.precision) or model


def flops_per_token_at(cfg: RunConfig, model_config) -> Callable[[int], float]:
    """Model FLOPs to train one token at a given context length, as `graft plan` counts them.

    One formula for plan and measurement (`plan.compute.train_flops_per_token`): with
    adapters it counts each adapter's forward and input gradient, not only its weight
    gradient. DoRA is counted as LoRA (its magnitude vector costs O(out) per token).
    """
    from graftlm.plan.compute import train_flops_per_token
    from graftlm.plan.memory import RunShape

    adapter = cfg.adapter
    shape = RunShape(model=model_config, seq_len=cfg.train.seq_len, scalar_head=cfg.objective == "reward")
    if adapter is not None:
        shape = dataclasses.replace(shape, parameterization="lora" if adapter.kind == "dora" else adapter.kind,
                                    lora_r=adapter.r, lora_targets=adapter.targets)
    return lru_cache(maxsize=64)(lambda context: train_flops_per_token(dataclasses.replace(shape, seq_len=context)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_lr(cfg: RunConfig, recorded: dict) -> float:
    """The learning rate of a run given no --optim.lr: the one it `recorded` (resumed),
    else TRL's rate for full fine-tuning of pre-trained weights, else 3e-4 (a model
    trained from scratch, or adapters)."""
    lr = recorded.get("optim.lr")
    if isinstance(lr, (int, float)) and lr > 0:
        return float(lr)
    if cfg.adapter is None and _from_weights(cfg) and cfg.objective in FINE_TUNING_LR:
        return FINE_TUNING_LR[cfg.objective]
    return DEFAULT_LR


def _trained_parameters(model: nn.Module, adapter: AdapterConfig | None, total: int, trainable: int) -> str:
    """What the run trains, in one line: with adapters, which layers they are on, so that
    a target list that matched fewer layers than meant is seen before the run, not after."""
    line = f"parameters: {total / 1e6:,.2f}M, "
    if adapter is None:
        return line + "all trained"

    def short_names(kind) -> tuple[list[str], list[str]]:
        names = [name for name, module in model.named_modules() if isinstance(module, kind)]
        return names, list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))

    layers, kinds = short_names(LoraLinear)
    line += (f"{trainable / 1e6:,.3f}M trained ({trainable / total:.2%}): {adapter.kind} r={adapter.r} on "
             f"{len(layers)} linear module{'s' if len(layers) != 1 else ''} ({', '.join(kinds)})")
    _, in_full = short_names(ModulesToSave)
    return line + (f", {', '.join(in_full)} trained in full" if in_full else "")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- the run ------------------------------------------------------------------------------------

def run_training(cfg: RunConfig, resume: bool | None = None, fresh: bool = False,
                 allow_config_change: bool = False, given=None) -> dict:
    """Train the run `cfg` describes. given: the dotted fields the user set (command line,
    recipe); a continued run takes the others from what it recorded. None: all of `cfg`."""
    lock = RunLock()
    try:
        return _run_training(cfg, resume, fresh, allow_config_change, lock, given)
    finally:
        lock.release()


def _run_training(cfg: RunConfig, resume: bool | None, fresh: bool, allow_config_change: bool,
                  lock: RunLock, given) -> dict:
    from graftlm import parallel

    started = time.perf_counter()
    spec: ObjectiveSpec = get_spec(cfg.objective)
    d = parallel.init_distributed(cfg.parallel, cfg.device)
    run_dir = run_directory(cfg)

    def look_at_run_directory():
        make_directory(run_dir, "--out/--name", create=False)  # made once the run is known to start
        lock.acquire(run_dir)
        latest, recorded, continued = prepare_run_directory(run_dir, cfg, resume, fresh, given)
        return latest, recorded, to_dict(continued)  # a plain mapping crosses to the other ranks

    # Rank 0 looks at the run directory (once); every rank resumes from the checkpoint it
    # chose, with the settings it continues with, or meets its refusal at the same point.
    resume_from, recorded, settings = parallel.decide_on_main(look_at_run_directory, d)
    cfg = from_dict(type(cfg), settings)
    # `auto` made concrete here, so that config.yaml, the resume check and the plan see it;
    # rank 0's choice, so that ranks on machines of different kinds compute alike.
    cfg.train.precision = parallel.decide_on_main(lambda: resolve_precision(cfg.train.precision, d.device), d)
    if cfg.optim.lr is None:  # concrete before config.yaml and the resume check read it
        cfg.optim.lr = parallel.decide_on_main(lambda: default_lr(cfg, recorded), d)
    # Recorded as a number, so that a run extended to more steps keeps the warmup it had.
    cfg.optim.warmup_steps = cfg.optim.warmup_for(cfg.train.max_steps)

    refuse_changed_settings(cfg, resume_from, allow_config_change, d.world_size)

    seed_everything(cfg.seed)
    from graftlm.models.hf import resolve_model_config
    context = resolve_model_config(cfg.model).max_seq_len  # a wrong --model is named before the tokenizer
    if cfg.adapter is not None and not _from_weights(cfg):
        # Its random base would be neither trained nor saved: the adapter could never be used.
        raise ConfigError(f"--adapter {cfg.adapter.kind}: model '{cfg.model}' has no weights (a preset or a "
                          "config starts from random ones), and adapters train on a pre-trained base that stays "
                          "frozen: pass a model directory (a run's final/, or a Hugging Face model's), or train "
                          "in full without --adapter")
    _check_weightless_directory(cfg, warn=print if d.is_main else lambda line: None)
    _note_random_start(cfg, warn=print if d.is_main else lambda line: None)
    # Concrete before config.yaml, the resume check and the plan read it.
    cfg.train.seq_len = cfg.train.seq_len_for(cfg.objective, context)
    if cfg.objective == "clm" and _from_weights(cfg) and cfg.train.seq_len > context:
        # Pre-training windows are all seq_len long; fine-tuning rows are cut at the
        # context instead (`sft.renderer_for`), and counted.
        raise ConfigError(f"config field 'train.seq_len': {cfg.train.seq_len} tokens exceed the context of "
                          f"model {cfg.model} (max_position_embeddings {context})")
    tokenizer = find_tokenizer(cfg, Path(cfg.data), warn=print if d.is_main else lambda line: None)
    data = spec.build_dataset(cfg, tokenizer)
    if d.is_main and spec.describe is not None:
        print(spec.describe(cfg), flush=True)
    if d.is_main and data.stats:  # in words here; the counts themselves go to summary.json
        packing = data.stats.get("packing")
        if packing:
            print(f"packing: {packing['rows']:,} rows into {packing['sequences']:,} sequences "
                  f"({packing['rows_per_sequence']:.2f} rows each, {packing['padding_fraction']:.1%} padding)",
                  flush=True)
        bad = data.stats.get("bad_rows_skipped")
        if bad:  # in words too, not only in the JSON line
            print(f"warning: skipped {bad['bad']} bad row{'s' if bad['bad'] > 1 else ''} of {bad['of']}; "
                  f"the first: {bad['first']}", flush=True)
        cut = data.stats.get("length_limit") or {}
        truncated, dropped = cut.get("truncated", 0), cut.get("dropped_too_long", 0)
        if truncated or dropped:  # the JSON counts, in words: what share is lost and which flag keeps it
            section = getattr(cfg, cfg.objective, None)
            keep = (f", or --{cfg.objective}.overflow truncate keeps their start"
                    if dropped and getattr(section, "overflow", None) == "drop" else "")
            remedy = (f"--{cfg.objective}.max-length raises the limit (up to the model's context){keep}"
                      if not _from_weights(cfg) or cut["max_length"] < context else
                      f"that is the context of model {cfg.model}: longer rows cannot be trained whole")
            print(f"warning: {truncated + dropped} of {cut['of']} rows ({(truncated + dropped) / cut['of']:.0%}) "
                  f"were cut or dropped at {cut['max_length']} tokens ({truncated} cut, {dropped} dropped); "
                  f"{remedy}", flush=True)
        if data.stats.get("validation_lost"):
            print(f"warning: {data.stats['validation_lost']}", flush=True)
        if cut.get("dropped_untrained"):
            print(f"warning: {cut['dropped_untrained']} of {cut['of']} rows were dropped: they have no token to "
                  f"train on, even whole (an empty reply, or none that --{cfg.objective}.train-on trains)",
                  flush=True)
    vocab = max(v for v in (tokenizer.vocab_size if tokenizer else 0, data.vocab_size or 0))
    model = build_model(cfg, vocab or None, tokenizer, d.device)
    if spec.prepare_model is not None:
        model = spec.prepare_model(cfg, model, tokenizer)
    model = apply_parameterization(model, cfg)
    objective = spec.build_objective(cfg, model)
    sampler = getattr(objective, "sampler", None)  # RL: its completions, when asked to log them
    if sampler is not None and d.is_main:
        sampler.completions_log = run_dir / "completions.jsonl"
    wrapped = parallel.wrap_model(model, d, cfg.parallel)

    params_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    params_trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    if d.is_main:
        print(_trained_parameters(model, cfg.adapter, params_total, params_trainable), flush=True)
    dtype = torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16
    loader = ResumableLoader(data.train, cfg.train.batch_size, seed=cfg.seed, rank=d.rank,
                             world_size=d.world_size)
    if d.is_main:  # only now: a run refused for its data or model leaves no directory behind
        make_directory(run_dir, "--out/--name")
        lock.acquire(run_dir)
    trainer = Trainer(
        model, objective, loader, cfg.train, cfg.optim, device=d.device, forward_model=wrapped,
        val_dataset=data.val, val_bytes_per_token=data.val_bytes_per_token, run_dir=run_dir,
        identity=run_identity(cfg, data.identity, d.world_size, saved_identity(resume_from), model),
        trainable_only=cfg.adapter is not None,
        flops_per_token=flops_per_token_at(cfg, model.config), peak_flops=peak_flops(d.device, dtype), rank=d.rank,
        world_size=d.world_size, all_reduce=lambda t: parallel.all_reduce_sum(t, d),
        grad_sync=lambda last: parallel.gradient_sync(wrapped, last), tensorboard=cfg.tensorboard,
        sharded=parallel.is_sharded(wrapped), started=started)
    config = {"objective": cfg.objective, **to_dict(cfg)}
    if resume_from is not None:
        trainer.resume(resume_from, allow_config_change)
        if d.is_main:
            print(f"resuming from {resume_from} (step {trainer.step})", flush=True)
            changed = changed_settings(recorded, config, defaults=to_dict(type(cfg)()))
            if changed:  # allowed (the learning rate, more steps...), but never unsaid
                print(f"warning: resumed with changed settings: {', '.join(changed)} (config.yaml now records "
                      "them; --fresh starts the run over)", flush=True)
            jump = schedule_jump(recorded, cfg, trainer.step)
            if jump:
                print(jump, flush=True)
    if d.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    stats = trainer.fit()

    summary = None
    with parallel.gathered(wrapped, d) as plain:  # FSDP2: every rank all-gathers, rank 0 writes
        if d.is_main:
            final = run_dir / "final"
            shutil.rmtree(final, ignore_errors=True)
            if cfg.adapter is not None:
                from graftlm.adapters import save_adapter
                save_adapter(plain, final, base_model_name_or_path=cfg.model)
            elif spec.save_final is not None:
                spec.save_final(plain, final, tokenizer)
            else:
                from graftlm.models.hf import save_model
                save_model(plain, final, tokenizer_dir=tokenizer.path if tokenizer else None,
                           dtype=final_dtype(cfg))
    if d.is_main:
        if tokenizer is not None and not (final / "tokenizer.json").exists():
            tokenizer.save(final)
        summary = {
            "objective": cfg.objective,
            "parameterization": cfg.adapter.kind if cfg.adapter else "full",
            "model": cfg.model, "device": str(d.device), "world_size": d.world_size,
            "precision": cfg.train.precision, "fast_bf16": fast_bfloat16(d.device.type),
            "params_total": params_total, "params_trainable": params_trainable,
            **stats, **({"data": data.stats} if data.stats else {}), "wall_time_s": trainer.wall_time_s(),
            "flops_per_token": stats["flops"] / max(stats["tokens"], 1), "peak_flops": trainer.peak_flops,
            # QLoRA: how fast this device dequantizes the NF4 base, which plan --check predicts the run's time with
            **({"nf4_dequant": nf4_dequant_rate(d.device).as_dict()}
               if cfg.adapter is not None and cfg.adapter.kind == "qlora" else {}),
            "artifact_bytes": _dir_bytes(final),
            "config_sha256": hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest(),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_report_or_warn(run_dir)
        saved_as = final_dtype(cfg) if cfg.adapter is None and spec.save_final is None else None
        print(f"saved: {final} ({'adapter' if cfg.adapter is not None else 'model'}, "
              f"{summary['artifact_bytes'] / 2**20:,.1f} MiB"
              + (f", {str(saved_as).removeprefix('torch.')}" if saved_as not in (None, torch.float32) else "")
              + ")", flush=True)
    parallel.barrier(d)
    # Let go of what holds the process group's pending work (FSDP's modules and their
    # last collectives' buffers, the sharded optimizer state) while the interpreter is
    # whole: freed later, at exit, by gloo's threads, they can abort a finished rank
    # with SIGABRT ("terminate called without an active exception", pytorch#179291).
    del trainer, wrapped, model, objective, loader
    gc.collect()
    parallel.shutdown(d)
    return summary or {}
