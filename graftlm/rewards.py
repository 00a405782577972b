"""Rewards for online RL (GRPO, PPO) and task accuracy in eval.

A reward is named by one string (`--grpo.reward`):
- `gsm8k` / `numeric`: 1 when the completion's final number equals the row's answer's
  (GSM8K style: the number after the last `####`, else the last number; commas, `$`
  and a trailing `.0` are normalised away);
- `exact`: 1 when the stripped completion equals the stripped answer;
- `regex:PATTERN`: 1 when PATTERN is found in the completion (a format reward);
- `module:function` or `path/to/file.py:function`: a user's Python function, called as
  `fn(completion, prompt, **extra)` with the row's other fields that it accepts;
- a directory: a reward model saved by `graft reward` (or any one-label HF
  sequence-classification model), scoring prompt + completion.

Every reward maps (completions, prompts, rows) to a list of floats. A user's function
that raises or returns a non-number is the user's error: `RewardScorer` either stops
with one line naming the function's file:line and the prompt, or (policy `skip`)
counts the row as bad and stops once more than `max_bad_fraction` are bad or nothing
valid is left.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
import traceback
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Literal

import torch

from graftlm.errors import ConfigError, GraftError

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def _normalise_number(text: str) -> str | None:
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    # 18, 18.0 and 18.00 are the same answer.
    return format(value.normalize(), "f") if value == value.to_integral() else str(value.normalize())


def final_number(text: str) -> str | None:
    """The final numeric answer of a text: after the last `####` if any, else the last number."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        numbers = NUMBER.findall(tail)
        if numbers:
            return _normalise_number(numbers[0])
    numbers = NUMBER.findall(text)
    return _normalise_number(numbers[-1]) if numbers else None


def _answer_of(row: dict) -> str:
    for key in ("final_answer", "answer", "reference", "target", "completion"):
        if isinstance(row.get(key), (str, int, float)):
            return str(row[key])
    raise GraftError(f"{row.get('source', 'row')}: this reward needs the row's answer (field 'answer')")


def numeric_match(completions, prompts, rows) -> list[float]:
    out = []
    for completion, row in zip(completions, rows):
        want = final_number(_answer_of(row))
        out.append(float(want is not None and final_number(completion) == want))
    return out


def exact_match(completions, prompts, rows) -> list[float]:
    return [float(c.strip() == _answer_of(r).strip()) for c, r in zip(completions, rows)]


def regex_reward(pattern: str) -> Callable:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"reward 'regex:{pattern}': invalid regular expression ({e})") from None

    def regex_format(completions, prompts, rows) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]
    return regex_format


# -- a user's Python function ------------------------------------------------------------

def import_function(spec: str) -> Callable:
    """`module:function` (importable from the working directory) or `file.py:function`."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise ConfigError(f"reward '{spec}': expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.exists():
                raise ConfigError(f"reward '{spec}': file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed to import: say where
        raise GraftError(f"reward '{spec}': importing {module_name} failed: {type(e).__name__}: {e}"
                         f"{_where(e)}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"reward '{spec}': {module_name} has no function '{func_name}'")
    return fn


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


class RewardFunctionError(GraftError):
    """A user's reward function raised or returned something that is not a number."""


def user_reward(spec: str) -> Callable:
    fn = import_function(spec)
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def call_user_function(completions, prompts, rows) -> list[float]:
        out = []
        for completion, prompt, row in zip(completions, prompts, rows):
            extra = {k: v for k, v in row.items() if k not in ("prompt", "source") and (takes_all or k in params)}
            try:
                value = fn(completion, prompt, **extra)
            except Exception as e:
                where = row.get("source")
                raise RewardFunctionError(
                    f"reward function {spec} raised {type(e).__name__}: {e}{_where(e)} "
                    f"on prompt {_short(prompt)}" + (f" ({where})" if where else "")) from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardFunctionError(
                    f"reward function {spec} returned {value!r} ({type(value).__name__}, not a finite number) "
                    f"on prompt {_short(prompt)}")
            out.append(float(value))
        return out
    return call_user_function


# -- a reward model --------------------------------------------------------------------

class RewardModelScorer:
    """Scores prompt + completion text with a saved scalar-head model."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 16):
        from graftlm.models.heads import load_scalar_model
        from graftlm.tokenizer import load_tokenizer

        self.model = load_scalar_model(model_dir, device=device).requires_grad_(False)
        self.tokenizer = load_tokenizer(model_dir)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, completions, prompts, rows) -> list[float]:
        from graftlm.objectives.dpo import pad_right

        limit = self.model.config.max_seq_len
        texts = [p + c for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            ids = [t[-limit:] for t in self.tokenizer.encode_batch(texts[start:start + self.batch_size])]
            batch = pad_right(ids, self.model.pad_token_id).to(self.device)
            scores.extend(self.model(batch).tolist())
        return scores


def build_reward(spec: str, device: str | torch.device = "cpu") -> Callable:
    """The reward named by `spec` (see the module docstring)."""
    if spec in ("gsm8k", "numeric"):
        return numeric_match
    if spec == "exact":
        return exact_match
    if spec.startswith("regex:"):
        return regex_reward(spec[len("regex:"):])
    if Path(spec).is_dir():
        return RewardModelScorer(spec, device=device)
    if ":" in spec:
        return user_reward(spec)
    raise ConfigError(f"reward '{spec}': expected gsm8k, numeric, exact, regex:PATTERN, "
                      "module:function, file.py:function or a reward model directory")


@dataclass
class RewardPolicy:
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "a reward function error stops the run, or skips the prompt"})
    max_bad_fraction: float = field(default=0.1, metadata={"help": "skip policy: stop when more prompts are bad"})


@dataclass
class RewardScorer:
    """Applies a reward with the error policy, counting skipped prompts over the run."""

    reward: Callable
    policy: RewardPolicy = field(default_factory=RewardPolicy)
    scored: int = 0
    skipped: int = 0

    def __call__(self, completions: list[str], prompts: list[str], rows: list[dict]) -> list[float | None]:
        """One score per completion; None for a completion whose prompt was skipped."""
        try:
            scores: list[float | None] = list(self.reward(completions, prompts, rows))
        except RewardFunctionError:
            if self.policy.on_error == "raise":
                raise
            scores = [self._one(c, p, r) for c, p, r in zip(completions, prompts, rows)]
        if len(scores) != len(completions):
            raise GraftError(f"reward returned {len(scores)} scores for {len(completions)} completions")
        bad = sum(s is None for s in scores)
        self.scored += len(scores)
        self.skipped += bad
        if self.skipped == self.scored:
            raise GraftError(f"no valid reward left: all {self.scored} completions so far failed to score")
        # A fraction of a handful of completions says little: judge it after a few dozen.
        if self.scored >= 32 and self.skipped > self.policy.max_bad_fraction * self.scored:
            raise GraftError(f"{self.skipped} of {self.scored} completions failed to score, more than "
                             f"max_bad_fraction={self.policy.max_bad_fraction}")
        return scores

    def _one(self, completion, prompt, row) -> float | None:
        try:
            return self.reward([completion], [prompt], [row])[0]
        except RewardFunctionError:
            return None
