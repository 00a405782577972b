"""Activation checkpointing and torch.compile change how a step runs, not what it computes."""

import pytest

from tests.unit.test_trainer import build_trainer, train_losses


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    plain = build_trainer(tmp_path / "plain", max_steps=4, save_every=0)
    plain.fit()
    recomputed = build_trainer(tmp_path / "ckpt", max_steps=4, save_every=0, activation_checkpointing=True)
    assert recomputed.model.gradient_checkpointing
    recomputed.fit()
    want, got = train_losses(tmp_path / "plain"), train_losses(tmp_path / "ckpt")
    assert sorted(got) == [1, 2, 3, 4]
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path, monkeypatch):
    import graftlm.trainer
    trims = []  # the heap a compiling step fragments is trimmed once, after that step
    monkeypatch.setattr(graftlm.trainer, "release_freed_host_memory", lambda: trims.append(1))
    eager = build_trainer(tmp_path / "eager", max_steps=3, save_every=0)
    eager.fit()
    assert trims == []
    compiled = build_trainer(tmp_path / "compiled", max_steps=3, save_every=0, compile=True)
    compiled.fit()
    assert trims == [1]
    want, got = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(got) == [1, 2, 3]
    # Inductor fuses and reorders float32 arithmetic: close, not bitwise.
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_compiled_bf16_training_with_the_grouped_attention_backward_trains_like_eager(tmp_path):
    """bf16 autocast compiled: the blocks' attention backward is graftlm's grouped one
    (kernels.attention), not the flash kernel's; the losses follow eager bf16's within
    bf16 rounding."""
    from torch.profiler import profile

    options = dict(max_steps=4, save_every=0, precision="bf16-autocast", learnable=True)
    eager = build_trainer(tmp_path / "eager", **options)
    eager.fit()
    compiled = build_trainer(tmp_path / "compiled", compile=True, **options)
    with profile() as run:
        compiled.fit()
    ops = {event.name for event in run.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops  # the forward
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" not in ops
    want, got = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(got) == [1, 2, 3, 4]
    assert got == pytest.approx(want, rel=2e-2)
    assert got[4] < got[1]


def test_compiled_layers_serve_training_and_scoring_but_never_generation():
    """Generation's cache length changes every step: compiled blocks would recompile each
    step, so forwards with a KV cache must take the eager modules."""
    import torch

    from graftlm.engine import Engine, SamplingParams
    from graftlm.models.config import preset
    from graftlm.models.transformer import Decoder

    torch.manual_seed(0)
    model = Decoder(preset("tiny", vocab_size=128)).eval()
    greedy = SamplingParams(max_new_tokens=5, temperature=0, stop_ids=())
    [want] = Engine(model).generate([[1, 2, 3]], greedy)
    calls = []

    def recording(module):
        def forward(*args, **kwargs):
            calls.append(module)
            return module(*args, **kwargs)
        return forward

    model.compiled_layers = [recording(block) for block in model.layers]  # stand-ins, no compiling
    model.compiled_output = recording(model._output)
    [got] = Engine(model).generate([[1, 2, 3]], greedy)
    assert got.token_ids == want.token_ids and calls == []
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert len(calls) == len(model.layers) + 1


@pytest.mark.slow
def test_compiled_layers_take_a_second_shape():
    """A batch of another shape (the last, smaller one; validation) makes the compiled
    blocks and log-prob head dynamic: they must still trace, forward and backward."""
    import torch

    from graftlm.models.config import preset
    from graftlm.models.transformer import Decoder

    torch.manual_seed(0)
    model = Decoder(preset("tiny", vocab_size=128))
    model.compile_layers()
    for shape in ((4, 16), (3, 12)):
        ids = torch.randint(0, 128, shape)
        model(ids[:, :-1], targets=ids[:, 1:]).sum().backward()
        assert torch.isfinite(model.lm_head.weight.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_layers_compile_no_graph_per_width(monkeypatch, bf16):
    """GRPO/PPO rollouts, and SFT/DPO rows padded to the longest in their batch, change
    the width every step. After the first change the blocks and the head must be one
    dynamic graph per grad mode (training; the no-grad reference and pi_old passes), not
    a graph per width: the kernels' Python loops over rows specialized the row count,
    and a GRPO step took 20-140 s of compiling against 0.5 s eager."""
    import torch
    from torch._dynamo.utils import counters

    from graftlm.models.config import preset
    from graftlm.models.transformer import Decoder

    compile_ = torch.compile
    # aot_eager traces (and specializes) like inductor, forward and backward, in seconds.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend="aot_eager", **kwargs))
    torch._dynamo.reset()  # no graphs or dynamic-shape memory from earlier tests
    torch.manual_seed(0)
    model = Decoder(preset("tiny", vocab_size=128))
    model.compile_layers()

    def step(width):
        ids = torch.randint(0, 128, (4, width))
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                model(ids[:, :-1], targets=ids[:, 1:])
            model(ids[:, :-1], targets=ids[:, 1:]).sum().backward()

    try:
        for width in (20, 27):  # a static graph each, then the dynamic one
            step(width)
        graphs = counters["stats"]["unique_graphs"]
        # Up to 64 positions a row (one log-prob chunk, one attention group): no new graph.
        for width in (33, 41, 50, 64):
            step(width)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
