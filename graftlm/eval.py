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

from pathlib import Path

from graftlm.data.render import RenderConfig, Renderer
from graftlm.errors import GraftError
from graftlm.evaluation.answers import answer_rows, few_shot_prompt, is_numeric, prompt_ids, score_answers
from graftlm.evaluation.chat import chat_loss, rendered_chats
from graftlm.evaluation.few_shot_chat import few_shot_chats
from graftlm.evaluation.kinds import KINDS, data_kind, kind_name
from graftlm.evaluation.pairs import pair_margins, rendered_pairs, reward_model_wins, share
from graftlm.evaluation.rows import MAX_BAD_FRACTION, Rows, first, split_shots, valid_rows
from graftlm.evaluation.text import text_metrics, text_windows
from graftlm.evaluation.variants import Variants
from graftlm.rewards import build_reward


def _progress_of(progress, variant: str):
    return None if progress is None else lambda done, total: progress(variant, done, total)



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
        out = {"exact_match": "share of greedy answers whose final number equals the answer's (an answer cut at "
                              "--max-new-tokens counts only with a finished '#### N')" if numeric
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
    kind = data_kind(data, kind_name(kind))
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
    rows = Rows(max_bad_fraction)  # where every row went: reported beside the metrics, never left out silently

    if is_scalar_model_dir(model_dir):
        if kind != "preference":
            raise GraftError(f"{model_dir}: a reward model scores pairs only ('chosen' + 'rejected'); these rows are "
                             f"scored as {KINDS[kind]}")
        from graftlm.models.heads import load_scalar_model

        scorer = load_scalar_model(model_dir, device=device)
        pairs = rendered_pairs(data, renderer, max_rows, scorer.pad_token_id, rows)
        wins = reward_model_wins(scorer, pairs, batch_size)
        result["metrics"][name or "reward model"] = {"pairwise_accuracy": share(wins)}
        result["definitions"] = {"pairwise_accuracy": "share of pairs whose chosen completion the reward model "
                                                      "scores higher"}
        return {**result, **rows.report(len(pairs), context)}

    from graftlm.models.hf import load_model

    name = name or "base"
    if name in adapters:
        raise GraftError(f"adapter name {name!r} is also the model's: name the adapter (--adapter NAME=DIR)")
    instances = Variants(model_dir, name, adapters, device, allow_other_base)
    model, use, variants = instances.model, instances.use, [name, *adapters]

    if kind == "text":
        texts = first([r["text"] for r in valid_rows(data, "text", rows)], max_rows, rows)
        windows, n_bytes, scored = text_windows(tokenizer, texts, model.config.max_seq_len, rows)
        for variant in variants:
            result["metrics"][variant] = text_metrics(use(variant), windows, n_bytes, tokenizer.pad_id or 0,
                                                      batch_size)
        result["definitions"] = _definitions(kind, name, adapters, reference)
        return {**result, **rows.report(scored, context)}
    if kind == "chat":
        shots, scored = split_shots(data, valid_rows(data, "sft", rows), few_shot, max_rows, rows)
        scored, chats = rendered_chats(data, scored, renderer, tokenizer.pad_id, rows)
        # Rendered before any scoring: a row that cannot take examples stops it at once.
        with_shots = few_shot_chats(tokenizer, renderer.config, shots, scored, rows) if few_shot else None
        for variant in variants:
            result["metrics"][variant] = chat_loss(use(variant), chats, batch_size)
        if few_shot:
            result["metrics"][f"{name}+{few_shot}-shot"] = chat_loss(use(name), with_shots, batch_size)
        result["definitions"] = _definitions(kind, name, adapters, reference, few_shot=few_shot)
        return {**result, **rows.report(len(chats), context)}
    if kind == "answers":
        shots, answers = split_shots(data, answer_rows(data, rows), few_shot, max_rows, rows)
        reward_fn = build_reward(reward, device=device) if reward else None
        room = model.config.max_seq_len - max_new_tokens
        if room < 1:
            raise GraftError(f"--max-new-tokens {max_new_tokens} leaves no room in the context of "
                             f"{model.config.max_seq_len}")
        prompts = [r["prompt"] for r in answers]
        ids, rows.cut = prompt_ids(renderer, prompts, room)
        for variant in variants:
            result["metrics"][variant] = score_answers(use(variant), tokenizer, answers, ids, max_new_tokens,
                                                        reward_fn, batch_size, _progress_of(progress, variant))
        if few_shot:
            shot_ids, rows.few_shot_cut = prompt_ids(renderer, [few_shot_prompt(shots, p) for p in prompts], room)
            variant = f"{name}+{few_shot}-shot"
            result["metrics"][variant] = score_answers(use(name), tokenizer, answers, shot_ids, max_new_tokens,
                                                        reward_fn, batch_size, _progress_of(progress, variant))
        result["definitions"] = _definitions(kind, name, adapters, reference, is_numeric(answers), reward)
        return {**result, **rows.report(len(answers), context)}

    # Preference pairs: each row's own log-prob preference, and where the row has a
    # reference, its implicit DPO reward's, under their own names (one name for both
    # hid that the model's row and the adapters' measured different things).
    pairs = rendered_pairs(data, renderer, max_rows, tokenizer.pad_id, rows)
    own, own_mean = pair_margins(use(name), pairs, tokenizer.pad_id, batch_size)
    result["metrics"][name] = {"logp_accuracy": share(own > 0), "avg_logp_accuracy": share(own_mean > 0)}
    if reference is not None:  # a fully fine-tuned policy: implicit reward against its reference
        ref, _ = pair_margins(load_model(reference, device=device), pairs, tokenizer.pad_id, batch_size)
        result["metrics"][name]["reward_accuracy"] = share(own - ref > 0)
    from graftlm.adapters import disable_adapters

    # Each adapter's reference is its own base without adapters: the model for LoRA and
    # DoRA, the 4-bit copy for QLoRA (what QLoRA-DPO trained against).
    base_margins = {id(model): own}
    for variant in adapters:
        adapted = use(variant)
        margin, mean = pair_margins(adapted, pairs, tokenizer.pad_id, batch_size)
        if id(adapted) not in base_margins:
            with disable_adapters(adapted):
                base_margins[id(adapted)], _ = pair_margins(adapted, pairs, tokenizer.pad_id, batch_size)
        # implicit DPO reward margin: the adapter's log-ratio gain over its base without it
        result["metrics"][variant] = {"logp_accuracy": share(margin > 0), "avg_logp_accuracy": share(mean > 0),
                                      "reward_accuracy": share(margin - base_margins[id(adapted)] > 0)}
    result["definitions"] = _definitions(kind, name, adapters, reference, quantized=instances.quantized_adapters)
    return {**result, **rows.report(len(pairs), context)}
