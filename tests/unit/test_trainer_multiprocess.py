"""Multi-process training as the user meets it, without starting processes: what one
process under torchrun says, which rank prints an error, which parallel options are refused."""

from __future__ import annotations

import torch

from graftlm import parallel


def test_fsdp_with_one_process_says_it_trains_unsharded(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    d = parallel.init_distributed(parallel.ParallelConfig(mode="fsdp"), "cpu")
    assert d.mode == "none" and d.device == torch.device("cpu")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "one process" in out[0] and "unsharded" in out[0], out
    parallel.init_distributed(parallel.ParallelConfig(mode="none"), "cpu")
    assert capsys.readouterr().out == ""
