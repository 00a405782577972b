"""Memory of one training run, per device, broken down the way a person reasons about it.

What "peak memory" means here: the largest total of live tensor bytes on one device at
any moment of a training step (forward, backward, optimizer step): weights, gradients,
optimizer states, the activations autograd keeps for backward, and the temporaries
around them. It is `torch.cuda.max_memory_allocated()` on a GPU; on a CPU,
`plan.measure.TensorMemoryTracker` counts the same. It leaves out what the runtime
keeps for itself (CUDA context, allocator slack), which the hardware catalogue's
`reserved_gb` covers when deciding whether a run fits.

Design choices, each matching what the trainer and the adapters do:
- Full training keeps float32 weights (bf16 only with precision "bf16"), gradients in
  the weights' dtype, and fused AdamW's two states in the weights' dtype (no step
  temporaries). Gradients are set to None between steps, so with one micro-batch they
  never coexist with a whole forward's activations.
- LoRA keeps the frozen base in its storage dtype (`adapters.config.base_storage_dtype`:
  `base_dtype: auto` is bf16 when the run computes in bf16); QLoRA stores every block
  linear weight as torchao NF4 (half a byte per weight, an int8 scaler per 64 weights, a
  bf16 factor per scaler block); adapters are float32 and trained like full weights.
- Under bf16 autocast, the bf16 copies autocast makes of float32 weights are saved for
  backward and live until it ends ("weight copies").
- Activations are what autograd saves during forward, per token. The coefficients are
  fitted to measurements of the Decoder (scripts/calibrate_plan_memory.py), because
  which tensors are saved depends on details (float32 RMSNorm, SDPA's saved outputs,
  frozen weights needing no input) that a hand count gets wrong. With activation
  checkpointing only each block's input is kept, and one block is recomputed at a time.
- Log-probabilities are computed in chunks of 256 positions (objectives/logprobs.py),
  so the logits' cost is a transient of a few chunk x vocab float32 arrays.
- Peak = the larger of two moments: the start of backward (everything static, all
  activations, weight copies, the logits transient) and the end of backward (everything
  static plus all gradients); in between, freed activations make room for gradients.
- FSDP over N devices divides weights, gradients, optimizer states and the reference
  model by N; DDP divides nothing.
- PPO (objectives/ppo.py) also holds its critic, a scalar-head model the objective
  trains itself with its own AdamW, in the policy's dtype and never sharded (the trainer
  wraps the policy only): weights, gradients (set to None just before its backward) and
  two optimizer states (`critic`); and the reward model that scores the rollouts, frozen,
  float32 (`rewards.RewardModelScorer`; a GRPO run scored by one holds it too). Its forward runs with grad after the policy's,
  whose activations are kept for the trainer's backward, so the critic's backward runs
  with both models' activations live: a moment of its own ("critic backward").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graftlm.models.config import ModelConfig

LOGPROB_CHUNK = 256
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# (parameterization, precision, frozen base dtype) -> fitted bytes per token:
#   layer: per block, coefficients of (h+q)/2, kv, intermediate, heads, r*targets, 1
#   rest:  outside the blocks, coefficients of h, head_dim, 1
#   logits: the transient, in units of chunk x vocab x 4 bytes
# Refit with scripts/calibrate_plan_memory.py (torch 2.13, CPU; the same ops run on CUDA).
ACTIVATION_COEFFS = {
    ("full", "fp32", None): dict(layer=(24, 8, 12, 4, 0, 8), rest=(8, 8, 20), logits=2.63),
    ("full", "bf16-autocast", None): dict(layer=(12, 4, 6, 4, 0, 8), rest=(4, 4, 20), logits=3.06),
    ("full", "bf16", None): dict(layer=(12, 4, 6, 4, 0, 8), rest=(4, 4, 20), logits=3.06),
    ("lora", "fp32", "float32"): dict(layer=(24, 8, 12, 4, 4, 8), rest=(4, 8, 16), logits=2.13),
    ("lora", "fp32", "bfloat16"): dict(layer=(12, 4, 6, 4, 2, 8), rest=(2, 4, 16), logits=2.56),
    ("lora", "bf16-autocast", "float32"): dict(layer=(12, 4, 6, 4, 2, 8), rest=(2, 4, 16), logits=2.56),
    ("lora", "bf16-autocast", "bfloat16"): dict(layer=(12, 4, 6, 4, 2, 8), rest=(2, 4, 16), logits=2.56),
    ("qlora", "fp32", "float32"): dict(layer=(24, 8, 12, 4, 4, 8), rest=(4, 8, 16), logits=2.13),
    ("qlora", "fp32", "bfloat16"): dict(layer=(12, 4, 6, 4, 2, 8), rest=(2, 4, 16), logits=2.56),
    ("qlora", "bf16-autocast", "float32"): dict(layer=(12, 4, 6, 4, 2, 8), rest=(2, 4, 16), logits=2.56),
    ("qlora", "bf16-autocast", "bfloat16"): dict(layer=(12, 4, 6, 4, 2, 8), rest=(2, 4, 16), logits=2.56),
}


@dataclass
class RunShape:
    """What a training run looks like to the cost model."""

    model: ModelConfig
    objective: str = "sft"  # clm | sft | dpo | grpo | ppo
    parameterization: str = "full"  # full | lora | qlora
    precision: str = "bf16-autocast"  # fp32 | bf16-autocast | bf16
    batch_size: int = 1  # per device and micro-batch: sequences (DPO: pairs; GRPO / PPO: completions)
    seq_len: int = 2048
    grad_accum: int = 1
    activation_checkpointing: bool = False
    lora_r: int = 16
    lora_targets: list[str] | str = "all-linear"
    lora_base_dtype: str = "bfloat16"
    grpo_group: int = 8  # completions per prompt
    grpo_completion_len: int = 256  # of seq_len, the generated part
    grpo_iterations: int = 1  # optimizer steps trained on each rollout (--grpo.iterations)
    # DPO / GRPO / PPO: False where the loss needs none (SimPO, ORPO; GRPO at beta 0; PPO at kl_coef 0)
    uses_reference: bool = True
    devices: int = 1
    sharding: str = "fsdp"  # fsdp | ddp (with devices > 1)
    device_type: str = "cuda"  # cuda | cpu: which kernels run (see compute.recompute_flops_per_token)
    scalar_head: bool = False  # a reward model / critic: a [1, hidden] score in place of the LM head (FLOPs)
    # PPO: the critic's shape (None: the policy's, as a critic copied from it or from a reward
    # model trained on the same base). GRPO and PPO: the reward model scoring each rollout
    # (None: the policy's shape); reward_is_model False: a reward function, no model runs;
    # None: each objective's usual reward (PPO a reward model, GRPO a function such as gsm8k)
    critic_model: ModelConfig | None = None
    reward_model: ModelConfig | None = None
    reward_is_model: bool | None = None

    @property
    def adapted(self) -> bool:
        return self.parameterization in ("lora", "qlora")

    @property
    def computes_bf16(self) -> bool:
        """Whether activations are bf16: bf16 precision, or a bf16-stored adapted base."""
        return self.precision != "fp32" or (self.adapted and self.lora_base_dtype == "bfloat16")

    @property
    def has_reference_model(self) -> bool:
        """Whether a frozen reference policy runs a forward over every trained batch."""
        return self.objective in ("dpo", "grpo", "ppo") and self.uses_reference

    @property
    def samples_rollouts(self) -> bool:
        """Whether each micro-batch's sequences are generated by the policy first (GRPO, PPO)."""
        return self.objective in ("grpo", "ppo")

    @property
    def critic(self) -> ModelConfig | None:
        """PPO's value model (a scalar head on a decoder), else None."""
        return (self.critic_model or self.model) if self.objective == "ppo" else None

    @property
    def scoring_model(self) -> ModelConfig | None:
        """The reward model of GRPO or PPO, a scalar head run over every rollout; None where a
        function scores."""
        if not self.samples_rollouts:
            return None
        is_model = self.objective == "ppo" if self.reward_is_model is None else self.reward_is_model
        return (self.reward_model or self.model) if is_model else None

    @property
    def sequences(self) -> int:
        """Sequences one micro-batch runs through the trained model."""
        return self.batch_size * (2 if self.objective == "dpo" else 1)

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len


# -- parameter counts -------------------------------------------------------------------------

def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one block."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_targets(targets: list[str] | str) -> list[str]:
    """The block linears a target spec names (all-linear, names, or a regex on HF names)."""
    import re
    if targets == "all-linear" or targets == ["all-linear"]:
        return list(LINEAR_NAMES)
    if isinstance(targets, str):
        return [n for n in LINEAR_NAMES
                if re.fullmatch(targets, f"model.layers.0.{'self_attn' if n in LINEAR_NAMES[:4] else 'mlp'}.{n}")]
    return [n for n in LINEAR_NAMES if any(t == n or t.endswith("." + n) for t in targets)]


def adapter_params(shape: RunShape) -> int:
    shapes = linear_shapes(shape.model)
    per_layer = sum(shapes[n][0] + shapes[n][1] for n in lora_targets(shape.lora_targets))
    return shape.lora_r * per_layer * shape.model.num_layers


def block_linear_params(cfg: ModelConfig) -> int:
    return sum(i * o for i, o in linear_shapes(cfg).values()) * cfg.num_layers


def _nf4_bytes(numel: int) -> int:
    from graftlm.adapters.nf4_layout import NF4_BLOCK, _scaler_block
    blocks = numel // NF4_BLOCK
    return numel // 2 + blocks + 2 * (blocks // _scaler_block(blocks)) + 2 + 32


def scalar_head_params(cfg: ModelConfig) -> int:
    """A `ScalarHeadModel` on `cfg`: the decoder without its LM head, plus a [1, hidden] score."""
    return cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size + cfg.hidden_size


def trainable_params(shape: RunShape) -> int:
    return adapter_params(shape) if shape.adapted else shape.model.num_params()


# -- the breakdown ---------------------------------------------------------------------------

@dataclass
class MemoryBreakdown:
    """Bytes per device. `peak` is what must fit; the rest explain it."""

    weights: int
    gradients: int
    optimizer: int
    weight_copies: int
    activations: int  # without activation checkpointing
    activations_checkpointed: int
    logits: int
    reference_model: int
    kv_cache: int
    peak: int
    peak_moment: str
    critic: int = 0  # PPO: the value model's weights, gradients and optimizer states
    critic_activations: int = 0  # PPO: what its forward keeps for its backward
    reward_model: int = 0  # GRPO / PPO: the frozen reward model scoring the rollouts, where one does
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _coeffs(shape: RunShape) -> dict:
    precision = shape.precision
    base = shape.lora_base_dtype if shape.adapted else None
    if shape.adapted and precision == "bf16":
        precision, base = "bf16-autocast", "bfloat16"  # a bf16 model: base and compute in bf16
    return ACTIVATION_COEFFS[(shape.parameterization, precision, base)]


def activation_bytes_per_token(shape: RunShape) -> tuple[float, float, float]:
    """(per block, outside the blocks, checkpointed per block) bytes per token."""
    cfg = shape.model
    c = _coeffs(shape)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    targets = len(lora_targets(shape.lora_targets)) if shape.adapted else 0
    a_h, a_kv, a_i, a_nh, a_r, a_0 = c["layer"]
    layer = (a_h * (cfg.hidden_size + q) / 2 + a_kv * kv + a_i * cfg.intermediate_size
             + a_nh * cfg.num_heads + a_r * shape.lora_r * targets + a_0)
    b_h, b_hd, b_0 = c["rest"]
    rest = b_h * cfg.hidden_size + b_hd * cfg.head_dim + b_0
    stream_bytes = 2 if shape.computes_bf16 else 4
    return layer, rest, cfg.hidden_size * stream_bytes


def memory_breakdown(shape: RunShape) -> MemoryBreakdown:
    cfg = shape.model
    total = cfg.num_params()
    shard = shape.devices if shape.devices > 1 and shape.sharding == "fsdp" else 1
    master = 2 if shape.precision == "bf16" else 4
    block_linear = block_linear_params(cfg)
    notes = []

    if shape.adapted:
        base_bytes = 2 if shape.lora_base_dtype == "bfloat16" or shape.precision == "bf16" else 4
        trainable = adapter_params(shape)
        if shape.parameterization == "qlora":
            per_layer = sum(_nf4_bytes(i * o) for i, o in linear_shapes(cfg).values())
            weights = per_layer * cfg.num_layers + (total - block_linear) * base_bytes
        else:
            weights = total * base_bytes
        weights += trainable * 4
        grads, optimizer = trainable * 4, trainable * 8
        reference = 0  # the base with adapters disabled
        copies = 2 * trainable if shape.computes_bf16 else 0
        if shape.parameterization == "lora" and shape.precision == "bf16-autocast" and base_bytes == 4:
            copies += 2 * block_linear  # autocast casts each float32 base weight; backward keeps it
    else:
        trainable = total
        weights = total * master
        grads, optimizer = total * master, total * 2 * master
        copies = 2 * block_linear if shape.precision == "bf16-autocast" else 0
        reference = total * master if shape.has_reference_model else 0  # a frozen copy, made on first use

    weights, grads, optimizer, reference = (x // shard for x in (weights, grads, optimizer, reference))
    if shard > 1:
        # FSDP gathers one block's weights at a time in full.
        weights += block_linear // cfg.num_layers * (2 if shape.precision != "fp32" else 4)

    layer, rest, checkpoint_input = activation_bytes_per_token(shape)
    tokens = shape.tokens
    activations = int(tokens * (cfg.num_layers * layer + rest))
    checkpointed = int(tokens * (cfg.num_layers * checkpoint_input + rest + layer))
    chunk = min(tokens, LOGPROB_CHUNK)
    logits = int(_coeffs(shape)["logits"] * chunk * cfg.vocab_size * 4)
    if tokens > LOGPROB_CHUNK:  # the chunks' input gradients are gathered into one tensor
        logits += tokens * cfg.hidden_size * 4

    kv_cache = 0
    if shape.samples_rollouts:
        kv_bytes = 4 if shape.precision == "fp32" else 2
        kv_cache = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_bytes * shape.batch_size * shape.seq_len

    critic = critic_used = critic_copies = reward_model = 0
    if shape.critic is not None:
        # Its weights, gradients and AdamW's two states, in the policy's dtype, whole on every device.
        critic_params = scalar_head_params(shape.critic)
        critic = critic_params * master * 4  # weights, gradients, two AdamW states
        # Its activations as a fully trained model of its shape, over the same rows: never
        # checkpointed (the trainer turns checkpointing on in the policy alone).
        critic_shape = RunShape(model=shape.critic, precision=shape.precision)
        layer, rest, _ = activation_bytes_per_token(critic_shape)
        critic_used = int(tokens * (shape.critic.num_layers * layer + rest))
        critic_copies = 2 * block_linear_params(shape.critic) if shape.precision == "bf16-autocast" else 0
    if shape.scoring_model is not None:
        reward_model = scalar_head_params(shape.scoring_model) * 4  # loaded in float32, frozen

    accumulating = shape.grad_accum > 1  # gradients live through later micro-batches' forward
    static = weights + optimizer + reference + (grads if accumulating else 0) + critic + reward_model
    used = checkpointed if shape.activation_checkpointing else activations
    moments = {
        "start of backward": static + used + copies + logits,
        "end of backward": static + grads,
    }
    if shape.critic is not None:
        # The critic's backward runs with the policy's activations (and bf16 weight copies) still
        # kept for the trainer's backward. Its gradients, set to None just before, are made as
        # its activations are freed; counted with all of them, as a tiny CPU run's tracked peak
        # (late in that backward) was closer to that than to its start.
        moments["critic backward"] = static + used + copies + critic_used + critic_copies
    if kv_cache:
        moments["rollout generation"] = static + kv_cache + 2 * shape.batch_size * cfg.vocab_size * 4
        notes.append(f"{shape.objective.upper()} generates rollouts before training on them: the KV cache and "
                     "the training activations do not coexist")
    if shape.precision == "bf16" and not shape.adapted:
        notes.append("pure bf16 weights and optimizer states: cheaper, but small updates can round away")
    moment = max(moments, key=moments.get)
    return MemoryBreakdown(weights=weights, gradients=grads, optimizer=optimizer, weight_copies=copies,
                           activations=activations, activations_checkpointed=checkpointed, logits=logits,
                           reference_model=reference, kv_cache=kv_cache, peak=moments[moment],
                           peak_moment=moment, critic=critic, critic_activations=critic_used,
                           reward_model=reward_model, notes=notes)


def largest_batch(shape: RunShape, usable_bytes: int, limit: int = 1 << 16) -> int:
    """The largest micro-batch (same units as `batch_size`) whose peak fits; 0 if none."""
    from dataclasses import replace

    def fits(b: int) -> bool:
        return memory_breakdown(replace(shape, batch_size=b)).peak <= usable_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
