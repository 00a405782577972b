"""Preference pairs (`chosen` + `rejected`): each completion's log-probability under a
model, summed and per token, and a reward model's scores of the two."""

from __future__ import annotations

import torch

from graftlm.evaluation.rows import Rows, first, rendered, valid_rows


def rendered_pairs(data, renderer, max_rows, pad_id, rows: Rows):
    from graftlm.objectives.dpo import PreferencePairs

    _, pairs = rendered(data, first(valid_rows(data, "dpo", rows), max_rows, rows), renderer.render_pair,
                        renderer, rows, "no preference pair to evaluate")
    return PreferencePairs(pairs, pad_id)


@torch.no_grad()
def pair_margins(model, pairs, pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, under the model as it is now: log p(chosen) - log p(rejected), summed over
    each completion's tokens and averaged per token (SimPO's length-normalised score)."""
    from graftlm.objectives.dpo import concatenated, sequence_logps

    sums, means = [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs.collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
        logps, tokens = sequence_logps(model, *concatenated(batch, pad_id))
        (chosen, rejected), (chosen_n, rejected_n) = logps.chunk(2), tokens.chunk(2)
        sums.append(chosen - rejected)
        means.append(chosen / chosen_n - rejected / rejected_n)
    return torch.cat(sums), torch.cat(means)


@torch.no_grad()
def reward_model_wins(scorer, pairs, batch_size: int) -> torch.Tensor:
    """Per pair: the reward model scores the chosen completion higher than the rejected."""
    from graftlm.objectives.reward import pair_scores

    wins = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs.collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
        c, r = pair_scores(scorer, batch)
        wins.append(c > r)
    return torch.cat(wins)


def share(wins: torch.Tensor) -> float:
    return wins.float().mean().item()
