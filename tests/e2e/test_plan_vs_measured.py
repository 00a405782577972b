"""`graft plan` against measurement: real training steps of the trainer on CPU.

For full fine-tuning, LoRA and QLoRA on tiny models of three sizes, one optimizer step
of `graftlm.trainer.Trainer` (SFT objective, fused AdamW, gradient clipping) runs under
`TensorMemoryTracker` and `FlopCounterMode`:
- peak memory: the largest total of live tensor bytes during the step (weights,
  optimizer states, gradients, activations, temporaries), after a first step has
  created the optimizer states; the plan predicts the same quantity (plan/memory.py);
- FLOPs: the matmul FLOPs of forward + backward, counted by torch, against the plan's
  executed FLOPs (model FLOPs plus the logits the chunked log-probs recompute). Torch
  has no formula for the CPU flash-attention kernel, so we add one (causal attention
  multiplies each query with its (T + 1) / 2 keys on average, the convention of the
  shared FLOPs function), nor for the in-place `addmm_` of the fused LoRA linear.

QLoRA's NF4 base is dequantized on every pass, work of no FLOPs that the plan times
apart: the passes it counts are the dequantizations a step makes (SFT, DPO, GRPO, with
and without activation checkpointing; counted, not timed), their time in a step is the
plan's at the measured rate, and a QLoRA run's `plan --check` adds it. The timed tests
run on one thread and compare with the fastest steps, with wide tolerances.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from graftlm import metrics
from graftlm.adapters.config import AdapterConfig
from graftlm.adapters.inject import apply_adapters
from graftlm.data.loader import ResumableLoader
from graftlm.models.config import ModelConfig
from graftlm.models.transformer import Decoder
from graftlm.objectives.sft import SFTObjective
from graftlm.optim import OptimConfig
from graftlm.plan.compute import dequant_passes, dequant_seconds, executed_flops_per_token
from graftlm.plan.measure import TensorMemoryTracker
from graftlm.plan.memory import RunShape, memory_breakdown
from graftlm.trainer import TrainConfig, Trainer

SIZES = {
    "xs": dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2),
    "s": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4, num_kv_heads=2),
    "m": dict(vocab_size=1024, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6, num_kv_heads=2),
}
REGIMES = {"full": None, "lora": "lora", "qlora": "qlora"}


class RandomTokens:
    def __init__(self, vocab: int, seq_len: int, rows: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (rows, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def _causal_flash_flops(query_shape, key_shape, *args, **kwargs) -> int:
    b, heads, t_q, d = query_shape
    t_k = key_shape[2]
    return 2 * 2 * b * heads * d * t_q * (t_k + 1) // 2


def _causal_flash_backward_flops(grad_out_shape, query_shape, key_shape, *args, **kwargs) -> int:
    return 2 * _causal_flash_flops(query_shape, key_shape)


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# Operators torch's FlopCounterMode has no formula for: the CPU flash-attention kernel,
# and the in-place addmm_ the fused LoRA linear adds its update with.
UNCOUNTED_BY_TORCH = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _causal_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _causal_flash_backward_flops,
    torch.ops.aten.addmm_: _addmm_inplace_flops,
}


def measure(size: str, regime: str, precision: str, batch: int = 4, seq_len: int = 64):
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=seq_len, **SIZES[size])
    model = Decoder(cfg)
    model.init_weights()
    if REGIMES[regime]:
        apply_adapters(model, AdapterConfig(kind=regime, r=8, base_dtype="bfloat16"))
    loader = ResumableLoader(RandomTokens(cfg.vocab_size, seq_len), batch)
    train = TrainConfig(max_steps=10, batch_size=batch, seq_len=seq_len, precision=precision)
    trainer = Trainer(model, SFTObjective(), loader, train, OptimConfig(), device=torch.device("cpu"),
                      trainable_only=regime != "full", tensorboard=False)
    trainer.train_step()  # creates the optimizer states
    tracker = TensorMemoryTracker()
    with tracker:
        tracker.track(list(model.parameters()), trainer.optimizer.state_dict()["state"])
        assert trainer.train_step() is not None
    counter = FlopCounterMode(display=False, custom_mapping=UNCOUNTED_BY_TORCH)
    with counter:
        trainer.train_step()
    shape = RunShape(model=cfg, objective="sft", parameterization=regime, precision=precision,
                     batch_size=batch, seq_len=seq_len, lora_r=8, lora_base_dtype="bfloat16", device_type="cpu")
    return shape, tracker.peak, counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("regime", list(REGIMES))
def test_predicted_peak_memory_and_flops_match_a_measured_step(size, regime):
    warnings.filterwarnings("ignore")
    precision = "bf16-autocast" if size == "s" else "fp32"
    shape, measured_peak, counted_flops = measure(size, regime, precision)
    predicted = memory_breakdown(shape)
    assert abs(predicted.peak - measured_peak) / measured_peak < 0.15, \
        f"{regime}/{size}: predicted peak {predicted.peak} vs measured {measured_peak} ({predicted})"
    predicted_flops = executed_flops_per_token(shape) * shape.tokens
    assert abs(predicted_flops - counted_flops) / counted_flops < 0.05, \
        f"{regime}/{size}: predicted {predicted_flops:.4g} FLOPs vs counted {counted_flops:.4g}"


def test_a_reward_models_flops_count_its_score_head_not_the_vocabulary():
    # A vocabulary 4x the blocks' size: counting the LM head the reward model does not have
    # (as runs and the plan did) reads several times the FLOPs, and MFU with them.
    from graftlm.models.heads import ScalarHeadModel
    cfg = ModelConfig(max_seq_len=64, **{**SIZES["xs"], "vocab_size": 4096})
    decoder = Decoder(cfg)
    decoder.init_weights()
    model = ScalarHeadModel.from_decoder(decoder, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(1, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False, custom_mapping=UNCOUNTED_BY_TORCH)
    with counter:
        model(ids).sum().backward()
    shape = RunShape(model=cfg, seq_len=64, precision="fp32", device_type="cpu", scalar_head=True)
    predicted = executed_flops_per_token(shape) * ids.numel()
    counted = counter.get_total_flops()
    assert abs(predicted - counted) / counted < 0.05, f"predicted {predicted:.4g} FLOPs vs counted {counted:.4g}"


# -- QLoRA: the NF4 base is dequantized on every pass ------------------------------------------

class Dequantizations:
    """Counts (and times) torchao's dequantization of NF4 weights, the work `linear_nf4` does
    on every call besides its matmul: calls, parameters and seconds since the last `reset`."""

    def __init__(self, monkeypatch):
        from graftlm.adapters.qlora import _nf4
        nf4_tensor, _ = _nf4()
        original = nf4_tensor.get_original_weight
        self.reset()

        def counted(weight):
            start = time.perf_counter()
            out = original(weight)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.params += weight.numel()
            return out

        monkeypatch.setattr(nf4_tensor, "get_original_weight", counted)

    def reset(self):
        self.calls, self.params, self.seconds = 0, 0, 0.0


def _qlora_model(size: str, seq_len: int, **extra):
    torch.manual_seed(0)
    cfg = ModelConfig(max_seq_len=seq_len, **{**SIZES[size], **extra})
    model = Decoder(cfg)
    model.init_weights()
    apply_adapters(model, AdapterConfig(kind="qlora", r=8, base_dtype="float32"))
    return cfg, model.train()


def _planned(shape) -> tuple[int, int]:
    """(calls, parameters) the plan says one micro-batch dequantizes."""
    passes = dequant_passes(shape).values()
    return sum(weights for _, weights in passes), sum(params for params, _ in passes)


@pytest.mark.parametrize("objective", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_predicted_nf4_dequantizations_match_a_counted_qlora_step(objective, checkpointing, monkeypatch):
    """Every pass the plan counts for a QLoRA micro-batch (training forward and backward, the
    recomputed forward, the reference forward, GRPO's prefill and decode steps) is a pass the
    step makes: counted in the dequantizations torchao runs, not timed."""
    from graftlm.objectives.dpo import DPOObjective
    from graftlm.objectives.grpo import GRPOConfig, GRPOObjective
    from graftlm.objectives.rollout import SamplingConfig
    from graftlm.tokenizer import train_tokenizer
    warnings.filterwarnings("ignore")
    batch, seq_len, completion = 4, 32, 5
    extra, shape_extra = {}, {}
    if objective == "grpo":
        tokenizer = train_tokenizer(iter(["copy: 0 1 2 3 4 5 6 7 8 9"] * 10), 280)
        # Nothing to stop at: every completion is max_new_tokens long, as the plan assumes.
        monkeypatch.setattr(type(tokenizer), "stop_ids", property(lambda self: []))
        extra = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
        shape_extra = dict(grpo_group=batch, grpo_completion_len=completion)
    cfg, model = _qlora_model("xs", seq_len, **extra)
    model.gradient_checkpointing = checkpointing
    ids = torch.randint(1, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    if objective == "sft":
        run = lambda: SFTObjective().loss(model, {"input_ids": ids})  # noqa: E731
    elif objective == "dpo":
        pairs = {"chosen_input_ids": ids, "chosen_loss_mask": mask, "rejected_input_ids": ids.flip(1),
                 "rejected_loss_mask": mask}
        run = lambda: DPOObjective().loss(model, pairs)  # noqa: E731
    else:
        # A reward of the completion's length: no completion stops early for it to be counted.
        grpo = GRPOObjective(GRPOConfig(sampling=SamplingConfig(group_size=batch, max_new_tokens=completion),
                                        beta=0.1), tokenizer, reward=lambda c, p, r: [float(len(x)) for x in c])
        prompt = "copy: 1 2"
        run = lambda: grpo.loss(model, {"prompt_ids": [tokenizer.encode(prompt)], "prompts": [prompt],  # noqa: E731
                                        "rows": [{"answer": "1 2", "source": "t.jsonl:1"}]})
    counter = Dequantizations(monkeypatch)
    total, _, _ = run()
    total.backward()
    shape = RunShape(model=cfg, objective=objective, parameterization="qlora", batch_size=batch, seq_len=seq_len,
                     lora_r=8, activation_checkpointing=checkpointing, **shape_extra)
    assert (counter.calls, counter.params) == _planned(shape)


@pytest.fixture
def one_thread():
    """Timing on one thread: on a shared 2-core host, a parallel operator waits for its
    second thread whenever another process holds that core (steps 20x slower at times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_predicted_nf4_dequantization_time_matches_a_timed_qlora_step(one_thread, monkeypatch, tmp_path):
    """The seconds a QLoRA training step spends dequantizing its NF4 base, against the plan's
    figure at the rate a run records (`metrics.nf4_dequant_rate`). The plan had none: a CPU
    QLoRA run's time was predicted 51% short. The fastest of a few steps, and a wide
    tolerance: the rate is the fastest of many isolated calls, a step's weights come cold."""
    warnings.filterwarnings("ignore")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    batch, seq_len = 8, 64
    cfg, model = _qlora_model("m", seq_len)
    rate = metrics.nf4_dequant_rate(torch.device("cpu"))
    loader = ResumableLoader(RandomTokens(cfg.vocab_size, seq_len), batch)
    trainer = Trainer(model, SFTObjective(), loader, TrainConfig(max_steps=10, batch_size=batch, seq_len=seq_len,
                                                                 precision="fp32"),
                      OptimConfig(), device=torch.device("cpu"), trainable_only=True, tensorboard=False)
    trainer.train_step()  # creates the optimizer states
    counter = Dequantizations(monkeypatch)
    seconds = []
    for _ in range(4):
        counter.reset()
        trainer.train_step()
        seconds.append(counter.seconds)
    shape = RunShape(model=cfg, parameterization="qlora", precision="fp32", batch_size=batch, seq_len=seq_len,
                     lora_r=8, lora_base_dtype="float32", device_type="cpu")
    predicted = sum(dequant_seconds(shape, 1, rate).values())
    assert 0.4 < min(seconds) / predicted < 3, \
        f"a step dequantized for {min(seconds):.4f} s (fastest of {seconds}); predicted {predicted:.4f} s at {rate}"


@pytest.mark.slow
def test_a_qlora_runs_check_predicts_its_time_with_the_dequantization_it_recorded(one_thread, monkeypatch, tmp_path):
    """A tiny QLoRA run through `graft sft`: it records its NF4 dequantization rate, and
    `plan --check` adds that time to the FLOPs' (on this CPU the FLOPs alone read a QLoRA
    run's time 51% short). The measured side is the run's own fastest steps, as another
    process on the cores only ever slows a step down; the tolerance is the MFU guess's."""
    import json
    import random

    from graftlm.cli import main
    from graftlm.plan.check import check_run, run_shape
    from graftlm.tokenizer import train_tokenizer
    from tests.distributed.support import random_base
    warnings.filterwarnings("ignore")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = random.Random(0)
    rows = [{"prompt": f"copy: {a} {b} {c}", "completion": f"{a} {b} {c}"}
            for a, b, c in ((rng.randrange(10), rng.randrange(10), rng.randrange(10)) for _ in range(200))]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_tokenizer(iter(["copy: 0 1 2 3 4 5 6 7 8 9"] * 20), 300).save(tmp_path / "tok")
    steps = 12
    base = random_base(tmp_path / "base", tmp_path / "tok", "small")
    assert main(["sft", "--model", str(base), "--data", str(tmp_path / "sft.jsonl"),
                 "--out", str(tmp_path / "runs"), "--name", "qlora", "--adapter", "qlora", "--adapter.r", "8",
                 "--train.max-steps", str(steps), "--train.batch-size", "32", "--train.seq-len", "32",
                 "--train.precision", "fp32", "--train.eval-every", "0", "--train.save-every", "0",
                 "--tensorboard", "false"]) == 0
    run = tmp_path / "runs" / "qlora"
    summary = json.loads((run / "summary.json").read_text())
    recorded = metrics.DequantRate.from_dict(summary["nf4_dequant"])
    assert recorded is not None and recorded.params_per_s > 0

    result = check_run(run, None)
    shape, _ = run_shape(run)
    dequant = result["figures"]["time: NF4 dequantization (s)"]["predicted"]
    assert dequant == pytest.approx(sum(dequant_seconds(shape, steps, recorded).values()))
    assert "the run's recorded rate" in result["assumed"]
    time_s = result["figures"]["time (s)"]["predicted"]
    from graftlm.plan import load_catalogue
    flops_only = result["figures"]["FLOPs"]["predicted"] / (summary["peak_flops"] * load_catalogue()["cpu"].mfu)
    assert time_s == pytest.approx(flops_only + dequant)
    step_times = sorted(r["step_tokens"] / r["tokens_per_s"]
                        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
    fastest = step_times[: len(step_times) // 2]
    measured = sum(fastest) / len(fastest) * steps
    assert 0.5 < time_s / measured < 2, \
        f"predicted {time_s:.3f} s ({dequant:.3f} s dequantizing) vs {measured:.3f} s at the run's fastest steps"


@pytest.mark.slow
def test_a_real_runs_model_counts_its_data_and_its_check_compares_like_with_like(monkeypatch, tmp_path, capsys):
    """A tiny `graft pretrain` run, then what a user does next: `graft plan --model
    runs/base/final --data rows.jsonl` counts the rows with the tokenizer the run saved
    beside its weights (it estimated UTF-8 bytes / 4: 40.1k for 86k tokens), and
    `plan --check` shows predicted / measured, but sets an H100's time beside this CPU's
    without comparing them (it printed +22812183%)."""
    import json

    from graftlm.cli import main
    from graftlm.data.shards import write_shards
    from graftlm.data.stats import data_stats
    from graftlm.plan.check import check_run
    from graftlm.tokenizer import train_tokenizer
    from tests.conftest import SHARED_DATA
    warnings.filterwarnings("ignore")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text()[:30_000]
    tokenizer = train_tokenizer(iter([text]), 300)
    tokenizer.save(tmp_path / "tok")
    write_shards(iter([("train", text), ("val", text[:3000])]), tokenizer, tmp_path / "shards")
    assert main(["pretrain", "--model", "tiny", "--data", str(tmp_path / "shards"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "runs"), "--name", "base", "--train.max-steps", "4",
                 "--train.batch-size", "2", "--train.seq-len", "32", "--train.precision", "fp32",
                 "--train.eval-every", "0", "--train.save-every", "0", "--tensorboard", "false"]) == 0
    run = tmp_path / "runs" / "base"
    capsys.readouterr()

    rows = tmp_path / "gsm.jsonl"
    rows.write_text("\n".join((SHARED_DATA / "gsm8k_train.jsonl").read_text().splitlines()[:40]) + "\n")
    assert main(["plan", "--model", str(run / "final"), "--data", str(rows), "--hardware", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert data["stats"]["tokens_counted_with"] == "tokenizer"
    assert data["tokens"] == data_stats([rows], tokenizer=run / "final")["tokens"] != data_stats([rows])["tokens"]

    result = check_run(run, None)
    assert result["time_compared"] and all(
        f["ratio"] == pytest.approx(f["predicted"] / f["measured"]) for f in result["figures"].values() if f["measured"])
    assert main(["plan", "--check", str(run), "--hardware", "H100", "--json"]) == 0
    on_h100 = json.loads(capsys.readouterr().out)[0]
    assert not on_h100["time_compared"] and on_h100["figures"]["time (s)"]["error"] is None
    assert on_h100["figures"]["time (s)"]["predicted"] < result["figures"]["time (s)"]["predicted"] / 100
    assert on_h100["figures"]["peak memory (bytes)"]["error"] == result["figures"]["peak memory (bytes)"]["error"]
