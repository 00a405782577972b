"""A training run's config, importable without torch: `graft <command> --help` builds a
training command's options from these dataclasses, and `graft plan` reads the trainers'
defaults from them, neither importing the modules that train (`runs.py`, `trainer.py`,
`parallel.py`: each imports torch, and re-exports what it used to define here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from graftlm.adapters.config import AdapterConfig
from graftlm.errors import ConfigError
from graftlm.objectives import config_class
from graftlm.optim import OptimConfig

PRETRAIN_SEQ_LEN = 256
ROW_LENGTH = {"sft": 1024, "dpo": 1024, "reward": 1024}  # TRL's max_length for these trainers


@dataclass
class TrainConfig:
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps to train"})
    batch_size: int = field(default=8, metadata={"help": "samples per micro-batch, per rank"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seq_len: int | None = field(default=None, metadata={
        "help": "tokens per sample (default: 256 for pre-training and RL; sft, dpo and reward rows up to 1024, "
                "or the model's context if shorter)"})
    precision: Literal["auto", "fp32", "bf16-autocast", "bf16"] = field(
        default="auto", metadata={"help": "fp32, bf16 autocast over fp32 weights, or pure bf16 (auto: bf16 "
                                          "autocast where the device computes bf16 fast, else fp32)"})
    activation_checkpointing: bool = False
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder block"})
    compile_activation_budget: float = field(default=1.0, metadata={
        "help": "with compile: share of a block's activations kept for backward, the rest recomputed "
                "(1.0: keep all, as an eager step does; 0.5: less memory for a slower step)"})
    eval_every: int = field(default=100, metadata={"help": "validate every N steps (0: only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches (0: the whole split)"})
    save_every: int = field(default=500, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the last K checkpoints (0: all)"})
    log_every: int = 10
    save_dtype: Literal["float32", "bfloat16", "float16"] | None = field(default=None, metadata={
        "help": "dtype of final/'s weights (default: the pre-trained base's, as it is stored, as transformers "
                "saves a model loaded in its own dtype; float32 for a new model); checkpoints stay float32"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after N non-finite steps in a row"})

    def seq_len_for(self, objective: str, context: int | None = None) -> int:
        """`seq_len`, or where a run has not chosen one, its objective's: pre-training
        windows (and RL sequences) of 256 tokens; SFT, DPO and reward rows of up to 1024, as
        TRL's trainers cut them (their `max_length`), where 256 cut half of GSM8K's rows.
        The default stays within the model's `context`; a length given is checked against
        it where the objective needs it whole (`runs.py`)."""
        if self.seq_len is not None:
            return self.seq_len
        default = ROW_LENGTH.get(objective, PRETRAIN_SEQ_LEN)
        return min(default, context) if context else default

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "max_bad_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"config field 'train.{name}': must be >= 1, got {getattr(self, name)}")
        if not 0 < self.compile_activation_budget <= 1:
            raise ConfigError("config field 'train.compile_activation_budget': must be in (0, 1], "
                              f"got {self.compile_activation_budget}")
        for name in ("eval_every", "eval_batches", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field 'train.{name}': must be >= 0, got {getattr(self, name)}")


@dataclass
class ParallelConfig:
    mode: Literal["none", "ddp", "fsdp"] = "none"
    timeout_s: int = 600  # a collective that waits longer fails, naming the rank
    fsdp_mixed_precision: bool = True  # bf16 params in compute, fp32 reductions (CUDA only; fsdp only)

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"config field 'parallel.timeout_s': must be positive, got {self.timeout_s}")


@dataclass
class RunConfig:
    model: str = field(default="", metadata={"help": "preset name, config file, or HF model directory"})
    data: str = field(default="", metadata={"help": "training data (shard directory for pretrain)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory (default: the data's or the model's)"})
    name: str | None = field(default=None, metadata={
        "help": "run name (default: <objective>-<model>, a run's final/ named by its run)"})
    out: str = field(default="runs", metadata={"help": "directory holding run directories"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    tensorboard: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter: AdapterConfig | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    objective = "clm"  # set per command by `run_config_class`

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("config field 'model' is required (a preset, config file or HF directory)")
        if not self.data:
            raise ConfigError("config field 'data' is required")
        sampling = getattr(getattr(self, self.objective, None), "sampling", None)
        if getattr(sampling, "compile", False):  # refused here, before a run directory exists
            from graftlm.objectives.configs import COMPILE_REFUSALS
            field_name = f"config field '{self.objective}.sampling.compile'"
            if self.adapter is not None and self.adapter.kind == "qlora":
                raise ConfigError(f"{field_name}: {COMPILE_REFUSALS['qlora']}")
            if self.parallel.mode == "fsdp":
                raise ConfigError(f"{field_name}: {COMPILE_REFUSALS['fsdp']}")


@lru_cache(maxsize=None)
def run_config_class(objective: str) -> type:
    """RunConfig plus the objective's own section, named after it (`clm:`, `dpo:`...)."""
    section = config_class(objective)
    return dataclasses.make_dataclass(
        f"{section.__name__.removesuffix('Config')}RunConfig",
        [(objective, section, field(default_factory=section))],
        bases=(RunConfig,), namespace={"objective": objective})


def requested_length(cfg: RunConfig, context: int | None = None) -> int:
    """The longest row the run asks for: the objective's max_length, or train.seq_len (its
    objective's default within `context` when not given)."""
    section = getattr(cfg, cfg.objective, None)
    return getattr(section, "max_length", None) or cfg.train.seq_len_for(cfg.objective, context)


def name_of_model_dir(directory: str | Path) -> str:
    """How commands name a model or adapter directory they were given: the directory's
    name, or for a run's `final/` (a summary.json or config.yaml beside it) the run's
    (`runs/sft/final` -> "sft"), since every run's model directory is named `final`."""
    real = Path(directory).resolve()
    if real.name == "final" and any((real.parent / f).is_file() for f in ("summary.json", "config.yaml")):
        return real.parent.name
    return real.name
