"""Prompts with answers: greedy generation with the engine, then `exact_match` (numeric
final-answer match when the answers are numbers or GSM8K-style `#### N`, exact string
match otherwise) and, with a reward function, the mean reward."""

from __future__ import annotations

from dataclasses import replace

import torch

from graftlm.evaluation.kinds import answer_of
from graftlm.evaluation.rows import Rows, valid_rows
from graftlm.rewards import exact_match, final_number, numeric_match


def answer_rows(path, rows: Rows) -> list[dict]:
    """Prompts with their answers, and the row's other fields for a reward function. A
    row without a string answer is a bad row, skipped and counted like the others."""
    from graftlm.data.sources import iter_rows

    def checked():
        for row in iter_rows(path):
            if not row.error and not isinstance(answer_of(row.fields), str):
                row = replace(row, error="eval of prompts needs a string 'answer' (or 'completion') to compare "
                                         "the greedy answer with")
            yield row

    return [{**r["extra"], "prompt": r["prompt"], "answer": answer_of(r["extra"]), "source": r["source"]}
            for r in valid_rows(checked(), "rl", rows)]


def few_shot_prompt(shots: list[dict], prompt):
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": shot["prompt"]}, {"role": "assistant", "content": shot["answer"]}]
    return messages + [{"role": "user", "content": prompt}]


def is_numeric(rows: list[dict]) -> bool:
    return all("####" in r["answer"] or final_number(r["answer"]) == r["answer"].strip().replace(",", "")
               for r in rows)


def prompt_ids(renderer, prompts, room: int) -> tuple[list[list[int]], int]:
    """Each prompt's token ids, and how many were cut to fit. A prompt longer than the
    context keeps its end (the question), not its first shots."""
    ids = [renderer.render_prompt({"prompt": p}) for p in prompts]
    return [i[-room:] for i in ids], sum(len(i) > room for i in ids)


@torch.no_grad()
def score_answers(model, tokenizer, rows, ids, max_new_tokens: int, reward, batch_size: int, progress=None) -> dict:
    from graftlm.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer)
    completions, truncated = [], []
    for start in range(0, len(ids), batch_size):
        outs = engine.generate(ids[start:start + batch_size],
                               SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
        completions += [o.text or "" for o in outs]
        truncated += [o.finish_reason == "length" for o in outs]
        if progress is not None:
            progress(len(completions), len(ids))
    texts = [p if isinstance(p, str) else p[-1]["content"] for p in (r["prompt"] for r in rows)]
    # As GRPO's reward does: a number in an answer cut at max_new_tokens may be cut too.
    scores = (numeric_match(completions, texts, rows, truncated=truncated) if is_numeric(rows)
              else exact_match(completions, texts, rows))
    metrics = {"exact_match": sum(scores) / len(scores)}
    if reward is not None:
        rewards = [r for r in reward(completions, texts, rows) if r is not None]  # None: does not apply
        metrics["reward"] = sum(rewards) / len(rewards) if rewards else float("nan")
    return metrics
