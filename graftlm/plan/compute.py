"""FLOPs of a run, and the time and money they take on given hardware.

The per-token training and forward FLOPs of the base model come from
`graftlm.metrics` (`training_flops_per_token`, `forward_flops_per_token`), the same
functions the trainer uses for the MFU it records, so plan and measurement count alike:
6N per token for full training plus causal attention. What adapters and objectives add
on top is counted here:

- LoRA / QLoRA: the frozen base still runs forward (2N) and passes gradients back to the
  activations (2N), but computes no weight gradients: ~4N per token. Each adapter
  (A: in -> r, B: r -> out) costs 2 r (in + out) forward, the same again for its input
  gradient and again for its weight gradient. Where nothing upstream is trainable
  (the first block's q/k/v inputs, with frozen embeddings and norms) autograd skips the
  input gradient, and so do we.
- DPO: chosen and rejected both train, and the frozen reference model runs one more
  forward over both (none for SimPO and ORPO). The reference is the base alone: LoRA
  disables its adapters, full fine-tuning keeps a frozen copy.
- GRPO: generation (prefill of the prompt, then one token at a time against a KV cache)
  for G completions per prompt, training on prompt + completion, and a reference forward
  (none at beta 0). With `iterations` k each rollout is sampled once and trained on in k
  passes: every pass runs the policy's forward and backward; the first pass's reference
  forward serves all k (the reference never changes), and pi_old's log-probs are the
  first pass's own, detached, so no forward of their own. A reward model (a directory as
  `--grpo.reward`) adds its forward over each rollout once, as PPO's does.
- PPO (objectives/ppo.py), per micro-batch: the rollout's generation, as GRPO's (usually
  one completion per prompt); the policy's forward and backward (pi_old is that forward,
  detached: no pass of its own); the reference forward (none at kl_coef 0); the critic,
  a scalar-head model trained in full by the objective: one forward over the rollout
  (its values, and detached, the old values) and its backward (twice the forward); and
  the reward model's forward over the rollout when a model scores it (a scalar head on
  every position; counted at the rollout's length, though it reads the prompt's and
  completion's text through its own tokenizer). One pass over each rollout: graftlm's
  PPO has no epochs over a rollout.

Model FLOPs leave out recomputation (the chunked log-probs recompute each chunk's logits
in backward when the head trains; activation checkpointing recomputes every block): MFU
is defined on model FLOPs, so time uses them; `executed_flops` adds recomputation, what a
FLOP counter sees.

Time = FLOPs / (devices x peak x MFU), the MFU a device typically reaches (catalogue),
except for GRPO's and PPO's sampling: a decode step reads every weight for a few FLOPs per
row, so it takes its reads' time at the catalogue's memory bandwidth where that is longer,
and dispatches some 70 eager operators per block, each costing the host a few
microseconds, which bound a small model's decoding (`generation_seconds`). Plus, for QLoRA, the time its NF4 base weights take to dequantize, which has no FLOPs
for MFU to absorb: torchao's linear_nf4 dequantizes every base linear (every block
linear, adapted or not) on each call. Per micro-batch that is a pass over them in the
training forward, another in backward (all but the first block's q/k/v, whose input
needs no gradient), one more with activation checkpointing (the recomputed forward),
one per reference forward (DPO, GRPO, PPO), and for GRPO's and PPO's rollouts one per
generated token (the prefill makes the first); a GRPO rollout's reference forward and
generation run once for the k micro-batches that train on it. A pass takes weights x the per-call cost
+ parameters / the device's rate (`metrics.DequantRate`; `Device.dequant_rate`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from graftlm.metrics import DequantRate, forward_flops_per_token, matmul_params, training_flops_per_token
from graftlm.models.limits import EAGER_GROUPED_MAX_SEQ
from graftlm.plan.hardware import Device, Hardware
from graftlm.plan.memory import (LINEAR_NAMES, RunShape, adapter_params, block_linear_params, linear_shapes,
                                 lora_targets)


def _first_block_skipped_input_grads(shape: RunShape) -> int:
    """Input-gradient FLOPs per token that autograd skips in an adapter run's first block.

    The first block's attention input comes from frozen embeddings and a frozen norm,
    so q/k/v need no input gradient. Everything after an adapted layer does.
    """
    shapes = linear_shapes(shape.model)
    return sum(2 * shapes[name][0] * shapes[name][1] for name in LINEAR_NAMES[:3])


def _counted_model(shape: RunShape):
    """The model whose matmuls are counted: a scalar head is one output, not the vocabulary
    (a reward model's FLOPs counted its base's LM head: 5x too many on a tiny model)."""
    return replace(shape.model, vocab_size=1) if shape.scalar_head else shape.model


def train_flops_per_token(shape: RunShape) -> float:
    """FLOPs to train on one token of a sequence of `shape.seq_len` (forward + backward)."""
    cfg = _counted_model(shape)
    if not shape.adapted:
        return training_flops_per_token(cfg, shape.seq_len, 1.0)
    adapters = adapter_params(shape)
    # The shared function counts the base (4N) and 2N*f of weight gradients: with
    # f = adapters / N that is exactly the adapters' weight gradients.
    flops = training_flops_per_token(cfg, shape.seq_len, adapters / matmul_params(cfg))
    flops += 4 * adapters  # the adapters' forward and input gradient
    if lora_targets(shape.lora_targets):
        flops -= _first_block_skipped_input_grads(shape)
    return flops


def recompute_flops_per_token(shape: RunShape) -> float:
    """FLOPs beyond the model's: not model FLOPs (MFU ignores them) but executed all the same.

    The chunked log-probs recompute each chunk's logits in backward (2 V h per token)
    when the head trains; with a frozen head (adapter runs) forward makes the hidden
    states' gradient from the logits it has, and nothing is recomputed. Activation
    checkpointing recomputes every block's forward. On a CPU in bf16 the attention
    backward makes whole score matrices (below).
    """
    cfg = _counted_model(shape)
    flops = 0 if shape.adapted or shape.scalar_head else 2 * cfg.vocab_size * cfg.hidden_size
    if shape.activation_checkpointing:
        flops += policy_forward_flops_per_token(shape) - 2 * cfg.vocab_size * cfg.hidden_size
    return flops + _cpu_attention_backward_extra(shape)


def _cpu_attention_backward_extra(shape: RunShape) -> float:
    """On a CPU in bf16, up to S = 512, graftlm's attention backward remakes each group
    of heads' whole S x S scores, the masked half included (models/kernels.py): five bmm
    of 2 S d per token and head, where the causal model counts 4 d (S + 1)."""
    cfg = shape.model
    if shape.device_type != "cpu" or not shape.computes_bf16 or shape.seq_len > EAGER_GROUPED_MAX_SEQ:
        return 0.0
    return cfg.num_layers * cfg.num_heads * cfg.head_dim * (10 * shape.seq_len - 4 * (shape.seq_len + 1))


def executed_flops_per_token(shape: RunShape) -> float:
    """What the hardware executes per trained token: model FLOPs plus recomputation."""
    return train_flops_per_token(shape) + recompute_flops_per_token(shape)


def policy_forward_flops_per_token(shape: RunShape, seq_len: int | None = None) -> float:
    """The trained policy's forward (adapters active), per token at context `seq_len`."""
    flops = forward_flops_per_token(shape.model, shape.seq_len if seq_len is None else seq_len)
    if shape.adapted:
        flops += 2 * adapter_params(shape)
    return flops


def reference_flops_per_token(shape: RunShape) -> float:
    """The frozen reference policy's forward, per token: the base model alone (LoRA: the
    same weights with its adapters disabled, which skip their matmuls; full: a frozen copy)."""
    return forward_flops_per_token(shape.model, shape.seq_len)


def scalar_forward_flops_per_token(cfg, seq_len: int) -> float:
    """A scalar-head model's forward (PPO's critic, a reward model), per token at context
    `seq_len`: the decoder with a [1, hidden] head in place of the LM head."""
    return forward_flops_per_token(replace(cfg, vocab_size=1), seq_len)


def rollout_layout(shape: RunShape) -> tuple[int, int]:
    """(prompt, completion) tokens of one rollout: seq_len holds both, and the completion
    runs to grpo_completion_len, the most a run samples."""
    completion = min(shape.grpo_completion_len, shape.seq_len - 1)
    return shape.seq_len - completion, completion


def rollout_flops(shape: RunShape, prompt: int, completion: int) -> float:
    """Sampling one completion of `completion` tokens after `prompt` tokens with the engine.

    The policy prefills the prompt, then decodes each generated token but the last against
    the KV cache: together a causal forward over prompt + completion - 1 tokens, each
    attending to its prefix, with the LM head on the last prompt position and the decoded
    ones only (the engine asks for no other logits).
    """
    cfg = shape.model
    tokens = prompt + completion - 1
    unasked_logits = (prompt - 1) * 2 * cfg.vocab_size * cfg.hidden_size
    return tokens * policy_forward_flops_per_token(shape, tokens) - unasked_logits


def _prefill_flops(shape: RunShape, prompt: int) -> float:
    """The prompt's forward before the first sampled token: logits at its last position only."""
    cfg = shape.model
    return prompt * policy_forward_flops_per_token(shape, prompt) - (prompt - 1) * 2 * cfg.vocab_size * cfg.hidden_size


def decode_bytes_per_step(shape: RunShape, context: float) -> float:
    """Bytes one decode step of a micro-batch reads: every matmul weight once, in the
    precision its matmuls run in (bf16 autocast casts each weight once for the whole
    generation: its cast cache), and each row's KV cache of `context` tokens. A QLoRA
    base's reads are its NF4 dequantization's, timed on their own (`dequant_passes`)."""
    cfg = shape.model
    width = 4 if shape.precision == "fp32" else 2
    weights = 0 if shape.parameterization == "qlora" else matmul_params(cfg) * width
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * width
    return weights + shape.batch_size * context * kv


# Eager PyTorch operators one decode step dispatches on graftlm's engine, counted with a
# TorchDispatchMode (tests/unit/test_plan_rollouts.py holds these to a fresh count): per
# block its norms, projections, RoPE, KV-cache writes and attention; per adapted linear its
# fused LoRA update (a QLoRA base's dequantization calls are `dequant_passes`' own cost);
# per step the embedding, final norm, head and the batched sampling, which draws each row's
# number from the row's own generator.
DECODE_OPS_PER_BLOCK = 70
DECODE_OPS_PER_ADAPTED_LINEAR = 11
DECODE_OPS_PER_STEP = 56
DECODE_OPS_PER_ROW = 1


def decode_ops(shape: RunShape) -> int:
    """Eager operators one decode step of a micro-batch dispatches (the prefill: as many)."""
    adapted = len(lora_targets(shape.lora_targets)) if shape.adapted else 0
    per_block = DECODE_OPS_PER_BLOCK + adapted * DECODE_OPS_PER_ADAPTED_LINEAR
    return DECODE_OPS_PER_STEP + shape.batch_size * DECODE_OPS_PER_ROW + shape.model.num_layers * per_block


def generation_seconds(shape: RunShape, distinct: float, flop_rate: float, device: Device) -> tuple[float, str]:
    """(wall seconds, what bounds them) to sample the rollouts behind `distinct` tokens
    (each rollout's tokens once), on `shape.devices` devices like `device`, each running
    `flop_rate` FLOP/s (peak x MFU).

    Each device samples its own micro-batches of `batch_size` rollouts together. The
    prefill is a forward over the prompts, bound by FLOPs as training is. Each later token
    is a decode step that does little arithmetic per byte it reads (2 FLOPs per weight and
    row): the step takes its FLOPs' time or its reads' (`decode_bytes_per_step`, at the
    memory bandwidth), whichever is longer. Every step, the prefill included, also
    dispatches `decode_ops` eager operators at `device.op_seconds` each. A CPU does that
    work in line with the arithmetic, so the two add up; a GPU runs its kernels while the
    host queues the next ones, so a step takes the longer of the two. A small model's
    decoding is mostly that overhead.
    """
    prompt, completion = rollout_layout(shape)
    micro_batches = distinct / shape.seq_len / (shape.batch_size * shape.devices)
    prefill_flops = _prefill_flops(shape, prompt)
    decode_flops = shape.batch_size * (rollout_flops(shape, prompt, completion) - prefill_flops) / flop_rate
    decode_reads = (completion - 1) * decode_bytes_per_step(shape, prompt + completion / 2) / device.bandwidth
    decode, bound = max((decode_flops, "FLOPs"), (decode_reads, "memory bandwidth"))
    work = shape.batch_size * prefill_flops / flop_rate + decode
    overhead = completion * decode_ops(shape) * device.op_seconds
    if device.kind == "cpu":
        per_batch = work + overhead
        bound = "per-operator overhead" if overhead > work else bound
    else:
        per_batch, bound = max((work, bound), (overhead, "per-operator overhead"))
    return micro_batches * per_batch, bound


def dequant_passes(shape: RunShape) -> dict[str, tuple[float, float]]:
    """QLoRA: (parameters, weights) that one micro-batch dequantizes, per part of the step
    (see the module docstring); empty for other parameterizations."""
    if shape.parameterization != "qlora":
        return {}
    cfg = shape.model
    params, weights = block_linear_params(cfg), len(LINEAR_NAMES) * cfg.num_layers
    first_qkv = sum(i * o for name, (i, o) in linear_shapes(cfg).items() if name in LINEAR_NAMES[:3])
    skipped = (first_qkv, 3) if lora_targets(shape.lora_targets) else (0, 0)
    forwards = 2 if shape.activation_checkpointing else 1
    passes = {"train forward": (forwards * params, forwards * weights),
              "train backward": (params - skipped[0], weights - skipped[1])}
    # A GRPO rollout is sampled, and the reference run on it, once for the passes over it.
    per_pass = 1 / passes_per_sequence(shape)
    if shape.has_reference_model:
        passes["reference forward"] = (per_pass * params, per_pass * weights)
    if shape.samples_rollouts:
        # The prefill makes the first token, a decode step each of the others.
        steps = rollout_layout(shape)[1] * per_pass
        passes["generation"] = (steps * params, steps * weights)
    return passes


def dequant_seconds(shape: RunShape, micro_batches: float, rate: DequantRate) -> dict[str, float]:
    """Seconds one device spends dequantizing NF4 weights over `micro_batches` micro-batches."""
    return {part: micro_batches * rate.pass_seconds(params, weights)
            for part, (params, weights) in dequant_passes(shape).items()}


def passes_per_sequence(shape: RunShape) -> int:
    """Passes the trainer makes over each sequence: GRPO's iterations over a rollout, else 1."""
    return shape.grpo_iterations if shape.objective == "grpo" else 1


def trained_tokens(shape: RunShape, tokens: float) -> float:
    """The tokens the trainer counts for `tokens` of data: GRPO trains on each rollout's
    tokens in grpo_iterations passes, and counts them in each."""
    return tokens * passes_per_sequence(shape)


def flops_detail(shape: RunShape, trained: float) -> dict[str, float]:
    """Model FLOPs of each part of the work behind `trained` trained tokens (the trainer's
    count, `trained_tokens`): what `graft plan` predicts and `graft plan --check` times.

    The policy's forward and backward (`train`) run on every pass; a GRPO rollout is
    generated once, and its reference log-probs computed once, whatever the passes over it.
    PPO adds its critic's forward and backward; GRPO and PPO their reward model's forward
    when a model scores the rollouts.
    """
    detail = {"train": train_flops_per_token(shape) * trained}
    distinct = trained / passes_per_sequence(shape)  # each sequence's tokens once
    if shape.has_reference_model:
        detail["reference forward"] = reference_flops_per_token(shape) * distinct
    if shape.samples_rollouts:
        prompt, completion = rollout_layout(shape)
        detail["generation"] = distinct / shape.seq_len * rollout_flops(shape, prompt, completion)
    if shape.critic is not None:
        critic = scalar_forward_flops_per_token(shape.critic, shape.seq_len) * distinct
        detail["critic forward"] = critic
        detail["critic backward"] = 2 * critic  # input and weight gradients: every weight trains
    if shape.scoring_model is not None:
        detail["reward model"] = scalar_forward_flops_per_token(shape.scoring_model, shape.seq_len) * distinct
    return detail


DEQUANT = "NF4 dequantization"


@dataclass
class Compute:
    train_tokens: float  # tokens the trained model processes (all epochs; GRPO: all passes)
    flops: float  # model FLOPs: what MFU and the trainer's summary count
    executed_flops: float  # plus recomputation (chunked logits, activation checkpointing)
    flops_per_token: float
    time_s: float
    cost_usd: float
    detail: dict  # FLOPs per part of the step
    time_detail: dict  # seconds: the FLOPs at peak x MFU and, for QLoRA, the NF4 dequantization
    dequant_detail: dict  # QLoRA: seconds of dequantization per part of the step
    generation_bound: str | None = None  # GRPO / PPO: what bounds decoding ("FLOPs", "memory bandwidth",
    # or "per-operator overhead")


def compute_cost(shape: RunShape, tokens: float, hardware: Hardware, price_per_hour: float | None = None,
                 epochs: float = 1.0) -> Compute:
    """FLOPs, time and money to train on `tokens` tokens of data `epochs` times.

    For DPO `tokens` counts both the chosen and the rejected sequences; for GRPO it is
    prompt + completion tokens of every completion, each sampled once.
    """
    trained = trained_tokens(shape, tokens * epochs)
    detail = flops_detail(shape, trained)
    flops = sum(detail.values())
    executed = flops + recompute_flops_per_token(shape) * trained
    device = hardware.device
    rate = device.peak_flops(shape.precision) * device.mfu * hardware.count
    generation = detail.get("generation", 0.0)
    time_detail = {"matmuls": (flops - generation) / rate}
    generation_bound = None
    if generation:  # token-at-a-time sampling: FLOPs or memory traffic, whichever is slower
        time_detail["generation"], generation_bound = generation_seconds(
            shape, trained / passes_per_sequence(shape), rate / hardware.count, device)
    # Each device dequantizes its own copy of the weights for each of its micro-batches.
    dequant = dequant_seconds(shape, trained / max(shape.tokens * hardware.count, 1), device.dequant_rate())
    if dequant:
        time_detail[DEQUANT] = sum(dequant.values())
    time_s = sum(time_detail.values())
    price = device.usd_per_hour if price_per_hour is None else price_per_hour
    return Compute(train_tokens=trained, flops=flops, executed_flops=executed, flops_per_token=flops / max(trained, 1),
                   time_s=time_s, cost_usd=time_s / 3600 * price * hardware.count, detail=detail, time_detail=time_detail,
                   dequant_detail=dequant, generation_bound=generation_bound)
