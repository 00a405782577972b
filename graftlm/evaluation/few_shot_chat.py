"""Chat rows after few-shot examples: the user and assistant turns of the first K rows go
before each scored conversation (after its system message), as context, not scored."""

from __future__ import annotations

from itertools import takewhile

from graftlm.data.render import RenderedRow, Renderer
from graftlm.errors import GraftError
from graftlm.evaluation.rows import Rows
from graftlm.objectives.sft import RenderedRows


def few_shot_chats(tokenizer, config, shots: list[dict], scored: list[dict], rows: Rows) -> RenderedRows:
    """The rows scored without examples, each after the examples' turns (a row kept
    without them is kept with them: the table's rows are scored on the same rows)."""
    after_shots = _FewShotChatRenderer(tokenizer, config, shots)
    rendered = [after_shots.render(row) for row in scored]
    rows.few_shot_cut = after_shots.examples_cut
    return RenderedRows(rendered, tokenizer.pad_id)


def _turns(example: dict) -> list[dict]:
    """A chat row's messages; a prompt/completion row's are one user and one assistant turn."""
    if "messages" in example:
        return example["messages"]
    if "prompt" in example:
        return [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["completion"]}]
    raise GraftError(f"{example['source']}: --few-shot: a text row among chat rows has no turns to take as an "
                     f"example or to put examples before")


class _FewShotChatRenderer(Renderer):
    """Chat rows after example turns: the user and assistant turns of the few-shot rows
    (their system messages left out) go after the row's own system message, as
    lm-eval-harness's multi-turn few-shot places them. The examples are context: only the
    row's own assistant turns are scored, the tokens its zero-shot loss counts. Where they
    do not all fit the context the first examples are left out (as answers lose theirs),
    and a row that fits none is rendered without them, cut as SFT cuts it; either way the
    row counts in `examples_cut`."""

    def __init__(self, tokenizer, config, shots: list[dict]):
        super().__init__(tokenizer, config)
        self.shots = [[m for m in _turns(shot) if m["role"] != "system"] for shot in shots]
        self.examples_cut = 0

    def render(self, example: dict) -> RenderedRow | None:
        turns = _turns(example)
        for first in range(len(self.shots)):  # leave out the first examples until the row fits
            row = self._after_examples(self.shots[first:], turns, example["source"])
            if len(row.input_ids) <= self.config.max_length:
                self.examples_cut += first > 0
                return row
        self.examples_cut += 1
        return super().render(example)

    def _after_examples(self, shots: list[list[dict]], turns: list[dict], source: str) -> RenderedRow:
        system = list(takewhile(lambda m: m["role"] == "system", turns))
        examples = [m for shot in shots for m in shot]
        text, spans = self.conversation_text(system + examples + turns[len(system):])
        replies = sum(m["role"] == "assistant" for m in examples)
        ids, mask = self._encode_spans(text, spans[replies:])  # the examples' replies are context, not scored
        return RenderedRow(ids, mask, source)
