"""Losses, one module per objective, and the registry that `runs.py` builds them from.

An objective module `graftlm/objectives/<name>.py` defines `SPEC = ObjectiveSpec(...)`:
- `config_cls`: its own config dataclass; the run config gets a section named after the
  objective (`--dpo.beta 0.1`, `dpo: {beta: 0.1}` in a recipe);
- `build_dataset(cfg, tokenizer) -> DataSplits`: train (and optional validation) data
  sets in the loader's protocol (`len`, `[i] -> dict of tensors`, optional `collate`);
- `build_objective(cfg, model) -> objective`: an object with `name` and
  `loss(model, batch) -> (loss_sum, count, metrics)` (see docs/ARCHITECTURE.md).
`cfg` is the whole run config (`runs.RunConfig` plus the objective's section). Modules
are imported only when their command runs, so one objective cannot break another.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from graftlm.errors import GraftError

# name -> module; a module that does not exist yet simply has no command.
OBJECTIVE_MODULES = {
    "clm": "graftlm.objectives.clm",
    "sft": "graftlm.objectives.sft",
    "dpo": "graftlm.objectives.dpo",
    "reward": "graftlm.objectives.reward",
    "grpo": "graftlm.objectives.grpo",
    "ppo": "graftlm.objectives.ppo",
}


@dataclass
class DataSplits:
    """What an objective's `build_dataset` returns."""

    train: Any
    val: Any = None
    # UTF-8 bytes per predicted validation token, for bits per byte (None: not reported)
    val_bytes_per_token: float | None = None
    # Largest token id the data can contain + 1; checked against the model's vocabulary.
    vocab_size: int | None = None
    # What identifies the data stream; a resumed run refuses a change in it.
    identity: dict = field(default_factory=dict)
    # Facts about the prepared data worth reporting (e.g. SFT packing efficiency):
    # printed when the run starts and written to summary.json under "data".
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    help: str
    config_cls: type
    build_dataset: Callable[[Any, Any], DataSplits]
    build_objective: Callable[[Any, Any], Any]
    # Optional: turn the built decoder into the trained model (reward: a scalar head),
    # `prepare_model(cfg, model, tokenizer) -> model`, and write it as `final/`,
    # `save_final(model, out, tokenizer)` (used without adapters).
    prepare_model: Callable[[Any, Any, Any], Any] | None = None
    save_final: Callable[[Any, Any, Any], Any] | None = None
    # Optional: `describe(cfg) -> str`, the one line of settings printed as a run starts,
    # for objectives whose defaults depend on other choices (SimPO's beta).
    describe: Callable[[Any], str] | None = None


def available() -> list[str]:
    """Objectives whose module is present."""
    return [name for name, module in OBJECTIVE_MODULES.items() if importlib.util.find_spec(module)]


def _check_known(name: str) -> None:
    if name not in OBJECTIVE_MODULES:
        raise GraftError(f"unknown objective '{name}' (known: {', '.join(OBJECTIVE_MODULES)})")


def config_class(name: str) -> type:
    """The objective's config section, without importing its module (which imports torch):
    what `graft <command> --help` and `graft plan` build run configs of."""
    from graftlm.objectives.configs import CONFIGS

    _check_known(name)
    return CONFIGS[name]


def get_spec(name: str) -> ObjectiveSpec:
    _check_known(name)
    module = importlib.import_module(OBJECTIVE_MODULES[name])
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, ObjectiveSpec):
        raise GraftError(f"objective '{name}' is not available yet ({OBJECTIVE_MODULES[name]} has no SPEC)")
    return spec
