"""Putting adapters on a model and managing them: inject, switch, disable, merge, unload.

Design choices:
- `apply_adapters` swaps each target `nn.Linear` for a `LoraLinear` around it, in
  place, and freezes every base parameter; the model stays the same `Decoder` object,
  so objectives, the trainer and parallel wrappers see no difference.
- The model remembers its adapters' configs (`model.adapter_configs`) and the identity
  of its base taken before any quantization or cast (`model.adapter_base_identity`), so
  saving an adapter records the base it was trained on.
- QLoRA quantizes the model's one base in place, for good, so a QLoRA adapter never
  shares a base with adapters of the other kinds, which were trained on full-precision
  weights (`check_shared_base`); several QLoRA adapters do share one quantized base.
- The reference model of DPO / GRPO / PPO comes from here: with adapters it is the same
  model with adapters disabled (no second copy of the base); without, a frozen copy
  made once and kept beside the model (not as a submodule, so it never shows up in
  `parameters()` or checkpoints).
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from graftlm.adapters import qlora
from graftlm.adapters.config import OUTPUT_LAYER, AdapterConfig, base_storage_dtype, name_matches, select_targets
from graftlm.adapters.identity import base_identity
from graftlm.adapters.lora import LoraLinear, ModulesToSave
from graftlm import placement
from graftlm.errors import GraftError

_REFERENCES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LoraLinear, ModulesToSave))]


def has_adapters(model: nn.Module) -> bool:
    return any(layer.adapter_names for layer in adapter_layers(model))


def loaded_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, "adapter_configs", {}))


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "active_adapter", None)


def apply_adapters(model: nn.Module, cfg: AdapterConfig, name: str = "default",
                   precision: str | None = None) -> nn.Module:
    """Add adapter `name` to `model` (in place), freeze the base, make `name` active.

    `precision` is the run's (`train.precision`); it decides where `base_dtype: auto`
    stores the frozen base (`base_storage_dtype`)."""
    cfg.validate()
    if name in loaded_adapters(model):
        raise GraftError(f"adapters: the model already has an adapter named '{name}'")
    check_shared_base(model, cfg.kind, name, where="adapters")
    if not hasattr(model, "adapter_configs"):
        # Kept if already set: a reward model's is that of the language model it was made from.
        model.adapter_base_identity = base_identity(model)
        model.adapter_configs = {}
    targets = select_targets(model, cfg)
    adapter_ids = {id(p) for p in adapter_named_parameters(model).values()}
    for param in model.parameters():
        if id(param) not in adapter_ids:
            param.requires_grad_(False)
    if base_storage_dtype(cfg.base_dtype, precision) == "bfloat16":
        _warn_if_bf16_is_slow(model, cfg, precision)
        _cast_base(model, torch.bfloat16)
    if cfg.kind == "qlora":
        _quantize_base(model, cfg)
    for target in targets:
        layer = model.get_submodule(target)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            _set_module(model, target, layer)
        layer.add_adapter(name, cfg.r, cfg.scaling, cfg.dropout, use_dora=cfg.kind == "dora", init=cfg.init)
    for target in _modules_to_save(model, cfg):
        wrapper = model.get_submodule(target)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            _set_module(model, target, wrapper)
        wrapper.add_adapter(name)
    model.adapter_configs[name] = cfg
    set_active_adapter(model, name)
    # New modules start in training mode; they take the model's (an adapter loaded for
    # inference must not keep its dropout on).
    model.train(model.training)
    return model


_KIND_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA"}
_OWN_BASE = ("load QLoRA adapters on a base of their own (a separate `graft serve`, or another model "
             "instance), or serve a merged model (`graft merge`) instead")


def check_shared_base(model: nn.Module, kind: str, name: str, where: str) -> None:
    """Refuse adapter `name` of `kind` where QLoRA and other adapters would share one base.

    QLoRA quantizes the model's one base to NF4 in place, for good (unloading its
    adapter does not undo it): every other adapter, and the base itself, would then
    compute on 4-bit weights. `where` starts the message (the adapter's directory)."""
    kinds = {other: cfg.kind for other, cfg in getattr(model, "adapter_configs", {}).items()}
    if kind == "qlora":
        others = [other for other, other_kind in kinds.items() if other_kind != "qlora"]
        if others:
            one = len(others) == 1
            raise GraftError(f"{where}: adapter '{name}' is a QLoRA adapter, which quantizes the model's base to "
                             f"4-bit NF4 in place, but {_described(others, kinds)} {'is' if one else 'are'} on "
                             f"that base: the 4-bit base would change {'its' if one else 'their'} outputs and the "
                             "base's own; " + _OWN_BASE)
    elif _base_is_nf4(model):
        quantizers = [other for other, other_kind in kinds.items() if other_kind == "qlora"]
        why = f"for {_described(quantizers, kinds)}" if quantizers else "by a QLoRA adapter loaded before"
        raise GraftError(f"{where}: adapter '{name}' is a {_KIND_NAMES[kind]} adapter, but this model's base is "
                         f"quantized to 4-bit NF4 {why}: an adapter trained on the full-precision base would run "
                         "on 4-bit weights; " + _OWN_BASE)


def _described(names: list[str], kinds: dict[str, str]) -> str:
    """"LoRA adapter 'a'", or "adapters 'a' (LoRA), 'b' (DoRA)"."""
    if len(names) == 1:
        return f"{_KIND_NAMES[kinds[names[0]]]} adapter '{names[0]}'"
    return "adapters " + ", ".join(f"'{n}' ({_KIND_NAMES[kinds[n]]})" for n in names)


def _base_is_nf4(model: nn.Module) -> bool:
    return any(qlora.is_nf4(param) for param in model.parameters())


def _modules_to_save(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    found = [name for name, module in model.named_modules()
             if name and cfg.modules_to_save and name_matches(name, cfg.modules_to_save)
             and not isinstance(module, (LoraLinear, ModulesToSave))
             and "original_module" not in name.split(".") and "modules_to_save" not in name.split(".")]
    wanted = [key for key in cfg.modules_to_save if not any(name_matches(f, [key]) for f in found)]
    wrapped = {name for name, m in model.named_modules() if isinstance(m, ModulesToSave)}
    wanted = [key for key in wanted if not any(name_matches(w, [key]) for w in wrapped)]
    if wanted:
        raise GraftError(f"config field 'adapter.modules_to_save': '{wanted[0]}' names no module of the model")
    return found + sorted(w for w in wrapped if name_matches(w, cfg.modules_to_save))


_SAID: set[str] = set()


def _warn_if_bf16_is_slow(model: nn.Module, cfg: AdapterConfig, precision: str | None) -> None:
    """`base_dtype: bfloat16` on a device without fast bf16 matmuls (an AVX2-only CPU, a
    card before Ampere): the frozen base then computes in bf16, many times slower than
    in float32. Said once per process, by rank 0; a bf16 `train.precision` was already
    warned of where the run resolved it (`placement.resolve_precision`)."""
    if cfg.base_dtype != "bfloat16" or precision in ("bf16-autocast", "bf16"):
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if placement.fast_bfloat16(device.type):
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    message = (f"warning: --adapter.base-dtype bfloat16: {placement.slow_bfloat16_reason(device)}, so every step runs many times slower than with "
               "a float32 base (its bf16 matrix products, 50x slower on an AVX2 CPU); --adapter.base-dtype auto or "
               "float32 keeps the frozen base in float32, at twice its memory")
    if message not in _SAID:
        _SAID.add(message)
        print(message, file=sys.stderr, flush=True)


def _cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen base in `dtype` (it gets no gradients, so bf16 halves it for free)."""
    adapter_ids = {id(p) for p in adapter_named_parameters(model).values()}
    for param in model.parameters():
        if id(param) not in adapter_ids and param.is_floating_point() and not qlora.is_nf4(param):
            param.data = param.data.to(dtype)


def _quantize_base(model: nn.Module, cfg: AdapterConfig) -> None:
    """QLoRA: every linear layer of the base except the output layer goes to NF4."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != OUTPUT_LAYER and not qlora.is_nf4(module.weight) \
                and not (cfg.modules_to_save and name_matches(name, cfg.modules_to_save)) \
                and "modules_to_save" not in name.split(".") and "original_module" not in name.split("."):
            qlora.quantize_linear_(module, name)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one every forward uses (None: the base alone)."""
    if name is not None and name not in loaded_adapters(model):
        raise GraftError(f"adapters: no adapter named '{name}' (loaded: {', '.join(loaded_adapters(model)) or 'none'})")
    unmerge(model)
    for layer in adapter_layers(model):
        layer.active = name
    for param_name, param in adapter_named_parameters(model).items():
        param.requires_grad_(_adapter_of(param_name) == name)
    model.active_adapter = name


def _adapter_of(param_name: str) -> str:
    """The adapter a parameter belongs to: the key after lora_A / lora_B / ... ."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("lora_A", "lora_B", "lora_magnitude", "modules_to_save"):
            return parts[i + 1]
    raise KeyError(param_name)


def unload_adapter(model: nn.Module, name: str, unwrap: bool = True) -> None:
    """Remove adapter `name` from memory; with the last one gone, layers are unwrapped
    unless `unwrap` is False (a compiled graph traced through the wrappers, e.g. a
    compiled server's decode step, stays valid only while they are there)."""
    if name not in loaded_adapters(model):
        raise GraftError(f"adapters: no adapter named '{name}' to unload")
    for layer in adapter_layers(model):
        layer.remove_adapter(name)
    del model.adapter_configs[name]
    if active_adapter(model) == name:
        remaining = loaded_adapters(model)
        set_active_adapter(model, remaining[0] if remaining else None)
    if unwrap and not loaded_adapters(model):
        _unwrap(model)


def _unwrap(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            _set_module(model, name, module.base_layer)
        elif isinstance(module, ModulesToSave):
            _set_module(model, name, module.original_module)


def adapter_named_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """{parameter name: parameter} of adapter `name` (default: every adapter)."""
    out = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        parts = param_name.split(".")
        if not any(p in ("lora_A", "lora_B", "lora_magnitude", "modules_to_save") for p in parts):
            continue
        if name is None or _adapter_of(param_name) == name:
            out[param_name] = param
    return out


def adapter_params(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The parameters that training updates: the active adapter's (or adapter `name`'s)."""
    return list(adapter_named_parameters(model, name or active_adapter(model)).values())


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The trainable tensors of adapter `name` by parameter name, for exact resume."""
    params = adapter_named_parameters(model, name or active_adapter(model))
    return {k: v.detach().clone() for k, v in params.items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str | None = None) -> None:
    """Restore what `adapter_state_dict` returned, exactly (names and shapes checked)."""
    params = adapter_named_parameters(model, name or active_adapter(model))
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        what = f"is missing '{missing[0]}'" if missing else f"has unexpected '{unexpected[0]}'"
        raise GraftError(f"adapter state {what}")
    for key, param in params.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise GraftError(f"adapter state '{key}' has shape {tuple(state[key].shape)}, "
                             f"the model's is {tuple(param.shape)}")
        param.copy_(state[key])


@contextmanager
def layers_set(layers: list[nn.Module], attribute: str, value):
    """Within the block every layer's `attribute` is `value`; each gets its own back after."""
    before = [getattr(layer, attribute) for layer in layers]
    for layer in layers:
        setattr(layer, attribute, value)
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            setattr(layer, attribute, was)


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its base alone."""
    layers = adapter_layers(model)
    merged = [layer for layer in layers if getattr(layer, "merged", None) is not None]
    for layer in merged:
        layer.unmerge()
    try:
        with layers_set(layers, "disabled", True):
            yield model
    finally:
        for layer in merged:
            layer.merge()


@contextmanager
def reference(model: nn.Module):
    """The frozen reference policy of DPO / GRPO / PPO.

    With adapters: the same model with adapters disabled (one copy of the base).
    Without: a frozen copy of the model, made on first use and kept for later calls.
    """
    if has_adapters(model):
        with disable_adapters(model):
            yield model
        return
    ref = _REFERENCES.get(model)
    if ref is None:
        from graftlm.parallel import frozen_copy  # DDP / FSDP2-aware (a plain deepcopy alone)
        ref = frozen_copy(model)
        _REFERENCES[model] = ref
    yield ref


def merge(model: nn.Module, safe: bool = True) -> None:
    """Fold the active adapter into the base weights (`safe`: refuse non-finite results)."""
    layers = [layer for layer in adapter_layers(model) if isinstance(layer, LoraLinear)]
    done = []
    try:
        for layer in layers:
            layer.merge(safe=safe)
            done.append(layer)
    except GraftError:
        for layer in done:
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    for layer in adapter_layers(model):
        if isinstance(layer, LoraLinear):
            layer.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: torch.dtype = torch.float32, safe: bool = True) -> nn.Module:
    """The model as a plain `Decoder` with the active adapter folded in (in place).

    A quantized (QLoRA) base is dequantized to `dtype` before merging; the adapter's
    fully trained modules replace the originals.
    """
    name = active_adapter(model)
    for layer_name, layer in list(model.named_modules()):
        if isinstance(layer, LoraLinear):
            weight = layer.base_weight()
            if name is not None and name in layer.lora_A and layer.merged is None:
                weight = layer._adapted_weight(name, weight)
            elif layer.merged is not None:
                weight = layer.base_weight()
            if safe and not torch.isfinite(weight).all():
                raise GraftError(f"adapters: merging adapter '{name}' into '{layer_name}' gives non-finite weights")
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.base_layer.bias is not None,
                              device=weight.device, dtype=dtype)
            plain.weight.copy_(weight.to(dtype))
            if layer.base_layer.bias is not None:
                plain.bias.copy_(layer.base_layer.bias.to(dtype))
            _set_module(model, layer_name, plain)
        elif isinstance(layer, ModulesToSave):
            _set_module(model, layer_name, layer.chosen(name))
    for module in model.modules():  # non-target layers quantized by QLoRA
        if isinstance(module, nn.Linear) and qlora.is_nf4(module.weight):
            module.weight = nn.Parameter(qlora.dequantize(module.weight, dtype), requires_grad=False)
    model.to(dtype)
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)  # a scalar head (reward model) has none
    if getattr(config, "tie_embeddings", False) and head is not None and head.weight is not model.embed_tokens.weight:
        config.tie_embeddings = False  # an adapter trained one of the two in full
    for attr in ("adapter_configs", "active_adapter", "adapter_base_identity"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
