"""What `graft plan` costs GRPO and PPO on: the rollouts they sample from a data file's
prompts (not the file's tokens, which count answers RL never trains on), and the time of
sampling them a token at a time, which a decode step's reads of the weights bound where
its FLOPs take less time than those reads do. And DPO on both sequences of each pair."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from graftlm.cli import main
from graftlm.data.stats import prompt_stats
from graftlm.plan import PlanOptions, RunShape, load_catalogue, make_plan, resolve_data, resolve_hardware
from graftlm.plan.compute import compute_cost
from graftlm.plan.hardware import Device, Hardware
from tests.unit.test_plan_rl_work import SMALL, HandCount

GSM8K = "../shared/data/gsm8k_train.jsonl"


def _device(bandwidth_gbs: float, kind: str = "gpu", op_overhead_us: float = 0.0) -> Hardware:
    return Hardware(Device(name="test", memory_gb=80, bf16_tflops=100, fp32_tflops=50, mfu=0.5, usd_per_hour=1.0,
                           memory_gbs=bandwidth_gbs, kind=kind, op_overhead_us=op_overhead_us))


def test_sampling_takes_the_longer_of_its_flops_and_its_reads_of_the_weights():
    """40 rollouts of 32 prompt + 16 sampled tokens in micro-batches of 8: 5 micro-batches,
    each a prefill at peak x MFU, then 15 decode steps, each reading every matmul weight
    (fp32: 4 bytes) and its rows' KV caches. With ample bandwidth the FLOPs bound them,
    as training's do; with little, the reads do."""
    hand = HandCount(SMALL)
    rollouts, prompt, completion, batch = 40, 32, 16, 8
    shape = RunShape(SMALL, objective="grpo", precision="fp32", batch_size=batch, seq_len=prompt + completion,
                     grpo_group=4, grpo_completion_len=completion)
    prefill = hand.rollout(prompt, 1)  # the prompt's forward and the first token's logits
    decode = hand.rollout(prompt, completion) - prefill
    kv_per_token = 2 * SMALL.num_layers * SMALL.num_kv_heads * SMALL.head_dim * 4
    step_bytes = hand.weights * 4 + batch * (prompt + completion / 2) * kv_per_token
    rate = 50e12 * 0.5
    for bandwidth_gbs, bound in ((1e6, "FLOPs"), (1.0, "memory bandwidth")):
        hardware = _device(bandwidth_gbs)
        compute = compute_cost(shape, rollouts * (prompt + completion), hardware)
        decode_time = max(batch * decode / rate, (completion - 1) * step_bytes / (bandwidth_gbs * 1e9))
        expected = rollouts / batch * (batch * prefill / rate + decode_time)
        assert compute.time_detail["generation"] == pytest.approx(expected, rel=1e-9)
        assert compute.generation_bound == bound
        training = compute.flops - compute.detail["generation"]
        assert compute.time_s == pytest.approx(training / rate + expected)
    # Two devices sample their own micro-batches side by side: half the wall time.
    two = compute_cost(replace(shape, devices=2), rollouts * (prompt + completion), Hardware(_device(1.0).device, 2))
    assert two.time_detail["generation"] == pytest.approx(expected / 2, rel=1e-9)


def test_sampling_pays_each_steps_eager_operators():
    """Every step (the prefill and 15 decode steps) dispatches 56 + 70 per block + 1 per row
    eager operators (11 more per adapted linear), each costing the host `op_overhead_us`.
    A GPU's host queues kernels while the card runs earlier ones: a micro-batch takes the
    longer of the two. A CPU does both in turn: they add up."""
    rollouts, prompt, completion, batch = 40, 32, 16, 8
    shape = RunShape(SMALL, objective="grpo", precision="fp32", batch_size=batch, seq_len=prompt + completion,
                     grpo_group=4, grpo_completion_len=completion)
    ops = 56 + batch + 70 * SMALL.num_layers
    tokens = rollouts * (prompt + completion)
    work = compute_cost(shape, tokens, _device(1e6)).time_detail["generation"]  # FLOPs alone
    overhead = rollouts / batch * completion * ops * 10e-6
    gpu = compute_cost(shape, tokens, _device(1e6, "gpu", op_overhead_us=10))
    assert gpu.time_detail["generation"] == pytest.approx(max(work, overhead), rel=1e-9)
    assert gpu.generation_bound == "per-operator overhead"
    cpu = compute_cost(shape, tokens, _device(1e6, "cpu", op_overhead_us=10))
    assert cpu.time_detail["generation"] == pytest.approx(work + overhead, rel=1e-9)
    # Adapters add their fused update's operators per adapted linear.
    lora = compute_cost(replace(shape, parameterization="lora", lora_targets=["q_proj", "v_proj"]), tokens,
                        _device(1e6, "cpu", op_overhead_us=10))
    lora_work = compute_cost(replace(shape, parameterization="lora", lora_targets=["q_proj", "v_proj"]), tokens,
                             _device(1e6)).time_detail["generation"]
    assert lora.time_detail["generation"] - lora_work == pytest.approx(
        overhead * (ops + 2 * 11 * SMALL.num_layers) / ops, rel=1e-9)


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_the_planned_operator_count_is_the_engines(adapter):
    """The constants behind `decode_ops` against a fresh count of the aten operators one
    decode step of graftlm's engine dispatches (the sampled rows' draws included)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from graftlm.adapters import AdapterConfig, apply_adapters
    from graftlm.engine import Engine, SamplingParams
    from graftlm.models.config import preset
    from graftlm.models.transformer import Decoder
    from graftlm.plan.compute import decode_ops

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    targets = ["q_proj", "v_proj", "down_proj"]
    for layers, batch in ((1, 1), (3, 6)):
        cfg = preset("tiny", vocab_size=300, num_layers=layers)
        model = Decoder(cfg)
        model.init_weights(torch.Generator().manual_seed(0))
        if adapter:
            apply_adapters(model, AdapterConfig(kind=adapter, r=4, target_modules=targets))
        engine = Engine(model.eval())
        counts = []
        for steps in (2, 3):  # the difference is one decode step
            params = [SamplingParams(max_new_tokens=steps, temperature=1.0, seed=i, stop_ids=()) for i in range(batch)]
            with Count() as count, torch.no_grad():
                engine.generate([[5, 6, 7]] * batch, params)
            counts.append(count.calls)
        shape = RunShape(cfg, objective="grpo", batch_size=batch, parameterization=adapter or "full",
                         lora_targets=targets)
        assert decode_ops(shape) == pytest.approx(counts[1] - counts[0], rel=0.05), (layers, batch)


def test_prompt_stats_count_prompts_alone(tmp_path):
    rows = [{"question": "q" * 40, "answer": "a" * 400 + " #### 3"}, {"prompt": "p" * 80},
            {"text": "no prompt here"}]
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = prompt_stats([path])
    assert stats["prompts"] == 2 and stats["skipped"] == 1
    assert stats["tokens"] == 40 // 4 + 80 // 4  # the answer's 400 bytes are not a prompt's
    (tmp_path / "corpus.txt").write_text("just text\n")
    assert prompt_stats([tmp_path / "corpus.txt"]) is None


def test_grpo_and_ppo_are_costed_on_the_rollouts_they_sample_from_the_file():
    """GSM8K's questions: each GRPO prompt sampled group_size times (PPO once), each rollout
    its prompt and up to max_new_tokens sampled; memory for the longest prompt's rollouts."""
    tokens, stats = resolve_data(GSM8K)
    prompts = stats["prompts"]
    assert prompts["prompts"] == stats["rows"] == 7473 and prompts["tokens"] < tokens / 2  # questions, no answers
    plan = make_plan(SMALL, tokens, resolve_hardware("A100-80GB", load_catalogue()),
                     PlanOptions(precision="fp32"), data_stats=stats)
    for name, group in (("grpo", 4), ("ppo", 1)):  # GRPOConfig / PPOConfig sampling.group_size
        regime = plan["regimes"][name]
        sampled = regime["rollouts"]
        mean_length = prompts["length"]["mean"] + 64  # sampling.max_new_tokens
        assert sampled["sequences"] == 7473 * group
        assert regime["tokens"] == pytest.approx(7473 * group * mean_length)
        assert regime["seq_len"] == prompts["length"]["max"] + 64
        assert regime["flops_detail"]["train"] > 0 and regime["time_detail"]["generation"] > 0
    for name in ("sft", "dpo", "pretrain"):
        assert plan["regimes"][name]["tokens"] == tokens and plan["regimes"][name]["rollouts"] is None


def test_text_data_has_no_prompts_and_an_explicit_seq_len_is_kept(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("a line of text\n" * 50)
    tokens, stats = resolve_data(str(text))
    assert stats["prompts"] is None
    hardware = resolve_hardware("A100-80GB", load_catalogue())
    plan = make_plan(SMALL, tokens, hardware, PlanOptions(precision="fp32"), data_stats=stats)
    assert plan["regimes"]["grpo"]["tokens"] == tokens and plan["regimes"]["grpo"]["rollouts"] is None
    _, gsm = resolve_data(GSM8K)
    kept = make_plan(SMALL, 1e6, hardware, PlanOptions(precision="fp32", seq_len=300), data_stats=gsm)
    assert kept["regimes"]["grpo"]["seq_len"] == 300


def test_the_plan_says_what_rl_is_costed_on_and_what_bounds_its_sampling(capsys):
    assert main(["plan", "--model", "1B", "--data", GSM8K, "--hardware", "H100"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "rollouts 7,473 prompts" in out and "x 4 (grpo), 1 (ppo) completions of up to 64 sampled tokens" in out
    assert "which RL never trains on" in out
    # A 1B model's eager decode step on an H100 reads its weights in under a millisecond,
    # and dispatches some 1,200 operators at 8 us each.
    assert ("sampling a token at a time, bound by the host's per-operator overhead (1,208 eager operators a "
            "decode step, 8 us each; --grpo.sampling.compile fuses them)") in out


def test_dpo_is_costed_on_both_sequences_of_each_pair(tmp_path):
    """A preference file's tokens count each pair's longer sequence (prompt + the longer
    reply); DPO trains on two (prompt + chosen, prompt + rejected): the plan counted half."""
    rows = [{"prompt": "p" * 400, "chosen": "c" * 80, "rejected": "r" * 40}] * 3
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens, stats = resolve_data(str(path))
    assert tokens == 3 * (100 + 20) and stats["pair_tokens"] == 3 * (2 * 100 + 20 + 10)
    plan = make_plan(SMALL, tokens, resolve_hardware("A100-80GB", load_catalogue()), PlanOptions(precision="fp32"),
                     data_stats=stats)
    assert plan["regimes"]["dpo"]["tokens"] == stats["pair_tokens"]
    assert plan["regimes"]["sft"]["tokens"] == tokens
