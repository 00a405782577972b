"""Which kind of data held-out rows are (text, chat, answers, pairs), from the first valid
row's fields, and whether they can be scored as another (`graft eval --as`)."""

from __future__ import annotations

from graftlm.errors import GraftError

# What each kind of data is scored for, its name for `graft eval --as` and in the result
# (`result["kind"]`, the table's heading), and the fields it needs.
KINDS = {"text": "text", "chat": "chat", "answers": "answers", "preference": "pairs"}
_NEEDS = {"text": "'text'", "chat": "'messages', 'prompt' + 'completion' or 'question' + 'answer'",
          "answers": "'prompt' or 'question' with a string 'answer' or 'completion'",
          "preference": "'chosen' + 'rejected'"}


def answer_of(fields: dict):
    return fields.get("answer", fields.get("completion"))


def _kinds_of(fields: dict) -> list[str]:
    """The kinds a row with these fields can be scored as, its default first."""
    kinds = []
    if "chosen" in fields and "rejected" in fields:
        kinds.append("preference")
    if ("prompt" in fields or "question" in fields) and isinstance(answer_of(fields), str):
        kinds.append("answers")
    if "messages" in fields or {"prompt", "completion"} <= fields.keys() or {"question", "answer"} <= fields.keys():
        kinds.append("chat")
    if "text" in fields:
        kinds.append("text")
    return kinds


def kind_name(kind: str | None) -> str | None:
    """A kind, given as `graft eval --as` and `result["kind"]` name it ("pairs"), or as this
    module does ("preference", still taken from callers of `evaluate`)."""
    if kind is None:
        return None
    names = {**{k: k for k in KINDS}, **{v: k for k, v in KINDS.items()}}
    if kind not in names:
        raise GraftError(f"unknown kind of data {kind!r} (one of {', '.join(KINDS.values())})")
    return names[kind]


def data_kind(path, wanted: str | None = None) -> str:
    """text | chat | answers | preference: `wanted` if the first valid row's fields allow
    it, else the fields' default."""
    from graftlm.data.sources import iter_rows

    for row in iter_rows(path):
        if row.error:
            continue
        kinds, found = _kinds_of(row.fields), ", ".join(repr(k) for k in sorted(row.fields))
        if not kinds:
            raise GraftError(f"{row.source}: eval needs text rows, chat rows, prompts with answers, or preference "
                             f"pairs (fields: {found})")
        if wanted is None or wanted in kinds:
            return wanted or kinds[0]
        raise GraftError(f"{row.source}: rows with fields {found} cannot be scored as {KINDS[wanted]} (it needs "
                         f"{_NEEDS[wanted]}); they can be as {' or '.join(KINDS[k] for k in kinds)}")
    raise GraftError(f"{path}: no valid row to evaluate")
