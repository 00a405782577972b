"""Hand-written autograd Functions for the decoder's element-wise layers.

Design choices:
- Each Function computes exactly what the plain PyTorch composition computes in
  float32 (the same operations in the same order, so Hugging Face parity holds), but
  saves less for backward and makes fewer passes over memory. On the CPU these layers
  are memory-bound: every extra temporary is a pass, and every saved tensor is
  activation memory held until backward.
- RMSNorm saves its input and one float32 statistic per row (not float32 copies of the
  activation); it can write its output straight in the compute dtype, which under bf16
  autocast spares each following linear its own cast (and the matching cast-backward).
  The statistic is always float32; under autocast the big tensor never is. Its eager
  backward takes the rows in chunks whose float32 temporaries stay in L2 cache.
- RoPE saves nothing but the shared cos/sin tables: its backward is the rotation by
  the opposite angle, g·cos + rotate_halfᵀ(g·sin).
- SwiGLU saves the gate and up projections and recomputes silu in backward instead of
  keeping silu(gate) as a third activation.
- The chunked log-probabilities (`linear_logprobs`, behind objectives/logprobs.py) are
  one Function over all chunks: backward remakes a chunk's logits with one matmul and
  takes the gradient from softmax directly, where checkpointing each chunk replayed its
  whole forward (float copy, logsumexp) before autograd's own backward of it. With a
  frozen output weight (adapters) forward also makes d log p / d hidden per row, so
  backward is one scaling (the benchmarks' head, 2048 x 512 -> 8192 in bf16, forward +
  backward: 82 -> 60 ms).
- Measured and dropped: running q/k/v (and gate/up) as one matmul on concatenated
  weights saved no time on the CPU, neither in training (the concatenation every step
  costs what the fewer matmul calls save) nor in decoding with a concatenated copy
  kept (a decode step streams the same bytes of weights either way).
- Attention in bf16 training on the CPU (`attention`, causal or with a boolean mask
  such as packed rows' documents): the forward is PyTorch's flash kernel, the backward
  is written out per group of heads, whose [heads, S, S] scores stay in cache, because
  the flash kernel's backward is about 7x its forward here.
  In compiled blocks it is bmm calls with the softmax gradient as plain element-wise
  operations, which inductor fuses (pre-training benchmark's shape, 8 x 8 heads,
  S = 256: 28 -> 18 ms per layer forward + backward; S = 512: 76 -> 58 ms; up to 32
  groups, past which compiling is too slow). Eagerly, those ten element-wise passes
  over the scores cost what they save, so there p is remade by one softmax and its
  gradient is softmax's own backward, two fused ATen kernels (19 -> 12.7 ms at
  S = 256; 58 -> 44 ms at S = 512; slower than flash at S = 1024, where flash's
  skipping of masked blocks wins). Float32 (no bf16 matrix units) keeps SDPA. The
  softmax-remade form in compiled blocks too was slower there (the compiled LoRA step
  0.43 -> 0.46 s): inductor's exp(s − lse) beats its softmax.
- Also measured and dropped (bf16, the benchmarks' shapes): the causal eager backward
  split into query halves, the first half scoring only the first half of the keys
  (3/4 of the work; 8.8 -> 8.6 ms a layer: the extra calls cost what the masked
  quarter saved); RMSNorm's forward in cache-sized row chunks (0.56 vs 0.59 ms: a
  single pass already); the trained head's float32 weight-gradient sum over chunks in
  row pieces (-1.3 ms of 92); SwiGLU forward and backward in cache-sized row chunks
  (slower alone, paired A/B in the LoRA step -11 / +18 ms: noise); the eager attention
  backward's groups at 4, 8, 32 or 64 heads instead of 16 (+31, +19, -12, -4 ms: noise
  or worse).
- Without autograd (generation, reference forwards) the wrappers call the forward
  math directly: `Function.apply` costs tens of microseconds of Python per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

from graftlm.models.limits import EAGER_GROUPED_MAX_SEQ


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record this call. Inference (generation, reference and
    rollout forwards) skips `Function.apply` and its Python overhead: measured, about
    7% of a decode step of the 30M preset on the CPU."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _norm_chunk_rows(dim: int) -> int:
    """Rows per chunk of the eager RMSNorm backward: a float32 [rows, dim] of 512 KiB."""
    return max(1, 2**19 // (4 * dim))


def _rms_norm_forward(x, weight, eps, out_dtype):
    """(output, float32 rstd per row); shared by the autograd Function and inference."""
    if x.dtype in (torch.float32, torch.float64):
        # Hugging Face's exact operations, so float32 logits match bit for bit.
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (weight * (x * rstd)).to(out_dtype), rstd
    # bf16/fp16: one float32 copy, the statistic and both scalings made in it in place,
    # rounded once at the end (Hugging Face rounds x·rstd before the gain too: at most
    # one bf16 rounding apart).
    xf = x.float()
    sq = torch.linalg.vector_norm(xf, 2, dim=-1, keepdim=True)
    rstd = torch.rsqrt(sq.square_().div_(x.shape[-1]).add_(eps))
    return xf.mul_(rstd).mul_(weight).to(out_dtype), rstd


class _RMSNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        out, rstd = _rms_norm_forward(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        acc = rstd.dtype  # float32 (float64 in gradient checks)
        shape, dim = x.shape, x.shape[-1]
        need_x, need_weight = ctx.needs_input_grad[:2]
        x, grad, rstd = x.reshape(-1, dim), grad.reshape(-1, dim), rstd.reshape(-1, 1)
        gain = weight.to(acc)
        grad_x = torch.empty_like(x) if need_x else None
        grad_weight = torch.zeros(dim, dtype=acc, device=x.device) if need_weight else None
        # Eagerly, rows go in chunks whose float32 temporaries stay in L2 cache, where one
        # pass over [rows, H] in float32 per operation, into fresh full-size temporaries,
        # was slower (2048 x 512 in bf16, alone: 7.8 -> 1.9 ms; the LoRA bench's 16 norms,
        # profiled in the step: 96 -> 63 ms). Inductor fuses the chain itself, so a
        # compiled graph takes all rows at once, without a range over them: that made
        # dynamo specialize the row count, one graph per batch width.
        if torch.compiler.is_compiling():
            parts = [slice(0, x.shape[0])]
        else:
            step = _norm_chunk_rows(dim)
            parts = [slice(start, start + step) for start in range(0, x.shape[0], step)]
        for part in parts:
            r = rstd[part]
            normed = x[part].to(acc, copy=True).mul_(r)  # x̂ = x · rstd
            g = grad[part].to(acc, copy=True)
            if need_weight:
                # A sum over rows as ones @ rows: the CPU's column reduction is several times slower.
                grad_weight += g.new_ones(g.shape[0]) @ (g * normed)
            if need_x:
                g.mul_(gain)
                # d/dx of x·rstd applied to g: rstd · (g − x̂ · mean(g · x̂))
                mean = torch.linalg.vecdot(g, normed).unsqueeze(-1).div_(dim)
                grad_x[part] = g.sub_(normed.mul_(mean)).mul_(r)
        grad_x = grad_x.view(shape) if need_x else None
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        return grad_x, grad_weight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
             ) -> torch.Tensor:
    """weight · x / sqrt(mean(x²) + eps), normalised in float32 as Hugging Face does.

    out_dtype defaults to what `weight * x.to(x.dtype)` gives (the promoted dtype).
    """
    if out_dtype is None:
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if not _needs_grad(x, weight):
        return _rms_norm_forward(x, weight, eps, out_dtype)[0]
    return _RMSNorm.apply(x, weight, eps, out_dtype)


def _rope_forward(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if torch.compiler.is_compiling():
        # The same operations; inductor fuses them itself and cannot trace `out=` views.
        return torch.cat((x1 * cos[..., :half] - x2 * sin[..., :half],
                          x2 * cos[..., half:] + x1 * sin[..., half:]), dim=-1)
    # The tables repeat their first half (as the decoder makes them), so x·cos and x·sin
    # are one product each over whole rows; then each half takes the other's sine term.
    # The same roundings as rotate_half's form (x1·c − x2·s, x2·c + x1·s), in four
    # operations instead of six on half rows (bf16 [8, 8, 256, 64], forward + backward:
    # 2.75 -> 2.6 ms).
    out = x * cos
    x_sin = x * sin
    out[..., :half] -= x_sin[..., half:]
    out[..., half:] += x_sin[..., :half]
    return out


class _Rope(Function):
    """x·cos + rotate_half(x)·sin on [..., T, D] with tables broadcast over heads."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_forward(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        g1, g2 = grad[..., :half], grad[..., half:]
        if torch.compiler.is_compiling():
            return torch.cat((g1 * cos[..., :half] + g2 * sin[..., half:],
                              g2 * cos[..., half:] - g1 * sin[..., :half]), dim=-1), None, None
        # The transpose of rotate_half maps [a, b] to [b, -a]; tables as in the forward.
        out = grad * cos
        g_sin = grad * sin
        out[..., :half] += g_sin[..., half:]
        out[..., half:] -= g_sin[..., :half]
        return out, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, H, T, D] by cos, sin [B, 1, T, D] (no gradient to the
    tables), whose two halves along D are equal, as the decoder's tables are."""
    if not _needs_grad(x):
        return _rope_forward(x, cos, sin)
    return _Rope.apply(x, cos, sin)


def _swiglu_forward(gate, up):
    act = F.silu(gate)
    return act.mul_(up) if act.dtype == up.dtype else act * up


class _SwiGLU(Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, saving only gate and up for backward."""
    if not _needs_grad(gate, up):
        return _swiglu_forward(gate, up)
    return _SwiGLU.apply(gate, up)


# Group size: each group's float32 scores [group, S, S] take at most 2 MiB (cache-sized).
_SCORE_ELEMENTS_PER_GROUP = 2**19
# Past this many groups the unrolled backward compiles too slowly (S = 512, 8 x 8 heads:
# 32 groups, 21 s) for what it saves; longer sequences keep the flash backward.
_MAX_GROUPS = 32


# Eagerly: each group's bf16 scores take at most 2 MiB, and the grouped backward is used up
# to EAGER_GROUPED_MAX_SEQ (models/limits.py: the planner counts its extra FLOPs by it too).
_EAGER_SCORE_ELEMENTS_PER_GROUP = 2**20


def _score_groups(heads: int, seq: int) -> int:
    return -(-heads // max(1, _SCORE_ELEMENTS_PER_GROUP // (seq * seq)))


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `allowed`, -inf elsewhere: a boolean mask as a bias added to the scores."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class _GroupedAttention(Function):
    """softmax(q kᵀ / √d + mask) v: the flash kernel forward, a grouped backward.

    `allowed` is None for the causal mask, else a boolean [B or 1, 1, S, S] (True = may
    attend): packed rows' document masks, sliding windows.
    """

    @staticmethod
    def forward(ctx, q, k, v, allowed):
        additive = None
        if allowed is not None:
            additive = _additive_mask(allowed, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, allowed is None, attn_mask=additive)[:2]
        ctx.save_for_backward(q, k, v, out, lse, allowed)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, allowed = ctx.saved_tensors
        b, h, s, d = q.shape
        n = b * h
        q, k, v, grad = (t.reshape(n, s, d) for t in (q, k, v, grad))
        if allowed is None:
            allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        else:  # one [S, S] mask per (row, head)
            allowed = allowed.expand(b, h, s, s).reshape(n, s, s)
        if torch.compiler.is_compiling():
            grads = _fused_backward(q, k, v, grad, out.reshape(n, s, d), lse.reshape(n, s, 1), allowed)
        else:
            grads = _softmax_backward(q, k, v, grad, allowed)
        return *(g.view(b, h, s, d) for g in grads), None


def _fused_backward(q, k, v, grad, out, lse, allowed):
    """The backward for inductor to fuse: p from the forward's log-sum-exp, the softmax
    gradient as plain float32 element-wise operations between the bmm calls."""
    n, s, d = q.shape
    scale = d ** -0.5
    # Σ_j p_ij dp_ij = dO_i · O_i, one float per query row.
    delta = (grad.float() * out.float()).sum(-1, keepdim=True)
    group = -(-n // _score_groups(n, s))
    grads = [], [], []
    for start in range(0, n, group):
        rows = slice(start, start + group)
        scores = torch.bmm(q[rows], k[rows].transpose(1, 2)).float() * scale - lse[rows]
        # `where`, not masked exp: a query that may attend to nothing gets zeros, not NaN.
        p = torch.where(allowed if allowed.dim() == 2 else allowed[rows], scores.exp(), 0.0)
        dp = torch.bmm(grad[rows], v[rows].transpose(1, 2)).float()
        ds = ((dp - delta[rows]) * p * scale).to(q.dtype)
        grads[0].append(torch.bmm(ds, k[rows]))
        grads[1].append(torch.bmm(ds.transpose(1, 2), q[rows]))
        grads[2].append(torch.bmm(p.to(q.dtype).transpose(1, 2), grad[rows]))
    return [torch.cat(g) for g in grads]


def _softmax_backward(q, k, v, grad, allowed):
    """The eager backward: per group of heads, p remade by one softmax and its gradient
    by softmax's own backward, each one fused ATen kernel (float32 inside, bf16 out),
    where each element-wise step as its own operation was another pass over the scores.
    Every query must see at least one key (else softmax gives NaN; `attention` checks)."""
    n, s, d = q.shape
    scale = d ** -0.5
    # The mask as an additive bias that the scores' matmul starts from (baddbmm), where a
    # masked_fill_ after it was one more pass over the scores (16 x 256 x 256: 0.84 -> 0.64 ms).
    bias = _additive_mask(allowed, q.dtype)
    grad_q, grad_k, grad_v = (torch.empty_like(q) for _ in range(3))
    group = max(1, _EAGER_SCORE_ELEMENTS_PER_GROUP // (s * s))
    for start in range(0, n, group):
        rows = slice(start, start + group)
        q_scaled = q[rows] * scale
        scores = torch.baddbmm(bias if bias.dim() == 2 else bias[rows], q_scaled, k[rows].transpose(1, 2))
        p = torch.softmax(scores, -1)
        dp = torch.bmm(grad[rows], v[rows].transpose(1, 2))
        ds = torch.ops.aten._softmax_backward_data(dp, p, -1, q.dtype)
        torch.bmm(ds, k[rows], out=grad_q[rows]).mul_(scale)
        torch.bmm(ds.transpose(1, 2), q_scaled, out=grad_k[rows])
        torch.bmm(p.transpose(1, 2), grad[rows], out=grad_v[rows])
    return grad_q, grad_k, grad_v


def _grouped_backward_pays(mask: str | torch.Tensor, heads: int, seq: int) -> bool:
    """Whether `_GroupedAttention` beats the flash kernel's backward here."""
    if torch.compiler.is_compiling():
        return _score_groups(heads, seq) <= _MAX_GROUPS
    # Eagerly every group's scores are made whole, the masked half included, so past
    # S = 512 the flash kernel's skipping of masked blocks wins (8 x 8 heads of 64, bf16,
    # forward + backward: S = 256, 19 -> 12.7 ms; 512, 58 -> 44 ms; 1024, 139 -> 169 ms).
    return seq <= EAGER_GROUPED_MAX_SEQ and (isinstance(mask, str) or bool(mask.any(-1).all()))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str | torch.Tensor | None,
              enable_gqa: bool) -> torch.Tensor:
    """Scaled-dot-product attention of q [B, H, T, D] over k, v [B, H_kv, S, D]; `mask` is
    "causal", None (attend to all) or a boolean [B or 1, 1, T, S] (True = may attend)."""
    b, h, s, _ = q.shape
    grouped_mask = isinstance(mask, str) or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool)
    if (grouped_mask and q.device.type == "cpu" and q.dtype == torch.bfloat16 and _needs_grad(q, k, v)
            and k.shape[2] == s and _grouped_backward_pays(mask, b * h, s)):
        if enable_gqa:  # the expansion's backward sums each kv head's gradient over its queries
            k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
        return _GroupedAttention.apply(q, k, v, None if isinstance(mask, str) else mask)
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


class _Chunk:
    """One chunk's log-probabilities and logit gradients, each from a fresh matmul.

    Eagerly, every chunk writes into the same buffers (logits in the compute dtype, a
    float32 copy, a float32 scratch) through `out=` ops. A fresh [rows, vocab] tensor per
    op and chunk costs more than the op itself on a CPU: new pages fault in, and the
    tensor is cold in cache (measured on the benchmarks' head, 2048 x 512 -> 8192 in
    bf16, forward + backward: 83–92 -> 69 ms frozen, 135–144 -> 125 ms trained). Under
    torch.compile the plain ops are traced instead: inductor plans its own buffers, and
    `out=` views of a dynamic size cannot be traced.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, acc: torch.dtype, device: torch.device):
        self.acc = acc
        self.buffered = not torch.compiler.is_compiling()
        self.weight_part = None  # the compute-dtype weight-gradient product, made at first use
        if self.buffered:
            self.logits = torch.empty(rows, vocab, dtype=dtype, device=device)
            self.acc_logits = self.logits if dtype == acc else torch.empty(rows, vocab, dtype=acc, device=device)
            self.scratch = torch.empty(rows, vocab, dtype=acc, device=device)

    def _logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden Wᵀ in the accumulation dtype (in the buffers: a view of their first rows)."""
        rows = hidden.shape[0]
        logits = torch.mm(hidden, weight.t(), out=self.logits[:rows])
        return logits if self.acc_logits is self.logits else self.acc_logits[:rows].copy_(logits)

    def _log_softmax(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """log_softmax(hidden Wᵀ) [rows, vocab] in the accumulation dtype (eagerly: in the scratch)."""
        if not self.buffered:
            return torch.log_softmax(hidden @ weight.t(), -1, dtype=self.acc)
        logits = self._logits(hidden, weight)
        return torch.log_softmax(logits, -1, out=self.scratch[:logits.shape[0]])

    def _in_compute_dtype(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t [rows, vocab] from the accumulation dtype into `dtype` (eagerly: the logits buffer)."""
        if not self.buffered:
            return t.to(dtype)
        return t if self.acc_logits is self.logits else self.logits[:t.shape[0]].copy_(t)

    def logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets) [rows] in the accumulation dtype."""
        return self._log_softmax(hidden, weight).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def logprobs_and_grad_hidden(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(targets) [rows] in the accumulation dtype, d log p(targets) / d hidden
        [rows, H] in hidden's dtype): the latter is (onehot(target) − p) W, made from this
        chunk's log-probs while they are at hand. `out`: where the latter goes (buffered)."""
        index = targets.unsqueeze(-1)
        logp = self._log_softmax(hidden, weight)
        picked = logp.gather(-1, index)
        onehot_minus_p = logp.exp_().neg_().scatter_add_(-1, index, torch.ones_like(picked))
        return picked.squeeze(-1), torch.mm(self._in_compute_dtype(onehot_minus_p, hidden.dtype), weight, out=out)

    def grad_logits(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    grad: torch.Tensor) -> torch.Tensor:
        """d(grad · log p(targets)) / d logits [rows, vocab] in hidden's dtype:
        grad · (onehot(target) − softmax(logits))."""
        g = grad.unsqueeze(-1)
        if not self.buffered:
            out = torch.softmax(hidden @ weight.t(), -1, dtype=self.acc)
        else:
            logits = self._logits(hidden, weight)
            out = torch.softmax(logits, -1, out=self.scratch[:logits.shape[0]])
        out.mul_(g.neg()).scatter_add_(-1, targets.unsqueeze(-1), g)
        return self._in_compute_dtype(out, hidden.dtype)

    def add_weight_grad(self, total: torch.Tensor | None, grad_logits: torch.Tensor,
                        hidden: torch.Tensor) -> torch.Tensor:
        """total + grad_logitsᵀ hidden, summed over the chunks in the accumulation dtype
        (eagerly in place, the compute-dtype product in a buffer made once)."""
        if not self.buffered:
            part = (grad_logits.t() @ hidden).to(self.acc)
            return part if total is None else total + part
        if total is None:
            total = torch.zeros(grad_logits.shape[1], hidden.shape[1], dtype=self.acc, device=hidden.device)
        if hidden.dtype == self.acc:
            return total.addmm_(grad_logits.t(), hidden)
        if self.weight_part is None:
            self.weight_part = torch.empty(total.shape, dtype=hidden.dtype, device=hidden.device)
        return total.add_(torch.mm(grad_logits.t(), hidden, out=self.weight_part))


def _row_chunks(rows, chunk_size: int) -> list[slice]:
    """Slices of `chunk_size` rows covering `rows`. Counted as ceil(rows / chunk_size) so
    that in a compiled graph dynamo guards on that count alone: `range(0, rows, step)`
    made it specialize the row count, one graph per batch width (GRPO's rollouts)."""
    return [slice(i * chunk_size, (i + 1) * chunk_size) for i in range(-(-rows // chunk_size))]


class _LinearLogprobs(Function):
    """log_softmax(hidden Wᵀ)[target] in chunks of rows, as one Function.

    With a trained W it saves only hidden, W and the targets: each chunk's [rows, vocab]
    logits are made again in backward (one matmul), where softmax gives the gradient
    directly (onehot − p), instead of replaying the whole forward as checkpointing would.

    With a frozen W (adapters, a frozen head) only hidden needs a gradient, and each row's
    log-prob depends on its own hidden state alone: the gradient of row i is
    grad_i · (onehot − p_i) W, so forward makes (onehot − p) W [N, H] from the chunk's
    softmax while it is at hand, and backward only scales its rows by the incoming
    gradient. That spares backward a logits matmul, a softmax and a float32 pass per
    chunk, and saves [N, H] instead of hidden (the same size).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 in tests
        chunk = _Chunk(min(chunk_size, targets.numel()), weight.shape[0], hidden.dtype, acc, hidden.device)
        chunks = _row_chunks(targets.numel(), chunk_size)
        ctx.chunk_size = chunk_size
        ctx.grad_made_in_forward = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        if ctx.grad_made_in_forward:
            d_hidden = torch.empty_like(hidden) if chunk.buffered else None
            parts = [chunk.logprobs_and_grad_hidden(hidden[rows], weight, targets[rows],
                                                    None if d_hidden is None else d_hidden[rows])
                     for rows in chunks]
            ctx.save_for_backward(d_hidden if chunk.buffered else torch.cat([part[1] for part in parts]))
            return torch.cat([part[0] for part in parts])
        ctx.save_for_backward(hidden, weight, targets)
        return torch.cat([chunk.logprobs(hidden[rows], weight, targets[rows]) for rows in chunks])

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_made_in_forward:  # frozen W: d log p / d hidden was made in forward
            (d_hidden,) = ctx.saved_tensors
            return (d_hidden * grad.unsqueeze(-1)).to(d_hidden.dtype), None, None, None
        hidden, weight, targets = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        acc = grad.dtype
        chunk = _Chunk(min(ctx.chunk_size, targets.numel()), weight.shape[0], hidden.dtype, acc, hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden and chunk.buffered else None
        hidden_parts, grad_weight = [], None
        for rows in _row_chunks(targets.numel(), ctx.chunk_size):
            grad_logits = chunk.grad_logits(hidden[rows], weight, targets[rows], grad[rows])
            if want_hidden and chunk.buffered:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            elif want_hidden:
                hidden_parts.append(grad_logits @ weight)
            if want_weight:
                grad_weight = chunk.add_weight_grad(grad_weight, grad_logits, hidden[rows])
        if want_hidden and not chunk.buffered:
            grad_hidden = torch.cat(hidden_parts)
        return grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    chunk_size: int) -> torch.Tensor:
    """log p(targets) [N] float32 for hidden [N, H], output weight [V, H], targets [N]
    (all valid ids), with only one chunk's logits alive at a time, forward or backward.

    Computes in the autocast dtype when autocast is on (as F.linear would), else in
    hidden's dtype.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return _LinearLogprobs.apply(hidden, weight, targets, chunk_size)
