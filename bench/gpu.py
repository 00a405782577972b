"""The GPU benchmark: pre-training and LoRA steps of a ~1B Llama preset, one table.

Run by `bench/gpu.sh` on a machine with one NVIDIA GPU. Installs nothing, reads nothing
from the network (random weights and tokens). Measures:
- graftlm pre-training step (bf16 autocast, fp32 master weights, fused AdamW,
  torch.compile, sequence 2048): tokens/s, MFU, peak GPU memory;
- graftlm LoRA step (r=16, all linear layers, bf16 frozen base) and the same step with
  transformers + PEFT when both are importable: tokens/s, MFU, peak GPU memory; and the
  LoRA step's speed over the pre-training step, which is the full fine-tuning step of the
  same batch (the LoRA issue's goal: at least 1.3x);
- graftlm QLoRA step (NF4 frozen base computed in bf16): tokens/s, peak GPU memory, and
  the frozen linear weights' size in NF4 against bf16 (goal: at most 0.3x);
- generation in bf16 on the same weights (64-token prompts, 128 new tokens, greedy,
  batch 1 and 8): transformers' `generate`, graftlm's engine eager and with
  `compile=True`: new tokens/s, and the ratio to transformers;
- GRPO's sampling (16 rollouts of 64 prompt + 128 sampled tokens, bf16): graftlm's engine
  eager and with `--grpo.sampling.compile` (a compiled decode step that reads the weights
  live), ms per token, beside what `graft plan` predicts for the same shape on this card
  (`plan.compute.generation_seconds`: the eager step's operators at `op_overhead_us`).

Design choices:
- FLOPs and peaks are graftlm's own (`plan.compute.train_flops_per_token`,
  `metrics.peak_flops`): the MFU printed here is the one `graft plan` predicts and the
  trainer records, not a third formula.
- Each row is printed as soon as it is measured, so a run cut short by gpu.sh's time
  limit still shows what it measured.
- torch.compile needs a working Triton and C compiler on the machine; where it fails,
  the row is measured eagerly and says so, instead of the whole run failing.
- `--smoke` runs the same code on a tiny preset on the CPU in seconds (eager), so the
  script itself is tested without a GPU (tests/unit/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from graftlm.metrics import peak_flops
from graftlm.models.config import preset
from graftlm.models.transformer import Decoder
from graftlm.objectives.logprobs import shift_targets
from graftlm.plan.compute import train_flops_per_token
from graftlm.plan.memory import RunShape

LORA_R = 16
ROWS = ("pretrain", "lora", "qlora", "peft", "generation", "rollouts")


def flops_per_token(cfg, seq_len: int, parameterization: str) -> float:
    """Model FLOPs to train one token, as `graft plan` and the trainer count them."""
    return train_flops_per_token(RunShape(model=cfg, seq_len=seq_len, parameterization=parameterization,
                                          lora_r=LORA_R, lora_targets="all-linear"))


def timed_steps(step, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device) -> None:
    torch._dynamo.reset()  # compiled graphs of the previous row hold its model alive
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def compiled_or_eager(make_step, compile_model: bool):
    """(step, how): `make_step(compile)` compiled when asked and possible, else eager."""
    if compile_model:
        step = make_step(True)
        try:
            step()  # compilation happens here
            return step, "compiled"
        except Exception as e:  # no Triton / C compiler / an op inductor cannot lower
            print(f"  torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); "
                  "measuring eager", flush=True)
            torch._dynamo.reset()
    return make_step(False), "eager"


def measure(name, make_step, cfg, args, device, parameterization) -> tuple:
    """Time a step and return its table row: name, tokens/s, MFU, peak GPU memory."""
    step, how = compiled_or_eager(make_step, not args.no_compile)
    seconds = timed_steps(step, 2, args.steps, device)
    tokens = args.batch * args.seq_len
    mfu = flops_per_token(cfg, args.seq_len, parameterization) * tokens / seconds / peak_flops(device)
    return f"{name} ({how})", tokens / seconds, mfu, peak_memory_gb(device)


def graftlm_step_maker(model, batch, params, device):
    targets = shift_targets(batch)
    mask = targets != -100

    def make_step(compile_model: bool):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        forward = torch.compile(model) if compile_model else model

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logp = forward(batch, targets=targets)
                loss = -(logp * mask).sum() / mask.sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return make_step


def random_decoder(cfg, device) -> Decoder:
    model = Decoder(cfg).to(device)  # initialised where it runs: a 1B init on the CPU is slow
    model.init_weights()
    model.reset_rope(device)  # RoPE tables are plain attributes: move them before compiling
    return model


def bench_pretrain(cfg, args, device):
    reset_memory(device)
    model = random_decoder(cfg, device)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    make_step = graftlm_step_maker(model, batch, list(model.parameters()), device)
    return measure("graftlm pre-training", make_step, cfg, args, device, "full")


def bench_adapter_graftlm(cfg, args, device, kind: str = "lora"):
    """graftlm's LoRA (bf16 frozen base) or QLoRA (NF4 frozen base) step; QLoRA's row also
    prints its frozen linear weights' size against the same weights in bf16."""
    from graftlm.adapters import AdapterConfig, apply_adapters
    from graftlm.adapters import qlora

    reset_memory(device)
    model = random_decoder(cfg, device)
    frozen = {name: module.weight for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
              and name != "lm_head"}
    bf16_bytes = sum(w.numel() * 2 for w in frozen.values())
    apply_adapters(model, AdapterConfig(kind=kind, r=LORA_R, alpha=2 * LORA_R, target_modules=["all-linear"],
                                        base_dtype="bfloat16"))
    if kind == "qlora":
        stored = sum(qlora.storage_bytes(m.base_layer.weight) for m in model.modules() if hasattr(m, "base_layer"))
        print(f"  QLoRA frozen linear weights: {stored / 2**30:.2f} GiB NF4 vs {bf16_bytes / 2**30:.2f} GiB bf16 "
              f"({stored / bf16_bytes:.2f}x; goal <= 0.3x)", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # fp32 master weights for what trains, as the trainer keeps them
        p.data = p.data.float()
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    name = f"graftlm {'QLoRA' if kind == 'qlora' else 'LoRA'} r={LORA_R}"
    return measure(name, graftlm_step_maker(model, batch, params, device), cfg, args, device, "lora")


def failed_row(what: str, error: Exception) -> None:
    """One line for a row that failed, so that the rows after it are still measured (a
    CUDA device-side assert, though, leaves the device unusable for the rest)."""
    print(f"{what} failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}", flush=True)


def bench_lora_peft(cfg, args, device):
    import peft
    import transformers

    reset_memory(device)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
    with torch.device(device):  # build on the GPU directly
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa")
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R,
                                                       target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)

    def make_step(compile_model: bool):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        forward = torch.compile(model) if compile_model else model

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return measure(f"transformers + PEFT LoRA r={LORA_R}", make_step, cfg, args, device, "lora")


def bench_generation(cfg, args, device) -> None:
    """Print new tokens/s of transformers' `generate` and graftlm's engine (eager and
    compiled) on the same bf16 weights, one row per side and batch size."""
    import tempfile

    import transformers

    from graftlm.engine import Engine, SamplingParams
    from graftlm.models.config import to_hf_config
    from graftlm.models.hf import load_model

    reset_memory(device)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in to_hf_config(cfg).items()
                                         if k not in ("architectures", "model_type")})
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_model(tmp, dtype=torch.bfloat16, device=device)
    prompt_len, new_tokens = (8, 8) if args.smoke else (64, 128)
    greedy = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_ids=())
    engines = {"graftlm engine (eager)": Engine(ours)}
    if not args.no_compile:
        engines["graftlm engine (compiled)"] = Engine(ours, compile=True)
    print(f"\n{'generate, bf16, ' + str(new_tokens) + ' new tokens':42s} {'tokens/s':>12s} {'vs HF':>7s}",
          flush=True)
    for batch in (1, 8):
        ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), device=device)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=0).tolist()
        sides = {"transformers generate": run_hf}
        sides.update({name: (lambda e=engine: e.generate(ids.tolist(), greedy))
                      for name, engine in engines.items()})
        hf_tps = None
        for name, run in sides.items():
            try:
                run()  # warm-up (and the compiled side's compile)
            except Exception as e:  # one side's failure must not hide the others
                print(f"{name} batch {batch}: failed ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:160]})", flush=True)
                continue
            seconds = timed_steps(run, 0, 2, device)
            tps = batch * new_tokens / seconds
            hf_tps = hf_tps or tps
            print(f"{name + ' batch ' + str(batch):42s} {tps:12,.1f} {tps / hf_tps:6.2f}x", flush=True)


def bench_rollouts(cfg, args, device) -> None:
    """Print GRPO's sampling time per token, eager and compiled with live weights, beside
    the plan's prediction for this shape on this device."""
    from graftlm.engine import CompiledDecodeStep, Engine, SamplingParams
    from graftlm.plan.compute import decode_ops, generation_seconds
    from graftlm.plan.hardware import load_catalogue, this_machine

    reset_memory(device)
    model = random_decoder(cfg, device).to(torch.bfloat16).eval()
    rows, prompt_len, new_tokens = (4, 8, 8) if args.smoke else (16, 64, 128)
    prompts = torch.randint(3, cfg.vocab_size, (rows, prompt_len)).tolist()
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i, stop_ids=()) for i in range(rows)]
    shape = RunShape(cfg, objective="grpo", precision="bf16", batch_size=rows, seq_len=prompt_len + new_tokens,
                     grpo_group=4, grpo_completion_len=new_tokens)
    here = this_machine(load_catalogue())
    predicted, bound = generation_seconds(shape, rows * (prompt_len + new_tokens),
                                          here.peak_flops("bf16") * here.mfu, here)
    print(f"\n{'GRPO sampling, bf16, ' + str(rows) + ' rollouts':42s} {'ms/token':>12s} {'s/rollout':>10s}",
          flush=True)
    print(f"{'graft plan (' + bound + ')':42s} {predicted / new_tokens * 1e3:12.2f} {predicted:10.3f}  "
          f"({decode_ops(shape):,} operators a step at {here.op_seconds * 1e6:.3g} us)", flush=True)
    sides = {"graftlm eager": lambda: Engine(model)}
    if not args.no_compile:
        step = CompiledDecodeStep(model, live_weights=True)
        sides["graftlm --grpo.sampling.compile"] = lambda: Engine(model, compiled_decode=step)
    for name, engine in sides.items():
        try:
            engine().generate(prompts, params)  # warm-up (and the compiled side's compile)
            seconds = timed_steps(lambda: engine().generate(prompts, params), 0, 2, device)
        except Exception as e:  # one side's failure must not hide the other
            failed_row(name, e)
            continue
        print(f"{name:42s} {seconds / new_tokens * 1e3:12.2f} {seconds:10.3f}", flush=True)


def print_row(row) -> None:
    name, tps, mfu, mem = row
    print(f"{name:42s} {tps:12,.0f} {mfu:7.1%} {mem:9.1f}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS),
                        help="the rows to measure (a short device lease may not fit all)")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, to test the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.seq_len, args.steps, args.no_compile = "tiny", 2, 64, 2, True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg = preset(args.preset, max_seq_len=max(args.seq_len, 64))
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"peak bf16 {peak_flops(device) / 1e12:.0f} TFLOP/s")
    print(f"model: preset {args.preset}, {cfg.num_params() / 1e9:.2f}B parameters, "
          f"batch {args.batch} x {args.seq_len}, {args.steps} timed steps")
    print(f"\n{'step':42s} {'tokens/s':>12s} {'MFU':>7s} {'peak GB':>9s}", flush=True)
    rows = {}
    makers = {"pretrain": lambda: bench_pretrain(cfg, args, device),
              "lora": lambda: bench_adapter_graftlm(cfg, args, device, "lora"),
              "qlora": lambda: bench_adapter_graftlm(cfg, args, device, "qlora"),
              "peft": lambda: bench_lora_peft(cfg, args, device)}
    for name, make_row in makers.items():
        if name not in args.only:
            continue
        try:
            rows[name] = make_row()
            print_row(rows[name])
        except ImportError as e:
            print(f"{name}: not measured ({e})", flush=True)
        except Exception as e:  # one row's failure must not hide the others
            failed_row(name, e)
        if name == "lora" and {"pretrain", "lora"} <= rows.keys():
            # The pre-training step trains every weight: the full fine-tuning step of this batch.
            print(f"{'graftlm LoRA step / full step':42s} {rows['lora'][1] / rows['pretrain'][1]:11.2f}x  "
                  "(goal >= 1.3x)", flush=True)
    if "generation" in args.only:
        try:
            bench_generation(cfg, args, device)
        except Exception as e:  # the table above stays printed
            failed_row("generation", e)
    if "rollouts" in args.only:
        try:
            bench_rollouts(cfg, args, device)
        except Exception as e:
            failed_row("rollouts", e)

if __name__ == "__main__":
    main()
