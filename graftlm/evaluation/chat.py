"""Chat rows (`messages`, or prompt/completion rows scored as chat): rendered as SFT
renders them (a row longer than the context is cut), scored by the mean loss of the
assistant turns' tokens."""

from __future__ import annotations

import torch

from graftlm.evaluation.rows import Rows, rendered
from graftlm.objectives.sft import RenderedRows


def rendered_chats(data, examples: list[dict], renderer, pad_id, rows: Rows):
    """(the chat rows kept, them rendered as SFT renders them)."""
    kept, rendered_rows = rendered(data, examples, renderer.render, renderer, rows,
                                   "no chat row has an assistant token to score")
    return kept, RenderedRows(rendered_rows, pad_id)


@torch.no_grad()
def chat_loss(model, chats, batch_size: int) -> dict:
    """Mean loss per assistant token: SFT's own loss, summed over the rows."""
    from graftlm.objectives.sft import SFTObjective

    device, objective = next(model.parameters()).device, SFTObjective()
    total, tokens = 0.0, 0
    for start in range(0, len(chats), batch_size):
        batch = chats.collate([chats[i] for i in range(start, min(start + batch_size, len(chats)))])
        nll, count, _ = objective.loss(model, {k: v.to(device) for k, v in batch.items()})
        total, tokens = total + nll.item(), tokens + int(count)
    return {"loss": total / tokens, "tokens": tokens}
