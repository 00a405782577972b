"""`--grpo.sampling.compile`: the rollouts' decode step, compiled once for the run, reads
the weights at every call, so it samples what eager decoding samples as the policy trains,
without compiling again."""

from __future__ import annotations

import pytest
import torch

from graftlm.adapters import AdapterConfig, apply_adapters
from graftlm.errors import GraftError
from graftlm.objectives.grpo import GRPOConfig, GRPOObjective
from graftlm.objectives.rollout import SamplingConfig
from tests.unit.rl_support import length_reward, policy, prompt_batch


def _objective(tokenizer, compile: bool) -> GRPOObjective:
    sampling = SamplingConfig(group_size=4, max_new_tokens=12, compile=compile)
    return GRPOObjective(GRPOConfig(sampling=sampling), tokenizer, reward=length_reward)


@pytest.mark.slow  # one compile, tens of seconds
def test_compiled_rollouts_sample_the_eager_tokens_as_the_policy_trains(tokenizer):
    from torch._dynamo.utils import counters

    model = policy(tokenizer)
    # An active adapter: the graph computes the model as it is, adapter included.
    apply_adapters(model, AdapterConfig(r=4, target_modules=["all-linear"]))
    generator = torch.Generator().manual_seed(0)
    compiled, eager = _objective(tokenizer, True), _objective(tokenizer, False)
    graphs = counters["stats"]["unique_graphs"]
    seen = []
    for _ in range(3):
        with torch.no_grad():  # a training step's worth of change, base and adapter alike
            for name, p in model.named_parameters():
                if "lora_B" in name or name.endswith("q_proj.weight"):
                    p.add_(torch.randn(p.shape, generator=generator) * 0.3)
        got = compiled.sampler.sample(model, prompt_batch(tokenizer), tokenizer.pad_id)
        want = eager.sampler.sample(model, prompt_batch(tokenizer), tokenizer.pad_id)
        assert torch.equal(got.input_ids, want.input_ids)
        assert got.completions == want.completions
        seen.append(got.input_ids)
        assert model.training  # sampling put the model back in training mode
    assert not torch.equal(seen[0], seen[1]) or not torch.equal(seen[1], seen[2])  # the weights moved the samples
    # A graph for batch 1 (once rows have finished) and one for larger batches, whatever the weights.
    assert counters["stats"]["unique_graphs"] - graphs <= 2
    assert compiled.sampler._compiled_decode is not None and eager.sampler._compiled_decode is None


def test_compiled_rollouts_refuse_a_qlora_base_before_compiling(tokenizer):
    model = policy(tokenizer)
    apply_adapters(model, AdapterConfig(kind="qlora", r=4, target_modules=["q_proj"]))
    with pytest.raises(GraftError, match="config field 'sampling.compile': QLoRA's NF4 base does not compile"):
        _objective(tokenizer, True).sampler.sample(model, prompt_batch(tokenizer), tokenizer.pad_id)


@pytest.mark.parametrize("option, message", [
    (["--adapter", "qlora"], "QLoRA's NF4 base does not compile in one graph"),
    (["--parallel", "fsdp"], "not under FSDP (each rollout gathers new weight tensors)")])
def test_the_cli_refuses_what_cannot_compile_before_a_run_directory_exists(option, message, tmp_path, capsys):
    from graftlm.cli import main

    argv = ["grpo", "--model", "tiny", "--data", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "runs"),
            "--grpo.sampling.compile", "true", *option]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"graft grpo: error: config field 'grpo.sampling.compile': {message}" + err.split(message)[1]
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()
