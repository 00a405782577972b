"""Parameterization: what a run trains. `full` trains the model; `lora`, `qlora`, `dora`
train small adapters on a frozen base (see docs/ARCHITECTURE.md, "Parameterization").

Modules: config (AdapterConfig, target selection), lora (the layers), dora (DoRA's
math), qlora (NF4 base via torchao), inject (apply / switch / disable / merge / unload),
peft_format (PEFT files), multi (per-row adapters), identity (base fingerprints).
"""

from graftlm.lazy import lazy_exports

# name -> the module defining it, imported when the name is first used: `adapters.config`
# (the run config's section) is read without torch, which every other module imports.
_DEFINED_IN = {
    "AdapterConfig": "config", "base_identity": "identity", "row_adapters": "multi",
    **dict.fromkeys(["active_adapter", "adapter_named_parameters", "adapter_params", "adapter_state_dict",
                     "apply_adapters", "disable_adapters", "has_adapters", "load_adapter_state_dict",
                     "loaded_adapters", "merge", "merge_and_unload", "reference", "set_active_adapter",
                     "unload_adapter", "unmerge"], "inject"),
    **dict.fromkeys(["load_adapter", "read_adapter_config", "save_adapter"], "peft_format"),
}

__all__ = [
    "AdapterConfig", "apply_adapters", "has_adapters", "loaded_adapters", "active_adapter",
    "set_active_adapter", "unload_adapter", "disable_adapters", "reference", "adapter_params",
    "adapter_named_parameters", "adapter_state_dict", "load_adapter_state_dict", "merge", "unmerge",
    "merge_and_unload", "save_adapter", "load_adapter", "read_adapter_config", "row_adapters",
    "base_identity",
]


__getattr__ = lazy_exports(__name__, _DEFINED_IN)
