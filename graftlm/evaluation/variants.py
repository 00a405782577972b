"""The model each row of the table (the model's own, each adapter's) is scored on."""

from __future__ import annotations


class Variants:
    """The model each row of the table is scored on. The model's own row and its LoRA and
    DoRA adapters share the model as loaded. Loading a QLoRA adapter quantizes its base to
    NF4, so QLoRA adapters go onto a second instance of the base, loaded only for them:
    every other row stays on the full-precision weights, and each QLoRA row is scored on
    the 4-bit base it was trained on."""

    def __init__(self, model_dir, name: str, adapters: dict[str, str], device: str, allow_other_base: bool):
        from graftlm.adapters import load_adapter
        from graftlm.models.hf import load_model

        self.name = name
        self.model = load_model(model_dir, device=device)
        self.quantized_adapters = tuple(a for a, path in adapters.items() if _is_qlora(path))
        quantized = load_model(model_dir, device=device) if self.quantized_adapters else None
        self._model_of = {name: self.model}
        for adapter, path in adapters.items():
            self._model_of[adapter] = quantized if adapter in self.quantized_adapters else self.model
            load_adapter(self._model_of[adapter], path, adapter, allow_other_base=allow_other_base)

    def use(self, variant: str):
        """The model of `variant`'s row, computing with its adapter (the model's own row: none)."""
        from graftlm.adapters import has_adapters, set_active_adapter

        model = self._model_of[variant]
        if has_adapters(model):
            set_active_adapter(model, None if variant == self.name else variant)
        return model


def _is_qlora(adapter_dir) -> bool:
    from graftlm.adapters.peft_format import read_adapter_config

    return read_adapter_config(adapter_dir).get("graftlm_kind") == "qlora"
