"""Render normalised rows into token ids and a loss mask.

Design choices:
- `loss_mask[t]` is True when input token t is trained as a target (predicted from
  the tokens before it), the convention of `objectives.logprobs.shift_targets`.
- Messages render with the tokenizer's chat template (ChatML for models trained from
  scratch). Assistant spans are found by rendering prefixes, not by pattern matching:
  the span of assistant turn i runs from the end of `render(messages[:i],
  add_generation_prompt=True)` to the end of `render(messages[:i+1])`, so it holds the
  reply and the template's end-of-turn text (`<|im_end|>` and its newline for ChatML,
  `<|eot_id|>` for Llama 3): the model learns to stop. The whole conversation is then
  tokenized once, and a token is trained when it starts inside a span (character
  offsets), so ids are exactly those of tokenizing the full rendered text, as
  `transformers` and TRL do. A template that rewrites earlier turns (not prefix
  preserving) falls back to locating the reply's text after the previous span.
- Default: loss on assistant tokens only; `train_on="all"` trains every token.
- Prompt/completion rows render as a user turn and an assistant turn. When the
  tokenizer has no chat template of its own and lacks ChatML's tokens (a base model),
  they render as raw text instead: prompt + completion + EOS, loss on the completion
  and EOS. `{"text"}` rows are text + EOS, every token trained. BOS is prepended to
  raw text when the tokenizer asks for it (`add_bos`).
- Length policy (`max_length`): `overflow="truncate"` keeps the start and counts the
  row as truncated; `"drop"` drops it and counts it. A row left with no trained token
  (e.g. a prompt that fills `max_length`) is dropped and counted: it would only cost
  compute. Preference pairs keep the whole prompt and cut both completions.
"""

from __future__ import annotations

from dataclasses import dataclass

from graftlm.errors import GraftError
from graftlm.tokenizer import IM_START, Tokenizer


@dataclass
class RenderConfig:
    max_length: int | None = None
    overflow: str = "truncate"  # "truncate" (keep the start) or "drop"
    train_on: str = "assistant"  # "assistant" (completion only) or "all"

    def __post_init__(self):
        if self.overflow not in ("truncate", "drop"):
            raise GraftError(f"overflow must be 'truncate' or 'drop', got {self.overflow!r}")
        if self.train_on not in ("assistant", "all"):
            raise GraftError(f"train_on must be 'assistant' or 'all', got {self.train_on!r}")
        if self.max_length is not None and self.max_length < 2:
            raise GraftError(f"max_length must be at least 2, got {self.max_length}")


@dataclass
class RenderedRow:
    input_ids: list[int]
    loss_mask: list[bool]
    source: str = ""
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask[1:])  # the first token has no context to be predicted from


@dataclass
class RenderedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_mask: list[bool]
    rejected_ids: list[int]
    rejected_mask: list[bool]
    source: str = ""
    truncated: bool = False
    margin: float = 0.0  # the row's `margin` (reward models: how far chosen must beat rejected)


@dataclass
class RenderCounts:
    """Each row counted once: `truncated` rows were cut at the length limit and kept;
    `dropped_too_long` ones were lost to it (the drop policy, or cut until nothing was
    left to train); `dropped_untrained` ones have nothing to train even whole."""
    rows: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_untrained: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """True when messages can be rendered with real chat tokens (own template or ChatML's)."""
    return tokenizer.chat_template is not None or tokenizer.token_id(IM_START) is not None


class Renderer:
    """Turns normalised rows into `RenderedRow` / `RenderedPair`, applying the length policy."""

    def __init__(self, tokenizer: Tokenizer, config: RenderConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or RenderConfig()
        self.counts = RenderCounts()
        self.chat = has_chat_template(tokenizer)

    # -- text and spans -------------------------------------------------------------

    def _template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a template's raise_exception, or a Jinja error
            raise GraftError(f"chat template failed: {e}") from None

    def conversation_text(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        full = self._template(messages)
        spans, searched_from = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                before = self._template(messages[:i], add_generation_prompt=True)
            except GraftError:  # some templates refuse an empty conversation
                before = None
            upto = self._template(messages[:i + 1])
            if before is not None and upto.startswith(before) and full.startswith(upto):
                spans.append((len(before), len(upto)))
            else:  # not prefix preserving: find the reply itself after the last span
                start = full.find(message["content"], searched_from)
                if start < 0:
                    raise GraftError("chat template does not render the assistant message text")
                end = start + len(message["content"])
                for stop in self._end_of_turn_texts():
                    if full.startswith(stop, end):
                        end += len(stop)
                        break
                spans.append((start, end))
            searched_from = spans[-1][1]
        return full, spans

    def _end_of_turn_texts(self) -> list[str]:
        tok = self.tokenizer
        return [t for t in (tok.backend.id_to_token(i) for i in tok.stop_ids) if t]

    def _encode_spans(self, text: str, spans: list[tuple[int, int]], bos: bool = False,
                      eos: bool = False, with_starts: bool = False):
        """Token ids of `text` and a mask of the tokens that start inside `spans`."""
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        ids = list(encoding.ids)
        starts = [start for start, _ in encoding.offsets]
        mask = [any(s <= start < e for s, e in spans) for start in starts]
        if with_starts:
            return ids, mask, starts
        if bos and self.tokenizer.add_bos and self.tokenizer.bos_id is not None:
            ids, mask = [self.tokenizer.bos_id] + ids, [False] + mask
        if eos:
            if self.tokenizer.eos_id is None:
                raise GraftError("the tokenizer has no EOS token to end a text row")
            ids, mask = ids + [self.tokenizer.eos_id], mask + [True]
        return ids, mask

    def _raw_prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
        """[BOS] prompt completion EOS, tokenized as one text; the completion and EOS are trained
        (a token that crosses the boundary counts as completion)."""
        tok = self.tokenizer
        if tok.eos_id is None:
            raise GraftError("the tokenizer has no EOS token to end a completion")
        encoding = tok.backend.encode(prompt + completion, add_special_tokens=False)
        ids = list(encoding.ids) + [tok.eos_id]
        mask = [end > len(prompt) for _, end in encoding.offsets] + [True]
        if tok.add_bos and tok.bos_id is not None:
            ids, mask = [tok.bos_id] + ids, [False] + mask
        return ids, mask

    # -- rows -------------------------------------------------------------------------

    def render_full(self, example: dict) -> RenderedRow:
        """ids and mask of an SFT / text row, before the length policy."""
        source = example.get("source", "")
        if "messages" in example or ("prompt" in example and self.chat):
            messages = example.get("messages") or [
                {"role": "user", "content": example["prompt"]},
                {"role": "assistant", "content": example["completion"]}]
            text, spans = self.conversation_text(messages)
            ids, mask = self._encode_spans(text, spans)
        elif "prompt" in example:  # raw text, for a model without a chat template
            ids, mask = self._raw_prompt_completion(example["prompt"], example["completion"])
        elif "text" in example:
            ids, mask = self._encode_spans(example["text"], [(0, len(example["text"]))], bos=True, eos=True)
        else:
            raise GraftError(f"{source}: not an SFT or text row")
        if self.config.train_on == "all":
            mask = [True] * len(ids)
        return RenderedRow(ids, mask, source)

    def render(self, example: dict) -> RenderedRow | None:
        """The row after the length policy, or None when dropped (and counted)."""
        self.counts.rows += 1
        row = self.render_full(example)
        limit = self.config.max_length
        if limit is not None and len(row.input_ids) > limit:
            if self.config.overflow == "drop":
                self.counts.dropped_too_long += 1
                return None
            row = RenderedRow(row.input_ids[:limit], row.loss_mask[:limit], row.source, truncated=True)
        return self._kept(row, row.trained_tokens > 0, row.truncated)

    # -- preference pairs -------------------------------------------------------------

    def _completion(self, prompt, completion) -> tuple[list[int], list[int], list[bool]]:
        """(prompt ids, completion ids, completion mask) of prompt + completion rendered together."""
        if isinstance(prompt, list) or self.chat:
            prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            completion = (completion if isinstance(completion, list)
                          else [{"role": "assistant", "content": completion}])
            boundary = len(self._template(prompt, add_generation_prompt=True))
            text, spans = self.conversation_text(prompt + completion)
            ids, mask, starts = self._encode_spans(text, spans, with_starts=True)
            split = sum(1 for start in starts if start < boundary)
        else:
            ids, mask = self._raw_prompt_completion(prompt, completion)
            split = mask.index(True)
        if self.config.train_on == "all":
            mask = [True] * len(ids)
        return ids[:split], ids[split:], mask[split:]

    def render_pair(self, example: dict) -> RenderedPair | None:
        """prompt ids + chosen ids + rejected ids (completion masks), or None when dropped."""
        self.counts.rows += 1
        prompt_ids, chosen, chosen_mask = self._completion(example["prompt"], example["chosen"])
        _, rejected, rejected_mask = self._completion(example["prompt"], example["rejected"])
        pair = RenderedPair(prompt_ids, chosen, chosen_mask, rejected, rejected_mask,
                            example.get("source", ""), margin=example.get("margin", 0.0))
        limit = self.config.max_length
        if limit is not None and len(prompt_ids) + max(len(chosen), len(rejected)) > limit:
            room = limit - len(prompt_ids)
            if self.config.overflow == "drop" or room < 1:
                self.counts.dropped_too_long += 1
                return None
            pair.chosen_ids, pair.chosen_mask = chosen[:room], chosen_mask[:room]
            pair.rejected_ids, pair.rejected_mask = rejected[:room], rejected_mask[:room]
            pair.truncated = True
        return self._kept(pair, any(pair.chosen_mask) and any(pair.rejected_mask), pair.truncated)

    def _kept(self, rendered, trains: bool, cut: bool):
        """`rendered`, or None when it has nothing left to train; counted once either way."""
        if not trains:
            if cut:  # cut until nothing was left to train: lost to the length limit
                self.counts.dropped_too_long += 1
            else:
                self.counts.dropped_untrained += 1
            return None
        self.counts.truncated += cut
        return rendered

    # -- RL prompts -------------------------------------------------------------------

    def render_prompt(self, example: dict) -> list[int]:
        """Token ids of an RL prompt, ending where the model's reply starts."""
        prompt = example["prompt"]
        if isinstance(prompt, list) or self.chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.encode(self._template(messages, add_generation_prompt=True))
        return self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos)
