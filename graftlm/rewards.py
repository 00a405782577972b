"""Rewards for online RL (GRPO, PPO) and task accuracy in eval.

A reward is named by one string (`--grpo.reward`):
- `gsm8k` / `numeric`: 1 when the completion's final number equals the row's answer's
  (GSM8K style: the number after the last `####`, else the last number; commas, `$`
  and a trailing `.0` are normalised away). A completion cut at `max_new_tokens` (not
  ended by the model) is scored only from a finished `####` answer: see `numeric_match`;
- `exact`: 1 when the stripped completion equals the stripped answer;
- `regex:PATTERN`: 1 when PATTERN is found in the completion (a format reward);
- `module:function` or `path/to/file.py:function`: a user's Python function, in one of
  two forms (`user_reward`): per completion, `fn(completion, prompt, **extra) -> float`
  with the row's other fields that it accepts; or batched as in TRL,
  `fn(prompts, completions, **kwargs) -> list[float]`, told apart by its parameter named
  `completions`;
- a directory: a reward model saved by `graft reward` (or any one-label HF
  sequence-classification model), scoring prompt + completion.

Every reward maps (completions, prompts, rows) to a list of floats; one that also takes
`truncated` (a bool per completion: cut at `max_new_tokens`) is given it by the rollout.
A user's function may return None for a completion it does not apply to (TRL's form,
for data sets that mix tasks).

Several rewards (`--grpo.reward gsm8k regex:PATTERN`, TRL's list of reward functions)
score each completion with their weighted sum (`--grpo.reward-weights`, 1 each by
default) over the rewards that apply to it; each one's mean is logged beside the sum
(`reward/<name>/mean`, TRL's `rewards/<name>/mean`). A completion that no reward applies
to scores 0 here (TRL's sum of NaNs) and is counted (`reward/none_applied`); GRPO leaves
it out of its group's baseline with advantage 0, as TRL 1.16 does (`grpo.group_advantages`).

A user's function that raises or returns a non-number is the user's error:
`RewardScorer` either stops with one line naming the function's file:line and the
prompt, or (policy `skip`) counts the row as bad and stops once more than
`max_bad_fraction` are bad or nothing valid is left.
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
from typing import Callable

import torch

from graftlm.errors import ConfigError, GraftError
from graftlm.objectives.configs import RewardPolicy, check_weights  # defined without torch, for the configs

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


def finished_marked_answer(text: str) -> bool:
    """Whether a text has a `####` answer that the text goes on after: its number was
    written whole, even if the text was then cut."""
    if "####" not in text:
        return False
    tail = text.rsplit("####", 1)[1]
    match = NUMBER.search(tail)
    return match is not None and tail[match.end():].strip() != ""


def numeric_match(completions, prompts, rows, truncated=None) -> list[float]:
    """1.0 where the completion's final number (`final_number`) is the row's answer's.

    `truncated` (optional, one bool per completion; the rollout passes it): a completion
    cut at `max_new_tokens` did not end its answer, so the last number of its text is
    wherever the cut fell, not an answer (a model writing digits at random would be paid
    by chance). A cut completion scores only from a `####` answer followed by more text
    (the model went on after it); otherwise 0, even if its last number matches. Without
    `truncated` (eval, other callers) every completion counts as ended."""
    out = []
    for i, (completion, row) in enumerate(zip(completions, rows)):
        want = final_number(_answer_of(row))
        if truncated is not None and truncated[i] and not finished_marked_answer(completion):
            out.append(0.0)
            continue
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


def is_batched(fn: Callable) -> bool:
    """TRL's form: TRL calls a reward function by keyword, `fn(prompts=..., completions=...,
    **columns)`, so such a function has a parameter named `completions` (or takes only
    keywords). graftlm's per-completion form names it `completion`."""
    params = inspect.signature(fn).parameters.values()
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.VAR_POSITIONAL)]
    named = {p.name for p in params}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return "completions" in named or (takes_all and not positional)


def _short_value(value, limit: int = 80) -> str:
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text + (f" ({len(value)} items)" if isinstance(value, (list, tuple)) else "")


PER_COMPLETION = "once per completion as fn(completion, prompt, **row_fields) -> float"
BATCHED = "once per batch as fn(prompts=[...], completions=[...], **columns) -> list of floats (TRL's form)"


def _check_number(value) -> bool:
    """A finite number, or None: the function does not apply to this completion (TRL's form)."""
    return value is None or (not isinstance(value, bool) and isinstance(value, (int, float))
                             and math.isfinite(value))


def user_reward(spec: str) -> Callable:
    """A user's function (`module:function` / `file.py:function`), in one of two forms:
    - per completion (a first parameter such as `completion`): `fn(completion, prompt,
      **extra) -> float`, with the row's other fields it names (all with `**kwargs`);
    - batched, TRL's form (a parameter named `completions`, see `is_batched`):
      `fn(prompts=[...], completions=[...], **columns) -> list[float]`, once per batch,
      each other field of the rows as a list (TRL's dataset columns) where the function
      names it or takes `**kwargs`. Prompts and completions are text (TRL's standard,
      not conversational, format: a chat prompt is its last message's content).
    None for a completion is "this reward does not apply to it" (TRL's form). A result of
    the wrong form stops the run with one line that names the function, the form it was
    called in and what it returned (shortened)."""
    fn = import_function(spec)
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def wanted(key: str) -> bool:
        return key not in ("prompt", "source", "prompts", "completions") and (takes_all or key in params)

    def failed(e: Exception, prompt: str, where: str | None) -> RewardFunctionError:
        return RewardFunctionError(
            f"reward function {spec} raised {type(e).__name__}: {e}{_where(e)} "
            f"on prompt {_short(prompt)}" + (f" ({where})" if where else ""))

    def call_batched(completions, prompts, rows) -> list[float | None]:
        columns: dict[str, list] = {}
        for row in rows:
            for key in row:
                if wanted(key) and key not in columns:
                    columns[key] = [r.get(key) for r in rows]
        kwargs = {"completions": list(completions), **columns}
        if takes_all or "prompts" in params:
            kwargs["prompts"] = list(prompts)
        try:
            values = fn(**kwargs)
        except Exception as e:
            raise failed(e, prompts[0] if prompts else "", rows[0].get("source") if rows else None) from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise RewardFunctionError(
                f"reward function {spec} returned {_short_value(values)} for {len(completions)} completions; "
                f"graftlm calls it {BATCHED} (its parameter 'completions' says so), so it must return "
                f"{len(completions)} numbers, one per completion")
        for value, prompt in zip(values, prompts):
            if not _check_number(value):
                raise RewardFunctionError(
                    f"reward function {spec} returned {_short_value(value)} ({type(value).__name__}, not a finite "
                    f"number or None) in its list, for a completion of prompt {_short(prompt)}")
        return [None if v is None else float(v) for v in values]

    def call_user_function(completions, prompts, rows) -> list[float | None]:
        out = []
        for completion, prompt, row in zip(completions, prompts, rows):
            extra = {k: v for k, v in row.items() if wanted(k)}
            try:
                value = fn(completion, prompt, **extra)
            except Exception as e:
                raise failed(e, prompt, row.get("source")) from None
            if not _check_number(value):
                hint = ("; a batched function (TRL's fn(prompts, completions, **kwargs) -> list) must name its "
                        "parameter 'completions'" if isinstance(value, (list, tuple)) else "")
                raise RewardFunctionError(
                    f"reward function {spec} returned {_short_value(value)} ({type(value).__name__}, not a finite "
                    f"number or None) on prompt {_short(prompt)}; graftlm calls it {PER_COMPLETION}{hint}")
            out.append(None if value is None else float(value))
        return out
    return call_batched if is_batched(fn) else call_user_function


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


BUILT_IN = {"gsm8k": numeric_match, "numeric": numeric_match, "exact": exact_match}


def names_a_model(spec: str) -> bool:
    """Whether the reward `spec` is a reward model's directory rather than a function: not a
    built-in, a regex or a `module:function`. A run's recorded directory that has moved
    since still names a model (what `graft plan --check` needs to know)."""
    if spec in BUILT_IN or spec.startswith("regex:"):
        return False
    return Path(spec).is_dir() or ":" not in spec


def build_reward(spec: str, device: str | torch.device = "cpu") -> Callable:
    """The reward named by `spec` (see the module docstring)."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    if spec.startswith("regex:"):
        return regex_reward(spec[len("regex:"):])
    if Path(spec).is_dir():
        return RewardModelScorer(spec, device=device)
    if ":" in spec:
        return user_reward(spec)
    raise ConfigError(f"reward '{spec}': expected gsm8k, numeric, exact, regex:PATTERN, "
                      "module:function, file.py:function or a reward model directory")


def reward_names(specs: list[str]) -> list[str]:
    """Short names for the metrics (`reward/<name>/mean`): a function's name, a reward
    model directory's name, `regex`, the built-in's name; a repeated name is numbered."""
    names = []
    for spec in specs:
        if spec in BUILT_IN:
            name = spec
        elif spec.startswith("regex:"):
            name = "regex"
        elif ":" in spec and not Path(spec).is_dir():
            name = spec.rpartition(":")[2]
        else:
            name = Path(spec.rstrip("/")).name or spec
        taken = sum(n == name or n.startswith(f"{name}_") for n in names)
        names.append(f"{name}_{taken + 1}" if taken else name)
    return names


@dataclass
class NamedReward:
    """One of a run's rewards: its metrics name, the callable and its weight in the sum."""

    name: str
    fn: Callable
    weight: float = 1.0

    def __post_init__(self):
        try:
            self.takes_truncated = "truncated" in inspect.signature(self.fn).parameters
        except (TypeError, ValueError):  # no signature to read
            self.takes_truncated = False

    def __call__(self, completions, prompts, rows, truncated=None) -> list:
        if self.takes_truncated and truncated is not None:
            return list(self.fn(completions, prompts, rows, truncated=list(truncated)))
        return list(self.fn(completions, prompts, rows))


def build_rewards(specs: list[str], weights: list[float] | None = None,
                  device: str | torch.device = "cpu") -> list[NamedReward]:
    """The rewards named by `specs`, weighted (1 each without `weights`)."""
    check_weights(specs, weights)
    return [NamedReward(name, build_reward(spec, device=device), 1.0 if weights is None else weights[i])
            for i, (name, spec) in enumerate(zip(reward_names(specs), specs))]


_FAILED = object()  # a completion that a reward could not score (policy `skip`)


@dataclass
class RewardScorer:
    """Applies a run's rewards with the error policy: each completion's score is the
    weighted sum of the rewards that apply to it (0 when none does, as in TRL); counts
    the completions that failed to score over the run. `reward`: one callable, or the
    run's `NamedReward`s; `section`: the command's config section, for the flag a stop names."""

    reward: Callable | list[NamedReward]
    policy: RewardPolicy = field(default_factory=RewardPolicy)
    section: str = "grpo"
    scored: int = 0
    skipped: int = 0  # failed to score (policy `skip`)

    def __post_init__(self):
        self.rewards = self.reward if isinstance(self.reward, list) else [NamedReward("reward", self.reward)]
        # Each reward's scores of the last call (None: did not apply), for per-reward metrics,
        # and which completions no reward applied to (scored 0).
        self.last_parts: dict[str, list[float | None]] = {}
        self.last_none_applied: list[bool] = []

    def __call__(self, completions: list[str], prompts: list[str], rows: list[dict],
                 truncated: list[bool] | None = None) -> list[float | None]:
        """One score per completion; None for a completion that failed to score (policy
        `skip`). `truncated`: which completions were cut at `max_new_tokens`, for rewards
        that take it."""
        cut = truncated if truncated is not None else [None] * len(completions)
        parts = {}
        for reward in self.rewards:
            try:
                values = reward(completions, prompts, rows, truncated)
            except RewardFunctionError:
                if self.policy.on_error == "raise":
                    raise
                values = [self._one(reward, c, p, r, t) for c, p, r, t in zip(completions, prompts, rows, cut)]
            if len(values) != len(completions):
                raise GraftError(f"reward {reward.name} returned {len(values)} scores for {len(completions)} "
                                 "completions")
            parts[reward.name] = values
        scores, none_applied = [], []
        for i in range(len(completions)):
            applied = [(reward.weight, parts[reward.name][i]) for reward in self.rewards
                       if parts[reward.name][i] is not None]
            none_applied.append(not applied)
            scores.append(None if any(v is _FAILED for _, v in applied) else sum(w * v for w, v in applied))
        self.last_parts = {name: [None if v is _FAILED else v for v in values] for name, values in parts.items()}
        self.last_none_applied = none_applied
        self.scored += len(scores)
        self.skipped += sum(s is None for s in scores)
        if self.skipped == self.scored:
            raise GraftError(f"no valid reward left: all {self.scored} completions so far failed to score")
        # A fraction of a handful of completions says little: judge it after a few dozen.
        if self.scored >= 32 and self.skipped > self.policy.max_bad_fraction * self.scored:
            raise GraftError(f"{self.skipped} of {self.scored} completions failed to score, more than "
                             f"--{self.section}.reward-errors.max-bad-fraction {self.policy.max_bad_fraction}")
        return scores

    def _one(self, reward: NamedReward, completion, prompt, row, truncated=None):
        try:
            return reward([completion], [prompt], [row], None if truncated is None else [truncated])[0]
        except RewardFunctionError:
            return _FAILED
