"""`graft <argv>` as torchrun launches it, plus one thing: before the process group
closes, every rank hashes its own copy of the trained weights, and rank 0 writes the
hashes to $GRAFTLM_TEST_DIGESTS as JSON (`{"policy": [rank0, rank1], "critic": [...]}`).

Under DDP every rank holds a full replica of the policy (and PPO's critic is a plain
module on every rank), so equal hashes mean the ranks really trained one model. It
wraps the real command: only `Trainer` (to find the model) and `parallel.shutdown`
(to hash before the group closes) are patched.

Usage: python -m torch.distributed.run ... tests/distributed/rank_digest.py <graft argv>
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

from graftlm import parallel, runs
from graftlm.cli import main

_trainers = []


class RecordingTrainer(runs.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _trainers.append(self)


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        # QLoRA's NF4 weights: their packed inner tensors, bit for bit.
        parts = ([getattr(tensor, inner) for inner in tensor.__tensor_flatten__()[0]]
                 if type(tensor).__name__ == "NF4Tensor" else [tensor])
        h.update(name.encode())
        for part in parts:
            h.update(part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_shutdown = parallel.shutdown


def hashing_shutdown(d: parallel.Dist) -> None:
    trainer = _trainers[-1]
    mine = {"policy": digest(trainer.model)}
    critic = getattr(trainer.objective, "critic", None)
    if critic is not None:
        mine["critic"] = digest(critic)
    gathered = [None] * d.world_size
    dist.all_gather_object(gathered, mine)
    if d.is_main:
        out = {key: [g[key] for g in gathered] for key in mine}
        with open(os.environ["GRAFTLM_TEST_DIGESTS"], "w") as f:
            json.dump(out, f)
    # As run_training does: nothing that holds the group's pending work may outlive it
    # (kept until interpreter exit, gloo's threads free it there and can abort the rank).
    del trainer, critic
    _trainers.clear()
    gc.collect()
    _shutdown(d)


if __name__ == "__main__":
    runs.Trainer = RecordingTrainer
    parallel.shutdown = hashing_shutdown
    raise SystemExit(main(sys.argv[1:]))
