"""Pack tokenized rows into fixed-length sequences without letting rows see each other.

Design choices:
- Each packed sequence has `input_ids`, `loss_mask`, `position_ids` (restarting at 0
  for each row), `document_ids` (row k of the sequence has id k; padding gets the
  next id, so it attends only to itself), and `length` / `rows`, its tokens without
  padding and its number of rows (for throughput and `packing_stats`). The decoder turns `document_ids` into a
  block-diagonal causal mask, so a packed row computes exactly what it computes alone:
  packed and unpacked training give the same per-row loss.
- The first token of every row is never trained: in a packed sequence its target
  position would be predicted from the previous row's last token.
- Two strategies. `best_fit` (the default for SFT rows) sorts rows longest first and
  puts each into the fullest sequence that still has room (best-fit decreasing, a few
  percent of padding at most on typical data); `sequential` keeps the row order and
  starts a new sequence when the next row does not fit (streaming, order preserving).
  A row longer than the sequence is an error: the renderer's length policy comes first.
- `documents_from_eos` gives the same two fields for a window of pre-training tokens,
  where documents are separated by EOS.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Iterator

import numpy as np

from graftlm.errors import GraftError


def _sequence(rows: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_len, dtype=bool)
    position_ids = np.zeros(seq_len, dtype=np.int64)
    document_ids = np.full(seq_len, len(rows), dtype=np.int64)  # padding: its own document
    at = 0
    for doc, (ids, mask) in enumerate(rows):
        n = len(ids)
        input_ids[at:at + n] = ids
        loss_mask[at:at + n] = mask
        loss_mask[at] = False
        position_ids[at:at + n] = np.arange(n)
        document_ids[at:at + n] = doc
        at += n
    position_ids[at:] = np.arange(seq_len - at)
    return {"input_ids": input_ids, "loss_mask": loss_mask, "position_ids": position_ids,
            "document_ids": document_ids, "length": np.int64(at), "rows": np.int64(len(rows))}


def _checked(rows: Iterable, seq_len: int) -> Iterator[tuple[list[int], list[bool]]]:
    for row in rows:
        ids, mask = (row.input_ids, row.loss_mask) if hasattr(row, "input_ids") else row
        if len(ids) > seq_len:
            raise GraftError(f"{getattr(row, 'source', 'a row')}: {len(ids)} tokens do not fit a "
                             f"sequence of {seq_len}; set a max_length with a truncate/drop policy")
        if len(ids) != len(mask):
            raise ValueError("input_ids and loss_mask differ in length")
        if ids:
            yield list(ids), list(mask)


def pack_rows(rows: Iterable, seq_len: int, pad_id: int = 0,
              strategy: str = "best_fit") -> list[dict[str, np.ndarray]]:
    """Pack rows (`RenderedRow`s or `(ids, mask)` pairs) into sequences of `seq_len`."""
    rows = list(_checked(rows, seq_len))
    if strategy == "sequential":
        bins: list[list] = []
        used = seq_len + 1
        for row in rows:
            if used + len(row[0]) > seq_len:
                bins.append([])
                used = 0
            bins[-1].append(row)
            used += len(row[0])
    elif strategy == "best_fit":
        bins = []
        free: list[tuple[int, int]] = []  # (room left, bin index), sorted
        for row in sorted(rows, key=lambda r: len(r[0]), reverse=True):
            n = len(row[0])
            k = bisect.bisect_left(free, (n, -1))
            if k < len(free):
                room, index = free.pop(k)
            else:
                room, index = seq_len, len(bins)
                bins.append([])
            bins[index].append(row)
            if room - n > 0:
                bisect.insort(free, (room - n, index))
    else:
        raise GraftError(f"packing strategy must be 'best_fit' or 'sequential', got {strategy!r}")
    return [_sequence(b, seq_len, pad_id) for b in bins]


def packing_stats(sequences: list[dict[str, np.ndarray]]) -> dict:
    """How well rows filled the sequences: rows per sequence and the fraction of padding."""
    if not sequences:
        return {"rows": 0, "sequences": 0, "rows_per_sequence": 0.0, "padding_fraction": 0.0}
    rows = sum(int(s["rows"]) for s in sequences)
    tokens = sum(int(s["length"]) for s in sequences)
    capacity = sum(len(s["input_ids"]) for s in sequences)
    return {"rows": rows, "sequences": len(sequences), "rows_per_sequence": rows / len(sequences),
            "padding_fraction": 1 - tokens / capacity}


def documents_from_eos(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids, document_ids) for a window of EOS-separated pre-training tokens.

    A document ends with its EOS token (the EOS belongs to the document it closes), so
    the token after an EOS starts a new document at position 0.
    """
    tokens = np.asarray(tokens)
    ends = tokens == eos_id
    document_ids = np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)
    index = np.arange(len(tokens))
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    position_ids = index - starts[document_ids]
    return position_ids.astype(np.int64), document_ids
