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
def test_compiled_model_trains_like_eager(tmp_path):
    eager = build_trainer(tmp_path / "eager", max_steps=3, save_every=0)
    eager.fit()
    compiled = build_trainer(tmp_path / "compiled", max_steps=3, save_every=0, compile=True)
    compiled.fit()
    want, got = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(got) == [1, 2, 3]
    # Inductor fuses and reorders float32 arithmetic: close, not bitwise.
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
