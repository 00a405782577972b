"""The resumable, rank-aware loader: exactly once per epoch, new shuffles, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graftlm.data.loader import ResumableLoader, iterate_once
from graftlm.errors import GraftError
from graftlm.objectives.clm import TokenWindows


class Numbers:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.tensor([i])}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_exactly_once_per_epoch_across_ranks_and_epoch_boundaries(world_size):
    n, batch, accum, steps = 37, 3, 2, 20  # batches straddle epoch boundaries
    loaders = [ResumableLoader(Numbers(n), batch, seed=5, rank=r, world_size=world_size)
               for r in range(world_size)]
    stream = []  # the global order: micro-batch by micro-batch, rank by rank
    for _ in range(steps * accum):
        for loader in loaders:
            b = loader.next_batch()
            assert b["x"].squeeze(1).tolist() == b["sample_ids"].tolist()
            stream.extend(b["sample_ids"].tolist())
    epochs = [stream[i:i + n] for i in range(0, len(stream) - n + 1, n)]
    assert len(epochs) >= 3
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]  # a new shuffle each epoch
    assert {l.epoch for l in loaders} == {loaders[0].epoch}  # ranks share one position


def test_state_dict_resumes_the_same_stream():
    a = ResumableLoader(Numbers(23), 4, seed=1, rank=1, world_size=2)
    for _ in range(7):
        a.next_batch()
    b = ResumableLoader(Numbers(23), 4, seed=1, rank=1, world_size=2)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert a.next_batch()["sample_ids"].tolist() == b.next_batch()["sample_ids"].tolist()


def test_epoch_seed_is_seed_plus_epoch():
    loader = ResumableLoader(Numbers(10), 10, seed=3)
    first = loader.next_batch()["sample_ids"]
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    assert first.tolist() == expected.tolist()
    second = loader.next_batch()["sample_ids"]
    assert second.tolist() == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()


def test_resume_into_another_data_set_is_refused():
    a = ResumableLoader(Numbers(10), 2)
    with pytest.raises(GraftError, match="10 samples"):
        ResumableLoader(Numbers(11), 2).load_state_dict(a.state_dict())


def test_iterate_once_covers_each_sample_once_across_ranks():
    seen = []
    for rank in range(3):
        for b in iterate_once(Numbers(11), 2, rank=rank, world_size=3):
            seen.extend(b["sample_ids"].tolist())
    assert sorted(seen) == list(range(11))


def test_token_windows_cover_every_token_once():
    tokens = np.arange(1, 42, dtype=np.uint16)  # 41 tokens -> 5 windows of 8 (+1 shared)
    windows = TokenWindows(tokens, 8)
    assert len(windows) == 5
    labels = torch.cat([windows[i]["labels"] for i in range(len(windows))])
    assert labels.tolist() == list(range(2, 42))
    assert torch.equal(windows[1]["input_ids"], torch.arange(9, 17))


def test_document_mask_restarts_positions_and_masks_eos_targets():
    eos = 0
    tokens = np.array([5, 6, eos, 7, 8, 9, eos, 3, 4], dtype=np.uint16)
    w = TokenWindows(tokens, 8, eos_id=eos, document_mask=True)[0]
    assert w["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert w["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert w["labels"].tolist() == [6, 0, -100, 8, 9, 0, -100, 4]
