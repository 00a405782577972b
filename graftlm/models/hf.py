"""Hugging Face interop: load a local model directory into a `Decoder`, save one back.

A directory is `config.json`, one `model.safetensors` or shards with
`model.safetensors.index.json`, and the tokenizer files. Only safetensors are read:
no pickle, ever, and no code from the directory runs (`auto_map` is refused).
Parameter names are Hugging Face's with the `model.` prefix dropped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from graftlm.errors import GraftError, read_json
from graftlm.models.config import (check_model_dir, load_config, read_hf_config, recorded_base,  # noqa: F401
                                   resolve_model_config, run_directory_hint, to_hf_config)  # (without torch)
from graftlm.models.transformer import Decoder, skeleton
from graftlm.tokenizer import generation_eos_ids, load_tokenizer, read_generation_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def _hf_name(ours: str) -> str:
    return ours if ours.startswith("lm_head.") else "model." + ours


def _our_name(hf: str) -> str:
    return hf[len("model."):] if hf.startswith("model.") else hf


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, checking the shard index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GraftError(f"{index}: not a valid shard index (no 'weight_map' object)")
        files = sorted({model_dir / name for name in weight_map.values()})
        for f in files:
            if not f.exists():
                raise GraftError(f"{index}: names shard '{f.name}', which is missing")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise GraftError(f"{model_dir}: has only pickle weights (*.bin / *.pt); graftlm reads "
                         "safetensors only (convert with transformers' save_pretrained(safe_serialization=True))")
    raise GraftError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a corrupt or truncated file is one clear error."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise GraftError(f"{path}: empty file (0 bytes), not a safetensors file")
        if size < 8:
            raise GraftError(f"{path}: corrupt safetensors file ({size} bytes, shorter than its "
                             "8-byte header length)")
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
        if header_len > size - 8:
            raise GraftError(f"{path}: corrupt safetensors file (header of {header_len} bytes "
                             f"is larger than the file's {size})")
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
        return tensors
    except GraftError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise GraftError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _check_finite(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN / Inf weights (a corrupted body: safetensors has no checksum), which
    would otherwise load silently and generate nothing or fail training at step 1.
    `aminmax` propagates NaN, so its two values are finite exactly when every value is;
    it reads the tensor once without allocating (a tenth of `isfinite(t).all()`'s time).
    The count is taken only for a bad tensor."""
    if tensor.is_floating_point() and tensor.numel() and not all(map(torch.isfinite, torch.aminmax(tensor))):
        bad = int((~torch.isfinite(tensor)).sum())
        raise GraftError(f"{path}: tensor '{name}' has {bad:,} non-finite values (NaN or Inf) of "
                         f"{tensor.numel():,}: the file is corrupt")


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(model_dir: Path) -> torch.dtype | None:
    """The floating dtype a model directory's weights are stored in (from the first
    file's header, nothing loaded); None when it cannot be told."""
    try:
        with safe_open(str(weight_files(Path(model_dir))[0]), framework="pt") as f:
            kinds = {f.get_slice(name).get_dtype() for name in f.keys()}
    except (GraftError, SafetensorError, OSError, IndexError):
        return None
    floats = [_SAFETENSORS_FLOATS[k] for k in kinds if k in _SAFETENSORS_FLOATS]
    return floats[0] if len(floats) == 1 else None


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in weight_files(model_dir):
        for name, tensor in read_safetensors(f).items():
            _check_finite(f, name, tensor)
            state[_our_name(name)] = tensor
    return state


def load_model(path: str | Path, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu") -> Decoder:
    """Load an HF model directory. `dtype=None` keeps the stored dtype. The model
    remembers the directory it came from (`model.source_dir`, resolved), which an
    adapter's recorded base is compared with, and its generation_config.json
    (`model.generation_config`, a dict: `Engine` stops on its EOS ids, `save_model`
    carries it over)."""
    model_dir = check_model_dir(path)
    cfg = read_hf_config(model_dir / "config.json")
    generation = read_generation_config(model_dir)
    generation_eos_ids(generation, model_dir / "generation_config.json")  # a bad field is named now, not at save
    state = load_state_dict(model_dir)
    with skeleton():
        model = Decoder(cfg)
    expected = dict(model.state_dict())
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise GraftError(f"{model_dir}: weights are missing tensor '{_hf_name(missing[0])}'"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise GraftError(f"{model_dir}: weights have unexpected tensor '{_hf_name(unexpected[0])}' "
                         "(does config.json match the weights?)")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise GraftError(f"{model_dir}: tensor '{_hf_name(name)}' has shape {tuple(state[name].shape)}, "
                             f"config.json implies {tuple(ref.shape)}")
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.reset_rope(torch.device(device))
    model.source_dir = model_dir.resolve()
    model.generation_config = generation
    return model.eval()


def saved_generation_config(model: Decoder, tokenizer_dir: str | Path | None = None) -> dict:
    """generation_config.json of a saved model: the base's (`load_model` kept it, with its
    sampling defaults), its ids updated from the config, and `eos_token_id` every id that
    graftlm stops on (the base's, the config's and the tokenizer's `stop_ids`, as Qwen lists
    `[151645, 151643]`), so that transformers' `generate` ends a ChatML turn at <|im_end|>."""
    cfg = model.config
    generation = dict(getattr(model, "generation_config", None) or {})
    stops = generation_eos_ids(generation) + cfg.eos_ids
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        stops += load_tokenizer(tokenizer_dir).stop_ids
    stops = [i for i in dict.fromkeys(stops) if 0 <= i < cfg.vocab_size]
    for key, value in (("bos_token_id", cfg.bos_token_id), ("pad_token_id", cfg.pad_token_id)):
        if value is not None:
            generation[key] = value
    if stops:  # one id stays a number, as transformers writes it, unless the base listed them
        listed = isinstance(generation.get("eos_token_id"), list)
        generation["eos_token_id"] = stops if len(stops) > 1 or listed else stops[0]
    return generation


def save_model(model: Decoder, out: str | Path, tokenizer_dir: str | Path | None = None,
               dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` as an HF directory that `transformers` loads (sharded when large)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if dtype is not None:
            tensor = tensor.to(dtype)
        state[_hf_name(name)] = tensor.contiguous().cpu()
    stored_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(to_hf_config(cfg, stored_dtype), indent=2) + "\n")
    generation = saved_generation_config(model, tokenizer_dir)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata=metadata)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.exists() and fname != "generation_config.json":
                shutil.copyfile(src, out / fname)
    return out
