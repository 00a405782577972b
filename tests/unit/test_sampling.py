"""`graftlm.sampling.sample_tokens`: batched sampling draws each row's token with the
probabilities transformers' temperature / top-k / top-p warpers give, and a seeded row
draws the same tokens alone as beside rows with other settings."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from graftlm.sampling import CANDIDATES, sample_tokens

DRAWS = 5000


def _logits(vocab: int, seed: int = 0) -> torch.Tensor:
    """A peaked distribution, as a trained model's: a few likely tokens, a long tail."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 3


def _expected(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    return warpers(None, logits[None].clone())[0].softmax(-1)


def _draw(logits, temperature, top_k, top_p, seeds):
    rows = len(seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return sample_tokens(logits[None].expand(rows, -1), [temperature] * rows, [top_k] * rows, [top_p] * rows, gens)


@pytest.mark.parametrize("vocab,temperature,top_k,top_p", [
    (50, 1.0, 0, 1.0),        # plain: the vocabulary's order
    (50, 0.7, 5, 1.0),        # top-k, a vocabulary within the candidates (whole sort)
    (1000, 1.0, 0, 0.9),      # top-p among the candidates
    (1000, 1.3, 20, 0.8),     # both
    (1000, 4.0, 0, 0.95),     # a flat distribution: its top-p prefix runs past the candidates
])
def test_frequencies_match_transformers_warpers(vocab, temperature, top_k, top_p):
    logits = _logits(vocab)
    want = _expected(logits, temperature, top_k, top_p)
    if temperature == 4.0:
        assert int((want > 0).sum()) > CANDIDATES[0]  # sampled over the whole sorted vocabulary
    tokens = _draw(logits, temperature, top_k, top_p, range(DRAWS))
    seen = torch.bincount(tokens, minlength=vocab).double() / DRAWS
    assert bool((seen[want == 0] == 0).all()), "a token the warpers remove was drawn"
    sigma = (want * (1 - want) / DRAWS).sqrt()
    assert float(((seen - want).abs() - 5 * sigma).max()) < 1e-3


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_batch():
    vocab = 1000
    logits = torch.stack([_logits(vocab, seed) for seed in range(5)])
    # Plain, top-k, top-p, both, and a top-p prefix past the candidates.
    settings = [(1.0, 0, 1.0), (0.8, 10, 1.0), (1.0, 0, 0.9), (1.2, 50, 0.7), (5.0, 0, 0.99)]

    def draw(rows):
        temps, ks, ps = zip(*(settings[i] for i in rows))
        return sample_tokens(logits[rows], list(temps), list(ks), list(ps),
                             [torch.Generator().manual_seed(100 + i) for i in rows]).tolist()

    together = draw(list(range(5)))
    alone = [draw([i])[0] for i in range(5)]
    reversed_batch = draw([4, 3, 2, 1, 0])[::-1]
    assert together == alone == reversed_batch
