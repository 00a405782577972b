"""LoRA training step: graftlm vs transformers + PEFT, side by side in one run.

Same model as the pre-training benchmark (hidden 512, 8 layers, 8 heads, intermediate
1408, vocab 8192), LoRA r=16 on every linear layer but the output, batch 8 x 256, bf16
autocast on CPU, fused AdamW over the trainable parameters. The frozen base is stored in
bf16 on both sides (PEFT users load with `dtype=torch.bfloat16`; a graftlm run under
bf16 autocast does it by default, `adapter.base_dtype: auto`); adapters stay float32.

Each configuration runs in its own subprocess so that peak resident memory (ru_maxrss)
is its own: graftlm LoRA, PEFT LoRA, both again with gradient checkpointing (activations
recomputed per block: less memory for more compute), graftlm QLoRA, graftlm full
fine-tuning (float32 weights, same batch), graftlm's frozen base alone (the LoRA model
with its adapters disabled, backward still through every block: the floor under any
LoRA step, so that LoRA's own cost and the full step's extra cost are printed apart;
it also makes the first block's input gradient, which a LoRA step skips, so LoRA's
share comes out a few ms low),
and graftlm LoRA, PEFT LoRA and graftlm full fine-tuning compiled (graftlm: each block,
as `--train.compile true` does, keeping every activation for backward, and LoRA again
recomputing half of them, `-half`, as `--train.compile-activation-budget 0.5` does; PEFT: the whole model with `torch.compile`; the first,
compiling step is not timed but its memory counts in the peak; after it graftlm's
sides trim the C heap, as its trainer does: `trainer.release_freed_host_memory`). Printed: tokens/s, peak
RSS, and the ratios against the goals (graftlm >= 1.5x PEFT tokens/s, <= 0.6x its
memory; LoRA >= 1.3x faster than full fine-tuning) for eager and compiled graftlm, plus
QLoRA's frozen base size vs bf16. A ratio is each side's fastest round against the
other's, then the same ratio within each round and the median of those: a shared host's
speed drifts by 10-30% over minutes, which moves a ratio of two sides timed in the
same round less.

    .venv/bin/python bench/lora_step.py [--steps 3] [--repeats 3] [--threads N] [--only SIDE ...]
                                        [--hidden H] [--precision auto|bf16-autocast|fp32]

`--precision auto` (the default) is what `--train.precision auto` picks here: bf16
autocast, the goals' setting, on a CPU with AVX-512 or AMX, and float32 (weights, base
and compute, on both sides) on one without, where a bf16 matmul is ~50x slower than a
float32 one and a bf16 run would measure that fallback, not the step.

`--hidden` widens the model (intermediate 2.75x, heads of 64; the goals are set at 512):
LoRA's saving (weight gradients, optimizer) grows with the weights, its own cost with
the activations, so the LoRA / full ratio grows with width.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIMS = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
            num_kv_heads=8, max_seq_len=256)
BATCH, SEQ, RANK, ALPHA = 8, 256, 16, 32
BF16 = True  # bf16 autocast and a bf16 frozen base (the goals' setting); False: float32 throughout
SIDES = ("graft-lora", "peft-lora", "graft-lora-ckpt", "peft-lora-ckpt", "graft-qlora", "graft-full",
         "graft-frozen", "graft-lora-compiled", "graft-lora-compiled-half", "peft-lora-compiled",
         "graft-full-compiled")


def set_width(hidden: int) -> None:
    """The same model at another width, in the pre-training preset's proportions."""
    DIMS.update(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_heads=hidden // 64,
                num_kv_heads=hidden // 64)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch():
    import torch
    return torch.randint(0, DIMS["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def graft_model(side: str):
    import torch

    import graftlm.adapters as A
    from graftlm.models import Decoder, ModelConfig
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**DIMS))
    model.init_weights(torch.Generator().manual_seed(0))
    info = {}
    if not side.startswith("graft-full"):
        kind = "qlora" if side == "graft-qlora" else "lora"
        model.gradient_checkpointing = side.endswith("-ckpt")
        A.apply_adapters(model, A.AdapterConfig(kind=kind, r=RANK, alpha=ALPHA,
                                                base_dtype="bfloat16" if BF16 else "float32"))
        if side == "graft-frozen":
            from graftlm.adapters.inject import adapter_layers
            for layer in adapter_layers(model):
                layer.disabled = True
            # Nothing is trainable, so the embedding's output is made to require grad:
            # backward then runs through every block, as in a LoRA step.
            model.embed_tokens.register_forward_hook(lambda module, args, out: out.requires_grad_())
        from graftlm.adapters import qlora
        base = [m.base_layer.weight for m in model.modules() if hasattr(m, "base_layer")]
        info["frozen_linear_bytes"] = sum(qlora.storage_bytes(w) for w in base)
    if "-compiled" in side:  # what `--train.compile true` does
        from graftlm.trainer import TrainConfig
        # -half: half the activations recomputed (--train.compile-activation-budget 0.5)
        budget = 0.5 if side.endswith("-half") else TrainConfig().compile_activation_budget
        model.compile_layers(budget)
    params = [] if side == "graft-frozen" else [p for p in model.parameters() if p.requires_grad]
    return model.train(), params, info


def graft_step(model, ids):
    import torch

    from graftlm.objectives.logprobs import IGNORE_INDEX, shift_targets
    targets = shift_targets(ids)
    valid = targets != IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        logp = model(ids, targets=targets)  # log-probs inside forward, as the objectives ask
    (-(logp * valid).sum() / valid.sum()).backward()


def peft_model(side: str):
    import peft
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=DIMS["vocab_size"], hidden_size=DIMS["hidden_size"],
                                   intermediate_size=DIMS["intermediate_size"],
                                   num_hidden_layers=DIMS["num_layers"], num_attention_heads=DIMS["num_heads"],
                                   num_key_value_heads=DIMS["num_kv_heads"], max_position_embeddings=SEQ,
                                   tie_word_embeddings=False)
    base = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if BF16 else torch.float32,
                                                         attn_implementation="sdpa")
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    if side.endswith("-ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    if side.endswith("-compiled"):
        model = torch.compile(model)
    return model.train(), params, {}


def peft_step(model, ids):
    import torch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()


def run_side(side: str, steps: int) -> dict:
    import torch
    peft_side = side.startswith("peft")
    model, params, info = peft_model(side) if peft_side else graft_model(side)
    step = peft_step if peft_side else graft_step
    # Fused AdamW on every side: graftlm's trainer uses it on the CPU (graftlm.optim), and
    # transformers' Trainer defaults to it (optim="adamw_torch_fused" with torch >= 2.8).
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    ids = batch()
    rss_built = peak_rss_mib()
    times = []
    for i in range(steps + 1):  # the first step warms up (allocator, optimizer state, compiling)
        start = time.perf_counter()
        step(model, ids)
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
        elif "-compiled" in side and not peft_side:  # as graftlm's trainer does after its compiling step
            from graftlm.trainer import release_freed_host_memory
            release_freed_host_memory()
    seconds = sorted(times)[len(times) // 2]
    return dict(side=side, tokens_per_s=BATCH * SEQ / seconds, step_s=seconds, peak_rss_mib=peak_rss_mib(),
                rss_after_build_mib=rss_built, trainable=sum(p.numel() for p in params), **info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds over all sides; each side's fastest counts, and each ratio is also "
                             "printed per round")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--hidden", type=int, default=DIMS["hidden_size"], help="model width (a multiple of 64)")
    parser.add_argument("--precision", choices=("auto", "bf16-autocast", "fp32"), default="auto",
                        help="auto: bf16 autocast where this CPU computes bf16 fast, else fp32")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one subprocess's job
    parser.add_argument("--only", nargs="+", choices=SIDES, default=list(SIDES))
    args = parser.parse_args()
    if args.hidden % 64:
        parser.error(f"--hidden must be a multiple of 64, got {args.hidden}")
    set_width(args.hidden)
    global BF16
    import torch

    from graftlm.placement import resolve_precision
    precision = resolve_precision(args.precision, torch.device("cpu"))
    BF16 = precision == "bf16-autocast"
    if args.side:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(run_side(args.side, args.steps)))
        return
    results, rounds = {}, []
    for _ in range(args.repeats):  # rounds over every side, so a slow spell hits all alike
        rounds.append({})
        for side in args.only:
            out = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(args.steps),
                                  "--threads", str(args.threads), "--hidden", str(args.hidden),
                                  "--precision", precision],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            run = json.loads(out.stdout.strip().splitlines()[-1])
            rounds[-1][side] = run["tokens_per_s"]
            best = results.setdefault(side, run)
            # The fastest round (the least disturbed), and the largest peak memory of all.
            peak = max(best["peak_rss_mib"], run["peak_rss_mib"])
            if run["tokens_per_s"] > best["tokens_per_s"]:
                results[side] = best = run
            best["peak_rss_mib"] = peak
    print(f"LoRA step, hidden {DIMS['hidden_size']} x {DIMS['num_layers']} layers, batch {BATCH}x{SEQ}, "
          f"r={RANK} all-linear, {'bf16 autocast' if BF16 else 'float32'}, "
          f"CPU x{args.threads} threads, "
          f"median of {args.steps} steps, fastest of {args.repeats} rounds")
    print(f"{'side':<20} {'tokens/s':>9} {'step s':>7} {'peak RSS MiB':>13} {'RSS built':>10} {'trainable':>10}")
    for r in results.values():
        print(f"{r['side']:<20} {r['tokens_per_s']:>9.0f} {r['step_s']:>7.2f} {r['peak_rss_mib']:>13.0f} "
              f"{r['rss_after_build_mib']:>10.0f} {r['trainable']:>10,}")
    def compare(label, ours, peer, speed_goal=None, memory_goal=None, memory=True):
        """One line: `ours` against `peer` (result names), when both ran."""
        a, b = results.get(ours), results.get(peer)
        if not (a and b):
            return
        line = f"{label}: tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x"
        line += f" (goal >= {speed_goal}x)" if speed_goal else ""
        if len(rounds) > 1:  # the same ratio within each round: how far the host's drift moves it
            per_round = sorted(r[ours] / r[peer] for r in rounds)
            line += f" [rounds: {' '.join(f'{x:.2f}' for x in per_round)}; median {statistics.median(per_round):.2f}x]"
        if memory:
            line += f", peak RSS {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x"
            line += f" (goal <= {memory_goal}x)" if memory_goal else ""
        print(line)

    compare("graftlm / PEFT", "graft-lora", "peft-lora", 1.5, 0.6)
    compare("with gradient checkpointing on both sides", "graft-lora-ckpt", "peft-lora-ckpt")
    compare("graftlm checkpointed vs PEFT default", "graft-lora-ckpt", "peft-lora")
    compare("graftlm LoRA / full fine-tuning step", "graft-lora", "graft-full", 1.3, memory=False)
    compare("graftlm with --train.compile true vs PEFT as used (eager)", "graft-lora-compiled", "peft-lora", 1.5, 0.6)
    compare("both compiled", "graft-lora-compiled", "peft-lora-compiled")
    compare("graftlm compiled LoRA / compiled full fine-tuning step", "graft-lora-compiled", "graft-full-compiled",
            1.3, memory=False)
    compare("  the same, LoRA recomputing half of its activations", "graft-lora-compiled-half",
            "graft-full-compiled", memory=False)
    compare("compiled LoRA: half the activations recomputed vs all kept", "graft-lora-compiled-half",
            "graft-lora-compiled")
    lora, full, frozen = (results.get(side) for side in ("graft-lora", "graft-full", "graft-frozen"))
    if lora and full and frozen:
        print(f"over the frozen base alone ({frozen['step_s'] * 1e3:.0f} ms): LoRA adds "
              f"{(lora['step_s'] - frozen['step_s']) * 1e3:.0f} ms (its matmuls, casts, optimizer), full fine-tuning "
              f"{(full['step_s'] - frozen['step_s']) * 1e3:.0f} ms (weight gradients, casts, AdamW)")
    qlora = results.get("graft-qlora")
    if lora and qlora:
        nf4, base = qlora["frozen_linear_bytes"], lora["frozen_linear_bytes"]
        print(f"QLoRA frozen linear weights: {nf4 / 2**20:.1f} MiB NF4 vs {base / 2**20:.1f} MiB "
              f"{'bf16' if BF16 else 'float32'} ({nf4 / base:.2f}x; goal <= 0.3x of bf16)")


if __name__ == "__main__":
    main()
