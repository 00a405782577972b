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


def test_an_error_every_rank_meets_is_printed_once_by_the_first_rank_to_fail(monkeypatch, capsys):
    import datetime

    import torch.distributed as dist

    from graftlm.cli import main

    # The store torchrun's agent serves to its ranks, where they count their errors.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    argv = ["pretrain", "--data", "shards"]  # no --model: every rank refuses the same way
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one machine
    for rank, printed in (("1", True), ("0", False)):  # rank 1 fails first, rank 0 says nothing more
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert ("graft pretrain: error: config field 'model' is required" in err) is printed, (rank, err)
    # Across machines a rank may meet an error of its own node: the line names the rank.
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a new attempt: its own count
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert main(argv) == 2
    assert "error (rank 0): config field 'model' is required" in capsys.readouterr().err


def test_a_collective_failure_is_printed_by_the_rank_it_happened_on(monkeypatch, capsys):
    from graftlm import cli

    def fail(args):
        raise parallel.CollectiveError("rank 1: a collective failed or timed out")

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(fail))
    assert cli.main(["x"]) == 2
    assert "rank 1: a collective failed" in capsys.readouterr().err


def _parser_with(handler):
    import argparse

    parser = argparse.ArgumentParser(prog="graft")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("x").set_defaults(handler=handler)
    return parser


def _config(argv):
    from graftlm.cli import build_parser
    from graftlm.train_cli import config_for

    return config_for(build_parser().parse_args(["pretrain", "--model", "tiny", "--data", "shards", *argv]))[0]


def test_an_fsdp_option_outside_fsdp_is_refused_naming_it(tmp_path):
    import pytest

    from graftlm.errors import ConfigError

    for mode in (["--parallel", "ddp"], []):
        with pytest.raises(ConfigError, match=r"--parallel\.fsdp-mixed-precision.*fsdp"):
            _config([*mode, "--parallel.fsdp-mixed-precision", "false"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("parallel:\n  mode: ddp\n  fsdp_mixed_precision: false\n")
    with pytest.raises(ConfigError, match=r"parallel\.fsdp_mixed_precision in .*r\.yaml"):
        _config(["--recipe", str(recipe)])
    # Given with fsdp, or not given at all: accepted.
    assert _config(["--parallel", "fsdp", "--parallel.fsdp-mixed-precision", "false"]).parallel.mode == "fsdp"
    assert _config(["--parallel", "ddp"]).parallel.fsdp_mixed_precision is True
    assert _config(["--recipe", str(recipe), "--parallel", "fsdp"]).parallel.fsdp_mixed_precision is False
