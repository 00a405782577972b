"""Sampling one token per row from a batch of logits, every row at its own settings.

Batched on the logits' device, not a loop over rows: a per-row `torch.multinomial` on
the CPU (the engine's first way) took ~3 ms a row at a 32k vocabulary, and a top-p sort
~5 ms more, more than a 32-row decode step's own forward; on a GPU each row also copied
its logits to the host.

Each row draws one uniform number from its own `torch.Generator` and takes the token
where that number falls in its distribution's cumulative sum (inverse-CDF sampling:
exact, as multinomial is). Which order that sum runs in depends on the row alone (its
settings and its logits), never on the rows beside it, so a seeded row gives the same
tokens alone or in any batch:
- no top-k or top-p: the vocabulary's order, and no sort at all;
- top-k, top-p: most likely first, over the first of `CANDIDATES` (the most likely 256
  tokens, then 4096) that holds the row's top-k and top-p tokens, else over its whole
  sorted vocabulary.
Temperature divides the logits; top-k keeps the k most likely tokens; top-p then keeps
the smallest prefix of those, most likely first, whose probability reaches p (at least
one token), as transformers' warpers do.
"""

from __future__ import annotations

import torch

# The most likely tokens a top-k / top-p row is sampled among, widening until its kept
# tokens all lie within them (topk is far cheaper than a full sort of a large vocabulary).
CANDIDATES = (256, 4096)


def sample_tokens(logits: torch.Tensor, temperatures: list[float], top_ks: list[int], top_ps: list[float],
                  generators: list[torch.Generator]) -> torch.Tensor:
    """One token id per row of `logits` [rows, vocab]: a [rows] long tensor on its device.

    `top_ks[i]` 0 and `top_ps[i]` 1.0 are off; every temperature is > 0 (greedy rows
    take an argmax instead)."""
    rows, vocab = logits.shape
    device = logits.device
    scores = logits.float() / torch.tensor(temperatures, device=device)[:, None]
    uniforms = torch.stack([torch.rand((), generator=g) for g in generators]).to(device)
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    tokens = torch.empty(rows, dtype=torch.long, device=device)
    plain, left = [], []  # rows sampled over the whole vocabulary, and top-k / top-p rows
    for i in range(rows):
        (plain if ks[i] == vocab and top_ps[i] == 1.0 else left).append(i)
    if plain:
        tokens[plain] = _inverse_cdf(scores[plain], uniforms[plain])
    for width in [w for w in CANDIDATES if w < vocab] + [vocab]:  # the whole vocabulary, sorted, last
        if not left:
            break
        left = _sample_narrowed(scores, left, ks, top_ps, uniforms, tokens, width)
    return tokens


def _sample_narrowed(scores, index: list[int], ks: list[int], ps: list[float], uniforms, tokens,
                     width: int) -> list[int]:
    """Sample rows `index` (top-k / top-p) among their `width` most likely tokens into
    `tokens`; return the rows whose kept tokens might not all lie among them."""
    vocab, device = scores.shape[-1], scores.device
    full = width == vocab
    if full:  # stable: tied tokens in the vocabulary's order
        values, order = scores[index].sort(dim=-1, descending=True, stable=True)
    else:
        values, order = scores[index].topk(width)  # most likely first
    k = torch.tensor([ks[i] for i in index], device=device)
    p = torch.tensor([ps[i] for i in index], device=device)
    rank = torch.arange(width, device=device)
    values = values.masked_fill(rank >= k[:, None], float("-inf"))
    # Top-p's probabilities are over the top-k tokens (all the vocabulary without top-k).
    within = k[:, None] <= width
    log_total = torch.where(within, values.logsumexp(-1, keepdim=True), scores[index].logsumexp(-1, keepdim=True))
    probs = (values - log_total).exp()
    keep = (probs.cumsum(-1) - probs) < p[:, None]  # the tokens before it hold less than p
    # Complete when the row's top-k lies within `width` and, without top-k, its top-p prefix ended inside it.
    complete = within.squeeze(-1) & ((k < vocab) | ~keep[:, -1]) if not full else torch.ones_like(k, dtype=torch.bool)
    choice = _inverse_cdf(values.masked_fill(~keep, float("-inf")), uniforms[index])
    sampled = order.gather(-1, choice[:, None]).squeeze(-1)
    done = complete.tolist()
    tokens[[i for i, ok in zip(index, done) if ok]] = sampled[complete]
    return [i for i, ok in zip(index, done) if not ok]


def _inverse_cdf(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The position, per row, where `uniforms` falls in softmax(scores)'s cumulative sum."""
    cdf = scores.softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    # Below the total, so that the first entry above it is a token of nonzero probability.
    point = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1).clamp_max(scores.shape[-1] - 1)
