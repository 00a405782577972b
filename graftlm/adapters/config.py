"""`AdapterConfig`, the parameterization section of a run config, and target selection.

Targets are chosen exactly as PEFT chooses them, so that one `target_modules` value
means the same thing in graftlm and in PEFT, and a PEFT `adapter_config.json` selects the
same layers here:
- a list of names: a module matches when its full name equals an entry or ends with
  "." + entry (`["q_proj", "v_proj"]`, or `["layers.0.mlp.up_proj"]`); each entry must
  match some linear layer (PEFT asks that one does, so a typo beside good names goes
  unnoticed there);
- a regular expression (any other string): `re.fullmatch` against the module's full
  name *as Hugging Face spells it* (`model.layers.0.self_attn.q_proj`, `lm_head`), which
  is the name PEFT matches against;
- "all-linear": every `nn.Linear` except the output layer (`lm_head`), as PEFT does.
Modules in `modules_to_save` are trained in full (a copy per adapter) and never also
get LoRA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from graftlm.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where layers are selected: the run config (AdapterConfig) needs none
    from torch import nn


def _lora_linear():
    from graftlm.adapters.lora import LoraLinear
    return LoraLinear

KINDS = ("lora", "qlora", "dora")
ALL_LINEAR = "all-linear"
OUTPUT_LAYER = "lm_head"
SCALAR_HEAD = "score"  # a reward model's head (models/heads.py), trained in full with adapters
BASE_DTYPES = ("auto", "float32", "bfloat16")


def base_storage_dtype(base_dtype: str, precision: str | None) -> str:
    """The dtype the frozen base is stored in: `base_dtype`, with "auto" resolved by the
    run's precision. A run that computes in bf16 (bf16 autocast, or a bf16 model) keeps
    the base in bf16: it gets no gradient, autocast would cast each linear weight to
    bf16 on every step anyway, and it takes half the memory (PEFT users load the same
    way). Elsewhere (float32 runs; adapters applied outside a run) it stays float32."""
    if base_dtype != "auto":
        return base_dtype
    return "bfloat16" if precision in ("bf16-autocast", "bf16") else "float32"


@dataclass
class AdapterConfig:
    kind: str = field(default="lora", metadata={
        "help": "lora (the default once any --adapter* flag is given), qlora (4-bit NF4 frozen base), dora, "
                "or full (no adapter: the run trains every weight, as without any --adapter* flag)"})
    r: int = field(default=16, metadata={"help": "rank of the low-rank update"})
    alpha: float = field(default=32.0, metadata={"help": "scale numerator: alpha / r (or / sqrt(r) with rslora)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    # A list of module names, a regular expression, or "all-linear". In a YAML recipe a
    # list is a list; on the command line a comma-separated value is a list of names.
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR],
                                      metadata={"help": "names, one regex, or all-linear"})
    modules_to_save: list[str] = field(default_factory=list,
                                       metadata={"help": "modules trained in full, e.g. lm_head,embed_tokens"})
    init: str = field(default="default", metadata={"help": "default (A kaiming-uniform, B zeros) or gaussian"})
    base_dtype: str = field(default="auto", metadata={
        "help": "storage dtype of the frozen base: auto (bfloat16 when the run computes in bf16, else float32), "
                "float32 or bfloat16"})

    def validate(self) -> None:
        if self.kind not in KINDS:
            # The run config's field also takes `full`, which leaves the adapter section out.
            raise ConfigError(f"config field 'adapter.kind': expected one of {', '.join(KINDS)}, or full (no "
                              f"adapter: every weight trains), got {self.kind!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"config field 'adapter.r': expected a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"config field 'adapter.alpha': expected a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config field 'adapter.dropout': expected a number in [0, 1), got {self.dropout!r}")
        if self.init not in ("default", "gaussian"):
            raise ConfigError(f"config field 'adapter.init': expected 'default' or 'gaussian', got {self.init!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"config field 'adapter.base_dtype': expected one of {', '.join(BASE_DTYPES)}, "
                              f"got {self.base_dtype!r}")
        targets = self.targets
        if not targets:
            raise ConfigError("config field 'adapter.target_modules': names no module")
        if isinstance(targets, str) and targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as e:
                raise ConfigError(f"config field 'adapter.target_modules': invalid regex {targets!r} ({e})") from None
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError("config field 'adapter.target_modules': 'all-linear' cannot be combined with names")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)

    @property
    def targets(self) -> list[str] | str:
        """A list of names, or one string (a regex, or "all-linear").

        A one-entry list that is not a plain module name (it contains regex syntax) is
        read as a regex, so `--adapter.target-modules '.*\\.(q|v)_proj'` works.
        """
        names = list(self.target_modules)
        if len(names) == 1 and (names[0] == ALL_LINEAR or not re.fullmatch(r"[\w.]+", names[0])):
            return names[0]
        return names


def hf_module_name(name: str) -> str:
    """graftlm's module name as Hugging Face (and PEFT) spell it. A decoder's modules
    lack the backbone's `model.` prefix; a scalar head's (`model.layers...`, `score`)
    already are Hugging Face's."""
    own = (OUTPUT_LAYER, "model", SCALAR_HEAD)
    return name if any(name == top or name.startswith(top + ".") for top in own) else "model." + name


def graft_module_name(hf_name: str) -> str:
    return hf_name[len("model."):] if hf_name.startswith("model.") else hf_name


def name_matches(name: str, names: list[str]) -> bool:
    """PEFT's rule for a list: equal, or ending with "." + entry (on either spelling)."""
    hf = hf_module_name(name)
    return any(key in (name, hf) or name.endswith("." + key) or hf.endswith("." + key) for key in names)


def select_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Names of the `nn.Linear` modules of `model` that get LoRA under `cfg`."""
    targets = cfg.targets
    linear = _linear_layers(model)
    if isinstance(targets, list):
        _refuse_unmatched_names(targets, linear)
    chosen = [name for name in linear
              if not (cfg.modules_to_save and name_matches(name, cfg.modules_to_save))
              and _is_target(name, targets)]
    if not chosen:
        example = hf_module_name(linear[0]) if linear else "model.layers.0.self_attn.q_proj"
        how = (f"a regex must match a whole name as Hugging Face spells it, such as '{example}', as in PEFT"
               if isinstance(targets, str) else "names look like 'q_proj' or 'layers.0.mlp.up_proj'")
        raise ConfigError(f"config field 'adapter.target_modules': {cfg.target_modules!r} matches no linear layer "
                          f"({how})")
    modules = dict(model.named_modules())
    widest = max(min(modules[name].in_features, modules[name].out_features) for name in chosen)
    if cfg.r > widest:  # B·A can have no higher rank; its A and B alone could fill the memory
        raise ConfigError(f"config field 'adapter.r': {cfg.r} is above the rank of every targeted layer (at most "
                          f"{widest}, the smaller side of the widest); LoRA ranks are usually 8-64")
    return chosen


def _linear_layers(model: nn.Module) -> list[str]:
    """The model's own linear layers by name (an adapter wrapper counts as its layer;
    the copies inside wrappers do not)."""
    from torch import nn

    inner = ("base_layer", "modules_to_save", "original_module")
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, _lora_linear())) and not set(name.split(".")) & set(inner)]


def _is_target(name: str, targets: list[str] | str) -> bool:
    if targets == ALL_LINEAR:
        return name != OUTPUT_LAYER
    if isinstance(targets, str):
        return re.fullmatch(targets, hf_module_name(name)) is not None
    return name_matches(name, targets)


def _refuse_unmatched_names(names: list[str], linear: list[str]) -> None:
    """Each name of a list must match some layer: a typo beside good names would
    otherwise leave its layers without an adapter, silently."""
    for key in names:
        if not any(name_matches(layer, [key]) for layer in linear):
            short = ", ".join(dict.fromkeys(layer.rsplit(".", 1)[-1] for layer in linear))
            raise ConfigError(f"config field 'adapter.target_modules': '{key}' matches no linear layer of the "
                              f"model (its linear layers: {short})")
