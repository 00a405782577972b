"""Rollouts for online RL: sample completions with the engine, score them, lay them out.

Shared by GRPO and PPO. Design choices:
- Prompts come as token ids (rendered by `data/render.py`, ending where the reply
  starts) with their normalised rows; each is repeated `group_size` times and the
  `Engine` samples all rows in one batched KV-cache generation, under no grad, with the
  policy as it is (its adapters active). Seeds advance with every rollout, so a run is
  reproducible and no two rollouts repeat their samples. The rollout counter is the
  sampler's state (`state_dict`), saved in checkpoints: a resumed run draws what the
  unbroken run drew.
- For the training forward, each row is laid out as prompt + completion, right-padded:
  with causal attention the padding after a row cannot change it, so no mask is needed.
  `loss_mask` marks the completion tokens (incl. the stop token, so stopping is learned).
- The reward sees the completion's text (without the stop token), the prompt's text
  and the row's extra fields, and (a reward that takes `truncated`, such as gsm8k's)
  which completions were cut at `max_new_tokens`; skipped scores (see
  `rewards.RewardScorer`) are NaN and their rows carry no loss.
- Time in generation and in scoring is measured, so the run can report the split.
- Rollouts that teach little are named as the run goes (`RolloutWarnings`): completions
  cut at `max_new_tokens` (`completions/clipped_ratio`, as TRL logs it) and, for GRPO,
  groups whose completions all got the same reward (`frac_reward_zero_std`).
- Validation: the held-out prompts (the `val_fraction` / `val_data` split) are answered
  greedily, one completion each, and scored with the training reward; the trainer logs
  their mean as `val_reward` (`held_out_reward`). Greedy decoding makes it a property of
  the policy, not of a draw; it does not advance the sampling seed, so the training
  rollouts are the same whatever `eval_every` is.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graftlm.errors import GraftError
from graftlm.objectives.configs import COMPILE_REFUSALS, SamplingConfig
from graftlm.objectives.dpo import pad_right


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [N, T] prompt + completion, right-padded
    loss_mask: torch.Tensor  # [N, T] bool: completion tokens (as targets)
    rewards: torch.Tensor  # [N] float, NaN where the reward was skipped
    completions: list[str]
    group_size: int
    generation_s: float
    scoring_s: float
    lengths: torch.Tensor  # [N] prompt + completion tokens of each row, without padding
    truncated: torch.Tensor  # [N] bool: stopped at max_new_tokens (or the context), not by a stop token
    # Several rewards: each one's [N] scores (NaN where it did not apply), for its own metrics.
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    none_applied: torch.Tensor | None = None  # [N] bool: no reward applied (scored 0, left out of GRPO's baseline)

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.loss_mask.sum(-1)

    @property
    def valid(self) -> torch.Tensor:
        return ~torch.isnan(self.rewards)


def collate_prompts(examples: list[dict]) -> dict:
    """RL prompt rows -> batch: token ids, texts and rows stay Python lists."""
    return {"prompt_ids": [e["prompt_ids"] for e in examples],
            "prompts": [e["prompt_text"] for e in examples],
            "rows": [e["row"] for e in examples]}


def reward_row(example: dict) -> dict:
    """What a reward function sees of a normalised RL row: its extra fields and source."""
    return {**example.get("extra", {}), "source": example.get("source", "")}


def _check_compilable(policy) -> None:
    """Refuse `sampling.compile` where one graph cannot serve every rollout: a QLoRA base's
    NF4 weights do not trace in one graph, and FSDP gathers new weight tensors at each."""
    from graftlm.adapters.qlora import is_nf4
    from graftlm.parallel import is_sharded

    if any(is_nf4(p) for p in policy.parameters()):
        raise GraftError(f"config field 'sampling.compile': {COMPILE_REFUSALS['qlora']}")
    if is_sharded(policy):
        raise GraftError(f"config field 'sampling.compile': {COMPILE_REFUSALS['fsdp']}")


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RolloutSampler:
    """Samples and scores groups of completions; one instance per run (it owns the seed)."""

    def __init__(self, config: SamplingConfig, scorer, tokenizer=None):
        self.config, self.scorer, self.tokenizer = config, scorer, tokenizer
        self.rollouts = 0  # training rollouts sampled so far: where the seeds are
        self.completions_log = None  # RUN/completions.jsonl on the main rank (runs.py sets it)
        self._log_opened = False
        self._compiled_decode = None  # with `compile`: one compiled decode step for the run

    def engine(self, policy):
        """The engine that samples from `policy`: eager, or with `compile` one whose decode
        step was compiled at the first rollout and is kept for the run (the graph reads the
        weights at every call, so it samples from the policy as it trains)."""
        from graftlm.engine import CompiledDecodeStep, Engine

        if not self.config.compile:
            return Engine(policy, self.tokenizer)
        if self._compiled_decode is None:
            _check_compilable(policy)
            self._compiled_decode = CompiledDecodeStep(policy, live_weights=True)
            if _rank_and_world()[0] == 0:
                print("compiling the rollouts' decode step at the first rollout (once; tens of seconds)",
                      file=sys.stderr)
        return Engine(policy, self.tokenizer, compiled_decode=self._compiled_decode)

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = state["rollouts"]

    @torch.no_grad()
    def sample(self, model, batch: dict, pad_id: int = 0, greedy: bool = False) -> Rollout:
        """`group_size` sampled completions per prompt; greedy: one, the most likely."""
        from graftlm.engine import SamplingParams

        cfg = self.config
        g = 1 if greedy else cfg.group_size
        policy = getattr(model, "module", model)
        was_training = policy.training
        prompt_ids = [p for p in batch["prompt_ids"] for _ in range(g)]
        if greedy:
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
        else:
            # Row i of rank r is row r·n + i of the global batch, seeded as one process
            # would seed it (seed + its global index, in a range of its own per rollout):
            # ranks never share random draws, and the samples do not depend on the world size.
            rank, world = _rank_and_world()
            first = cfg.seed + (self.rollouts * world * 7919 + rank) * len(prompt_ids)
            params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, top_k=cfg.top_k, seed=first + i)
                      for i in range(len(prompt_ids))]
            self.rollouts += 1
        start = time.perf_counter()
        try:
            from graftlm.parallel import unsharded_for_generation
            with unsharded_for_generation(model):  # FSDP2: ranks stop at different lengths
                outputs = self.engine(policy).generate(prompt_ids, params)
        finally:
            policy.train(was_training)
        generation_s = time.perf_counter() - start

        completions = [o.text if o.text is not None else "" for o in outputs]
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        rows = [r for r in batch["rows"] for _ in range(g)]
        truncated = [o.finish_reason == "length" for o in outputs]
        start = time.perf_counter()
        scores = self.scorer(completions, prompts, rows, truncated=truncated)
        scoring_s = time.perf_counter() - start

        parts = getattr(self.scorer, "last_parts", {})
        parts = parts if len(parts) > 1 else {}  # one reward: its score is the reward
        if not greedy and cfg.log_completions and self.completions_log is not None:
            self._log(prompts, completions, scores, truncated, parts)
        sequences = [p + o.token_ids for p, o in zip(prompt_ids, outputs)]
        masks = [[False] * len(p) + [True] * len(o.token_ids) for p, o in zip(prompt_ids, outputs)]
        rewards = _with_nan(scores)
        device = next(policy.parameters()).device
        return Rollout(pad_right(sequences, pad_id).to(device), pad_right(masks, 0).bool().to(device),
                       rewards.to(device), completions, g, generation_s, scoring_s,
                       torch.tensor([len(s) for s in sequences]), torch.tensor(truncated, dtype=torch.bool),
                       {name: _with_nan(values) for name, values in parts.items()},
                       torch.tensor(getattr(self.scorer, "last_none_applied", None) or [False] * len(scores)))

    def _log(self, prompts, completions, scores, truncated, parts) -> None:
        """Append this rollout's first `log_completions` completions: what the reward paid for
        (and, with several rewards, what each paid: None where it did not apply)."""
        if not self._log_opened:
            # Rows of this rollout and later ones were written by an earlier attempt of the
            # run (which died after its last checkpoint, or was started over) and are about
            # to be written again: dropped, so that `rollout` counts one run's rollouts.
            self._log_opened = True
            path = Path(self.completions_log)
            if path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["rollout"] < self.rollouts]
                path.write_text("".join(line + "\n" for line in kept))
        with open(self.completions_log, "a") as f:
            for i in range(min(self.config.log_completions, len(completions))):
                each = {"rewards": {name: values[i] for name, values in parts.items()}} if parts else {}
                f.write(json.dumps({"rollout": self.rollouts, "prompt": prompts[i], "completion": completions[i],
                                    "reward": scores[i], **each, "truncated": truncated[i]}) + "\n")


def _with_nan(scores: list[float | None]) -> torch.Tensor:
    return torch.tensor([float("nan") if s is None else float(s) for s in scores])


def _applied_mean(values: torch.Tensor) -> float | None:
    """A reward's mean over the completions it applied to (NaN: did not); None if none."""
    applied = values[~torch.isnan(values)]
    return applied.mean().item() if applied.numel() else None


def held_out_reward(sampler: RolloutSampler, model, batch: dict,
                    pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sum of greedy completions' rewards, number scored, each of several rewards' mean
    over the batch's completions it applied to): an objective's `evaluate_batch`."""
    rollout = sampler.sample(model, batch, pad_id, greedy=True)
    valid = rollout.valid
    each = {f"reward/{name}": _applied_mean(values) or 0.0 for name, values in rollout.reward_parts.items()}
    return torch.nan_to_num(rollout.rewards).mul(valid).sum(), valid.sum(), each


def rollout_metrics(rollout: Rollout) -> dict:
    valid = rollout.rewards[rollout.valid]
    # Each of several rewards over the completions it applied to (TRL's rewards/<name>/mean).
    means = {name: _applied_mean(values) for name, values in rollout.reward_parts.items()}
    parts = {f"reward/{name}/mean": mean for name, mean in means.items() if mean is not None}
    if rollout.none_applied is not None and rollout.none_applied.any():
        parts["reward/none_applied"] = rollout.none_applied.float().mean().item()
    return {
        **parts,
        "reward/mean": valid.mean().item() if valid.numel() else float("nan"),
        "reward/std": valid.std().item() if valid.numel() > 1 else 0.0,
        "completion_length": rollout.completion_lengths.float().mean().item(),
        "completions/clipped_ratio": rollout.truncated.float().mean().item(),
        "time/generation_s": rollout.generation_s,
        "time/scoring_s": rollout.scoring_s,
        # What the policy trains on (the trainer's throughput and MFU): the rollout, not the batch.
        "tokens": int(rollout.lengths.sum()), "context": rollout.input_ids.shape[1],
    }


class RolloutWarnings:
    """Warning lines for rollouts that teach little, read from each step's logged metrics:
    - every prompt's completions got the same reward (`train_frac_reward_zero_std` 1; GRPO,
      `groups`): every advantage is 0, so the step learns nothing (but the KL);
    - half or more of the completions stopped at `max_new_tokens`
      (`train_completions/clipped_ratio`): a cut answer is scored as it stands.
    Each is printed the first step that shows it, then at most once every `every` steps, with
    how many steps since showed it: a line per step would bury a long run's progress lines."""

    def __init__(self, section: str, sampling: SamplingConfig, groups: bool, every: int = 100):
        self.section, self.sampling, self.groups, self.every = section, sampling, groups, every
        self._seen = {"zero_std": 0, "clipped": 0}  # steps since the kind's last line
        self._hits: dict[str, list[tuple[int, float, float]]] = {"zero_std": [], "clipped": []}
        self._last: dict[str, int | None] = {"zero_std": None, "clipped": None}

    def __call__(self, record: dict) -> list[str]:
        # Cut completions first: they are the likelier cause of equal rewards (all scored 0).
        checks = [("clipped", "train_completions/clipped_ratio", 0.5)]
        if self.groups:  # a mean over micro-batches and ranks: 1 when every group agreed
            checks.append(("zero_std", "train_frac_reward_zero_std", 0.999))
        lines = []
        for kind, key, threshold in checks:
            value = record.get(key)
            if not isinstance(value, (int, float)):
                continue
            self._seen[kind] += 1
            if value >= threshold:
                self._hits[kind].append((record["step"], value, record.get("train_reward/mean", float("nan"))))
            last = self._last[kind]
            if self._hits[kind] and (last is None or record["step"] - last >= self.every):
                lines.append(self._line(kind, record["step"]))
                self._seen[kind], self._hits[kind], self._last[kind] = 0, [], record["step"]
        return lines

    def _line(self, kind: str, step: int) -> str:
        hits, option = self._hits[kind], f"--{self.section}.sampling"
        first = step - self._seen[kind] + 1
        span = f"step {hits[0][0]}" if len(hits) == 1 else f"{len(hits)} of steps {first}-{step}"
        if kind == "zero_std":
            mean = sum(h[2] for h in hits) / len(hits)
            cut = self._last["clipped"] == step  # the line above says they were cut: the first thing to fix
            return (f"warning: {span}: every prompt's {self.sampling.group_size} completions got the same reward "
                    f"(mean reward {mean:.3g}; train_frac_reward_zero_std 1), so every advantage was 0 and "
                    "nothing was learned; "
                    + (f"cut completions (above) likely all scored alike: raise {option}.max-new-tokens first, "
                       f"then {option}.temperature or {option}.group-size" if cut else
                       f"raise {option}.temperature or {option}.group-size for more varied completions, "
                       f"or check --{self.section}.reward: does it tell these completions apart?"))
        ratio = sum(h[1] for h in hits) / len(hits)
        return (f"warning: {span}: {ratio:.0%} of completions stopped at {option}.max-new-tokens "
                f"{self.sampling.max_new_tokens} (train_completions/clipped_ratio) and were scored cut off; "
                f"raise {option}.max-new-tokens, or fine-tune the model to end its answers (SFT on answers "
                f"that end with EOS)")


def prompt_text(prompt) -> str:
    """The text a reward function sees as the prompt: the string, or the last message's content."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


class PromptDataset:
    """Normalised RL rows (`{"prompt", "extra", "source"}`) rendered to prompt token ids."""

    def __init__(self, examples: list[dict], renderer):
        self.items = [{"prompt_ids": renderer.render_prompt(e), "prompt_text": prompt_text(e["prompt"]),
                       "row": reward_row(e)} for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    collate = staticmethod(collate_prompts)


def build_prompt_splits(cfg, section, tokenizer, objective: str):
    """Train / validation RL prompts (`grpo`, `ppo`), rendered up to the reply."""
    from graftlm.objectives import DataSplits
    from graftlm.objectives.sft import left_out, load_splits, renderer_for

    renderer = renderer_for(cfg, section, tokenizer)
    train, val, read = load_splits(cfg, section, objective)
    # Validated by held-out reward (`held_out_reward`), not loss: an RL loss on held-out
    # prompts means little (its advantages are centred).
    return DataSplits(train=PromptDataset(train, renderer), val=PromptDataset(val, renderer) if val else None,
                      vocab_size=tokenizer.vocab_size, identity={"data": cfg.data, "prompts": len(train)},
                      stats=left_out(read))


def run_tokenizer(cfg):
    """The tokenizer of the run, as `runs.py` found it (RL decodes completions to score them)."""
    from pathlib import Path

    from graftlm.runs import find_tokenizer

    return find_tokenizer(cfg, Path(cfg.data))
