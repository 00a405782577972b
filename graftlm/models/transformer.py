"""The decoder: one readable Llama-family transformer.

Design choices:
- Module and parameter names follow Hugging Face's Llama (`embed_tokens`,
  `layers.N.self_attn.q_proj`, `mlp.gate_proj`, `lm_head`, ...), so checkpoints map
  one to one (`hf.py` only adds the `model.` prefix) and LoRA targets read the same.
- Attention is `F.scaled_dot_product_attention` with native grouped-query attention
  (`kernels.attention`; compiled bf16 training on the CPU swaps in a faster backward).
  Without padding or packing it takes the `is_causal` fast path; packed rows get a
  block-diagonal causal mask built from document ids; left-padded generation gets a
  key-padding mask.
- RoPE tables (cos, sin) are computed once in float32 for every position, including
  Llama 3's frequency scaling, and gathered by position id: packed rows simply restart
  their positions at 0.
- RMSNorm, RoPE and SwiGLU are hand-written autograd Functions (`kernels.py`): same
  float32 results as the plain composition, less saved for backward, fewer passes.
- The model returns logits or final hidden states, never a loss: objectives compute
  their own (chunked) losses from hidden states, which keeps the full vocabulary
  logits of a long batch out of memory.
- A `KVCache` preallocates keys and values for generation; `engine.py` owns decoding.
  Attention only calls `cache.write(layer, k, v)`: the eager cache writes at a Python
  offset and returns the written slots; `DecodeSlot` (one compiled decode step) holds
  views of the written slots plus the new token's and writes the last one, so the
  slot count is a dynamic dimension and `torch.compile` compiles
  `Decoder.decode_step` once for every step.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from graftlm.models import kernels
from graftlm.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as Hugging Face does, then scale in the input dtype. Under
        # autocast the output is already in the compute dtype: every consumer is a linear
        # that would cast it anyway (once per consumer, each with its own cast-backward).
        out_dtype = None
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        return kernels.rms_norm(x, self.weight, self.eps, out_dtype)


def rope_inverse_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies of RoPE, with Llama 3 / linear scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


@dataclass
class KVCache:
    """Preallocated keys and values for every layer, for batched generation.

    Rows are left-padded so that all rows write at the same slot; `key_valid` marks
    which slots of each row hold real tokens (False for left padding).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_valid: torch.Tensor  # [batch, max_len] bool
    length: int = 0  # slots written so far

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        # Zeros, not empty: unwritten slots are masked out, but garbage there can be NaN,
        # and 0 * NaN in attention's weighted sum would still reach real rows.
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)],
            key_valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.key_valid.shape[1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` [B, kv_heads, T, D] in the next T slots (the caller advances
        `length` once all layers wrote); return the keys and values of every written slot."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (a LongTensor of row indices), e.g. when sequences finish."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.key_valid = self.key_valid.index_select(0, rows)


@dataclass
class DecodeSlot:
    """A `KVCache` as one compiled decode step sees it: views of its written slots plus
    the slot of the token being decoded (the last one), so attention reads exactly what
    eager decoding reads. The slot count is a dynamic dimension of the compiled graph:
    it grows every step without recompiling."""

    keys: list[torch.Tensor]  # [B, KV, L, D] views, L = written slots + 1
    values: list[torch.Tensor]
    key_valid: torch.Tensor  # [B, L]

    @classmethod
    def next_of(cls, cache: KVCache) -> "DecodeSlot":
        end = cache.length + 1
        return cls([k[:, :, :end] for k in cache.keys], [v[:, :, :end] for v in cache.values],
                   cache.key_valid[:, :end])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, -1:] = k
        values[:, :, -1:] = v
        return keys, values

    def mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, L] bool: the slots the new token may attend to."""
        allowed = self.key_valid
        if window is not None:
            slots = torch.arange(allowed.shape[1], device=allowed.device)
            allowed = allowed & (allowed.shape[1] - 1 - slots < window)
        return allowed[:, None, None, :]


def project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """Each layer applied to the same x. A layer type with a `forward_group` may run them
    as one (LoRA layers: one read of x for all their adapters, one input gradient)."""
    forward_group = getattr(type(layers[0]), "forward_group", None)
    out = forward_group(x, layers) if forward_group is not None else None
    return out if out is not None else tuple(layer(x) for layer in layers)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: KVCache | DecodeSlot | None = None, layer: int = 0):
        b, t, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = kernels.apply_rope(q.transpose(1, 2), cos, sin)
        k = kernels.apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        gqa = self.num_heads != self.num_kv_heads
        out = kernels.attention(q, k, v, mask, gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(*project(x, (self.gate_proj, self.up_proj))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# torch.nn.init's functions that module constructors call (nn.Linear, nn.Embedding).
_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")


@contextmanager
def skeleton():
    """Build modules on the meta device (no memory) without their random initialisation,
    for weights that are loaded next. On meta tensors torch's init runs its Python
    reference implementations, the first of which imports torch._dynamo: 2-5 s of every
    command that loads a model and trains nothing (generate, chat, eval, serve)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


class Decoder(nn.Module):
    """A decoder-only transformer. `forward` returns logits, or hidden states on request."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.compiled_layers: list | None = None  # both set by compile_layers()
        self.compiled_output = None
        self._rope_device = None
        self.reset_rope()

    # -- set-up ---------------------------------------------------------------------

    def reset_rope(self, device=None) -> None:
        """(Re)compute the RoPE tables in float32 on `device` (None: the CPU, also for a
        model built on the meta device; forward moves them to its inputs' device)."""
        device = torch.device("cpu") if device is None else device
        inv_freq = rope_inverse_frequencies(self.config, device)
        positions = torch.arange(self.config.max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # Plain attributes, not buffers: they are derived, never saved, and must stay
        # float32 when the model is cast to bf16.
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation for pre-training from scratch (GPT-2 style)."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, residual_std, generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def compile_layers(self, activation_budget: float = 1.0) -> None:
        """`torch.compile` each block and the output (norm, logits or log-probs), for the
        forwards without a KV cache (training and scoring); generation keeps the eager
        modules, whose cache length changes every step.

        Per block rather than the whole model: the blocks share one compiled graph, so
        compiling takes a fraction of the time and memory (the same step speed, measured
        on the pre-training benchmark), and the partitioner's
        `activation_budget` (the share of a block's activations kept for backward; the
        rest is recomputed inside the fused backward) applies per block. Measured on the
        LoRA benchmark (fp32, with the trainer's heap trim after the compiling step): 1.0
        (keep everything) takes the eager step's peak memory (1308 vs 1311 MiB), 0.5
        0.85x of it for a step about 8% slower.
        """
        import torch._functorch.config as functorch_config

        # Read when each graph is partitioned (at its first call), so set process-wide.
        functorch_config.activation_memory_budget = activation_budget
        # Not registered as submodules: the parameters stay owned by `self.layers`.
        self.compiled_layers = [torch.compile(block) for block in self.layers]
        self.compiled_output = torch.compile(self._output)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # -- forward --------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden: bool = False,
        last_token_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or hidden states [B, T, H]).

        position_ids: [B, T]; default 0..T-1 (or continuing the cache).
        document_ids: [B, T]; tokens attend only within their document (packing).
        cache: a `KVCache` to read and extend (generation); its `key_valid` must already
            mark the slots that this call writes.
        last_token_only: compute logits for the last position only (generation).
        targets: [B, T] token ids (IGNORE_INDEX where unused): return float32 log p(target)
            per position, computed in chunks so the full logits never exist. Asking the
            model (rather than reading `lm_head.weight` outside) keeps this inside
            forward, where DDP and FSDP2 expect every parameter to be used.
        """
        b, t = input_ids.shape
        device = input_ids.device
        if self.rope_cos.device != device:
            self.reset_rope(device)
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=device).expand(b, t)
        mask = self._attention_mask(b, t, device, document_ids, cache)
        x, cos, sin = self._embed(input_ids, position_ids)
        layers = self.compiled_layers if self.compiled_layers and cache is None else self.layers
        for i, block in enumerate(layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length = start + t
        if last_token_only:
            x = x[:, -1:]
        output = self.compiled_output if self.compiled_layers and cache is None else self._output
        return output(x, targets, output_hidden)

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    slot: DecodeSlot) -> torch.Tensor:
        """Logits [B, V] of one new token per row (input_ids, position_ids [B, 1]) written
        at the last slot of `slot`. Only the batch and the slot count vary, both dynamic
        dimensions, so `torch.compile` (the engine's `compile=True`) compiles it once."""
        x, cos, sin = self._embed(input_ids, position_ids)
        mask = slot.mask(self.config.sliding_window)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, slot, i)
        return self._output(x, None, False)[:, -1]

    def _embed(self, input_ids, position_ids):
        """Token embeddings and the RoPE cos / sin [B, 1, T, D] of their positions, in
        the compute dtype (autocast's, else the embedding's)."""
        cos = self.rope_cos[position_ids].unsqueeze(1)
        sin = self.rope_sin[position_ids].unsqueeze(1)
        x = self.embed_tokens(input_ids)
        device_type = input_ids.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        if x.dtype != cos.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return x, cos, sin

    def _output(self, x, targets, output_hidden):
        """The final norm, then log p(targets), hidden states or logits."""
        x = self.norm(x)
        if targets is not None:
            from graftlm.objectives.logprobs import token_logprobs
            return token_logprobs(x, self.lm_head.weight, targets)
        return x if output_hidden else self.lm_head(x)

    def _attention_mask(self, b, t, device, document_ids, cache):
        """"causal" (fast path), None (attend to every key) or a boolean mask [B, 1, T, S]
        (True = may attend)."""
        window = self.config.sliding_window
        start = cache.length if cache is not None else 0
        total = start + t
        needs_window = window is not None and total > window
        if cache is None and document_ids is None and not needs_window:
            return "causal"
        if cache is not None and document_ids is None and not needs_window:
            # Decoding fast paths (no mask tensors to build per step). One new token may
            # see every written slot of its row: only padding needs masking. A prefill
            # into an empty cache without padding is plain causal attention.
            valid = cache.key_valid[:, :total]
            if t == 1:
                return None if bool(valid.all()) else valid[:, None, None, :]
            if start == 0 and bool(valid.all()):
                return "causal"
        q_pos = torch.arange(start, total, device=device)
        k_pos = torch.arange(total, device=device)
        allowed = k_pos[None, :] <= q_pos[:, None]  # [T, S]
        if needs_window:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        allowed = allowed.unsqueeze(0)
        if document_ids is not None:
            allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
        if cache is not None:
            # A left-padding query may see no valid key at all; letting every query see
            # itself keeps its (ignored) output finite instead of NaN, and NaN in the
            # cache would leak into real rows through 0 * NaN in attention.
            allowed = (allowed & cache.key_valid[:, None, :total]) | (k_pos[None, :] == q_pos[:, None])
        return allowed.unsqueeze(1)

    # -- helpers --------------------------------------------------------------------

    def num_params(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total
