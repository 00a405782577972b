"""graftlm: pre-train, fine-tune or LoRA a language model, and know what each costs."""

__version__ = "0.1.0"
