"""Training-step benchmark on the CPU: graftlm's loop against transformers' LlamaForCausalLM
with torch.optim.AdamW, same model shape, same batch, bf16 autocast.

Each side runs in its own subprocess so that peak resident memory is its own; the
parent measures a matmul peak on the spot for MFU, and prints one table.
    .venv/bin/python bench/train_step.py [--steps 5] [--warmup 2] [--precision auto|bf16-autocast|fp32]
Goals: graftlm tokens/s >= 1.3x, peak memory <= 0.8x. `--precision auto` is what
`--train.precision auto` picks here: bf16 autocast (the goals' setting) on a CPU with
AVX-512 or AMX, float32 on both sides on one without (a bf16 matmul is ~50x slower there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
             num_kv_heads=8, max_seq_len=256, tie_embeddings=False)
BATCH, SEQ = 8, 256


def graftlm_side(steps: int, warmup: int, precision: str, compile: bool = False) -> dict:
    import numpy as np
    import torch

    from graftlm.data.loader import ResumableLoader
    from graftlm.models.config import ModelConfig
    from graftlm.models.transformer import Decoder
    from graftlm.objectives.clm import CausalLM, TokenWindows
    from graftlm.optim import OptimConfig
    from graftlm.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    model = Decoder(ModelConfig(**SHAPE))
    model.init_weights()
    tokens = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], BATCH * SEQ * (steps + warmup) + 1)
    loader = ResumableLoader(TokenWindows(tokens.astype(np.uint16), SEQ), BATCH, shuffle=False)
    cfg = TrainConfig(max_steps=steps + warmup, batch_size=BATCH, seq_len=SEQ, precision=precision,
                      compile=compile)
    trainer = Trainer(model, CausalLM(), loader, cfg, OptimConfig(lr=1e-4, warmup_steps=0),
                      device=torch.device("cpu"), tensorboard=False)
    for _ in range(warmup):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step()["loss"]
    return {"seconds_per_step": (time.perf_counter() - start) / steps, "loss": loss}


def hf_side(steps: int, warmup: int, precision: str, compile: bool = False) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"],
        intermediate_size=SHAPE["intermediate_size"], num_hidden_layers=SHAPE["num_layers"],
        num_attention_heads=SHAPE["num_heads"], num_key_value_heads=SHAPE["num_kv_heads"],
        max_position_embeddings=SEQ, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).train()
    forward = torch.compile(model) if compile else model
    # Fused AdamW, as graftlm's trainer uses on the CPU and as transformers' Trainer
    # defaults to (optim="adamw_torch_fused" with torch >= 2.8).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ + 1), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = forward(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return {"seconds_per_step": (time.perf_counter() - start) / steps, "loss": loss}


SIDES = {"graftlm": graftlm_side, "transformers": hf_side,
         # One more warm-up step there: the first compiles the forward and the backward.
         "graftlm compiled": lambda steps, warmup, precision: graftlm_side(steps, warmup + 1, precision, compile=True),
         "transformers compiled": lambda steps, warmup, precision: hf_side(steps, warmup + 1, precision, compile=True)}


def run_side(side: str, steps: int, warmup: int, precision: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(steps),
                          "--warmup", str(warmup), "--precision", precision], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=("auto", "bf16-autocast", "fp32"), default="auto",
                        help="auto: bf16 autocast where this CPU computes bf16 fast, else fp32")
    parser.add_argument("--side", choices=SIDES)
    args = parser.parse_args()
    import torch

    from graftlm.placement import resolve_precision
    precision = resolve_precision(args.precision, torch.device("cpu"))
    if args.side:
        torch.set_num_threads(torch.get_num_threads())
        result = SIDES[args.side](args.steps, args.warmup, precision)
        from graftlm.metrics import peak_host_memory_bytes
        print(json.dumps({**result, "peak_rss": peak_host_memory_bytes()}))
        return

    from graftlm.metrics import measure_matmul_peak, training_flops_per_token
    from graftlm.models.config import ModelConfig
    bf16 = precision == "bf16-autocast"
    peak = measure_matmul_peak(torch.device("cpu"), torch.bfloat16 if bf16 else torch.float32)
    flops_per_step = training_flops_per_token(ModelConfig(**SHAPE), SEQ) * BATCH * SEQ
    rows = {side: run_side(side, args.steps, args.warmup, precision) for side in SIDES}
    print(f"CPU, {torch.get_num_threads()} threads, batch {BATCH} x {SEQ}, {'bf16 autocast' if bf16 else 'float32'}; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s ({'bf16' if bf16 else 'float32'}, measured now)")
    print("both: fused AdamW, grad clip 1.0, float32 weights. Differences: transformers predicts "
          "255 tokens a row (labels = inputs, shifted inside), graftlm 256; graftlm skips weight "
          "decay on norms and embeddings")
    print(f"{'':22s}{'tokens/s':>10s}{'MFU':>8s}{'peak RSS MiB':>14s}{'loss':>8s}")
    for side, r in rows.items():
        tps = BATCH * SEQ / r["seconds_per_step"]
        mfu = flops_per_step / r["seconds_per_step"] / peak
        print(f"{side:22s}{tps:10,.0f}{100 * mfu:7.1f}%{r['peak_rss'] / 2**20:14,.0f}{r['loss']:8.3f}")
    for ours, peer in (("graftlm", "transformers"), ("graftlm compiled", "transformers"),
                       ("graftlm compiled", "transformers compiled")):
        g, h = rows[ours], rows[peer]
        print(f"{ours} / {peer}: speed {h['seconds_per_step'] / g['seconds_per_step']:.2f}x "
              f"(goal >= 1.3x), memory {g['peak_rss'] / h['peak_rss']:.2f}x (goal <= 0.8x)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
