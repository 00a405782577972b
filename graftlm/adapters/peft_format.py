"""Adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

A graftlm adapter loads in PEFT (`PeftModel.from_pretrained`) and a PEFT LoRA / DoRA
adapter loads here. Tensor names are PEFT's, with the adapter name left out:
`base_model.model.<hf module>.lora_A.weight`, `.lora_B.weight`, DoRA's
`.lora_magnitude_vector`, and for a module trained in full `base_model.model.<hf
module>.weight`. Which layers an adapter covers is read from the tensors themselves,
so `target_modules` in any of PEFT's spellings (names, a regex, expanded full names)
never has to be re-matched.

Beyond PEFT's fields, the weights file's metadata records `graftlm_kind` (lora / qlora
/ dora) and `graftlm_base_identity` (see identity.py), where PEFT does not look (in the
config it would warn of unknown fields on every load). Loading refuses, with one line
naming the field or tensor: pickle weights (`adapter_model.bin`), a config field of
the wrong type or range (checked before any tensor, so a bad `r` is not blamed on the
base), `use_dora` that the tensors or `graftlm_kind` contradict, a base whose recorded
identity differs, a tensor for a module the base lacks or whose shape does not fit
it, a QLoRA adapter beside other kinds on one base (inject.check_shared_base), and
PEFT features graftlm lacks (LoRA biases, LoRA on embeddings). An adapter that records
no identity (made by PEFT) loads, as in PEFT, but where its `base_model_name_or_path`
is a local directory other than the one the model was loaded from
(`model.source_dir`), one warning names both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from graftlm.adapters.config import KINDS, AdapterConfig, graft_module_name, hf_module_name
from graftlm.adapters import identity
from graftlm.adapters.inject import (active_adapter, apply_adapters, check_shared_base, loaded_adapters,
                                     set_active_adapter)
from graftlm.adapters.lora import LoraLinear, ModulesToSave
from graftlm.errors import ConfigError, GraftError, read_json
from graftlm.models.heads import ScalarHeadModel
from graftlm.models.hf import read_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _saved_target_names(model: nn.Module, name: str) -> list[str]:
    """Leaf names of the layers the adapter covers (what PEFT writes for "all-linear")."""
    return sorted({layer_name.rsplit(".", 1)[-1] for layer_name, layer in model.named_modules()
                   if isinstance(layer, LoraLinear) and name in layer.lora_A})


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's names."""
    tensors = {}
    for layer_name, layer in model.named_modules():
        key = PREFIX + hf_module_name(layer_name)
        if isinstance(layer, LoraLinear) and name in layer.lora_A:
            tensors[key + ".lora_A.weight"] = layer.lora_A[name]
            tensors[key + ".lora_B.weight"] = layer.lora_B[name]
            if name in layer.lora_magnitude:
                tensors[key + ".lora_magnitude_vector"] = layer.lora_magnitude[name]
        elif isinstance(layer, ModulesToSave) and name in layer.modules_to_save:
            for param_name, param in layer.modules_to_save[name].named_parameters():
                tensors[f"{key}.{param_name}"] = param
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_adapter(model: nn.Module, out_dir: str | Path, name: str | None = None,
                 base_model_name_or_path: str | None = None, base_identity: dict | None = None) -> Path:
    """Write adapter `name` (default: the active one) as a PEFT adapter directory."""
    name = name or active_adapter(model)
    if name not in loaded_adapters(model):
        raise GraftError(f"save_adapter: no adapter named '{name}' on the model")
    cfg: AdapterConfig = model.adapter_configs[name]
    targets = cfg.targets
    if base_model_name_or_path and Path(base_model_name_or_path).is_dir():
        # Absolute: the adapter is read from other directories than the run's.
        base_model_name_or_path = str(Path(base_model_name_or_path).resolve())
    config = {
        "peft_type": "LORA",
        # A scalar head (reward model) is PEFT's sequence classification: its base loads
        # as `AutoModelForSequenceClassification`, `score` among the modules to save.
        "task_type": "SEQ_CLS" if isinstance(model, ScalarHeadModel) else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.kind == "dora",
        "target_modules": targets if isinstance(targets, str) and targets != "all-linear"
        else _saved_target_names(model, name),
        "modules_to_save": list(cfg.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    # graftlm's own fields go in the weights file's metadata: in the config PEFT would
    # warn of unknown fields on every load (and advise upgrading PEFT).
    metadata = {"format": "pt", "graftlm_kind": cfg.kind,
                "graftlm_base_identity": json.dumps(base_identity or identity.base_identity(model))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(model, name), out / WEIGHTS_FILE, metadata=metadata)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _graftlm_fields(adapter_dir: Path) -> dict:
    """`graftlm_kind` and `graftlm_base_identity` from the weights file's metadata (none
    for PEFT's adapters; an unreadable file is reported when its tensors are read)."""
    try:
        with safe_open(str(adapter_dir / WEIGHTS_FILE), framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError):
        return {}
    fields = {}
    if "graftlm_kind" in metadata:
        fields["graftlm_kind"] = metadata["graftlm_kind"]
    if "graftlm_base_identity" in metadata:
        try:
            fields["graftlm_base_identity"] = json.loads(metadata["graftlm_base_identity"])
        except ValueError:
            raise GraftError(f"{adapter_dir / WEIGHTS_FILE}: metadata 'graftlm_base_identity' is not JSON") from None
    return fields


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / CONFIG_FILE
    if not Path(adapter_dir).exists():
        raise GraftError(f"{adapter_dir}: adapter directory does not exist")
    if not path.exists():
        if (Path(adapter_dir) / "config.json").is_file() and any(Path(adapter_dir).glob("*.safetensors")):
            raise GraftError(f"{adapter_dir}: is a model directory, not an adapter (no {CONFIG_FILE}): pass it as "
                             "--model; an adapter is a run's final/ trained with --adapter")
        raise GraftError(f"{adapter_dir}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    config = read_json(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise GraftError(f"{path}: field 'peft_type' is {config.get('peft_type')!r}; graftlm loads LORA adapters")
    for field, ok in (("bias", "none"), ("lora_bias", False), ("fan_in_fan_out", False), ("rank_pattern", {}),
                      ("alpha_pattern", {})):
        if config.get(field) not in (ok, None):
            raise GraftError(f"{path}: field '{field}' is {config[field]!r}; graftlm supports only {ok!r}")
    # Adapters saved before these fields moved to the weights' metadata kept them here.
    return {**config, **_graftlm_fields(Path(adapter_dir))}


def config_from_peft(config: dict, path: Path, kind: str | None = None) -> AdapterConfig:
    """The `AdapterConfig` of a PEFT `adapter_config.json` (`path`), its fields checked
    here so that a bad one is named as the file spells it, not blamed on the base."""
    recorded = _recorded_kind(config, path)
    use_dora = _field(config, path, "use_dora", _is_bool, "true or false", default=(kind or recorded) == "dora")
    kind = kind or recorded or ("dora" if use_dora else "lora")
    if use_dora != (kind == "dora"):
        said = "'graftlm_kind' in its weights' metadata says" if kind == recorded else "it is loaded as"
        raise GraftError(f"{path}: field 'use_dora' is {str(use_dora).lower()}, but {said} {kind}")
    targets = _field(config, path, "target_modules", _is_names, "a list of names or one regex", default=[])
    cfg = AdapterConfig(
        kind=kind,
        r=_field(config, path, "r", lambda v: _is_int(v) and v > 0, "a positive integer"),
        alpha=float(_field(config, path, "lora_alpha", lambda v: _is_number(v) and v > 0, "a positive number",
                           default=8)),
        dropout=float(_field(config, path, "lora_dropout", lambda v: _is_number(v) and 0 <= v < 1,
                             "a number in [0, 1)", default=0.0)),
        rslora=_field(config, path, "use_rslora", _is_bool, "true or false", default=False),
        target_modules=[targets] if isinstance(targets, str) else list(targets),
        modules_to_save=list(_field(config, path, "modules_to_save", _is_name_list, "a list of names", default=[])))
    try:
        cfg.validate()  # what is left to check: a target regex, a `kind` passed in
    except ConfigError as e:
        raise GraftError(f"{path}: {e}") from None
    return cfg


def _recorded_kind(config: dict, path: Path) -> str | None:
    """graftlm's kind of the adapter, if graftlm saved it."""
    recorded = config.get("graftlm_kind")
    if recorded is not None and recorded not in KINDS:
        raise GraftError(f"{path.parent}: 'graftlm_kind' (in its weights' metadata) is {recorded!r}; expected one "
                         f"of {', '.join(KINDS)}")
    return recorded


_REQUIRED = object()


def _field(config: dict, path: Path, field: str, ok, expected: str, default=_REQUIRED):
    """`config[field]`, or `default` where it is absent (PEFT writes null for a field left unset)."""
    value = config.get(field)
    if value is None:
        if default is _REQUIRED:
            raise GraftError(f"{path}: field '{field}' is missing")
        return default
    if not ok(value):
        raise GraftError(f"{path}: field '{field}' must be {expected}, got {value!r}")
    return value


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_name_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_names(value) -> bool:
    return isinstance(value, str) or _is_name_list(value)


def _check_task(model: nn.Module, task_type: str | None, adapter_dir: Path) -> None:
    scalar = isinstance(model, ScalarHeadModel)
    if task_type == "SEQ_CLS" and not scalar:
        raise GraftError(f"{adapter_dir}: a reward-model adapter (task_type SEQ_CLS), not a language model's: "
                         f"it is a model on its own (it records its base): score pairs with `graft eval --model "
                         f"{adapter_dir} --data PAIRS`, use it as a reward (--ppo.reward {adapter_dir}), or merge "
                         "it into its base with `graft merge`, which writes a reward model")
    if scalar and task_type not in ("SEQ_CLS", None):
        raise GraftError(f"{adapter_dir}: task_type {task_type}; a reward model takes SEQ_CLS adapters")


def _check_identity(model: nn.Module, recorded: dict | None, path: Path, allow_other_base: bool) -> None:
    if not recorded:
        return  # an adapter made by PEFT: shapes are still checked tensor by tensor
    actual = identity.base_identity(model)
    if "config_sha256" in recorded and recorded["config_sha256"] != actual["config_sha256"]:
        fields = recorded.get("architecture")
        difference = identity.architecture_difference(fields, model.config) if isinstance(fields, dict) else None
        if difference is not None:
            raise GraftError(f"{path}: the adapter was trained on a base with a different architecture "
                             f"('graftlm_base_identity.architecture'): {difference}")
        # Recorded before the fields were (or they do not say what differs): only the hash.
        raise GraftError(f"{path}: the recorded 'graftlm_base_identity.config_sha256' does not match this base "
                         f"model (the adapter was trained on a base with a different architecture: "
                         f"{recorded['config_sha256'][:12]} vs {actual['config_sha256'][:12]})")
    if "weights_sample" not in recorded and "weights_sha256" in recorded:
        # Recorded before the sample replaced the hash (which float16 rounding broke).
        print(f"warning: {path}: saved by an earlier graftlm, whose record of the base weights cannot be "
              "compared; only the architecture and the shapes are checked", file=sys.stderr, flush=True)
    if "weights_sample" in recorded and not allow_other_base:
        difference = identity.weights_difference(recorded["weights_sample"], model)
        if difference is not None:
            raise GraftError(f"{path}: the adapter was trained on a base with other weights "
                             f"('graftlm_base_identity.weights_sample': {difference}); if this base is "
                             "meant (a fine-tuned variant of it), pass --allow-other-base")


def _check_recorded_base(model: nn.Module, recorded: str | None, adapter_dir: Path) -> None:
    """An adapter made by PEFT records no identity of its base, only the name it was
    made from (`base_model_name_or_path`). Where that is a local directory other than
    the one the model was loaded from, say so, and load it (PEFT does not check either);
    a hub id, or a directory not on this machine, is not compared."""
    source = getattr(model, "source_dir", None)
    if source is None and isinstance(model, ScalarHeadModel):
        source = getattr(model.model, "source_dir", None)
    if source is None or not isinstance(recorded, str) or not recorded:
        return
    try:
        recorded_dir = Path(recorded).expanduser()
        if not recorded_dir.is_dir() or recorded_dir.resolve() == Path(source).resolve():
            return
    except (OSError, ValueError):
        return
    print(f"warning: {adapter_dir}: {CONFIG_FILE} names its base model as {recorded_dir.resolve()}, but it is "
          f"loaded onto the model in {Path(source).resolve()}; it records nothing else of its base (it was not "
          "saved by graftlm), so only the shapes are checked: if these are different models, its outputs are wrong",
          file=sys.stderr, flush=True)


def _split_key(key: str, weights_path: Path) -> tuple[str, str]:
    """PEFT tensor name -> (graftlm module name, what: lora_A | lora_B | magnitude | saved.<param>)."""
    if not key.startswith(PREFIX):
        raise GraftError(f"{weights_path}: tensor '{key}' is not a PEFT adapter tensor (no '{PREFIX}' prefix)")
    rest = key[len(PREFIX):]
    if rest.endswith((".lora_embedding_A", ".lora_embedding_B")) or ".base_layer." in rest:
        raise GraftError(f"{weights_path}: tensor '{key}' is PEFT's LoRA on an embedding layer (or the "
                         "embedding it saves beside one), which graftlm does not support: its LoRA targets "
                         "linear layers; train the embedding in full instead (modules_to_save)")
    for suffix, what in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                         (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude")):
        if rest.endswith(suffix):
            return rest[:-len(suffix)], what
    module, _, param = rest.rpartition(".")
    module = module.removesuffix(".modules_to_save")  # older PEFT spelling
    return module, "saved." + param


def _own_module_name(modules: dict, hf_name: str) -> str:
    """The model's name for a module PEFT names `hf_name`. A decoder's modules are
    Hugging Face's without the backbone's `model.` prefix; a scalar head (reward model)
    keeps Hugging Face's names (`model.layers...`, `score`)."""
    return hf_name if hf_name in modules else graft_module_name(hf_name)


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str = "default",
                 kind: str | None = None, allow_other_base: bool = False) -> nn.Module:
    """Load a PEFT-format adapter as adapter `name`; it becomes active if it is the first.

    `kind="qlora"` loads a LoRA adapter onto an NF4-quantized base (QLoRA inference).
    `allow_other_base`: load it although the base weights it records differ from the
    model's (a fine-tuned variant of its base); the architecture and shapes still must fit.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / WEIGHTS_FILE
    if not weights_path.exists():
        if (adapter_dir / "adapter_model.bin").exists():
            raise GraftError(f"{adapter_dir}: has only adapter_model.bin (pickle), which graftlm never loads; "
                             "re-save it with PEFT's save_pretrained(safe_serialization=True)")
        raise GraftError(f"{adapter_dir}: no {WEIGHTS_FILE}")
    cfg = config_from_peft(config, adapter_dir / CONFIG_FILE, kind)
    check_shared_base(model, cfg.kind, name, where=str(adapter_dir))
    _check_task(model, config.get("task_type"), adapter_dir)
    _check_identity(model, config.get("graftlm_base_identity"), adapter_dir, allow_other_base)
    if not config.get("graftlm_base_identity"):
        _check_recorded_base(model, config.get("base_model_name_or_path"), adapter_dir)
    state = read_safetensors(weights_path)
    modules = dict(model.named_modules())
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, what = _split_key(key, weights_path)
        by_module.setdefault(_own_module_name(modules, module), {})[what] = (key, tensor)
    lora_targets, saved = [], []
    for module_name, parts in sorted(by_module.items()):
        layer = modules.get(module_name)
        if layer is None:
            key = next(iter(parts.values()))[0]
            raise GraftError(f"{weights_path}: tensor '{key}' names module '{hf_module_name(module_name)}', "
                             "which this base model does not have (a different base?)")
        if any(what.startswith("saved.") for what in parts):
            saved.append(module_name)
        elif "lora_A" in parts and "lora_B" in parts:
            lora_targets.append(module_name)
            _check_dora_magnitude(parts, cfg, weights_path)
            _check_lora_shapes(layer, parts, cfg, module_name, weights_path)
        else:
            key = next(iter(parts.values()))[0]
            raise GraftError(f"{weights_path}: tensor '{key}' has no lora_A / lora_B partner")
    cfg.target_modules = lora_targets or cfg.target_modules
    cfg.modules_to_save = saved
    previous = active_adapter(model)
    apply_adapters(model, cfg, name)  # adds the layers; filled below
    if previous is not None:
        set_active_adapter(model, previous)
    _fill(model, name, by_module, weights_path)
    for module_name in saved:  # trained in float32; served in the model's own dtype
        wrapper = model.get_submodule(module_name)
        wrapper.modules_to_save[name].to(_float_dtype(wrapper.original_module))
    return model


def _float_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _check_dora_magnitude(parts, cfg, weights_path) -> None:
    """A DoRA layer needs its trained magnitude: without it the adapter would run with
    the magnitude a new one starts from, and a LoRA layer has no place for one."""
    key = parts["lora_A"][0]
    if cfg.kind == "dora" and "magnitude" not in parts:
        raise GraftError(f"{weights_path}: {CONFIG_FILE} says 'use_dora': true, but tensor '{key}' has no DoRA "
                         f"magnitude beside it ('{key.removesuffix('.lora_A.weight')}.lora_magnitude_vector')")
    if cfg.kind != "dora" and "magnitude" in parts:
        raise GraftError(f"{weights_path}: tensor '{parts['magnitude'][0]}' is a DoRA magnitude, but "
                         f"{CONFIG_FILE} does not say 'use_dora': true")


def _check_lora_shapes(layer, parts, cfg, module_name, weights_path) -> None:
    base = layer.base_layer if isinstance(layer, LoraLinear) else layer
    if not isinstance(base, nn.Linear):
        raise GraftError(f"{weights_path}: tensor '{parts['lora_A'][0]}' targets "
                         f"'{hf_module_name(module_name)}', which is not a linear layer of this base model")
    expected = {"lora_A": (cfg.r, base.in_features), "lora_B": (base.out_features, cfg.r),
                "magnitude": (base.out_features,)}
    for what, (key, tensor) in parts.items():
        if tuple(tensor.shape) != expected[what]:
            raise GraftError(f"{weights_path}: tensor '{key}' has shape {tuple(tensor.shape)}, but this base "
                             f"model's '{hf_module_name(module_name)}' needs {expected[what]} (a different base?)")


@torch.no_grad()
def _fill(model: nn.Module, name: str, by_module: dict, weights_path: Path) -> None:
    for module_name, parts in by_module.items():
        layer = model.get_submodule(module_name)
        if isinstance(layer, LoraLinear):
            layer.lora_A[name].copy_(parts["lora_A"][1])
            layer.lora_B[name].copy_(parts["lora_B"][1])
            if "magnitude" in parts:
                layer.lora_magnitude[name].copy_(parts["magnitude"][1])
            continue
        own = dict(layer.modules_to_save[name].named_parameters())
        for what, (key, tensor) in parts.items():
            param = own.get(what[len("saved."):])
            if param is None or tuple(param.shape) != tuple(tensor.shape):
                want = "no such parameter" if param is None else f"needs {tuple(param.shape)}"
                raise GraftError(f"{weights_path}: tensor '{key}' has shape {tuple(tensor.shape)}; "
                                 f"this base model's '{hf_module_name(module_name)}' {want}")
            param.copy_(tensor)
