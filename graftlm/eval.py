"""Held-out evaluation of a model, its adapters side by side, and a few-shot baseline.

`evaluate(model_dir, data, adapters={name: dir}, few_shot=K)` returns a plain dict:
`{"kind", "rows", "metrics": {variant: {metric: value}}}` where the variants are
`base`, each adapter's name, and `base+{K}-shot`. What is measured follows the data:
- text rows (`{"text"}`): mean token loss and bits per byte (nats / ln 2 over the UTF-8
  bytes of the predicted tokens); a text longer than the context is scored whole, in
  context-length windows;
- chat rows (`{"messages"}`, what `graft sft` trains on): mean loss of the assistant
  turns' tokens, rendered as SFT renders them (a row longer than the context is cut);
- prompts with answers (`prompt`/`question` + `answer`/`completion`): greedy generation
  with the engine, then exact-match accuracy (numeric final-answer match when the
  answers are numbers or GSM8K-style `#### N`, exact string match otherwise) and, with
  `reward=`, the mean reward of any reward spec from `graftlm.rewards`;
- preference pairs: pairwise accuracy. A policy prefers the chosen completion when its
  implicit DPO reward, log pi(chosen) - log pi_base(chosen), beats the rejected one's;
  the base itself compares plain log-probs, or, with `reference=DIR` (a fully
  fine-tuned policy), its log-ratios against that reference. A reward model directory
  (`graft reward`) compares its scores.
The few-shot baseline ("prompting alone") prefixes each prompt with the first K rows
as solved examples, and those rows are not scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from graftlm.data.formats import RowCounts, load_examples
from graftlm.errors import GraftError
from graftlm.objectives.logprobs import IGNORE_INDEX
from graftlm.objectives.sft import left_out
from graftlm.rewards import build_reward, exact_match, final_number, numeric_match


def _data_kind(path) -> str:
    """text | answers | preference, from the first valid row's fields."""
    from graftlm.data.sources import iter_rows

    for row in iter_rows(path):
        if row.error:
            continue
        fields = row.fields
        if "chosen" in fields and "rejected" in fields:
            return "preference"
        if ("prompt" in fields or "question" in fields) and any(k in fields for k in ("answer", "completion")):
            return "answers"
        if "messages" in fields:
            return "chat"
        if "text" in fields:
            return "text"
        raise GraftError(f"{row.source}: eval needs text rows, chat rows, prompts with answers, or preference pairs "
                         f"(fields: {', '.join(sorted(fields))})")
    raise GraftError(f"{path}: no valid row to evaluate")


def _valid_rows(data, objective: str, read: RowCounts) -> list[dict]:
    """The valid rows of `data`; bad ones are skipped (up to 1% of them) and counted in `read`."""
    rows, counts = load_examples(data, objective)
    read.add(counts)
    return rows


def _answer_rows(path, read: RowCounts) -> list[dict]:
    """Prompts with their answers, and the row's other fields for a reward function."""
    rows = _valid_rows(path, "rl", read)
    out = []
    for r in rows:
        extra = r["extra"]
        answer = extra.get("answer", extra.get("completion"))
        if not isinstance(answer, str):
            raise GraftError(f"{r['source']}: eval of prompts needs a string 'answer' (or 'completion')")
        out.append({**extra, "prompt": r["prompt"], "answer": answer, "source": r["source"]})
    return out


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


@torch.no_grad()
def _answers(model, tokenizer, renderer, rows, prompts, max_new_tokens: int, reward, batch_size: int,
             progress=None) -> dict:
    from graftlm.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer)
    # A prompt longer than the context keeps its end (the question), not its first shots.
    room = model.config.max_seq_len - max_new_tokens
    if room < 1:
        raise GraftError(f"--max-new-tokens {max_new_tokens} leaves no room in the context of {model.config.max_seq_len}")
    ids = [renderer.render_prompt({"prompt": p})[-room:] for p in prompts]
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


def _seq_logps(model, batch: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    from graftlm.objectives.dpo import concatenated, sequence_logps

    ids, mask = concatenated(batch, pad_id)
    logps, _ = sequence_logps(model, ids, mask)
    return logps.chunk(2)


@torch.no_grad()
def _pair_margins(model, pairs, pad_id: int, batch_size: int) -> torch.Tensor:
    """log p(chosen) - log p(rejected) per pair, under the model as it is now."""
    margins = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs.collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
        chosen, rejected = _seq_logps(model, batch, pad_id)
        margins.append(chosen - rejected)
    return torch.cat(margins)


def _windows(ids: list[int], max_len: int) -> list[list[int]]:
    """Windows of at most `max_len` tokens, each starting on the previous one's last
    token, so that every token after the first is predicted exactly once."""
    return [ids[start:start + max_len] for start in range(0, max(len(ids) - 1, 1), max_len - 1)]


@torch.no_grad()
def _text_metrics(model, tokenizer, texts: list[str], max_len: int, batch_size: int) -> dict:
    # A text longer than the context is scored in context-length windows (each starts
    # afresh), as held-out loss is measured, rather than cut at the context.
    windows, n_bytes = [], 0
    for text in texts:
        ids = tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)
        if len(ids) < 2:
            continue
        windows += _windows(ids, max_len)
        n_bytes += len(tokenizer.decode(ids[1:]).encode("utf-8"))
    if not windows:
        raise GraftError("no text row has two tokens to evaluate")
    device = next(model.parameters()).device
    total_nll, tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        group = windows[start:start + batch_size]
        width = max(map(len, group))
        # Right padding: a causal model's real positions never see it, and its targets are ignored.
        x = torch.tensor([w + [tokenizer.pad_id or 0] * (width - len(w)) for w in group], device=device)
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


def evaluate(model_dir: str | Path, data: str | Path, adapters: dict[str, str] | None = None,
             few_shot: int = 0, max_rows: int | None = None, max_new_tokens: int = 64,
             reward: str | None = None, reference: str | Path | None = None, batch_size: int = 16,
             device: str = "cpu", allow_other_base: bool = False, progress=None) -> dict:
    """Evaluate the base model and each adapter on `data`; see the module docstring.
    `progress(variant, rows done, rows)` is called as generated answers come in (the slow kind)."""
    from graftlm.data.render import RenderConfig, Renderer
    from graftlm.models.heads import is_scalar_model_dir
    from graftlm.tokenizer import load_tokenizer

    adapters = adapters or {}
    kind = _data_kind(data)
    tokenizer = load_tokenizer(model_dir)
    context = _context_length(model_dir)
    renderer = Renderer(tokenizer, RenderConfig(max_length=context))
    result = {"kind": kind, "model": str(model_dir), "data": str(data), "metrics": {}}
    read = RowCounts()  # bad rows skipped: reported beside the metrics, never silently

    if is_scalar_model_dir(model_dir):
        if kind != "preference":
            raise GraftError(f"{model_dir}: a reward model evaluates preference pairs only")
        from graftlm.models.heads import load_scalar_model
        from graftlm.objectives.reward import pair_scores

        scorer = load_scalar_model(model_dir, device=device)
        pairs = _pairs(data, renderer, max_rows, scorer.pad_token_id, read)
        wins = []
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                batch = pairs.collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
                c, r = pair_scores(scorer, batch)
                wins.append(c > r)
        result["rows"] = len(pairs)
        result["metrics"]["reward model"] = {"pairwise_accuracy": torch.cat(wins).float().mean().item()}
        return {**result, **left_out(read)}

    from graftlm.models.hf import load_model

    model = load_model(model_dir, device=device)
    if adapters:
        from graftlm.adapters import load_adapter
        for name, path in adapters.items():
            load_adapter(model, path, name, allow_other_base=allow_other_base)
    variants = ["base", *adapters]

    def use(name):
        if adapters:
            from graftlm.adapters import set_active_adapter
            set_active_adapter(model, None if name == "base" else name)

    if kind == "text":
        texts = [r["text"] for r in _valid_rows(data, "text", read)][:max_rows]
        result["rows"] = len(texts)
        for name in variants:
            use(name)
            result["metrics"][name] = _text_metrics(model, tokenizer, texts, model.config.max_seq_len,
                                                       batch_size)
    elif kind == "chat":
        chats = _chats(data, renderer, max_rows, tokenizer.pad_id, read)
        result["rows"] = len(chats)
        for name in variants:
            use(name)
            result["metrics"][name] = _chat_loss(model, chats, batch_size)
    elif kind == "answers":
        rows = _answer_rows(data, read)
        shots, rows = rows[:few_shot], rows[few_shot:]
        rows = rows[:max_rows]
        if not rows:
            raise GraftError(f"{data}: no row left to score after the {few_shot} few-shot example row(s)")
        result["rows"] = len(rows)
        reward_fn = build_reward(reward, device=device) if reward else None
        prompts = [r["prompt"] for r in rows]
        for name in variants:
            use(name)
            result["metrics"][name] = _answers(model, tokenizer, renderer, rows, prompts, max_new_tokens,
                                               reward_fn, batch_size, _progress_of(progress, name))
        if few_shot:
            use("base")
            shot_prompts = [_few_shot_prompt(shots, p) for p in prompts]
            name = f"base+{few_shot}-shot"
            result["metrics"][name] = _answers(model, tokenizer, renderer, rows, shot_prompts, max_new_tokens,
                                               reward_fn, batch_size, _progress_of(progress, name))
    else:
        pairs = _pairs(data, renderer, max_rows, tokenizer.pad_id, read)
        result["rows"] = len(pairs)
        use("base")
        base = _pair_margins(model, pairs, tokenizer.pad_id, batch_size)
        if reference is not None:  # a fully fine-tuned policy: implicit reward against its reference
            ref = _pair_margins(load_model(reference, device=device), pairs, tokenizer.pad_id, batch_size)
            result["metrics"]["base vs reference"] = {"pairwise_accuracy": (base - ref > 0).float().mean().item()}
        result["metrics"]["base"] = {"pairwise_accuracy": (base > 0).float().mean().item()}
        for name in adapters:
            use(name)
            # implicit DPO reward margin: the adapter's log-ratio gain over the base
            margin = _pair_margins(model, pairs, tokenizer.pad_id, batch_size) - base
            result["metrics"][name] = {"pairwise_accuracy": (margin > 0).float().mean().item()}
    return {**result, **left_out(read)}


def _rendered(data, objective: str, render, max_rows, read: RowCounts, none_left: str) -> list:
    """The first `max_rows` valid rows of `data`, rendered; those that render to nothing
    (no token to score) are left out, and none at all is an error."""
    rendered = [r for r in map(render, _valid_rows(data, objective, read)[:max_rows]) if r is not None]
    if not rendered:
        raise GraftError(f"{data}: {none_left}")
    return rendered


def _chats(data, renderer, max_rows, pad_id, read: RowCounts):
    from graftlm.objectives.sft import RenderedRows

    return RenderedRows(_rendered(data, "sft", renderer.render, max_rows, read,
                                  "no chat row has an assistant token to score"), pad_id)


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


def _pairs(data, renderer, max_rows, pad_id, read: RowCounts):
    from graftlm.objectives.dpo import PreferencePairs

    return PreferencePairs(_rendered(data, "dpo", renderer.render_pair, max_rows, read,
                                     "no preference pair to evaluate"), pad_id)
