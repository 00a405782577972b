"""What a data set holds, as a plain dict: `graft data stats` prints it, `graft plan` uses it.

Design choices:
- Every row is read and checked for the objective (given, or guessed from the first
  row's fields); bad rows are counted and the first few errors kept, never fatal here.
- Tokens are counted with the model's tokenizer when one is given (rows rendered as
  training would render them: chat template, EOS, length policy), else estimated as
  UTF-8 bytes / 4 and labelled as an estimate.
- Exact duplicates: rows whose normalised content (source excluded) is identical.
  Near duplicates: MinHash over lower-cased word 5-gram shingles (64 hash functions
  with a fixed seed, so the figure is reproducible), banded LSH (16 bands of 4) to find
  candidates, counted when the estimated Jaccard similarity is >= 0.8 and the row is
  not already an exact duplicate. Each duplicate row after the first of its group
  counts once.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from graftlm.data.formats import RowError, format_for, normalise
from graftlm.data.render import RenderConfig, Renderer
from graftlm.data.sources import iter_rows, resolve_paths

_PRIME = (1 << 31) - 1
_NUM_HASHES, _BANDS = 64, 16
_NEAR_THRESHOLD = 0.8
_WORD = re.compile(r"\w+")


def guess_objective(fields: dict) -> str:
    if "chosen" in fields and "rejected" in fields:
        return "preference"
    if "messages" in fields or "completion" in fields or ("question" in fields and "answer" in fields):
        return "sft"
    if "prompt" in fields:
        return "rl"
    return "text"


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() if k != "source" for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class _MinHasher:
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, _NUM_HASHES, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, _NUM_HASHES, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        shingles = {" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))}
        x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") % _PRIME
                      for s in shingles], dtype=np.uint64)
        return ((np.outer(x, self.a) + self.b) % _PRIME).min(axis=0)


def _near_duplicates(signatures: list[np.ndarray | None]) -> int:
    rows_per_band = _NUM_HASHES // _BANDS
    buckets: dict[tuple, list[int]] = {}
    duplicate = set()
    for i, sig in enumerate(signatures):
        if sig is None:
            continue
        for band in range(_BANDS):
            key = (band, sig[band * rows_per_band:(band + 1) * rows_per_band].tobytes())
            earlier = buckets.setdefault(key, [])
            if i not in duplicate and any(np.mean(signatures[j] == sig) >= _NEAR_THRESHOLD for j in earlier):
                duplicate.add(i)
            earlier.append(i)
    return len(duplicate)


def _percentiles(lengths: list[int]) -> dict:
    if not lengths:
        return {"min": 0, "p50": 0, "p90": 0, "max": 0, "mean": 0.0}
    arr = np.array(lengths)
    return {"min": int(arr.min()), "p50": int(np.percentile(arr, 50)),
            "p90": int(np.percentile(arr, 90)), "max": int(arr.max()), "mean": float(arr.mean())}


def _estimated_tokens(value) -> int:
    """Tokens of a row's strings without a tokenizer: UTF-8 bytes / 4. An RL row counts its
    prompt alone: its answer is read by a reward, never trained on."""
    return max(1, len("\n".join(_strings(value)).encode("utf-8")) // 4)


def _row_tokens(renderer: Renderer, example: dict, fmt: str) -> int | tuple[int, int] | None:
    """Tokens of the rendered row, or None when the length policy dropped it. A preference
    pair: (its longer sequence, both its sequences), the second what DPO trains on."""
    if fmt == "preference":
        pair = renderer.render_pair(example)
        if pair is None:
            return None
        prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        return prompt + max(chosen, rejected), 2 * prompt + chosen + rejected
    if fmt == "rl":
        renderer.counts.rows += 1
        return len(renderer.render_prompt(example))
    row = renderer.render(example)
    return None if row is None else len(row.input_ids)


def data_stats(paths, objective: str | None = None, tokenizer=None, text_field: str = "text",
               max_length: int | None = None, overflow: str = "truncate") -> dict:
    """Rows, tokens, length distribution, duplicates, untrained and bad rows of `paths`.

    `tokenizer` is a `graftlm.tokenizer.Tokenizer`, a model/tokenizer directory, or None
    (token counts are then estimated as bytes / 4).
    """
    if isinstance(tokenizer, (str, Path)):
        from graftlm.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    files = resolve_paths(paths)
    renderer = Renderer(tokenizer, RenderConfig(max_length, overflow)) if tokenizer else None
    hasher = _MinHasher(seed=0)
    fmt = format_for(objective) if objective else None
    rows = bad = exact = pair_tokens = 0
    errors: list[str] = []
    seen: set[bytes] = set()
    lengths: list[int] = []
    signatures: list[np.ndarray | None] = []
    for row in iter_rows(files):
        rows += 1
        if fmt is None and row.error is None:
            fmt = format_for(objective or guess_objective(row.fields))
        try:
            example = normalise(row, fmt or "text", text_field)
        except RowError as e:
            bad += 1
            if len(errors) < 10:
                errors.append(f"{row.source}: {e}")
            continue
        text = "\n".join(_strings(example))
        key = hashlib.blake2b(json.dumps({k: v for k, v in example.items() if k != "source"},
                                         sort_keys=True).encode(), digest_size=16).digest()
        is_exact = key in seen
        seen.add(key)
        exact += is_exact
        signatures.append(None if is_exact else hasher.signature(text))
        if renderer is not None:
            count = _row_tokens(renderer, example, fmt)
        elif fmt == "preference":  # as rendered: the prompt, then each reply after it
            prompt, chosen, rejected = (_estimated_tokens(example[k]) for k in ("prompt", "chosen", "rejected"))
            count = prompt + max(chosen, rejected), 2 * prompt + chosen + rejected
        else:
            count = _estimated_tokens(example["prompt"] if fmt == "rl" else example)
        if isinstance(count, tuple):
            count, both = count
            pair_tokens += both
        if count is not None:
            lengths.append(count)
    counts = renderer.counts.to_dict() if renderer else {}
    return {
        "files": [str(f) for f in files],
        "objective": fmt,
        "rows": rows,
        "valid": rows - bad,
        "bad": bad,
        "bad_examples": errors,
        "tokens": int(sum(lengths)),
        "tokens_counted_with": "tokenizer" if renderer else "estimate (UTF-8 bytes / 4)",
        # Preference pairs: tokens are each pair's longer sequence; DPO trains on both.
        **({"pair_tokens": pair_tokens} if fmt == "preference" else {}),
        "length": _percentiles(lengths),
        "exact_duplicates": exact,
        "near_duplicates": _near_duplicates(signatures),
        "untrained_rows": counts.get("dropped_untrained") if renderer else None,
        "too_long_dropped": counts.get("dropped_too_long") if renderer else None,
        "truncated": counts.get("truncated") if renderer else None,
    }


def prompt_stats(paths, tokenizer=None) -> dict | None:
    """What an RL run (GRPO, PPO) would sample from `paths`: its prompt rows and their
    tokens, or None when no row holds a prompt (a text file, say).

    A GRPO run never trains on a row's answer: it samples completions after the prompt.
    Rows with a `prompt` (or GSM8K's `question`) qualify, rendered as the run renders them
    (`Renderer.render_prompt`: the chat template's generation prompt) with `tokenizer`, else
    estimated from the prompt's UTF-8 bytes / 4. Rows without one are counted, not used.
    """
    if isinstance(tokenizer, (str, Path)):
        from graftlm.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    renderer = Renderer(tokenizer, RenderConfig(None, "truncate")) if tokenizer else None
    lengths: list[int] = []
    skipped = 0
    for row in iter_rows(resolve_paths(paths)):
        try:
            example = normalise(row, "rl")
        except RowError:
            skipped += 1
            continue
        if renderer is not None:
            lengths.append(len(renderer.render_prompt(example)))
        else:
            lengths.append(_estimated_tokens(example["prompt"]))
    if not lengths:
        return None
    return {"prompts": len(lengths), "skipped": skipped, "tokens": int(sum(lengths)),
            "counted_with": "tokenizer" if renderer else "estimate (UTF-8 bytes / 4)",
            "length": _percentiles(lengths)}
