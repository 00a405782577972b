"""graftlm.models.kernels: each autograd Function against the plain PyTorch composition
(float64 gradient checks, float32 equality, bf16 autocast closeness)."""

import pytest
import torch
import torch.nn.functional as F

from graftlm.models import kernels


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _plain_rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _plain_rms_norm(x, weight, eps):
    xf = x.float() if x.dtype != torch.float64 else x
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _plain_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def _tables(batch, seq, dim, dtype):
    """cos/sin tables shaped as the decoder gathers them: [B, 1, T, D], halves repeated."""
    freqs = torch.rand(batch, 1, seq, dim // 2, dtype=torch.float64) * 6
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _grads(fn, *inputs, frozen=()):
    """fn's output and the gradients of its floating-point inputs (but those at the
    positions in `frozen`, which get none) for a fixed, uneven upstream gradient."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point() and i not in frozen)
              for i, t in enumerate(inputs)]
    out = fn(*inputs)
    out.backward(torch.ones_like(out) if out.ndim == 0 else torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return out, [t.grad for t in inputs if t.requires_grad]


def test_rope_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
    cos, sin = _tables(2, 5, 8, torch.float64)
    assert torch.autograd.gradcheck(lambda x: kernels.apply_rope(x, cos, sin), (x,))


def test_rope_equals_composition_float32_and_bf16():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 7, 4, 16, generator=g).to(dtype).transpose(1, 2)  # [B, H, T, D] view
        cos, sin = _tables(2, 7, 16, dtype)
        got, (got_grad,) = _grads(lambda x: kernels.apply_rope(x, cos, sin), x)
        want, (want_grad,) = _grads(lambda x: _plain_rope(x, cos, sin), x)
        assert torch.equal(got, want)
        tol = 0 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got_grad, want_grad, atol=tol * 4, rtol=tol)


def test_swiglu_gradcheck_and_equality():
    g = torch.Generator().manual_seed(2)
    gate = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(kernels.swiglu, (gate, up))
    gate32, up32 = gate.float().detach(), up.float().detach()
    got, got_grads = _grads(kernels.swiglu, gate32, up32)
    want, want_grads = _grads(lambda a, b: F.silu(a) * b, gate32, up32)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.fixture(params=["one chunk", "uneven chunks"])
def norm_chunks(request, monkeypatch):
    """The eager backward of RMSNorm in one chunk of rows, or in chunks of 7 rows with a
    shorter last one (the real size holds far more rows than these tests have)."""
    if request.param == "uneven chunks":
        monkeypatch.setattr(kernels, "_norm_chunk_rows", lambda dim: 7)


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 3, 4, 6)])
def test_rms_norm_gradcheck_float64(shape, norm_chunks):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(shape[-1], dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: kernels.rms_norm(x, w, 1e-6), (x, w))


def test_rms_norm_float32_is_hugging_face_exact(norm_chunks):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(4, 9, 32, generator=g), torch.randn(32, generator=g)
    got, got_grads = _grads(lambda x, w: kernels.rms_norm(x, w, 1e-5), x, w)
    want, want_grads = _grads(lambda x, w: _plain_rms_norm(x, w, 1e-5), x, w)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rms_norm_bf16_under_autocast_matches_float64(norm_chunks):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 128, generator=g).bfloat16()
    w = torch.randn(128, generator=g) * 0.1 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = _grads(lambda x, w: kernels.rms_norm(x, w, 1e-6, torch.bfloat16), x, w)
    want, want_grads = _grads(lambda x, w: _plain_rms_norm(x, w, 1e-6), x.double(), w.double())
    assert got.dtype == torch.bfloat16 and got_grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=1e-2)
    for a, b in zip(got_grads, want_grads):
        scale = b.abs().max()
        assert (a.double() - b).abs().max() <= 1e-2 * scale


# A frozen weight (adapters) takes the path that makes d log p / d hidden in forward.
@pytest.mark.parametrize("weight_trained", [True, False], ids=["trained-head", "frozen-head"])
def test_linear_logprobs_gradcheck_float64_across_chunks(weight_trained):
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=weight_trained)
    targets = torch.randint(0, 11, (7,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: kernels.linear_logprobs(h, w, targets, 3), (hidden, weight))


@pytest.mark.parametrize("weight_trained", [True, False], ids=["trained-head", "frozen-head"])
def test_linear_logprobs_float32_and_autocast_match_composition(weight_trained):
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(10, 16, generator=g), torch.randn(40, 16, generator=g) * 0.3
    targets = torch.randint(0, 40, (10,), generator=g)
    frozen = () if weight_trained else (1,)
    got, got_grads = _grads(lambda h, w: kernels.linear_logprobs(h, w, targets, 4), hidden, weight, frozen=frozen)
    want, want_grads = _grads(lambda h, w: _plain_logprobs(h, w, targets), hidden, weight, frozen=frozen)
    assert len(got_grads) == len(want_grads) == 2 - len(frozen)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = _grads(lambda h, w: kernels.linear_logprobs(h, w, targets, 4), hidden, weight, frozen=frozen)
        want, want_grads = _grads(lambda h, w: _plain_logprobs(h, w, targets), hidden, weight, frozen=frozen)
    assert got.dtype == torch.float32 and all(grad.dtype == torch.float32 for grad in got_grads)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)



@pytest.mark.slow  # compiles
@pytest.mark.parametrize("weight_trained", [True, False], ids=["trained-head", "frozen-head"])
def test_compiled_linear_logprobs_match_eager(weight_trained):
    # Under torch.compile the chunks run as plain ops (no buffers); two batch sizes, so
    # the second call runs a dynamic graph.
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(40, 16, generator=g) * 0.3
    frozen = () if weight_trained else (1,)
    compiled = torch.compile(kernels.linear_logprobs)
    for rows in (10, 7):
        hidden, targets = torch.randn(rows, 16, generator=g), torch.randint(0, 40, (rows,), generator=g)
        got, got_grads = _grads(lambda h, w: compiled(h, w, targets, 4), hidden, weight, frozen=frozen)
        want, want_grads = _grads(lambda h, w: kernels.linear_logprobs(h, w, targets, 4), hidden, weight, frozen=frozen)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert len(got_grads) == 2 - len(frozen)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

def test_decoder_training_gradients_match_plain_composition():
    """The whole decoder with kernels vs the same decoder with plain functions swapped in."""
    from graftlm.models.config import ModelConfig
    from graftlm.models.transformer import Decoder
    torch.manual_seed(8)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=16)
    model = Decoder(cfg)
    model.init_weights(torch.Generator().manual_seed(8))
    ids = torch.randint(0, 64, (2, 16))
    targets = ids.roll(-1, 1)

    def loss_and_grads():
        model.zero_grad()
        loss = -model(ids, targets=targets).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    got = loss_and_grads()
    plain = dict(apply_rope=_plain_rope, swiglu=lambda a, b: F.silu(a) * b,
                 rms_norm=lambda x, w, eps, dtype=None: _plain_rms_norm(x, w, eps),
                 linear_logprobs=lambda h, w, t, chunk: _plain_logprobs(h, w, t))
    saved = {name: getattr(kernels, name) for name in plain}
    try:
        for name, fn in plain.items():
            setattr(kernels, name, fn)
        import graftlm.objectives.logprobs as logprobs
        saved_lp, logprobs.linear_logprobs = logprobs.linear_logprobs, plain["linear_logprobs"]
        want = loss_and_grads()
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)
        logprobs.linear_logprobs = saved_lp
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _document_mask(length: int) -> torch.Tensor:
    """Packed rows' mask [2, 1, S, S]: causal within documents of 3 uneven lengths."""
    documents = torch.stack([torch.arange(length) * 3 // length, (torch.arange(length) + length // 5) * 3 // length])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :])).unsqueeze(1)


@pytest.mark.parametrize("run", ["compiled", "eager"])
@pytest.mark.parametrize("kv_heads, masked", [(4, False), (2, False), (4, True)])
def test_attention_backward_matches_float64(kv_heads, masked, run):
    """In bf16 training on the CPU, attention's backward is graftlm's grouped one, not the
    flash kernel's, and its gradients are as close to float64 as flash's: causal, with
    GQA, and with packed rows' document mask. Compiled: bmm with the softmax gradient for
    inductor to fuse (2 x 4 heads of S = 512 make 4 groups of 2). Eager: softmax and its
    backward remade per group (2 groups of 4)."""
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 512, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 512, 16, generator=g, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(2, 4, 512, 16, generator=g, dtype=torch.float64)
    gqa = kv_heads != 4
    mask = _document_mask(512) if masked else "causal"

    def sdpa(q, k, v):
        if masked:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def grads(fn, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        (fn(*inputs).double() * grad_out).sum().backward()
        return [t.grad.double() for t in inputs]

    exact = grads(sdpa, torch.float64)

    def errors(fn):
        return [((got - e).abs().max() / e.abs().max()).item() for got, e in zip(grads(fn, torch.bfloat16), exact)]

    flash = errors(sdpa)
    if run == "compiled":
        compiled = torch.compile(lambda q, k, v: kernels.attention(q, k, v, mask, gqa), fullgraph=True)
        grouped, codes = run_and_get_code(lambda: errors(compiled))
        assert "flash_attention_for_cpu_backward" not in "\n".join(codes)
        assert "flash_attention_for_cpu" in "\n".join(codes)  # the forward is the flash kernel
    else:
        with torch.profiler.profile() as prof:
            grouped = errors(lambda q, k, v: kernels.attention(q, k, v, mask, gqa))
        ops = {e.key for e in prof.key_averages()}
        assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" not in ops
        assert "aten::_softmax_backward_data" in ops
    for mine, theirs in zip(grouped, flash):
        assert mine < 2 * theirs, (grouped, flash)


def test_eager_attention_keeps_flash_for_a_query_that_sees_nothing():
    """Softmax over a row with no allowed key is NaN: such a mask keeps the flash kernel."""
    mask = torch.ones(1, 1, 256, 256, dtype=torch.bool).tril()
    mask[..., 5, :] = False
    q, k, v = (torch.randn(1, 2, 256, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.profiler.profile() as prof:
        kernels.attention(q, k, v, mask, False).float().nan_to_num().sum().backward()
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in {e.key for e in prof.key_averages()}


def test_grouped_attention_backward_gives_zeros_to_a_query_that_sees_nothing():
    mask = torch.ones(1, 1, 256, 256, dtype=torch.bool).tril()
    mask[..., 5, :] = False
    q, k, v = (torch.randn(1, 2, 256, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: kernels.attention(q, k, v, mask, False), fullgraph=True)
    compiled(q, k, v).float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, 5] == 0).all()


def test_grouped_attention_backward_does_not_recompile_per_length():
    """Batches of changing length (DPO pads to each batch's longest) make one dynamic
    graph after the first change, not a graph per length."""
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(lambda q, k, v: kernels.attention(q, k, v, "causal", False).sin(), backend=counting)
    for length in (256, 192, 128, 160, 96, 224):
        q, k, v = (torch.randn(2, 4, length, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        compiled(q, k, v).sum().backward()
    assert len(graphs) == 2
