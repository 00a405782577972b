"""Text rows: mean token loss and bits per byte (nats / ln 2 over the UTF-8 bytes of the
predicted tokens), a text longer than the context scored whole, in context-length windows."""

from __future__ import annotations

import math

import torch

from graftlm.errors import GraftError
from graftlm.evaluation.rows import Rows
from graftlm.objectives.logprobs import IGNORE_INDEX


def _windows(ids: list[int], max_len: int) -> list[list[int]]:
    """Windows of at most `max_len` tokens, each starting on the previous one's last
    token, so that every token after the first is predicted exactly once."""
    return [ids[start:start + max_len] for start in range(0, max(len(ids) - 1, 1), max_len - 1)]


def text_windows(tokenizer, texts: list[str], max_len: int, rows: Rows) -> tuple[list[list[int]], int, int]:
    """(windows, UTF-8 bytes of the predicted tokens, texts scored). A text longer than
    the context is scored in context-length windows (each starts afresh), as held-out
    loss is measured, rather than cut at the context; one of fewer than two tokens has
    nothing to predict and is left out."""
    # Each text is scored after the token that precedes a document where the model was
    # trained: BOS when the tokenizer adds one (as `graft prepare` and transformers
    # tokenize), else the previous document's EOS; so its first token is predicted too.
    first = tokenizer.bos_id if tokenizer.add_bos and tokenizer.bos_id is not None else tokenizer.eos_id
    windows, n_bytes, scored = [], 0, 0
    for text in texts:
        ids = ([] if first is None else [first]) + tokenizer.encode(text)
        if len(ids) < 2:
            rows.leave_out("too_short", 1)
            continue
        windows += _windows(ids, max_len)
        n_bytes += len(tokenizer.decode(ids[1:]).encode("utf-8"))
        scored += 1
    if not windows:
        raise GraftError("no text row has two tokens to evaluate")
    return windows, n_bytes, scored


@torch.no_grad()
def text_metrics(model, windows: list[list[int]], n_bytes: int, pad_id: int, batch_size: int) -> dict:
    device = next(model.parameters()).device
    total_nll, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        group = windows[start:start + batch_size]
        width = max(map(len, group))
        # Right padding: a causal model's real positions never see it, and its targets are ignored.
        x = torch.tensor([w + [pad_id] * (width - len(w)) for w in group], device=device)
        targets = torch.tensor([w[1:] + [IGNORE_INDEX] * (width - len(w) + 1) for w in group], device=device)
        valid = targets != IGNORE_INDEX
        total_nll -= (model(x, targets=targets) * valid).sum().item()
        tokens += int(valid.sum())
    return {"loss": total_nll / tokens, "bpb": total_nll / math.log(2) / max(n_bytes, 1), "tokens": tokens}
