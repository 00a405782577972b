"""A seeded, resumable, rank-aware loader of micro-batches.

Design choices:
- One global stream of sample indices: epoch e is a permutation of 0..N-1 drawn from a
  generator seeded with `seed + e`, and epochs follow each other without a gap. Each
  micro-batch takes the next `world_size * batch_size` indices of that stream, and rank
  r keeps slice r of them. So every sample of an epoch is seen exactly once across
  ranks, every batch is full (a batch may straddle an epoch boundary), and all ranks
  share one position.
- The whole state is `(epoch, position)` in that stream, identical on every rank, so a
  checkpoint stores one small JSON mapping and resume is exact.
- The loader knows nothing about objectives: a dataset is `len()` and `[i] -> dict of
  tensors`, and may bring its own `collate(samples)` (padding for variable-length
  rows); the default stacks. The batch carries `sample_ids` so that the exactly-once
  property can be checked and bad batches named.
- Reuse (RL's `iterations`): a dataset with `reuse = (passes, block)` is served in
  blocks of `block` consecutive micro-batches, each block `passes` times in a row
  (B1..Bk, B1..Bk, ...). Every batch is still drawn from the stream exactly once, so
  no sample is skipped; the batch says which pass and slot it is (`reuse_pass`,
  `reuse_slot`), so the objective can reuse what it computed on pass 0. The block's
  indices are part of the state, so a resume mid-block serves the same batches.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from graftlm.errors import GraftError


class Dataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


def stack_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class ResumableLoader:
    """Endless micro-batches over `dataset` for one rank; `state_dict()` resumes exactly."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        self.dataset = dataset
        self.num_samples = len(dataset)
        if self.num_samples == 0:
            raise GraftError("the training data set has no samples (is the data shorter than one sequence?)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self.passes, self.block = getattr(dataset, "reuse", (1, 1))
        if self.passes < 1 or self.block < 1:
            raise ValueError(f"dataset reuse {dataset.reuse} must be (passes >= 1, block >= 1)")
        self.reuse_pass, self.reuse_slot = 0, 0
        self._block_indices: list[list[int]] = []  # global indices of the current block's batches
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    # -- the global index stream ------------------------------------------------------

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(self.num_samples, generator=gen)
            else:
                self._order = torch.arange(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def _take(self, count: int) -> list[int]:
        """The next `count` indices of the global stream, crossing epochs as needed."""
        out: list[int] = []
        while len(out) < count:
            order = self._epoch_order(self.epoch)
            take = min(count - len(out), self.num_samples - self.position)
            out.extend(order[self.position:self.position + take].tolist())
            self.position += take
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    # -- batches ------------------------------------------------------------------------

    def _next_indices(self) -> list[int]:
        if self.passes == 1:
            return self._take(self.world_size * self.batch_size)
        if self.reuse_pass == 0:
            self._block_indices.append(self._take(self.world_size * self.batch_size))
        return self._block_indices[self.reuse_slot]

    def next_batch(self) -> dict[str, torch.Tensor]:
        indices = self._next_indices()
        mine = indices[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        collate = getattr(self.dataset, "collate", stack_collate)
        batch = collate([self.dataset[i] for i in mine])
        batch["sample_ids"] = torch.tensor(mine, dtype=torch.long)
        if self.passes > 1:
            batch["reuse_pass"], batch["reuse_slot"] = self.reuse_pass, self.reuse_slot
            self.reuse_slot += 1
            if self.reuse_slot == self.block:
                self.reuse_slot, self.reuse_pass = 0, self.reuse_pass + 1
                if self.reuse_pass == self.passes:
                    self.reuse_pass, self._block_indices = 0, []
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def epoch_progress(self) -> float:
        """Epochs completed so far, fractional."""
        return self.epoch + self.position / self.num_samples

    # -- resume -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size,
                "world_size": self.world_size, "reuse_pass": self.reuse_pass, "reuse_slot": self.reuse_slot,
                "block_indices": self._block_indices}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            # Positions in another data set's permutation mean nothing here.
            raise GraftError(f"loader state is for {state['num_samples']} samples, the data set "
                             f"has {self.num_samples}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.reuse_pass, self.reuse_slot = int(state.get("reuse_pass", 0)), int(state.get("reuse_slot", 0))
        self._block_indices = [list(map(int, b)) for b in state.get("block_indices", [])]
        expected = self.block if self.reuse_pass else self.reuse_slot
        if (self.passes == 1 or self.reuse_pass >= self.passes or self.reuse_slot >= self.block
                or len(self._block_indices) != expected):
            # Saved with other reuse settings: start a fresh block where the stream stands.
            self.reuse_pass, self.reuse_slot, self._block_indices = 0, 0, []


def iterate_once(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Each sample once, in order, this rank's share (validation); the last batch may be short."""
    collate = getattr(dataset, "collate", stack_collate)
    indices = list(range(rank, len(dataset), world_size))
    for n, start in enumerate(range(0, len(indices), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        mine = indices[start:start + batch_size]
        batch = collate([dataset[i] for i in mine])
        batch["sample_ids"] = torch.tensor(mine, dtype=torch.long)
        yield batch
