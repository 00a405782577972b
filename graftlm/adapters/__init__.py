"""Parameterization: what a run trains. `full` trains the model; `lora`, `qlora`, `dora`
train small adapters on a frozen base (see docs/ARCHITECTURE.md, "Parameterization").

Modules: config (AdapterConfig, target selection), lora (the layers), dora (DoRA's
math), qlora (NF4 base via torchao), inject (apply / switch / disable / merge / unload),
peft_format (PEFT files), multi (per-row adapters), identity (base fingerprints).
"""

from graftlm.adapters.config import AdapterConfig
from graftlm.adapters.identity import base_identity
from graftlm.adapters.inject import (active_adapter, adapter_named_parameters, adapter_params,
                                     adapter_state_dict, apply_adapters, disable_adapters, has_adapters,
                                     load_adapter_state_dict, loaded_adapters, merge, merge_and_unload,
                                     reference, set_active_adapter, unload_adapter, unmerge)
from graftlm.adapters.multi import row_adapters
from graftlm.adapters.peft_format import load_adapter, read_adapter_config, save_adapter

__all__ = [
    "AdapterConfig", "apply_adapters", "has_adapters", "loaded_adapters", "active_adapter",
    "set_active_adapter", "unload_adapter", "disable_adapters", "reference", "adapter_params",
    "adapter_named_parameters", "adapter_state_dict", "load_adapter_state_dict", "merge", "unmerge",
    "merge_and_unload", "save_adapter", "load_adapter", "read_adapter_config", "row_adapters",
    "base_identity",
]
