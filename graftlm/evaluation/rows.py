"""Where every row of held-out data went: read (bad ones skipped, up to a bound), left out
and why, cut to fit the context; `Rows.report` is what the result says of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from graftlm.data.formats import RowCounts, load_examples
from graftlm.errors import GraftError

# Why rows of the data were not evaluated, in the order `graft eval` lists them.
LEFT_OUT_REASONS = ("bad", "few_shot_examples", "past_max_rows", "too_long", "nothing_to_score", "too_short")
# Held-out files are small (one bad row of 40 is 2.5%): skip bad rows and stop only on a
# file mostly bad, the wrong file or the wrong kind, where training stops above 1%.
MAX_BAD_FRACTION = 0.5


@dataclass
class Rows:
    """Where every row of the data went: read (bad ones skipped), left out and why, cut."""

    max_bad_fraction: float = MAX_BAD_FRACTION  # stop above this share of bad rows
    read: RowCounts = field(default_factory=RowCounts)
    left_out: dict[str, int] = field(default_factory=dict)
    cut: int = 0  # evaluated, but cut to fit the context
    few_shot_cut: int = 0  # few-shot prompts whose first examples were cut to fit

    def leave_out(self, reason: str, rows: int) -> None:
        self.left_out[reason] = self.left_out.get(reason, 0) + rows

    def report(self, evaluated: int, context: int) -> dict:
        from graftlm.objectives.sft import left_out  # here: sft imports torch, and `graft eval --help` reads this module

        left = {"bad": self.read.bad, **self.left_out}
        out = {"rows": evaluated, "rows_in_data": self.read.rows,
               "rows_left_out": {k: left[k] for k in LEFT_OUT_REASONS if left.get(k)}, "context": context}
        if self.cut:
            out["rows_cut"] = self.cut
        if self.few_shot_cut:
            out["few_shot_prompts_cut"] = self.few_shot_cut
        return {**out, **left_out(self.read)}


def valid_rows(data, objective: str, rows: Rows) -> list[dict]:
    """The valid rows of `data` (paths or `Row`s); bad ones are skipped and counted in
    `rows`, as the training commands skip them, up to `rows.max_bad_fraction`."""
    valid, counts = load_examples(data, objective, max_bad_fraction=rows.max_bad_fraction)
    rows.read.add(counts)
    return valid


def first(items: list, max_rows: int | None, rows: Rows) -> list:
    """The first `max_rows` of `items`; the rest are counted as left out."""
    kept = items[:max_rows]
    rows.leave_out("past_max_rows", len(items) - len(kept))
    return kept


def split_shots(data, valid: list, few_shot: int, max_rows: int | None, rows: Rows) -> tuple[list, list]:
    """(the first `few_shot` rows: the few-shot examples, never scored, so that every row
    of the table is scored on the same rows; the next `max_rows`: the rows scored)."""
    shots, scored = valid[:few_shot], first(valid[few_shot:], max_rows, rows)
    rows.leave_out("few_shot_examples", len(shots))
    if not scored:
        raise GraftError(f"{data}: no row left to score after the {few_shot} few-shot example row(s)")
    return shots, scored


def rendered(data, examples: list[dict], render, renderer, rows: Rows, none_left: str) -> tuple[list[dict], list]:
    """(the examples kept, them rendered): those too long for the context or with no token
    to score are left out (and counted), and none at all is an error."""
    before = renderer.counts.to_dict()
    kept = [(example, r) for example, r in zip(examples, map(render, examples)) if r is not None]
    counts = {k: v - before[k] for k, v in renderer.counts.to_dict().items()}
    rows.leave_out("too_long", counts["dropped_too_long"])
    rows.leave_out("nothing_to_score", counts["dropped_untrained"])
    rows.cut += counts["truncated"]
    if not kept:
        raise GraftError(f"{data}: {none_left}")
    return [example for example, _ in kept], [r for _, r in kept]
