"""Held-out evaluation of a model, its adapters side by side, and a few-shot baseline.

`evaluate(model_dir, data, adapters={name: dir}, few_shot=K, name=...)` returns a plain
dict: `{"kind", "rows", "rows_in_data", "rows_left_out", "metrics": {row: {metric:
value}}, "definitions": {metric: meaning}}`. The rows of "metrics" are the model itself,
labelled `name` (`graft eval`: its run's or directory's name, `runs/sft/final` -> `sft`;
the default "base", or "reward model" for one), each adapter's name, and
`{name}+{K}-shot`. Every row of the table is scored on the same rows of the data. The
model's row and its LoRA / DoRA adapters' are scored on the model as loaded; QLoRA
adapters on a second instance of it, quantized to NF4 as they were trained (loading one
quantizes its base in place), so a QLoRA adapter beside the others changes no other row.

What is measured, the kind (`result["kind"]`, named as `graft eval --as` takes it),
follows the first valid row's fields; `kind=` (`graft eval --as`) picks another where the
fields allow it (prompt/completion rows scored as chat: the held-out loss of the
completions rather than greedy answers), else it is an error:
- text rows (`{"text"}`): mean token loss and bits per byte (nats / ln 2 over the UTF-8
  bytes of the predicted tokens); a text longer than the context is scored whole, in
  context-length windows;
- chat rows (`{"messages"}`, what `graft sft` trains on; by choice `prompt` +
  `completion` or `question` + `answer`): mean loss of the assistant turns' (the
  completion's) tokens, rendered as SFT renders them (a row longer than the context is cut);
- answers, the default for prompts with answers (`prompt`/`question` + a string
  `answer`/`completion`): greedy generation with the engine, then `exact_match` (numeric
  final-answer match when the answers are numbers or GSM8K-style `#### N`, exact string
  match otherwise; lm-eval-harness's name) and, with `reward=`, the mean reward of any
  reward spec from `graftlm.rewards`;
- pairs (`chosen` + `rejected`; "preference" inside this module): three
  accuracies, never one name for two. `logp_accuracy`: the row's model gives the chosen
  completion the higher summed log-probability (every policy row; it favours the
  shorter completion). `avg_logp_accuracy`: the higher mean log-probability per token,
  the length-normalised score SimPO trains (every policy row). `reward_accuracy`: the
  chosen completion has the higher implicit DPO reward, log pi(y) - log pi_ref(y) (TRL's
  `rewards/accuracies`), where a reference exists: an adapter's is its base without
  adapters (for a QLoRA adapter the 4-bit base, QLoRA-DPO's reference), the model's own
  is `reference=DIR` (a fully fine-tuned policy); without one the model's row has no
  reward_accuracy. A reward model directory (`graft reward`) gets
  `pairwise_accuracy`: its score of the chosen completion beats the rejected one's.
The few-shot baseline ("prompting alone", the row `{name}+{K}-shot`) takes the first K
rows as examples, and those rows are not scored. Answers: each prompt is prefixed with them
as solved examples (user and assistant turns). Chat: their user and assistant turns go
before each scored conversation (after its system message), as lm-eval-harness's
multi-turn few-shot places them, and are context: the loss is that of the row's own
assistant tokens, as without them. Text and pairs refuse it: a text has no turns, and a
pair's accuracy compares two completions of one prompt, with no solved answer to show.

No row is left out silently: `rows_in_data` counts every row read, `rows` those
evaluated, and `rows_left_out` says why the others were not (`bad`,
`few_shot_examples`, `past_max_rows`, `too_long` for the context, `nothing_to_score`,
`too_short`); `rows_cut` counts evaluated rows cut to fit the context. Bad rows are
skipped under the training commands' policy (`data.formats.iter_examples`), but with
a bound for held-out files, where one bad row of 40 is 2.5%: `max_bad_fraction`
(default 0.5) stops only a file mostly bad (the wrong file, or the wrong kind), naming
its first bad row; `bad_rows_skipped` names the first one skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import takewhile
from pathlib import Path

import torch

from graftlm.data.formats import RowCounts, load_examples
from graftlm.data.render import RenderConfig, RenderedRow, Renderer
from graftlm.errors import GraftError
from graftlm.objectives.logprobs import IGNORE_INDEX
from graftlm.objectives.sft import RenderedRows, left_out
from graftlm.rewards import build_reward, exact_match, final_number, numeric_match

# Why rows of the data were not evaluated, in the order `graft eval` lists them.
LEFT_OUT_REASONS = ("bad", "few_shot_examples", "past_max_rows", "too_long", "nothing_to_score", "too_short")
# What each kind of data is scored for, its name for `graft eval --as` and in the result
# (`result["kind"]`, the table's heading), and the fields it needs.
KINDS = {"text": "text", "chat": "chat", "answers": "answers", "preference": "pairs"}
_NEEDS = {"text": "'text'", "chat": "'messages', 'prompt' + 'completion' or 'question' + 'answer'",
          "answers": "'prompt' or 'question' with a string 'answer' or 'completion'",
          "preference": "'chosen' + 'rejected'"}
# Held-out files are small (one bad row of 40 is 2.5%): skip bad rows and stop only on a
# file mostly bad, the wrong file or the wrong kind, where training stops above 1%.
MAX_BAD_FRACTION = 0.5


@dataclass
class _Rows:
    """Where every row of the data went: read (bad ones skipped), left out and why, cut."""

    max_bad_fraction: float = MAX_BAD_FRACTION  # stop above this share of bad rows
    read: RowCounts = field(default_factory=RowCounts)
    left_out: dict[str, int] = field(default_factory=dict)
    cut: int = 0  # evaluated, but cut to fit the context
    few_shot_cut: int = 0  # few-shot prompts whose first examples were cut to fit

    def leave_out(self, reason: str, rows: int) -> None:
        self.left_out[reason] = self.left_out.get(reason, 0) + rows

    def report(self, evaluated: int, context: int) -> dict:
        left = {"bad": self.read.bad, **self.left_out}
        out = {"rows": evaluated, "rows_in_data": self.read.rows,
               "rows_left_out": {k: left[k] for k in LEFT_OUT_REASONS if left.get(k)}, "context": context}
        if self.cut:
            out["rows_cut"] = self.cut
        if self.few_shot_cut:
            out["few_shot_prompts_cut"] = self.few_shot_cut
        return {**out, **left_out(self.read)}


def _kinds_of(fields: dict) -> list[str]:
    """The kinds a row with these fields can be scored as, its default first."""
    kinds = []
    if "chosen" in fields and "rejected" in fields:
        kinds.append("preference")
    if ("prompt" in fields or "question" in fields) and isinstance(_answer_of(fields), str):
        kinds.append("answers")
    if "messages" in fields or {"prompt", "completion"} <= fields.keys() or {"question", "answer"} <= fields.keys():
        kinds.append("chat")
    if "text" in fields:
        kinds.append("text")
    return kinds


def _kind_name(kind: str | None) -> str | None:
    """A kind, given as `graft eval --as` and `result["kind"]` name it ("pairs"), or as this
    module does ("preference", still taken from callers of `evaluate`)."""
    if kind is None:
        return None
    names = {**{k: k for k in KINDS}, **{v: k for k, v in KINDS.items()}}
    if kind not in names:
        raise GraftError(f"unknown kind of data {kind!r} (one of {', '.join(KINDS.values())})")
    return names[kind]


def _data_kind(path, wanted: str | None = None) -> str:
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


def _valid_rows(data, objective: str, rows: _Rows) -> list[dict]:
    """The valid rows of `data` (paths or `Row`s); bad ones are skipped and counted in
    `rows`, as the training commands skip them, up to `rows.max_bad_fraction`."""
    valid, counts = load_examples(data, objective, max_bad_fraction=rows.max_bad_fraction)
    rows.read.add(counts)
    return valid


def _first(items: list, max_rows: int | None, rows: _Rows) -> list:
    """The first `max_rows` of `items`; the rest are counted as left out."""
    kept = items[:max_rows]
    rows.leave_out("past_max_rows", len(items) - len(kept))
    return kept


def _split_shots(data, valid: list, few_shot: int, max_rows: int | None, rows: _Rows) -> tuple[list, list]:
    """(the first `few_shot` rows: the few-shot examples, never scored, so that every row
    of the table is scored on the same rows; the next `max_rows`: the rows scored)."""
    shots, scored = valid[:few_shot], _first(valid[few_shot:], max_rows, rows)
    rows.leave_out("few_shot_examples", len(shots))
    if not scored:
        raise GraftError(f"{data}: no row left to score after the {few_shot} few-shot example row(s)")
    return shots, scored


def _answer_of(fields: dict):
    return fields.get("answer", fields.get("completion"))


def _answer_rows(path, rows: _Rows) -> list[dict]:
    """Prompts with their answers, and the row's other fields for a reward function. A
    row without a string answer is a bad row, skipped and counted like the others."""
    from graftlm.data.sources import iter_rows

    def checked():
        for row in iter_rows(path):
            if not row.error and not isinstance(_answer_of(row.fields), str):
                row = replace(row, error="eval of prompts needs a string 'answer' (or 'completion') to compare "
                                         "the greedy answer with")
            yield row

    return [{**r["extra"], "prompt": r["prompt"], "answer": _answer_of(r["extra"]), "source": r["source"]}
            for r in _valid_rows(checked(), "rl", rows)]


def _few_shot_prompt(shots: list[dict], prompt):
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": shot["prompt"]}, {"role": "assistant", "content": shot["answer"]}]
    return messages + [{"role": "user", "content": prompt}]


def _is_numeric(rows: list[dict]) -> bool:
    return all("####" in r["answer"] or final_number(r["answer"]) == r["answer"].strip().replace(",", "")
               for r in rows)


def _progress_of(progress, variant: str):
    return None if progress is None else lambda done, total: progress(variant, done, total)


def _prompt_ids(renderer, prompts, room: int) -> tuple[list[list[int]], int]:
    """Each prompt's token ids, and how many were cut to fit. A prompt longer than the
    context keeps its end (the question), not its first shots."""
    ids = [renderer.render_prompt({"prompt": p}) for p in prompts]
    return [i[-room:] for i in ids], sum(len(i) > room for i in ids)


@torch.no_grad()
def _answers(model, tokenizer, rows, ids, max_new_tokens: int, reward, batch_size: int, progress=None) -> dict:
    from graftlm.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer)
    completions = []
    for start in range(0, len(ids), batch_size):
        outs = engine.generate(ids[start:start + batch_size],
                               SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
        completions += [o.text or "" for o in outs]
        if progress is not None:
            progress(len(completions), len(ids))
    texts = [p if isinstance(p, str) else p[-1]["content"] for p in (r["prompt"] for r in rows)]
    match = numeric_match if _is_numeric(rows) else exact_match
    scores = match(completions, texts, rows)
    metrics = {"exact_match": sum(scores) / len(scores)}
    if reward is not None:
        rewards = reward(completions, texts, rows)
        metrics["reward"] = sum(rewards) / len(rewards)
    return metrics


@torch.no_grad()
def _pair_margins(model, pairs, pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _share(wins: torch.Tensor) -> float:
    return wins.float().mean().item()


def _windows(ids: list[int], max_len: int) -> list[list[int]]:
    """Windows of at most `max_len` tokens, each starting on the previous one's last
    token, so that every token after the first is predicted exactly once."""
    return [ids[start:start + max_len] for start in range(0, max(len(ids) - 1, 1), max_len - 1)]


def _text_windows(tokenizer, texts: list[str], max_len: int, rows: _Rows) -> tuple[list[list[int]], int, int]:
    """(windows, UTF-8 bytes of the predicted tokens, texts scored). A text longer than
    the context is scored in context-length windows (each starts afresh), as held-out
    loss is measured, rather than cut at the context; one of fewer than two tokens has
    nothing to predict and is left out."""
    windows, n_bytes, scored = [], 0, 0
    for text in texts:
        ids = tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)
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
def _text_metrics(model, windows: list[list[int]], n_bytes: int, pad_id: int, batch_size: int) -> dict:
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


def _context_length(model_dir: Path) -> int:
    from graftlm.models.heads import is_scalar_adapter_dir, scalar_adapter_base
    from graftlm.models.hf import load_config

    if is_scalar_adapter_dir(model_dir):  # a reward model's adapter: its base's context
        return load_config(scalar_adapter_base(model_dir)).max_seq_len
    return load_config(model_dir).max_seq_len


def _definitions(kind: str, model: str, adapters, reference, numeric: bool = False, reward=None,
                 few_shot: int = 0, quantized: tuple = ()) -> dict:
    """What each metric column means, for this evaluation: printed under the table."""
    if kind == "text":
        return {"loss": "mean negative log-likelihood per predicted token (nats)",
                "bpb": "bits per UTF-8 byte of the predicted text", "tokens": "tokens predicted"}
    if kind == "chat":
        out = {"loss": "mean negative log-likelihood per assistant (completion) token (nats)",
               "tokens": "assistant tokens scored"}
        if few_shot:
            out["loss"] += (f"; {model}+{few_shot}-shot: of the same tokens, after the user and assistant turns of "
                            f"the first {few_shot} rows as examples (context, not scored)")
        return out
    if kind == "answers":
        out = {"exact_match": "share of greedy answers whose final number equals the answer's" if numeric
               else "share of greedy answers equal to the answer (surrounding whitespace ignored)"}
        if reward:
            out["reward"] = f"mean reward ({reward}) of the greedy answers"
        return out
    full = [a for a in adapters if a not in quantized]
    refs = [f"{model} without adapters for {', '.join(full)}"] if full else []
    if quantized:
        refs.append(f"{model} quantized to 4 bits (NF4), without adapters, for {', '.join(quantized)}")
    if reference is not None:
        refs.insert(0, f"{reference} for {model}")
    out = {"logp_accuracy": "share of pairs whose chosen completion has the higher summed log-probability "
                            "under the row's model (favours the shorter completion)",
           "avg_logp_accuracy": "share of pairs whose chosen completion has the higher mean log-probability per "
                                "token under the row's model (length-normalised, as SimPO scores)"}
    if refs:
        out["reward_accuracy"] = ("share of pairs whose chosen completion has the higher implicit DPO reward, "
                                  "log p(y) - log p_ref(y); reference: " + "; ".join(refs))
    return out


class _Variants:
    """The model each row of the table is scored on. The model's own row and its LoRA and
    DoRA adapters share the model as loaded. Loading a QLoRA adapter quantizes its base to
    NF4, so QLoRA adapters go onto a second instance of the base, loaded only for them:
    every other row stays on the full-precision weights, and each QLoRA row is scored on
    the 4-bit base it was trained on."""

    def __init__(self, model_dir, name: str, adapters: dict[str, str], device: str, allow_other_base: bool):
        from graftlm.adapters import load_adapter
        from graftlm.models.hf import load_model

        self.name = name
        self.model = load_model(model_dir, device=device)
        self.quantized_adapters = tuple(a for a, path in adapters.items() if _is_qlora(path))
        quantized = load_model(model_dir, device=device) if self.quantized_adapters else None
        self._model_of = {name: self.model}
        for adapter, path in adapters.items():
            self._model_of[adapter] = quantized if adapter in self.quantized_adapters else self.model
            load_adapter(self._model_of[adapter], path, adapter, allow_other_base=allow_other_base)

    def use(self, variant: str):
        """The model of `variant`'s row, computing with its adapter (the model's own row: none)."""
        from graftlm.adapters import has_adapters, set_active_adapter

        model = self._model_of[variant]
        if has_adapters(model):
            set_active_adapter(model, None if variant == self.name else variant)
        return model


def _is_qlora(adapter_dir) -> bool:
    from graftlm.adapters.peft_format import read_adapter_config

    return read_adapter_config(adapter_dir).get("graftlm_kind") == "qlora"


def evaluate(model_dir: str | Path, data: str | Path, adapters: dict[str, str] | None = None,
             few_shot: int = 0, max_rows: int | None = None, max_new_tokens: int = 64,
             reward: str | None = None, reference: str | Path | None = None, batch_size: int = 16,
             device: str = "cpu", allow_other_base: bool = False, progress=None, name: str | None = None,
             kind: str | None = None, max_bad_fraction: float = MAX_BAD_FRACTION) -> dict:
    """Evaluate the model and each adapter on `data`; see the module docstring. `name`
    labels the model's own row (default "base", "reward model" for a reward model).
    `kind` (text | chat | answers | pairs) scores the rows as that kind where their fields
    allow it (default: the fields decide). Bad rows are skipped, and more than
    `max_bad_fraction` of them stop it (`TooManyBadRows`).
    `progress(variant, rows done, rows)` is called as generated answers come in (the slow kind)."""
    from graftlm.models.heads import is_scalar_model_dir
    from graftlm.tokenizer import load_tokenizer

    adapters = adapters or {}
    if not 0 <= max_bad_fraction <= 1:
        raise GraftError(f"max_bad_fraction: must be in [0, 1], got {max_bad_fraction}")
    kind = _data_kind(data, _kind_name(kind))
    if few_shot and kind not in ("answers", "chat"):
        raise GraftError(f"--few-shot: applies to answers (examples in the prompt) and chat rows (examples as turns "
                         f"before the conversation); these rows are scored as {KINDS[kind]}")
    tokenizer = load_tokenizer(model_dir)
    context = _context_length(model_dir)
    renderer = Renderer(tokenizer, RenderConfig(max_length=context))
    if few_shot and kind == "chat" and not renderer.chat:
        # Its prompt/completion rows are scored as raw text: examples as chat turns would
        # change the format as well as add examples.
        raise GraftError(f"--few-shot: chat rows take their examples as chat turns, and the tokenizer of {model_dir} "
                         f"has no chat template")
    result = {"kind": KINDS[kind], "model": str(model_dir), "data": str(data), "metrics": {}}
    rows = _Rows(max_bad_fraction)  # where every row went: reported beside the metrics, never left out silently

    if is_scalar_model_dir(model_dir):
        if kind != "preference":
            raise GraftError(f"{model_dir}: a reward model scores pairs only ('chosen' + 'rejected'); these rows are "
                             f"scored as {KINDS[kind]}")
        from graftlm.models.heads import load_scalar_model
        from graftlm.objectives.reward import pair_scores

        scorer = load_scalar_model(model_dir, device=device)
        pairs = _pairs(data, renderer, max_rows, scorer.pad_token_id, rows)
        wins = []
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                batch = pairs.collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
                c, r = pair_scores(scorer, batch)
                wins.append(c > r)
        result["metrics"][name or "reward model"] = {"pairwise_accuracy": _share(torch.cat(wins))}
        result["definitions"] = {"pairwise_accuracy": "share of pairs whose chosen completion the reward model "
                                                      "scores higher"}
        return {**result, **rows.report(len(pairs), context)}

    from graftlm.models.hf import load_model

    name = name or "base"
    if name in adapters:
        raise GraftError(f"adapter name {name!r} is also the model's: name the adapter (--adapter NAME=DIR)")
    instances = _Variants(model_dir, name, adapters, device, allow_other_base)
    model, use, variants = instances.model, instances.use, [name, *adapters]

    if kind == "text":
        texts = _first([r["text"] for r in _valid_rows(data, "text", rows)], max_rows, rows)
        windows, n_bytes, scored = _text_windows(tokenizer, texts, model.config.max_seq_len, rows)
        for variant in variants:
            result["metrics"][variant] = _text_metrics(use(variant), windows, n_bytes, tokenizer.pad_id or 0,
                                                       batch_size)
        result["definitions"] = _definitions(kind, name, adapters, reference)
        return {**result, **rows.report(scored, context)}
    if kind == "chat":
        shots, scored = _split_shots(data, _valid_rows(data, "sft", rows), few_shot, max_rows, rows)
        scored, chats = _chats(data, scored, renderer, tokenizer.pad_id, rows)
        # Rendered before any scoring: a row that cannot take examples stops it at once.
        with_shots = _few_shot_chats(tokenizer, renderer.config, shots, scored, rows) if few_shot else None
        for variant in variants:
            result["metrics"][variant] = _chat_loss(use(variant), chats, batch_size)
        if few_shot:
            result["metrics"][f"{name}+{few_shot}-shot"] = _chat_loss(use(name), with_shots, batch_size)
        result["definitions"] = _definitions(kind, name, adapters, reference, few_shot=few_shot)
        return {**result, **rows.report(len(chats), context)}
    if kind == "answers":
        shots, answers = _split_shots(data, _answer_rows(data, rows), few_shot, max_rows, rows)
        reward_fn = build_reward(reward, device=device) if reward else None
        room = model.config.max_seq_len - max_new_tokens
        if room < 1:
            raise GraftError(f"--max-new-tokens {max_new_tokens} leaves no room in the context of "
                             f"{model.config.max_seq_len}")
        prompts = [r["prompt"] for r in answers]
        ids, rows.cut = _prompt_ids(renderer, prompts, room)
        for variant in variants:
            result["metrics"][variant] = _answers(use(variant), tokenizer, answers, ids, max_new_tokens,
                                                  reward_fn, batch_size, _progress_of(progress, variant))
        if few_shot:
            shot_ids, rows.few_shot_cut = _prompt_ids(renderer, [_few_shot_prompt(shots, p) for p in prompts], room)
            variant = f"{name}+{few_shot}-shot"
            result["metrics"][variant] = _answers(use(name), tokenizer, answers, shot_ids, max_new_tokens,
                                                  reward_fn, batch_size, _progress_of(progress, variant))
        result["definitions"] = _definitions(kind, name, adapters, reference, _is_numeric(answers), reward)
        return {**result, **rows.report(len(answers), context)}

    # Preference pairs: each row's own log-prob preference, and where the row has a
    # reference, its implicit DPO reward's, under their own names (one name for both
    # hid that the model's row and the adapters' measured different things).
    pairs = _pairs(data, renderer, max_rows, tokenizer.pad_id, rows)
    own, own_mean = _pair_margins(use(name), pairs, tokenizer.pad_id, batch_size)
    result["metrics"][name] = {"logp_accuracy": _share(own > 0), "avg_logp_accuracy": _share(own_mean > 0)}
    if reference is not None:  # a fully fine-tuned policy: implicit reward against its reference
        ref, _ = _pair_margins(load_model(reference, device=device), pairs, tokenizer.pad_id, batch_size)
        result["metrics"][name]["reward_accuracy"] = _share(own - ref > 0)
    from graftlm.adapters import disable_adapters

    # Each adapter's reference is its own base without adapters: the model for LoRA and
    # DoRA, the 4-bit copy for QLoRA (what QLoRA-DPO trained against).
    base_margins = {id(model): own}
    for variant in adapters:
        adapted = use(variant)
        margin, mean = _pair_margins(adapted, pairs, tokenizer.pad_id, batch_size)
        if id(adapted) not in base_margins:
            with disable_adapters(adapted):
                base_margins[id(adapted)], _ = _pair_margins(adapted, pairs, tokenizer.pad_id, batch_size)
        # implicit DPO reward margin: the adapter's log-ratio gain over its base without it
        result["metrics"][variant] = {"logp_accuracy": _share(margin > 0), "avg_logp_accuracy": _share(mean > 0),
                                      "reward_accuracy": _share(margin - base_margins[id(adapted)] > 0)}
    result["definitions"] = _definitions(kind, name, adapters, reference, quantized=instances.quantized_adapters)
    return {**result, **rows.report(len(pairs), context)}


def _rendered(data, examples: list[dict], render, renderer, rows: _Rows, none_left: str) -> tuple[list[dict], list]:
    """(the examples kept, them rendered): those too long for the context or with no token
    to score are left out (and counted), and none at all is an error."""
    before = renderer.counts.to_dict()
    kept = [(example, r) for example, r in zip(examples, map(render, examples)) if r is not None]
    counts = {k: v - before[k] for k, v in renderer.counts.to_dict().items()}
    rows.leave_out("too_long", counts["dropped_too_long"])
    rows.leave_out("nothing_to_score", counts["dropped_untrained"])
    rows.cut += sum(r.truncated for _, r in kept)  # the renderer also counts rows cut, then dropped
    if not kept:
        raise GraftError(f"{data}: {none_left}")
    return [example for example, _ in kept], [r for _, r in kept]


def _chats(data, examples: list[dict], renderer, pad_id, rows: _Rows):
    """(the chat rows kept, them rendered as SFT renders them)."""
    kept, rendered = _rendered(data, examples, renderer.render, renderer, rows,
                               "no chat row has an assistant token to score")
    return kept, RenderedRows(rendered, pad_id)


def _few_shot_chats(tokenizer, config, shots: list[dict], scored: list[dict], rows: _Rows) -> RenderedRows:
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


@torch.no_grad()
def _chat_loss(model, chats, batch_size: int) -> dict:
    """Mean loss per assistant token: SFT's own loss, summed over the rows."""
    from graftlm.objectives.sft import SFTObjective

    device, objective = next(model.parameters()).device, SFTObjective()
    total, tokens = 0.0, 0
    for start in range(0, len(chats), batch_size):
        batch = chats.collate([chats[i] for i in range(start, min(start + batch_size, len(chats)))])
        nll, count, _ = objective.loss(model, {k: v.to(device) for k, v in batch.items()})
        total, tokens = total + nll.item(), tokens + int(count)
    return {"loss": total / tokens, "tokens": tokens}


def _pairs(data, renderer, max_rows, pad_id, rows: _Rows):
    from graftlm.objectives.dpo import PreferencePairs

    _, rendered = _rendered(data, _first(_valid_rows(data, "dpo", rows), max_rows, rows), renderer.render_pair,
                            renderer, rows, "no preference pair to evaluate")
    return PreferencePairs(rendered, pad_id)
