"""A scalar head on the decoder: reward models and PPO value models.

Design choices:
- `ScalarHeadModel` is the decoder without its LM head plus `score = Linear(hidden, 1,
  bias=False)`, which is exactly Hugging Face's `<Family>ForSequenceClassification`
  with `num_labels=1`: the backbone saves as `model.*`, the head as `score.weight`, so
  `transformers.AutoModelForSequenceClassification` loads what we save, with equal scores.
- A sequence's score is read at its last non-pad token, the rule transformers uses
  (the rightmost position whose id is not `pad_token_id`), so left- and right-padded
  batches score the same and both libraries agree. `pad_token_id` is written to
  config.json for that reason.
- `forward(..., per_token=True)` returns a value for every position (PPO's critic).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from graftlm.errors import GraftError, read_json
from graftlm.models.config import ModelConfig, read_hf_config, to_hf_config
from graftlm.models.transformer import Decoder, skeleton

CLASSIFIER_ARCHITECTURES = {"llama": "LlamaForSequenceClassification",
                            "mistral": "MistralForSequenceClassification",
                            "qwen2": "Qwen2ForSequenceClassification",
                            "qwen3": "Qwen3ForSequenceClassification"}


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Index of the rightmost non-pad token of each row (0 for an all-pad row)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


class ScalarHeadModel(nn.Module):
    """A decoder backbone (no LM head) with a one-output linear head."""

    def __init__(self, cfg: ModelConfig, pad_token_id: int | None = None):
        super().__init__()
        self.config = cfg
        self.pad_token_id = pad_token_id if pad_token_id is not None else cfg.pad_token_id
        if self.pad_token_id is None:
            raise GraftError("a scalar-head model needs a pad token id (set pad_token_id in config.json "
                             "or give the tokenizer a pad token)")
        self.model = Decoder(cfg)
        self._drop_lm_head()
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)

    def _drop_lm_head(self) -> None:
        # Unused by a scalar head; dropping it keeps DDP from waiting for its gradient.
        self.model.lm_head = None

    @classmethod
    def from_decoder(cls, decoder: Decoder, pad_token_id: int | None = None, std: float = 0.02,
                     generator: torch.Generator | None = None, record_base: bool = False) -> "ScalarHeadModel":
        """A fresh head on a (pre-trained) decoder; the decoder's weights are shared, not copied.

        `record_base`: adapters added to this model name the decoder, as loaded, as their
        base (`adapters.identity`), so that they load back onto it."""
        identity = None
        if record_base:
            from graftlm.adapters.identity import base_identity
            identity = base_identity(decoder)  # before the decoder's LM head is dropped
        with skeleton():
            out = cls(decoder.config, pad_token_id)
        out.model = decoder
        out._drop_lm_head()
        weight = decoder.embed_tokens.weight
        out.score = nn.Linear(decoder.config.hidden_size, 1, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(out.score.weight, 0.0, std, generator=generator)
        if identity is not None:
            out.adapter_base_identity = identity
        return out

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, per_token: bool = False) -> torch.Tensor:
        """Scores [B] at each row's last non-pad token, or values [B, T] with per_token."""
        hidden = self.model(input_ids, position_ids=position_ids, document_ids=document_ids, output_hidden=True)
        values = self.score(hidden).squeeze(-1).float()
        if per_token:
            return values
        index = last_token_index(input_ids, self.pad_token_id)
        return values.gather(1, index[:, None]).squeeze(1)


def save_scalar_model(model: ScalarHeadModel, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write an HF `<Family>ForSequenceClassification` directory (num_labels=1)."""
    from graftlm.models.hf import TOKENIZER_FILES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.lm_head"):
            continue
        state[name] = tensor.detach().contiguous().cpu()
    dtype = str(state["score.weight"].dtype).removeprefix("torch.")
    hf = to_hf_config(cfg, dtype)
    hf.update({"architectures": [CLASSIFIER_ARCHITECTURES[cfg.model_type]], "num_labels": 1,
               "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
               "pad_token_id": model.pad_token_id, "tie_word_embeddings": False})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.exists() and fname != "generation_config.json":
                (out / fname).write_bytes(src.read_bytes())
    return out


def is_scalar_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter of a reward model (task_type SEQ_CLS), e.g. `graft reward --adapter lora`'s."""
    config = Path(path) / "adapter_config.json"
    try:
        return config.exists() and read_json(config).get("task_type") == "SEQ_CLS"
    except GraftError:
        return False


def is_scalar_model_dir(path: str | Path) -> bool:
    """A reward model: a sequence-classification directory, or a reward model's adapter."""
    if is_scalar_adapter_dir(path):
        return True
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    try:
        architectures = read_json(config).get("architectures") or []
    except GraftError:  # unreadable or not an object: not one of ours to claim
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_scalar_model(path: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> ScalarHeadModel:
    """Load a sequence-classification directory with one label (ours or transformers'),
    or a reward model's adapter merged into its base."""
    from graftlm.models.hf import check_model_dir, load_state_dict

    if is_scalar_adapter_dir(path):
        from graftlm.adapters import merge_and_unload
        return merge_and_unload(load_scalar_adapter(path, dtype=dtype, device=device), dtype=dtype).eval()
    model_dir = check_model_dir(path)
    raw = read_json(model_dir / "config.json")
    labels = raw.get("num_labels", len(raw.get("id2label") or {}) or 2)
    if not is_scalar_model_dir(model_dir) or labels != 1:
        raise GraftError(f"{model_dir}: not a reward model (expected a *ForSequenceClassification "
                         f"config with num_labels 1, got {raw.get('architectures')} with {labels} labels)")
    cfg = read_hf_config(model_dir / "config.json")
    cfg.tie_embeddings = False
    # load_state_dict strips the backbone's "model." prefix; our module keeps it.
    state = {(k if k.startswith("score.") else "model." + k): v for k, v in load_state_dict(model_dir).items()}
    with skeleton():
        model = ScalarHeadModel(cfg)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise GraftError(f"{model_dir}: reward model weights {'lack' if missing else 'have unexpected'} "
                         f"tensor '{name}'")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    model.model.reset_rope(torch.device(device))
    return model.eval()


def scalar_adapter_base(adapter_dir: str | Path) -> Path:
    """The base language model a reward model's adapter records, which must be a model
    directory here."""
    from graftlm.models.hf import recorded_base

    base = recorded_base(adapter_dir)
    if not (base and (Path(base) / "config.json").exists()):
        raise GraftError(f"{adapter_dir}: a reward-model adapter whose base model ({base!r}) is not a model "
                         f"directory here: merge it with `graft merge --model BASE --adapter {adapter_dir} "
                         "--out DIR` and use DIR")
    return Path(base)


def load_scalar_adapter(adapter_dir: str | Path, base_dir: str | Path | None = None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        allow_other_base: bool = False) -> ScalarHeadModel:
    """A reward model's adapter on its base language model (`base_dir`, else the base the
    adapter records), unmerged; the head comes from the adapter."""
    from graftlm.adapters import load_adapter
    from graftlm.models.hf import load_model

    adapter_dir = Path(adapter_dir)
    decoder = load_model(base_dir or scalar_adapter_base(adapter_dir), dtype=dtype, device=device)
    pad = decoder.config.pad_token_id
    if (adapter_dir / "tokenizer.json").exists():  # the run's tokenizer, saved beside the adapter
        from graftlm.tokenizer import load_tokenizer
        pad = load_tokenizer(adapter_dir).pad_id
    head = ScalarHeadModel.from_decoder(decoder, pad_token_id=pad if pad is not None else 0, record_base=True)
    load_adapter(head, adapter_dir, allow_other_base=allow_other_base)
    return head.eval()
