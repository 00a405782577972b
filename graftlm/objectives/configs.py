"""Each objective's config section and its command's one-line help, importable without
torch: `graft <command> --help` builds a training command's options from them and
`graft plan` reads the trainers' defaults from them, neither importing an objective's
module (each imports torch). Those modules make their `SPEC` of these, and re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from graftlm.errors import ConfigError


@dataclass
class FineTuneData:
    """How fine-tuning rows are read and rendered (shared by sft, dpo, reward, grpo, ppo)."""

    val_fraction: float = field(default=0.05, metadata={"help": "rows held out for validation"})
    val_data: str | None = field(default=None, metadata={"help": "validation file (instead of val_fraction)"})
    max_length: int | None = field(default=None, metadata={"help": "tokens per row (default: train.seq_len)"})
    overflow: Literal["truncate", "drop"] = field(default="truncate", metadata={
        "help": "a row longer than max_length: keep its start, or leave it out (either way counted)"})
    train_on: Literal["assistant", "all"] = field(default="assistant", metadata={"help": "tokens that get a loss"})
    errors: Literal["skip", "raise"] = field(default="skip", metadata={"help": "bad rows: count and skip, or stop"})
    max_bad_fraction: float = 0.01

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"config field 'val_fraction': must be in [0, 1), got {self.val_fraction}")



@dataclass
class ClmConfig:
    document_mask: bool = field(default=False, metadata={
        "help": "attend only within each document of a window (slower: explicit mask)"})
    val_split: str = field(default="val", metadata={"help": "split to validate on ('' for none)"})



@dataclass
class SFTConfig(FineTuneData):
    """SFT's options are the data's (which tokens are trained is the renderer's choice) and packing."""

    packing: bool = field(default=False, metadata={
        "help": "pack several rows into each sequence of max_length (attention stays within a row)"})



REFERENCE_FREE = ("simpo", "orpo")
# beta where --dpo.beta is not given: 0.1, TRL's for DPO, IPO and ORPO. SimPO's reward is beta
# x a per-token AVERAGE log-prob and its margin gamma is in reward units: at beta 0.1 a pair is
# won only by 5 nats per token (gamma / beta), where the SimPO paper trains at beta 2.0-2.5
# with gamma / beta 0.25-0.5 (here 2.0 and 0.5: 0.25).
DEFAULT_BETA = {"simpo": 2.0}



@dataclass
class DPOConfig(FineTuneData):
    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = field(
        default="sigmoid", metadata={"help": "preference loss; simpo and orpo use no reference model"})
    beta: float | None = field(default=None, metadata={
        "help": "strength of the preference (DPO/IPO/SimPO beta, ORPO lambda); if not given: 0.1, and 2.0 "
                "for simpo (the SimPO paper's 2-2.5: its rewards are per-token averages)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "sigmoid/simpo: assumed fraction of flipped labels"})
    simpo_gamma: float = field(default=0.5, metadata={
        "help": "simpo: target reward margin (0.5 at beta 2.0: the gamma/beta of 0.25 the SimPO authors suggest "
                "searching from)"})

    def __post_init__(self) -> None:
        # Concrete at once, so that config.yaml records the beta the run used.
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.loss, 0.1)

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"config field 'dpo.beta': must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"config field 'dpo.label_smoothing': must be in [0, 0.5), got {self.label_smoothing}")



@dataclass
class RewardModelConfig(FineTuneData):
    # A reward model scores a sequence at its last token: a pair cut at max_length would
    # teach it to score text that never ends. Left out instead, as TRL's RewardTrainer does.
    overflow: Literal["truncate", "drop"] = field(default="drop", metadata={
        "help": "a pair longer than max_length: leave it out (counted), or keep its start"})
    center_coef: float = field(default=0.0, metadata={
        "help": "weight of (r_chosen + r_rejected)^2, keeping rewards near 0 (TRL's center_rewards_coefficient); "
                "0 = off"})

    def validate(self) -> None:
        super().validate()
        if self.center_coef < 0:
            raise ConfigError(f"config field 'reward.center_coef': must be >= 0, got {self.center_coef}")
        if self.train_on != "assistant":  # it would be accepted and change nothing
            raise ConfigError("config field 'reward.train_on': a reward model is trained on one score per sequence, "
                              "at its last token, not on tokens; leave it out")



@dataclass
class SamplingConfig:
    group_size: int = field(default=4, metadata={"help": "completions sampled per prompt"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest completion"})
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    log_completions: int = field(default=0, metadata={
        "help": "write the first N completions of each rollout, with prompt, reward and whether it was cut, "
                "to RUN/completions.jsonl (TRL's log_completions)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the rollouts' decode step, once (tens of seconds; it reads the weights as they "
                "train): eager decoding dispatches some 70 operators per block a token, most of sampling's time "
                "on a GPU. Not with QLoRA or FSDP"})

    def validate(self) -> None:
        if self.log_completions < 0:
            raise ConfigError(f"config field 'log_completions': must be >= 0, got {self.log_completions}")
        if self.group_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("config fields 'group_size' and 'max_new_tokens' must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"config field 'temperature': RL samples, so it must be > 0, got {self.temperature}")



# Why `sampling.compile` is refused, said alike where the config is read and, for a caller of
# the Python API, at the first rollout (`rollout.RolloutSampler.engine`).
COMPILE_REFUSALS = {
    "qlora": "QLoRA's NF4 base does not compile in one graph; sample eagerly (false), or train LoRA on a bf16 base",
    "fsdp": "not under FSDP (each rollout gathers new weight tensors); sample eagerly (false), or use --parallel ddp",
}


@dataclass
class RewardPolicy:
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "a reward function error stops the run, or skips the prompt"})
    max_bad_fraction: float = field(default=0.1, metadata={"help": "skip policy: stop when more prompts are bad"})



def check_weights(specs: list[str], weights: list[float] | None, field: str = "reward_weights") -> None:
    if weights is not None and len(weights) != len(specs):
        def count(n: int, noun: str) -> str:
            return f"{n} {noun}{'s' if n != 1 else ''}"
        raise ConfigError(f"config field '{field}': {count(len(weights), 'weight')} for "
                          f"{count(len(specs), 'reward')} ({', '.join(specs)}); give one weight per reward")



@dataclass
class GRPOConfig(FineTuneData):
    reward: list[str] = field(default_factory=lambda: ["gsm8k"], metadata={
        "help": "gsm8k | numeric | exact | regex:PATTERN | module:function | reward model dir, or several "
                "(their weighted sum); a function is fn(completion, prompt, **row_fields) -> float, or TRL's "
                "fn(prompts, completions, **kwargs) -> list, None where it does not apply"})
    reward_weights: list[float] | None = field(default=None, metadata={
        "help": "one weight per --grpo.reward (default: 1 each)"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward_errors: RewardPolicy = field(default_factory=RewardPolicy)
    beta: float = field(default=0.04, metadata={"help": "weight of the KL to the reference (0: no reference)"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the policy ratio (low side)"})
    epsilon_high: float | None = field(default=None, metadata={"help": "high side (default: epsilon)"})
    iterations: int = field(default=1, metadata={
        "help": "optimizer steps trained on each rollout (pi_old: the policy that sampled it)"})
    # TRL 1.16's names. graftlm's trainer divides the loss summed over a step's micro-batches and ranks
    # by their counts summed likewise, so each type is a (sum, count) per micro-batch (grpo.py:
    # `normalised`). "dapo" is both what graftlm always did (every completion token of the step
    # weighs the same) and TRL's default, so it stays the default: a run moved from TRL trains alike.
    loss_type: Literal["dapo", "bnpo", "grpo", "dr_grpo", "luspo"] = field(default="dapo", metadata={
        "help": "what the summed token losses are divided by (TRL's loss_type): dapo, the step's completion "
                "tokens (all micro-batches and ranks); bnpo, each micro-batch's own tokens, then a mean over "
                "micro-batches; grpo, each completion's length, then a mean over completions; dr_grpo, "
                "completions x max_new_tokens; luspo, completions (a sum over each completion's tokens; TRL "
                "pairs it with --grpo.importance-sampling-level sequence)"})
    importance_sampling_level: Literal["token", "sequence"] = field(default="token", metadata={
        "help": "the clipped ratio pi/pi_old per token, or one per completion: exp of its mean log-ratio "
                "(GSPO, whose paper pairs it with --grpo.loss-type grpo)"})
    # TRL's strings beside graftlm's original bool, read as the bool they mean (__post_init__),
    # so that config.yaml records one spelling and a resume given the other sees no change;
    # a run that recorded "group" or "none" still reads. TRL's "batch" (one std over the whole
    # generation batch of every rank) is not offered: graftlm samples each micro-batch on its own.
    scale_rewards: bool | Literal["group", "none"] = field(default=True, metadata={
        "help": "divide advantages by their group's std (true, or TRL's group), or not (false, or none: Dr. GRPO)"})
    # False keeps the gradients graftlm's runs always had (and a run recorded before the field
    # resumes with them); TRL 1.16 defaults to true, so a run matching TRL sets it.
    kl_bias_correction: bool = field(default=False, metadata={
        "help": "multiply the KL term by the ratio pi/pi_old, per token or per completion as "
                "--grpo.importance-sampling-level (TRL's use_bias_correction_kl; TRL 1.16 defaults to true, "
                "set it to match TRL): the KL gradient becomes that of the reverse KL, changed even on-policy"})
    advantage_eps: float = 1e-4

    def __post_init__(self) -> None:
        if isinstance(self.reward, str):  # GRPOConfig(reward="gsm8k"), as one reward is written in Python
            self.reward = [self.reward]
        self.scale_rewards = {"group": True, "none": False}.get(self.scale_rewards, self.scale_rewards)

    def validate(self) -> None:
        super().validate()
        if self.beta < 0 or self.epsilon <= 0 or self.iterations < 1:
            raise ConfigError("config fields 'beta' >= 0, 'epsilon' > 0 and 'iterations' >= 1 are required")
        if self.sampling.group_size < 2:
            raise ConfigError("config field 'grpo.sampling.group_size': GRPO needs groups of at least 2")
        if not self.reward:
            raise ConfigError("config field 'grpo.reward': give at least one reward")
        check_weights(self.reward, self.reward_weights, "grpo.reward_weights")



@dataclass
class PPOConfig(FineTuneData):
    reward: str = field(default="", metadata={
        "help": "reward model directory (or any reward spec, as --grpo.reward: gsm8k, module:function, ...)"})
    value_model: str | None = field(default=None, metadata={
        "help": "critic initialisation (default: the reward model, else a copy of the policy)"})
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(group_size=1))
    reward_errors: RewardPolicy = field(default_factory=RewardPolicy)
    kl_coef: float = field(default=0.05, metadata={"help": "per-token KL penalty in the reward"})
    gamma: float = 1.0
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the policy ratio"})
    value_clip: float = field(default=0.2, metadata={"help": "clip range of the value update"})
    value_lr: float = field(default=1e-4, metadata={"help": "learning rate of the critic"})
    whiten_advantages: bool = True

    def validate(self) -> None:
        super().validate()
        if not self.reward:
            raise ConfigError("config field 'ppo.reward' is required (a reward model directory from graft reward)")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError("config fields 'ppo.gamma' and 'ppo.lam' must be in [0, 1]")
        if self.kl_coef < 0 or self.epsilon <= 0 or self.value_clip <= 0:
            raise ConfigError("config fields 'ppo.kl_coef' >= 0, 'ppo.epsilon' > 0, 'ppo.value_clip' > 0")


# objective -> its section of the run config, and its command's help (`graft --help`)
CONFIGS = {"clm": ClmConfig, "sft": SFTConfig, "dpo": DPOConfig, "reward": RewardModelConfig, "grpo": GRPOConfig,
           "ppo": PPOConfig}
HELP = {
    "clm": "pre-train (or continue pre-training) on token shards from `graft prepare`",
    "sft": "supervised fine-tuning on chat / prompt-completion rows",
    "dpo": "preference optimisation: DPO (sigmoid), IPO, SimPO or ORPO on chosen/rejected pairs",
    "reward": "train a reward model (scalar head, Bradley-Terry loss on preference pairs)",
    "grpo": "online RL: sample groups of completions, score them, group-normalised advantages",
    "ppo": "classic RLHF: PPO against a reward model, with a value model and GAE",
}
