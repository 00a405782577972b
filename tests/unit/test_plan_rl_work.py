"""The work a preference or RL step does beside training the policy, as `graft plan` and
`graft plan --check` count it: DPO's, GRPO's and PPO's reference forward, GRPO's and PPO's
generation, GRPO's iterations (several passes over one rollout, each rollout generated,
and its reference forward run, once), and PPO's critic (forward and backward) and reward
model (forward).

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
    included), and causal attention at 4 per head dimension per key a query attends to.
    `outputs`: the head's outputs (1: a scalar head, a reward model's or a critic's)."""

    def __init__(self, cfg: ModelConfig, outputs: int | None = None):
        h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.head = (cfg.vocab_size if outputs is None else outputs) * h
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
    # Sampling is timed on its own (test_plan_rollouts.py), the rest at peak x MFU.
    training = compute.flops - compute.detail["generation"]
    assert compute.time_s == pytest.approx(training / rate + compute.time_detail["generation"])
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
    # Sampling also dispatches each decode step's eager operators (and the prefill's), which a
    # CPU runs in line with the work: 20 micro-batches of 8 rollouts, 16 steps each.
    overhead = trained_rows / 2 / 8 * 16 * (56 + 8 + 70 * SMALL.num_layers) * 8e-6
    assert result["figures"]["time (s)"]["predicted"] == pytest.approx(
        sum(work.values()) / (1e11 * load_catalogue()["cpu"].mfu) + overhead)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["grpo"]["beta"] = 0.0  # no KL: no reference forward
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert "reference forward" not in check_run(run, None)["flops_detail"]
    # Scored by a reward model (a directory as --grpo.reward): its forward over each rollout, once.
    config["grpo"]["reward"] = str(_scalar_model_dir(tmp_path / "rm", SMALL))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert check_run(run, None)["flops_detail"]["reward model"] == pytest.approx(
        trained_rows / 2 * HandCount(SMALL, outputs=1).forward(row), rel=1e-12)


def test_ppo_counts_its_critic_reference_generation_and_reward_model():
    """A PPO micro-batch, per rollout: generation; the policy's forward and backward (pi_old
    is that forward, detached: no pass of its own); the reference forward; the critic's one
    forward (values and old values) and its backward, every weight trained (2x the forward);
    the reward model's forward. The plan counted it as GRPO: no critic, no reward model."""
    hand, scalar = HandCount(SMALL), HandCount(SMALL, outputs=1)
    rollouts, seq_len, completion = 100, 48, 16
    shape = RunShape(SMALL, objective="ppo", precision="fp32", batch_size=8, seq_len=seq_len, grpo_group=1,
                     grpo_completion_len=completion)
    hardware = resolve_hardware("A100-80GB", load_catalogue())
    compute = compute_cost(shape, rollouts * seq_len, hardware)
    expected = {"train": rollouts * hand.train(seq_len),
                "reference forward": rollouts * hand.forward(seq_len),
                "generation": rollouts * hand.rollout(seq_len - completion, completion),
                "critic forward": rollouts * scalar.forward(seq_len),
                "critic backward": rollouts * 2 * scalar.forward(seq_len),
                "reward model": rollouts * scalar.forward(seq_len)}
    assert compute.detail == pytest.approx(expected, rel=1e-12)
    assert compute.flops == pytest.approx(sum(expected.values()), rel=1e-12)
    assert compute.train_tokens == rollouts * seq_len  # one pass over each rollout
    # A critic and reward model of their own shape; no reference at kl_coef 0; a reward
    # function runs no model.
    other = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_seq_len=512)
    detail = compute_cost(replace(shape, critic_model=other, reward_model=other, uses_reference=False),
                          rollouts * seq_len, hardware).detail
    assert detail["critic forward"] == pytest.approx(rollouts * HandCount(other, outputs=1).forward(seq_len))
    assert detail["reward model"] == pytest.approx(detail["critic forward"])
    assert "reference forward" not in detail
    assert "reward model" not in compute_cost(replace(shape, reward_is_model=False), 4800, hardware).detail
    # GRPO at the same shape: no critic, no reward model.
    grpo = compute_cost(replace(shape, objective="grpo"), rollouts * seq_len, hardware).detail
    assert set(grpo) == {"train", "reference forward", "generation"}  # GRPO's usual reward: a function
    # A GRPO run scored by a reward model runs its forward over every rollout, as PPO's does.
    scored = compute_cost(replace(shape, objective="grpo", reward_is_model=True), rollouts * seq_len, hardware)
    assert scored.detail["reward model"] == pytest.approx(expected["reward model"], rel=1e-12)


def _scalar_model_dir(path, cfg: ModelConfig):
    """A reward model directory as `graft reward` saves one (its config.json is what --check reads)."""
    from graftlm.models.config import to_hf_config
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**to_hf_config(cfg), "num_labels": 1, "pad_token_id": 0,
                                                  "architectures": ["LlamaForSequenceClassification"]}))
    return path


def test_check_times_a_ppo_run_with_its_critic_and_reward_model(tmp_path, capsys):
    """10 steps of 4 prompts, one completion each (40 tokens on average: 24 of prompt, 16
    generated), scored by a reward model of another shape that the critic starts from:
    --check timed it as a GRPO run, with neither critic nor reward model."""
    hand = HandCount(SMALL)
    other = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_seq_len=512)
    scalar = HandCount(other, outputs=1)
    reward_dir = _scalar_model_dir(tmp_path / "rm", other)
    steps, rows, row = 10, 4, 40
    run = _run(tmp_path, {"objective": "ppo", "train": {"batch_size": rows, "seq_len": 64, "precision": "fp32"},
                          "ppo": {"reward": str(reward_dir), "sampling": {"group_size": 1, "max_new_tokens": 16}}},
               {"tokens": steps * rows * row, "steps": steps, "flops": 1e10})
    result = check_run(run, None)
    rollouts = steps * rows
    work = {"train": rollouts * hand.train(row), "reference forward": rollouts * hand.forward(row),
            "generation": rollouts * hand.rollout(row - 16, 16), "critic forward": rollouts * scalar.forward(row),
            "critic backward": rollouts * 2 * scalar.forward(row), "reward model": rollouts * scalar.forward(row)}
    assert result["objective"] == "ppo"
    assert result["flops_detail"] == pytest.approx(work, rel=1e-12)
    assert result["figures"]["FLOPs"]["predicted"] == pytest.approx(work["train"], rel=1e-12)  # the trainer's
    time = result["figures"]["time (s)"]
    overhead = rollouts / rows * 16 * (56 + rows + 70 * SMALL.num_layers) * 8e-6  # eager operators, as GRPO's
    assert time["predicted"] == pytest.approx(sum(work.values()) / (1e11 * load_catalogue()["cpu"].mfu) + overhead)
    assert time["ratio"] == pytest.approx(time["predicted"] / 10.0)
    assert main(["plan", "--check", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ppo / full" in out and "predicted / measured" in out
    assert f"{time['ratio']:.2f}x" in out and "critic forward" in out and "reward model" in out
    # A reward function: no reward model runs, and the critic is a copy of the policy; at
    # kl_coef 0 no reference either.
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["ppo"].update(reward="regex:e", kl_coef=0.0)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    detail = check_run(run, None)["flops_detail"]
    assert set(detail) == {"train", "generation", "critic forward", "critic backward"}
    assert detail["critic forward"] == pytest.approx(rollouts * HandCount(SMALL, outputs=1).forward(row))
    config["ppo"]["value_model"] = str(reward_dir)  # a value model of its own
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert check_run(run, None)["flops_detail"]["critic forward"] == pytest.approx(work["critic forward"])


def test_ppo_memory_holds_its_critic_and_reward_model():
    """The critic: weights, gradients and two AdamW states, in the policy's dtype, never
    sharded; its backward runs while the policy's activations wait for theirs. The reward
    model: frozen float32 weights. A scalar head model is the decoder without its LM head
    plus a [1, hidden] score."""
    scalar_params = SMALL_PARAMS + SMALL.hidden_size  # SMALL ties its head to its embeddings
    shape = RunShape(SMALL, objective="ppo", precision="fp32", batch_size=8, seq_len=64, grpo_group=1,
                     grpo_completion_len=16)
    ppo, grpo = memory_breakdown(shape), memory_breakdown(replace(shape, objective="grpo"))
    assert ppo.critic == 4 * 4 * scalar_params and ppo.reward_model == 4 * scalar_params
    assert grpo.critic == grpo.reward_model == grpo.critic_activations == 0
    assert ppo.critic_activations > 0 and ppo.peak_moment == "critic backward"
    assert ppo.peak == (ppo.weights + ppo.optimizer + ppo.reference_model + ppo.critic + ppo.reward_model
                        + ppo.activations + ppo.critic_activations)
    assert memory_breakdown(replace(shape, devices=2)).critic == ppo.critic  # FSDP wraps the policy only
    hardware = resolve_hardware("A100-80GB", load_catalogue())
    # --batch counts prompts, as --train.batch-size does: PPO's 8 and GRPO's 2 (x 4 completions) are 8 sequences.
    planned = make_plan(SMALL, 1e6, hardware, PlanOptions(seq_len=64, batch_size=8, precision="fp32"))["regimes"]
    grpo = make_plan(SMALL, 1e6, hardware, PlanOptions(seq_len=64, batch_size=2, precision="fp32"))["regimes"]["grpo"]
    assert planned["ppo"]["batch_size"] == grpo["batch_size"] == 8 and planned["grpo"]["batch_size"] == 32
    assert planned["ppo"]["memory"]["critic"] == 4 * 4 * scalar_params
    assert planned["ppo"]["memory"]["peak"] > grpo["memory"]["peak"]
    assert grpo["memory"]["critic"] == 0


def test_a_ppo_step_makes_the_passes_the_plan_counts(monkeypatch):
    """objectives/ppo.py: one policy forward with grad (pi_old is it, detached), one
    reference forward, one critic forward and one critic backward per micro-batch, and the
    reward scored once: the parts of `flops_detail`, once each."""
    import torch

    from graftlm.models import Decoder
    from graftlm.objectives import ppo
    from graftlm.objectives.rollout import SamplingConfig
    from graftlm.plan.compute import flops_detail
    from graftlm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(iter(["copy: 0 1 2 3 4 5 6 7 8 9"] * 10), 280)
    torch.manual_seed(0)
    policy = Decoder(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                                 pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)).train()
    passes = dict.fromkeys(["train", "reference forward", "critic forward", "critic backward", "reward model"], 0)

    def counted(part, call=None):
        def count(*args, **kwargs):
            passes[part] += 1
            return call(*args, **kwargs) if call else None
        return count

    def reward(completions, prompts, rows):
        passes["reward model"] += 1
        return [float(len(c)) for c in completions]

    config = ppo.PPOConfig(reward="unused", sampling=SamplingConfig(group_size=2, max_new_tokens=4))
    objective = ppo.PPOObjective(config, tokenizer, policy, reward=reward)
    train = counted("train")
    policy.register_forward_hook(lambda *args: train() if torch.is_grad_enabled() else None)  # not generation's
    objective.critic.register_forward_hook(counted("critic forward"))
    objective.critic.score.weight.register_hook(counted("critic backward"))
    monkeypatch.setattr(ppo, "reference_token_logps", counted("reference forward", ppo.reference_token_logps))
    prompts = ["copy: 1 2", "copy: 3 4"]
    total, _, _ = objective.loss(policy, {"prompt_ids": [tokenizer.encode(p) for p in prompts],
                                          "prompts": prompts, "rows": [{}, {}]})
    total.backward()
    assert passes == dict.fromkeys(passes, 1)
    shape = RunShape(policy.config, objective="ppo", seq_len=16, grpo_group=2, grpo_completion_len=4)
    assert set(flops_detail(shape, 160)) == {*passes, "generation"}
