"""Measure what the planner predicts: peak live tensor bytes, and counted FLOPs.

"Peak memory" in graftlm means the largest total size of live tensor storages at any
moment of a training step (forward, backward, optimizer step), counting everything the
process holds: weights, gradients, optimizer states, activations and temporaries. On a
GPU that is `torch.cuda.max_memory_allocated()` (minus the allocator's rounding); on a
CPU there is no allocator statistic, so `TensorMemoryTracker` keeps the same count
itself: a dispatch mode sees every tensor an operator returns, counts each storage once,
and a weak-reference callback subtracts it when the storage is freed. Tensors that exist
before the tracker starts (weights, optimizer states) are registered with `track()`.

Process RSS is not used: it includes the interpreter, libraries and the C allocator's
free lists, which swamp the tensors of a tiny model.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages created or registered while active."""

    def __init__(self):
        super().__init__()
        self._sizes: dict[int, int] = {}  # id of the storage's StorageImpl -> bytes
        self._refs: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0

    def _forget(self, key: int, _ref=None) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def track(self, *objects) -> None:
        """Count tensors that already exist (any nesting of lists, dicts, tensors)."""
        for obj in objects:
            for leaf in tree_leaves(obj):
                if isinstance(leaf, torch.Tensor):
                    self._add(leaf)

    def _add(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta" or getattr(tensor, "is_sparse", False):
            return
        if is_traceable_wrapper_subclass(tensor):
            # A tensor subclass (e.g. an NF4 weight) owns its bytes in inner tensors; its
            # own storage is a placeholder of the dense size.
            names, _ = tensor.__tensor_flatten__()
            for name in names:
                self._add(getattr(tensor, name))
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda ref, key=key: self._forget(key))
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out
