"""Rows of one batch using different adapters: `row_adapters(model, names)`.

Row i uses adapter `names[i]` (None: the base alone). Every adapter layer runs its
frozen base once on the whole batch and then each adapter only on its own rows: rows
are grouped by adapter once per call, each group's update is two skinny matmuls on the
gathered rows, scattered back with `index_add`. So a batch of k adapters costs one base
pass plus the adapters' own (small) work, and a row's output does not depend on which
other rows share the batch. Inputs are [B, ...] (e.g. [B, T, H] hidden states or
[B, T] token ids for an embedding trained in full).

When generation drops finished rows, call `row_adapters` again with the remaining
names: the number of names must equal the batch size of every forward inside.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from graftlm.errors import GraftError


class RowRouting:
    """Which rows use which adapter, with index tensors cached per device."""

    def __init__(self, names: list[str | None]):
        self.names = list(names)
        self._cache: dict = {}

    def groups(self, batch: int, device: torch.device, with_base: bool = False):
        """[(adapter name or None, row indices or None for "all rows")], base rows last.

        `with_base` includes the base-only rows as a group (for modules trained in full,
        whose output must be assembled from every group).
        """
        if batch != len(self.names):
            raise GraftError(f"row_adapters: {len(self.names)} adapter names for a batch of {batch} rows")
        key = (str(device), with_base)
        if key not in self._cache:
            by_name: dict[str | None, list[int]] = {}
            for row, name in enumerate(self.names):
                by_name.setdefault(name, []).append(row)
            if not with_base:
                by_name.pop(None, None)
            self._cache[key] = [
                (name, None if len(rows) == batch else torch.tensor(rows, dtype=torch.long, device=device))
                for name, rows in sorted(by_name.items(), key=lambda item: item[0] is None)]
        return self._cache[key]


@contextmanager
def row_adapters(model: nn.Module, names: list[str | None]):
    """Within the block, row i of every forward of `model` uses adapter names[i]."""
    from graftlm.adapters.inject import adapter_layers, layers_set, loaded_adapters
    known = set(loaded_adapters(model))
    for i, name in enumerate(names):
        if name is not None and name not in known:
            raise GraftError(f"row_adapters: row {i} asks for adapter '{name}', which is not loaded "
                             f"(loaded: {', '.join(sorted(known)) or 'none'})")
    layers = adapter_layers(model)
    if any(getattr(layer, "merged", None) is not None for layer in layers):
        raise GraftError("row_adapters: an adapter is merged into the base; call graftlm.adapters.unmerge(model) first")
    with layers_set(layers, "routing", RowRouting(names)):
        yield model
