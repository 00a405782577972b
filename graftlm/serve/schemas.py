"""Request models of the OpenAI-compatible API, and OpenAI-style error bodies.

Design choices:
- Pydantic models check types and ranges (temperature >= 0, 0 < top_p <= 1,
  max_tokens >= 1, 1 <= n <= MAX_N, at most four stop strings); what depends on the
  loaded model (the `model` name, the context length) is checked in `app.py`.
- Unknown fields are ignored, as OpenAI-compatible servers commonly do, so that
  clients that send extra options (user, logit_bias=None, ...) still work; options that
  would change the output and that graftlm does not implement are refused instead of
  silently ignored (`UNSUPPORTED`).
- Every error leaves as `{"error": {"message", "type", "param", "code"}}`, the shape
  the official `openai` client parses.
- A refused body names its top-level field as `param`, and the message says what the
  field must be in plain words (`validation_error`, the one place pydantic's errors
  become API errors): no pydantic union tags ("constrained-str") or phrasings.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_N = 16
MAX_STOP = 4
MAX_PROMPTS = 64

# Options whose non-default value changes the response; refused rather than ignored.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "tools": (None, []), "suffix": (None, ""),
               "response_format": (None, {"type": "text"})}

StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow", strict=False)

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Not implemented: any value but 0 is refused as unsupported (`unsupported_option`).
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    # The tokens generated when the client gives no max_tokens: None for all the context
    # leaves. app.py clamps a default to what the context leaves (as vLLM does); a value
    # the client sent is never clamped.
    default_max_tokens: ClassVar[int | None] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported_option(self) -> str | None:
        """The first option set to a value graftlm does not implement, else None."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return name
        extra = self.model_extra or {}
        for name, allowed in UNSUPPORTED.items():
            if name in extra and extra[name] not in allowed:
                return name
        return None


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | \
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    max_tokens: int | None = Field(default=None, ge=1)
    default_max_tokens: ClassVar[int] = 16  # OpenAI's

    def token_budget(self) -> int | None:
        return self.max_tokens


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    path: str = Field(min_length=1, max_length=4096)


# What a field of several shapes accepts, said when a value fits none of them.
UNION_HINTS = {
    "prompt": "a string, a non-empty list of strings or a non-empty list of token ids",
    "stop": f"a string or a list of at most {MAX_STOP} strings",
    "content": 'a string or a list of text parts ({"type": "text", "text": ...})',
}
# Error types that say the value is not of the expected kind at all.
_KIND_ERRORS = {"string_type", "list_type", "int_type", "int_parsing", "int_from_float", "float_type",
                "float_parsing", "bool_type", "bool_parsing", "dict_type", "model_type",
                "model_attributes_type", "is_instance_of", "none_required"}


def _is_union_tag(part) -> bool:
    """pydantic names a union member in `loc` by its type ('str', 'list[str]',
    'constrained-str', 'TextPart'); field names here are lowercase identifiers."""
    return isinstance(part, str) and (any(c in part for c in "[-") or part[:1].isupper()
                                      or part in {"str", "int", "float", "bool"})


def _path(loc) -> str:
    out = ""
    for part in loc:
        if _is_union_tag(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _plain(error: dict) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    words = {"missing": "is required", "extra_forbidden": "is not a known field",
             "string_type": "must be a string", "list_type": "must be a list",
             "int_type": "must be an integer", "int_parsing": "must be an integer",
             "int_from_float": "must be an integer", "float_type": "must be a number",
             "float_parsing": "must be a number", "finite_number": "must be a finite number",
             "bool_type": "must be true or false", "bool_parsing": "must be true or false",
             "dict_type": "must be an object", "model_type": "must be an object",
             "model_attributes_type": "must be an object"}
    if kind in words:
        return words[kind]
    if kind == "string_too_short":
        return ("must not be an empty string" if ctx.get("min_length") == 1
                else f"must have at least {ctx.get('min_length')} characters")
    if kind == "string_too_long":
        return f"must have at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        return ("must not be an empty list" if ctx.get("min_length") == 1
                else f"must have at least {ctx.get('min_length')} items")
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items (it has {ctx.get('actual_length')})"
    for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in ctx and kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            return f"must be {sign} {ctx[key]}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    msg = error.get("msg") or "is not valid"
    return msg[:1].lower() + msg[1:]


def validation_error(errors: list[dict]) -> tuple[str | None, str]:
    """(param, message) for pydantic's `errors()`: `param` is the top-level field, the
    message names the field and says what it must be, in plain words. A value checked
    against several shapes (a union: `prompt`, `stop`, a message's `content`) gets the
    error of the shape it fits, else the shapes it may take (`UNION_HINTS`)."""
    if not errors:
        return None, "the request is not valid"
    first = errors[0]
    loc = tuple(first["loc"])
    param = loc[0] if loc and isinstance(loc[0], str) else None
    tag = next((k for k, part in enumerate(loc) if _is_union_tag(part)), None)
    if tag is None:
        return param, f"{_path(loc) or 'body'}: {_plain(first)}"
    site = loc[:tag]
    branches = [e for e in errors if tuple(e["loc"])[:tag] == site and len(e["loc"]) > tag
                and _is_union_tag(e["loc"][tag])]
    # A kind error at a member's top says the value is not of that shape: drop it.
    fitting = [e for e in branches if not (len(e["loc"]) == tag + 1 and e["type"] in _KIND_ERRORS)]
    chosen = next((e for e in fitting if e["type"] not in _KIND_ERRORS), None)
    if chosen is None and len({e["loc"][tag] for e in fitting}) == 1:
        chosen = fitting[0]
    if chosen is not None:
        return param, f"{_path(chosen['loc'])}: {_plain(chosen)}"
    field = _path(site)
    hint = UNION_HINTS.get(str(site[-1]) if site else "", "of another type")
    return param, f"{field or 'body'}: must be {hint}"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
