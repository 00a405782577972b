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
"""

from __future__ import annotations

from typing import Annotated, Literal

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
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported_option(self) -> str | None:
        """The first option set to a value graftlm does not implement, else None."""
        extra = self.model_extra or {}
        for name, allowed in UNSUPPORTED.items():
            if name in extra and extra[name] not in allowed:
                return name
        return None


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | \
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)


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


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
