"""Validate rows for an objective and normalise them into a few canonical shapes.

Canonical shapes (every one also has `source`, the row's `file:line`):
- text (pre-training, `clm`): `{"text"}`, read from `text_field` (default "text").
- sft: `{"messages": [{"role", "content"}, ...]}`, `{"prompt", "completion"}` (strings)
  or `{"text"}`. A conversational prompt/completion (message lists) becomes
  `messages`; GSM8K's `{"question", "answer"}` becomes prompt/completion.
- preference (`dpo`, `reward`, ...): `{"prompt", "chosen", "rejected"}`, all strings or
  all message lists (a string next to a list is wrapped as a user / assistant turn).
  Anthropic HH-RLHF transcripts (`{"chosen", "rejected"}` without a prompt) are parsed
  into messages, the prompt being the shared conversation before the last assistant
  turn; message-list pairs without a prompt are split the same way. An optional
  `margin` (a finite number; missing or null: none) is kept for the reward model
  (TRL's margin column: the chosen score must beat the rejected one by it).
- rl (`grpo`, `ppo`): `{"prompt", "extra"}`: `prompt` is a string or messages, and
  `extra` holds every other field for the reward function. GSM8K's `question` is the
  prompt and `extra` gets `answer` (full text) and `final_answer` (after "#### ").

Bad-row policy: `errors="skip"` (the default) counts and skips bad rows, and stops the
run with a `GraftError` when more than `max_bad_fraction` of the rows are bad (checked
as rows stream in once 1000 rows were seen, and at the end) or no valid row is left;
`errors="raise"` stops at the first bad row. Skipping is the default because real data
sets carry a few broken rows (HH-RLHF's harmless test split has 9 of 2,312: empty
answers, diverging transcripts); the fraction bound keeps a wrong file or a wrong
objective from passing silently. Every error names `file:line` and the field.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from graftlm.data.sources import Row, iter_rows
from graftlm.errors import GraftError

ROLES = ("system", "user", "assistant")
OBJECTIVE_FORMATS = {
    "text": "text", "clm": "text", "pretrain": "text",
    "sft": "sft",
    "preference": "preference", "dpo": "preference", "reward": "preference",
    "ipo": "preference", "simpo": "preference", "orpo": "preference",
    "rl": "rl", "grpo": "rl", "ppo": "rl",
}
_EARLY_CHECK_ROWS = 1000
_KEPT_ERRORS = 10
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class RowError(ValueError):
    """A row that cannot be used: `field` names the offending field (or None)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def format_for(objective: str) -> str:
    try:
        return OBJECTIVE_FORMATS[objective]
    except KeyError:
        raise GraftError(f"unknown objective '{objective}' for data "
                         f"(one of {', '.join(sorted(OBJECTIVE_FORMATS))})") from None


# -- field checks ---------------------------------------------------------------------


def _found(fields: dict) -> str:
    """What a row has instead, so that a misspelled field ('answr') shows beside the expected one."""
    if not fields:
        return " (the row has no fields)"
    names = ", ".join(repr(name) for name in list(fields)[:8])
    return f" (the row has {names}{', ...' if len(fields) > 8 else ''})"


def _string(row: dict, name: str, allow_empty: bool = False) -> str:
    if name not in row or row[name] is None:
        raise RowError(f"missing field '{name}'{_found(row)}", name)
    value = row[name]
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {type(value).__name__}", name)
    if not allow_empty and not value.strip():
        raise RowError(f"field '{name}' is empty", name)
    return value


def _finite_number(row: dict, name: str) -> float:
    value = row[name]
    # bool is an int to Python, but `"margin": true` is a mistake, not 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RowError(f"field '{name}' must be a finite number, got {repr(value)[:40]}", name)
    return float(value)


def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{name}' must be a non-empty list of messages", name)
    out = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise RowError(f"field '{where}' must be an object with role and content", where)
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"field '{where}.role': unknown role {role!r} (one of {', '.join(ROLES)})",
                           f"{where}.role")
        content = message.get("content")
        if not isinstance(content, str):
            raise RowError(f"field '{where}.content' must be a string", f"{where}.content")
        if role == "assistant" and not content.strip():
            raise RowError(f"field '{where}.content': empty assistant message", f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def final_answer(answer: str) -> str | None:
    """GSM8K's final answer: the text after the last '#### ', without thousands commas."""
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


# -- one normaliser per format ----------------------------------------------------------


def _text(row: Row, text_field: str) -> dict:
    name = "text" if row.from_text_file else text_field
    return {"text": _string(row.fields, name)}


def _sft(row: Row, text_field: str) -> dict:
    if row.from_text_file:  # one row of a whole file: sft would keep its first max_length tokens
        raise GraftError(f"{row.source}: a .txt file is one document, and sft trains on rows (it would keep the "
                         "first --sft.max-length tokens); give a .jsonl of rows (messages, prompt + completion, "
                         f"or '{text_field}'), or train on the text with `graft prepare` + `graft pretrain`")
    f = row.fields
    if "messages" in f:
        messages = _messages(f["messages"], "messages")
        return {"messages": messages}
    if "prompt" in f or "completion" in f:
        prompt, completion = f.get("prompt"), f.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            messages = _messages(prompt, "prompt") + _messages(completion, "completion")
            if not any(m["role"] == "assistant" for m in messages[len(prompt):]):
                raise RowError("field 'completion' has no assistant message", "completion")
            return {"messages": messages}
        return {"prompt": _string(f, "prompt"), "completion": _string(f, "completion")}
    if "question" in f and "answer" in f:
        return {"prompt": _string(f, "question"), "completion": _string(f, "answer")}
    if text_field in f:
        return _text(row, text_field)
    raise RowError("missing fields: expected 'messages', 'prompt' + 'completion', "
                   f"'question' + 'answer' or '{text_field}'{_found(f)}")


def parse_hh_transcript(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages (user / assistant turns)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(f"field '{name}' is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript", name)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    return messages


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> dict:
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1]["role"] != "assistant":
            raise RowError(f"field '{name}' does not end with an assistant turn", name)
        if not conversation[-1]["content"].strip():
            raise RowError(f"field '{name}': empty completion (last assistant turn)", name)
    if chosen[:-1] != rejected[:-1]:
        raise RowError("fields 'chosen' and 'rejected' do not share the conversation before "
                       "the last assistant turn", "rejected")
    if not chosen[:-1]:
        raise RowError("field 'chosen': no prompt before the last assistant turn", "chosen")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _preference(row: Row, text_field: str) -> dict:
    pair = _pair(row.fields)
    if row.fields.get("margin") is not None:
        pair["margin"] = _finite_number(row.fields, "margin")
    return pair


def _pair(f: dict) -> dict:
    for name in ("chosen", "rejected"):
        if f.get(name) is None:
            raise RowError(f"missing field '{name}'{_found(f)}", name)
    if f["chosen"] == f["rejected"]:
        raise RowError("fields 'chosen' and 'rejected' are equal", "rejected")
    if "prompt" not in f:
        chosen, rejected = f["chosen"], f["rejected"]
        if isinstance(chosen, str) and isinstance(rejected, str):
            chosen = parse_hh_transcript(chosen, "chosen")
            rejected = parse_hh_transcript(rejected, "rejected")
        else:
            chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        pair = _split_shared_prompt(chosen, rejected)
        if pair["chosen"] == pair["rejected"]:
            raise RowError("fields 'chosen' and 'rejected' have the same last assistant turn", "rejected")
        return pair
    values = {name: f[name] for name in ("prompt", "chosen", "rejected")}
    if all(isinstance(v, str) for v in values.values()):
        return {"prompt": _string(f, "prompt"), "chosen": _string(f, "chosen"),
                "rejected": _string(f, "rejected")}
    wrapped = {}
    for name, value in values.items():
        if isinstance(value, str):
            _string(f, name)
            value = [{"role": "user" if name == "prompt" else "assistant", "content": value}]
        wrapped[name] = _messages(value, name)
    if wrapped["chosen"] == wrapped["rejected"]:
        raise RowError("fields 'chosen' and 'rejected' are equal", "rejected")
    return wrapped


def _rl(row: Row, text_field: str) -> dict:
    f = row.fields
    if "prompt" in f:
        prompt = f["prompt"]
        prompt = _messages(prompt, "prompt") if isinstance(prompt, list) else _string(f, "prompt")
        extra = {k: v for k, v in f.items() if k != "prompt"}
    elif "question" in f:
        prompt = _string(f, "question")
        extra = {k: v for k, v in f.items() if k != "question"}
    else:
        raise RowError(f"missing field 'prompt' (or GSM8K's 'question'){_found(f)}", "prompt")
    answer = extra.get("answer")
    if isinstance(answer, str) and "final_answer" not in extra:
        final = final_answer(answer)
        if final is not None:
            extra["final_answer"] = final
    return {"prompt": prompt, "extra": extra}


_NORMALISERS = {"text": _text, "sft": _sft, "preference": _preference, "rl": _rl}


def normalise(row: Row, objective: str, text_field: str = "text") -> dict:
    """One valid row in its canonical shape, or `RowError`."""
    if row.error:
        raise RowError(row.error)
    example = _NORMALISERS[format_for(objective)](row, text_field)
    example["source"] = row.source
    return example


# -- the bad-row policy -----------------------------------------------------------------


@dataclass
class RowCounts:
    """What reading the data found: rows seen, bad rows and the first few errors."""

    rows: int = 0
    bad: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return self.rows - self.bad

    def add(self, other: RowCounts) -> None:
        """Count another file's reading in too."""
        self.rows, self.bad = self.rows + other.rows, self.bad + other.bad
        self.errors += other.errors

    def to_dict(self) -> dict:
        return {"rows": self.rows, "valid": self.valid, "bad": self.bad, "errors": list(self.errors)}


class TooManyBadRows(GraftError):
    """More than `max_bad_fraction` of the rows are bad: the run stops before training."""


def _too_many_bad(counts: RowCounts, max_bad_fraction: float) -> GraftError:
    return TooManyBadRows(
        f"{counts.bad} of {counts.rows} rows are bad ({counts.bad / counts.rows:.1%} > "
        f"max_bad_fraction {max_bad_fraction:.1%}); first: {counts.errors[0]}")


def iter_examples(rows: Iterable[Row] | str | Path | list, objective: str, text_field: str = "text",
                  errors: str = "skip", max_bad_fraction: float = 0.01,
                  counts: RowCounts | None = None) -> Iterator[dict]:
    """Valid rows of `rows` (or of the data paths given) normalised for `objective`."""
    if errors not in ("skip", "raise"):
        raise GraftError(f"errors must be 'skip' or 'raise', got {errors!r}")
    format_for(objective)
    if isinstance(rows, (str, Path)) or (isinstance(rows, (list, tuple))
                                         and all(isinstance(p, (str, Path)) for p in rows)):
        rows = iter_rows(rows)  # data paths rather than rows
    counts = counts if counts is not None else RowCounts()
    for row in rows:
        counts.rows += 1
        try:
            example = normalise(row, objective, text_field)
        except RowError as e:
            message = f"{row.source}: {e}"
            if errors == "raise":
                raise GraftError(message) from None
            counts.bad += 1
            if len(counts.errors) < _KEPT_ERRORS:
                counts.errors.append(message)
            if counts.rows >= _EARLY_CHECK_ROWS and counts.bad > max_bad_fraction * counts.rows:
                raise _too_many_bad(counts, max_bad_fraction)
            continue
        yield example
    if counts.rows and counts.bad > max_bad_fraction * counts.rows:
        raise _too_many_bad(counts, max_bad_fraction)
    if counts.valid == 0:
        first = f"; first: {counts.errors[0]}" if counts.errors else ""
        raise GraftError(f"no valid row for objective '{objective}' in {counts.rows} rows{first}")


def load_examples(paths, objective: str, text_field: str = "text", errors: str = "skip",
                  max_bad_fraction: float = 0.01) -> tuple[list[dict], RowCounts]:
    """All valid rows of `paths` for `objective`, with the counts of what was skipped."""
    counts = RowCounts()
    examples = list(iter_examples(paths, objective, text_field, errors, max_bad_fraction, counts))
    return examples, counts
