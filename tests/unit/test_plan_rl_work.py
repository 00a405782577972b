"""The work a preference or RL step does beside training the policy, as `graft plan` and
`graft plan --check` count it: DPO's and GRPO's reference forward, GRPO's generation, and
GRPO's iterations (several passes over one rollout, each rollout generated, and its
reference forward run, once).

Expected FLOPs are counted here by hand from the model's shape, token by token, rather
than through the planner's own helpers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from graftlm.cli import main
from graftlm.models.config import ModelConfig
from graftlm.plan import PlanOptions, RunShape, load_catalogue, make_plan, memory_breakdown, resolve_hardware
from graftlm.plan.check import check_run
from graftlm.plan.compute import compute_cost, dequant_passes, train_flops_per_token

# The `small` preset (tied embeddings): --check builds it from a run's config.yaml.
SMALL = ModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                    num_kv_heads=2, max_seq_len=512, tie_embeddings=True)
SMALL_PARAMS = 2048 * 128 + 4 * (128 * 128 * 2 + 2 * 128 * 64 + 3 * 128 * 352 + 256) + 128


class HandCount:
    """FLOPs of one model, counted from its shape: 2 per weight a token meets (the LM head
    included), and causal attention at 4 per head dimension per key a query attends to."""

    def __init__(self, cfg: ModelConfig):
        h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.head = cfg.vocab_size * h
        self.weights = layers * (h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h) + h + self.head
        self.attention_width = layers * cfg.num_heads * cfg.head_dim

    def attention(self, position: int) -> int:
        """A query at `position` (1-based) attends to that many keys: scores and values."""
        return 4 * self.attention_width * position

    def forward(self, tokens: int) -> float:
        """A causal forward over `tokens` tokens, logits at every position."""
        return sum(2 * self.weights + self.attention(p) for p in range(1, tokens + 1))

    def train(self, tokens: int) -> float:
        """Forward and backward of full training: backward costs twice the forward."""
        return 3 * self.forward(tokens)

    def rollout(self, prompt: int, completion: int) -> float:
        """The engine's prefill of the prompt (logits at its last position only), then one
        decode step per generated token but the last, each against the KV cache."""
        prefill = sum(2 * (self.weights - self.head) + self.attention(p) for p in range(1, prompt + 1))
        decode = sum(2 * self.weights + self.attention(p) for p in range(prompt + 1, prompt + completion))
        return prefill + 2 * self.head + decode


def test_grpo_iterations_generate_each_rollout_once_and_train_on_it_in_every_pass():
    """100 rollouts of 32 prompt + 16 completion tokens, trained on in 2 passes: 2 x 4800
    trained tokens of policy forward + backward; generation and the reference forward once
    per rollout (its reference log-probs are kept for the second pass). The plan counted
    the generation per trained sequence (twice at 2 iterations) and approximated it (no
    prefill attention, decode at three sampled contexts), and the reference forward per pass."""
    hand = HandCount(SMALL)
    rollouts, seq_len, completion = 100, 48, 16
    shape = RunShape(SMALL, objective="grpo", precision="fp32", batch_size=8, seq_len=seq_len, grpo_group=4,
                     grpo_completion_len=completion, grpo_iterations=2)
    hardware = resolve_hardware("A100-80GB", load_catalogue())
    compute = compute_cost(shape, rollouts * seq_len, hardware)
    expected = {"train": 2 * rollouts * hand.train(seq_len),
                "reference forward": rollouts * hand.forward(seq_len),
                "generation": rollouts * hand.rollout(seq_len - completion, completion)}
    assert compute.detail == pytest.approx(expected, rel=1e-12)
    assert compute.flops == pytest.approx(sum(expected.values()), rel=1e-12)
    assert compute.train_tokens == 2 * rollouts * seq_len  # the trainer counts every pass's tokens
    rate = hardware.device.peak_flops("fp32") * hardware.device.mfu
    assert compute.time_s == pytest.approx(compute.flops / rate)
    once = compute_cost(replace(shape, grpo_iterations=1), rollouts * seq_len, hardware).detail
    assert once["generation"] == pytest.approx(compute.detail["generation"])
    assert once["reference forward"] == pytest.approx(compute.detail["reference forward"])
    assert 2 * once["train"] == pytest.approx(compute.detail["train"])


def test_the_reference_forward_is_the_base_alone_and_only_where_the_loss_has_one():
    """LoRA's reference is the base with adapters disabled, which skip their matmuls: a plain
    base forward (the plan added the adapters' FLOPs). SimPO / ORPO and GRPO at beta 0 run
    none, and full fine-tuning then keeps no frozen copy."""
    hand = HandCount(SMALL)
    hardware = resolve_hardware("A100-80GB", load_catalogue())
    lora = RunShape(SMALL, objective="dpo", parameterization="lora", precision="fp32", batch_size=4, seq_len=64)
    detail = compute_cost(lora, 64 * 1000, hardware).detail
    assert detail["reference forward"] == pytest.approx(1000 * hand.forward(64), rel=1e-12)
    assert detail["train"] == pytest.approx(64 * 1000 * train_flops_per_token(lora))
    for free in (replace(lora, uses_reference=False),
                 RunShape(SMALL, objective="grpo", seq_len=64, grpo_completion_len=16, uses_reference=False)):
        assert "reference forward" not in compute_cost(free, 64 * 1000, hardware).detail
    full = RunShape(SMALL, objective="dpo", precision="fp32", seq_len=64)
    assert memory_breakdown(full).reference_model == SMALL.num_params() * 4
    assert memory_breakdown(replace(full, uses_reference=False)).reference_model == 0


def test_qlora_dequantizes_a_rollout_once_for_all_its_iterations():
    """Per micro-batch, on average: one generation and one reference forward for every
    `iterations` micro-batches; no reference pass where the loss has no reference."""
    shape = RunShape(SMALL, objective="grpo", parameterization="qlora", seq_len=64, grpo_completion_len=16)
    weights = 7 * SMALL.num_layers
    assert dequant_passes(shape)["generation"][1] == 16 * weights
    assert dequant_passes(shape)["reference forward"][1] == weights
    four = dequant_passes(replace(shape, grpo_iterations=4))
    assert four["generation"][1] == 4 * weights and four["reference forward"][1] == weights / 4
    assert "reference forward" not in dequant_passes(replace(shape, uses_reference=False))


def test_plan_takes_grpo_iterations_from_the_trainer_or_the_command_line(capsys):
    hardware = resolve_hardware("A100-80GB", load_catalogue())
    options = PlanOptions(seq_len=64, batch_size=8, precision="fp32")
    default = make_plan(SMALL, 1e6, hardware, options)["regimes"]["grpo"]["flops_detail"]
    twice = make_plan(SMALL, 1e6, hardware, replace(options, grpo_iterations=2))["regimes"]["grpo"]["flops_detail"]
    assert twice["generation"] == pytest.approx(default["generation"])  # GRPOConfig.iterations is 1
    assert twice["train"] == pytest.approx(2 * default["train"])
    planned = []
    for iterations in ([], ["--grpo-iterations", "2"]):
        assert main(["plan", "--model", "small", "--data", "1e6", "--seq-len", "64", "--batch", "8",
                     *iterations, "--json"]) == 0
        planned.append(json.loads(capsys.readouterr().out)["regimes"]["grpo"]["flops_detail"])
    assert planned[1]["generation"] == pytest.approx(planned[0]["generation"])
    assert planned[1]["train"] == pytest.approx(2 * planned[0]["train"])


def _run(tmp_path, config: dict, summary: dict):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "small", "parallel": {"mode": "none"}, **config}))
    (run / "summary.json").write_text(json.dumps({"device": "cpu", "world_size": 1, "params_total": SMALL_PARAMS,
                                                  "peak_flops": 1e11, "train_time_s": 10.0, **summary}))
    return run


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_check_times_a_dpo_run_with_its_reference_forward(tmp_path, capsys, loss):
    """A DPO step runs the policy's forward and backward over chosen + rejected and a
    reference forward over both (none for SimPO): --check timed the first alone."""
    hand = HandCount(SMALL)
    tokens = 10 * 4 * 2 * 64  # 10 steps of 4 pairs of 64-token rows
    run = _run(tmp_path, {"objective": "dpo", "dpo": {"loss": loss},
                          "train": {"batch_size": 4, "seq_len": 64, "precision": "fp32"}},
               {"tokens": tokens, "steps": 10, "flops": 1e10})
    result = check_run(run, None)
    train, reference = tokens / 64 * hand.train(64), tokens / 64 * hand.forward(64)
    work = train + (reference if loss == "sigmoid" else 0)
    assert result["figures"]["FLOPs"]["predicted"] == pytest.approx(train, rel=1e-12)  # what the trainer counts
    assert result["figures"]["time (s)"]["predicted"] == pytest.approx(work / (1e11 * load_catalogue()["cpu"].mfu))
    assert main(["plan", "--check", str(run)]) == 0
    assert ("time counts the FLOPs of train" in capsys.readouterr().out) == (loss == "sigmoid")


def test_check_times_a_lora_dpo_runs_reference_as_the_base_alone(tmp_path):
    hand = HandCount(SMALL)
    tokens = 10 * 4 * 2 * 64
    run = _run(tmp_path, {"objective": "dpo", "train": {"batch_size": 4, "seq_len": 64, "precision": "fp32"},
                          "adapter": {"kind": "lora", "r": 8, "target_modules": ["all-linear"],
                                      "base_dtype": "float32"}},
               {"tokens": tokens, "steps": 10, "flops": 1e10,  # an adapter run's total holds what it trained
                "params_total": SMALL_PARAMS + 1000, "params_trainable": 1000})
    result = check_run(run, None)
    shape = RunShape(SMALL, objective="dpo", parameterization="lora", precision="fp32", batch_size=4, seq_len=64,
                     lora_r=8, lora_base_dtype="float32", device_type="cpu")
    work = tokens * train_flops_per_token(shape) + tokens / 64 * hand.forward(64)
    assert result["figures"]["time (s)"]["predicted"] == pytest.approx(work / (1e11 * load_catalogue()["cpu"].mfu))


def test_check_times_a_grpo_run_with_generation_once_per_rollout(tmp_path):
    """10 steps of 2 prompts x 4 completions, trained on in 2 iterations: 80 sequences
    trained, 40 rollouts generated and run through the reference. The rows are the
    rollouts, 40 tokens on average (24 of prompt, 16 generated), not train.seq_len's 64:
    their work is counted at that length."""
    hand = HandCount(SMALL)
    steps, sequences_per_step, row = 10, 8, 40
    tokens = steps * sequences_per_step * row
    run = _run(tmp_path, {"objective": "grpo", "train": {"batch_size": 2, "seq_len": 64, "precision": "fp32"},
                          "grpo": {"iterations": 2, "beta": 0.04,
                                   "sampling": {"group_size": 4, "max_new_tokens": 16}}},
               {"tokens": tokens, "steps": steps, "flops": 1e10})
    result = check_run(run, None)
    trained_rows = steps * sequences_per_step
    work = {"train": trained_rows * hand.train(row), "reference forward": trained_rows / 2 * hand.forward(row),
            "generation": trained_rows / 2 * hand.rollout(row - 16, 16)}
    assert result["flops_detail"] == pytest.approx(work, rel=1e-12)
    assert result["figures"]["FLOPs"]["predicted"] == pytest.approx(work["train"], rel=1e-12)
    assert result["figures"]["time (s)"]["predicted"] == pytest.approx(
        sum(work.values()) / (1e11 * load_catalogue()["cpu"].mfu))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["grpo"]["beta"] = 0.0  # no KL: no reference forward
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert "reference forward" not in check_run(run, None)["flops_detail"]
