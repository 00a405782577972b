"""Generation speed: graftlm's engine against transformers' `generate`, in one run.

The model is the `30m` preset (hidden 512, 8 layers, vocabulary 8192) as a random
transformers LlamaForCausalLM, saved and loaded into graftlm, so both sides run the
same weights. Greedy, CPU float32, 64-token prompts, 128 new tokens, batch 1 and 8.
Neither side stops early (no EOS id), so both produce exactly 128 tokens per row; the
token ids are checked equal. Each figure is the best of `--repeats` timed runs after a
warm-up (the CPU may be shared; the best run is the least disturbed one).

It also prints the floor: the time of one decode step's matrix products alone (every
weight read once, q/k/v and gate/up already concatenated), which no float32 engine on
this CPU can beat; the ratio of transformers' step time to it bounds any speed-up.

    python bench/generate.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

PROMPT_TOKENS, NEW_TOKENS = 64, 128


def build_models(out_dir):
    import transformers
    from graftlm.engine import Engine
    from graftlm.models.config import preset, to_hf_config
    from graftlm.models.hf import load_model

    cfg = preset("30m")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in to_hf_config(cfg).items()
                                         if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(out_dir)
    print(f"model: 30m preset, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters, "
          f"vocabulary {cfg.vocab_size}")
    return hf, Engine(load_model(out_dir))


def matmul_floor_s(model, batch: int, repeats: int = 20) -> float:
    """Seconds of one decode step's matmuls alone, at `batch` rows (best of `repeats`)."""
    import torch.nn.functional as F

    weights = []
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        weights += [torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), attn.o_proj.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight]
    weights.append(model.lm_head.weight)
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}

    def step():
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
    with torch.inference_mode():
        return best_time(step, repeats)[0]


def best_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from graftlm.engine import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        hf, engine = build_models(tmp)
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, stop_ids=())
    print(f"CPU float32, {torch.get_num_threads()} threads, {PROMPT_TOKENS}-token prompts, "
          f"{NEW_TOKENS} new tokens, greedy\n")
    print(f"{'batch':>5}  {'transformers tok/s':>18}  {'graftlm tok/s':>13}  {'ratio':>6}  "
          f"{'matmul floor tok/s':>18}  {'bound':>6}")
    for batch in (1, 8):
        ids = torch.randint(3, 8192, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[:, PROMPT_TOKENS:].tolist()

        def run_ours():
            return [c.token_ids for c in engine.generate(ids.tolist(), greedy)]

        hf_s, hf_ids = best_time(run_hf, args.repeats)
        ours_s, our_ids = best_time(run_ours, args.repeats)
        same = "same ids" if hf_ids == our_ids else "IDS DIFFER"
        hf_tps, our_tps = batch * NEW_TOKENS / hf_s, batch * NEW_TOKENS / ours_s
        floor_tps = batch / matmul_floor_s(engine.model, batch)
        print(f"{batch:>5}  {hf_tps:>18.1f}  {our_tps:>13.1f}  {our_tps / hf_tps:>5.2f}x  "
              f"{floor_tps:>18.1f}  {floor_tps / hf_tps:>5.2f}x  ({same})")
    print("\nbound: the largest ratio any float32 engine could reach here (matmuls alone vs transformers)")


if __name__ == "__main__":
    main()
