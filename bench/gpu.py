"""The GPU benchmark: pre-training and LoRA steps of a ~1B Llama preset, one table.

Run by `bench/gpu.sh` on a machine with one NVIDIA GPU. Installs nothing. Measures:
- graftlm pre-training step (bf16 autocast, fp32 master weights, fused AdamW,
  torch.compile, sequence 2048): tokens/s, MFU, peak GPU memory;
- graftlm LoRA step (r=16, all linear layers, bf16 frozen base) and the same step with
  transformers + PEFT when both are importable: tokens/s, peak GPU memory.
MFU = model FLOPs (6N per token plus attention) / time / the GPU's dense bf16 peak.
`--smoke` runs the same code on a tiny preset on the CPU, to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from graftlm.models.config import preset
from graftlm.models.transformer import Decoder
from graftlm.objectives.logprobs import shift_targets

# Dense bf16 peak FLOP/s by device name fragment (vendor datasheets, no sparsity).
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
         "4090": 165e12, "T4": 65e12}


def device_peak(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for fragment, peak in PEAKS.items():
        if fragment in name:
            return peak
    return float("nan")


def flops_per_token(cfg, seq_len: int, trainable: str) -> float:
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size  # + lm_head
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len / 2  # causal half
    # Full training: forward 2N + backward 4N. LoRA: no weight gradients of the base (2N saved).
    weights = 6 * n if trainable == "full" else 4 * n
    return weights + attn


def timed_steps(step, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def measure(name, step, cfg, batch_size, seq_len, steps, device, trainable):
    """Time `step` and return its table row: name, tokens/s, MFU, peak GPU memory."""
    seconds = timed_steps(step, 3, steps, device)
    tokens = batch_size * seq_len
    mfu = flops_per_token(cfg, seq_len, trainable) * tokens / seconds / device_peak(device)
    return name, tokens / seconds, mfu, peak_memory_gb(device)


def graftlm_step_fn(model, batch, targets, params, device, compile_model):
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logp = forward(batch, targets=targets)
            mask = targets != -100
            loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_pretrain(cfg, batch_size, seq_len, steps, device, compile_model):
    reset_memory(device)
    model = Decoder(cfg).to(device)
    model.init_weights()
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
    step = graftlm_step_fn(model, batch, shift_targets(batch), model.parameters(), device, compile_model)
    row = measure("graftlm pre-training", step, cfg, batch_size, seq_len, steps, device, "full")
    del model, step
    return row


def bench_lora_graftlm(cfg, batch_size, seq_len, steps, device, compile_model):
    from graftlm.adapters import AdapterConfig, apply_adapters
    reset_memory(device)
    model = Decoder(cfg)
    model.init_weights()
    model = model.to(device=device, dtype=torch.bfloat16)
    apply_adapters(model, AdapterConfig(kind="lora", r=16, alpha=32, target_modules=["all-linear"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    step = graftlm_step_fn(model, batch, shift_targets(batch), params, device, compile_model)
    row = measure("graftlm LoRA r=16", step, cfg, batch_size, seq_len, steps, device, "lora")
    del model, step
    return row


def bench_lora_peft(cfg, batch_size, seq_len, steps, device):
    import peft
    import transformers
    reset_memory(device)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_cfg, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    row = measure("transformers + PEFT LoRA r=16", step, cfg, batch_size, seq_len, steps, device, "lora")
    del model, opt
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU, to test the script")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.batch, args.seq_len, args.steps, args.no_compile = "tiny", 2, 64, 2, True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg = preset(args.preset, max_seq_len=max(args.seq_len, 64))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"peak bf16 {device_peak(device) / 1e12:.0f} TFLOP/s")
    print(f"model: preset {args.preset}, {cfg.num_params() / 1e9:.2f}B parameters, "
          f"batch {args.batch} x {args.seq_len}")
    rows = [bench_pretrain(cfg, args.batch, args.seq_len, args.steps, device, not args.no_compile)]
    try:
        rows.append(bench_lora_graftlm(cfg, args.batch, args.seq_len, args.steps, device, not args.no_compile))
    except ImportError as e:
        print(f"graftlm LoRA step not measured: {e}")
    try:
        rows.append(bench_lora_peft(cfg, args.batch, args.seq_len, args.steps, device))
    except ImportError:
        print("transformers + PEFT not installed: their LoRA step is not measured")
    print(f"\n{'step':32s} {'tokens/s':>12s} {'MFU':>7s} {'peak GB':>9s}")
    for name, tps, mfu, mem in rows:
        print(f"{name:32s} {tps:12,.0f} {mfu:7.1%} {mem:9.1f}")


if __name__ == "__main__":
    main()
