"""Generation speed: graftlm's engine against transformers' `generate`, in one run.

The model is the `30m` preset (hidden 512, 8 layers, vocabulary 8192) as a random
transformers LlamaForCausalLM, saved and loaded into graftlm, so both sides run the
same weights. Greedy, CPU, 64-token prompts, 128 new tokens, batch 1 and 8. Neither
side stops early (no EOS id), so both produce exactly 128 tokens per row.

Sides, each timed on the same prompts:
- transformers `generate` in float32 (its default) and in bfloat16;
- graftlm's engine in float32, eager and with `compile=True` (`graft generate
  --compile`), and in bfloat16 with `compile=True`.
Each graftlm side is compared with transformers in the same dtype, and its token ids
with transformers' (float32 must match exactly; in bfloat16 the two round differently,
so the table shows how many of the 128 tokens agree before the first difference).

Each figure is the best of `--repeats` timed rounds, after a warm-up run; a round runs
every side once, so a drift of the (possibly shared) CPU's speed reaches all sides
alike, and the best run is the least disturbed one. The warm-up of a compiled side
includes compiling its decode step: its time is printed too. In bfloat16, token ids
part early: the random weights give nearly tied logits, so a rounding difference
flips a greedy choice.

Then sampling, as GRPO's rollouts sample: 32 rows of 64-token prompts, 64 new tokens,
temperature 1.0, each row seeded (`SamplingParams.seed`), with top-p off and at 0.9,
against transformers' `generate(do_sample=True)` on the same prompts, float32 eager on
both sides (the tokens differ: each side draws its own random numbers).

It also prints the float32 floor: one decode step's matrix products alone (every weight
read once, q/k/v and gate/up concatenated), which no float32 engine on this CPU can
beat; the ratio of transformers' step time to it bounds any float32 speed-up.

On a CPU without fast bfloat16 (AVX2 only: no AVX-512 / AMX) the bfloat16 sides are
left out, and the run says so: both sides would time PyTorch's scalar fallback.

    python bench/generate.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

PROMPT_TOKENS, NEW_TOKENS = 64, 128


def build_hf_model(out_dir):
    """A random 30m-preset LlamaForCausalLM, saved to `out_dir` for graftlm to load."""
    import transformers
    from graftlm.models.config import preset, to_hf_config

    cfg = preset("30m")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in to_hf_config(cfg).items()
                                         if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(out_dir)
    print(f"model: 30m preset, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters, "
          f"vocabulary {cfg.vocab_size}")
    return hf


def matmul_floor_s(model, batch: int, repeats: int = 20) -> float:
    """Seconds of one float32 decode step's matmuls alone, at `batch` rows (best of `repeats`)."""
    import torch.nn.functional as F

    weights = []
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        weights += [torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), attn.o_proj.weight,
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight]
    weights.append(model.lm_head.weight)
    weights = [w.float() for w in weights]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}

    def step():
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
    with torch.inference_mode():
        return best_of_rounds({"floor": step}, repeats)["floor"][0]


def best_of_rounds(sides: dict, repeats: int) -> dict:
    """{name: (best seconds, last output, seconds of the warm-up run)} of `sides`
    ({name: fn}), timed in `repeats` rounds that each run every side once, so a drift
    of the host's speed reaches every side alike."""
    results = {}
    for name, fn in sides.items():
        start = time.perf_counter()
        fn()
        results[name] = [float("inf"), None, time.perf_counter() - start]
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            out = fn()
            results[name][0] = min(results[name][0], time.perf_counter() - start)
            results[name][1] = out
    return {name: tuple(r) for name, r in results.items()}


def agreement(ours: list[list[int]], reference: list[list[int]]) -> str:
    if ours == reference:
        return "same ids"
    prefix = min(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(o))
                 for o, r in zip(ours, reference))
    return f"first {prefix} of {NEW_TOKENS} tokens agree in every row"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from graftlm.engine import Engine, SamplingParams
    from graftlm.models.hf import load_model
    from graftlm.placement import fast_bfloat16

    bf16 = fast_bfloat16("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_hf_model(tmp)
        engines = {"graftlm float32": Engine(load_model(tmp)),
                   "graftlm float32 compile": Engine(load_model(tmp), compile=True)}
        if bf16:
            engines["graftlm bfloat16 compile"] = Engine(load_model(tmp, dtype=torch.bfloat16), compile=True)
    hf_by_dtype = {"float32": hf, **({"bfloat16": copy.deepcopy(hf).to(torch.bfloat16)} if bf16 else {})}
    if not bf16:
        print("this CPU has no fast bfloat16 (no AVX-512 / AMX): the bfloat16 sides are left out")
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, stop_ids=())
    print(f"CPU, {torch.get_num_threads()} threads, {PROMPT_TOKENS}-token prompts, "
          f"{NEW_TOKENS} new tokens, greedy, best of {args.repeats}\n")
    for batch in (1, 8):
        ids = torch.randint(3, 8192, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))
        print(f"batch {batch}")
        print(f"  {'side':<36} {'tokens/s':>9}  {'vs transformers':>15}  {'warm-up s':>9}  token ids")
        sides = {}
        for dtype, model in hf_by_dtype.items():
            def run_hf(model=model):
                with torch.inference_mode():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)
                return out[:, PROMPT_TOKENS:].tolist()
            sides[f"transformers generate {dtype}"] = run_hf
        for name, engine in engines.items():
            sides[name] = lambda engine=engine: [c.token_ids for c in engine.generate(ids.tolist(), greedy)]
        results = best_of_rounds(sides, args.repeats)
        for name, (seconds, out, warm_up) in results.items():
            tps = batch * NEW_TOKENS / seconds
            if name.startswith("transformers"):
                print(f"  {name:<36} {tps:>9.1f}")
                continue
            dtype = "bfloat16" if "bfloat16" in name else "float32"
            ref_seconds, ref_ids, _ = results[f"transformers generate {dtype}"]
            print(f"  {name:<36} {tps:>9.1f}  {ref_seconds / seconds:>14.2f}x  {warm_up:>9.1f}  "
                  f"{agreement(out, ref_ids)}")
        hf_tps = batch * NEW_TOKENS / results["transformers generate float32"][0]
        floor_tps = batch / matmul_floor_s(engines["graftlm float32"].model, batch)
        print(f"  {'float32 matmul floor':<36} {floor_tps:>9.1f}  {floor_tps / hf_tps:>14.2f}x"
              f"  (the bound of any float32 engine)\n")
    sampling(hf, engines["graftlm float32"], SamplingParams, args.repeats)


def sampling(hf, engine, SamplingParams, repeats: int, rows: int = 32, new_tokens: int = 64) -> None:
    """Sampled rollouts, as GRPO draws them: every row seeded, top-p off and on."""
    ids = torch.randint(3, 8192, (rows, PROMPT_TOKENS), generator=torch.Generator().manual_seed(rows))
    print(f"sampling: batch {rows}, {new_tokens} new tokens, temperature 1.0, float32 eager, best of {repeats}")
    print(f"  {'side':<36} {'tokens/s':>9}  {'vs transformers':>15}")
    for top_p in (1.0, 0.9):
        params = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=top_p, stop_ids=(), seed=i)
                  for i in range(rows)]

        def run_hf(top_p=top_p):
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=True,
                            temperature=1.0, top_p=top_p, top_k=0, eos_token_id=None, pad_token_id=0)
        results = best_of_rounds({"transformers": run_hf, "graftlm": lambda params=params: engine.generate(
            ids.tolist(), params)}, repeats)
        hf_s, ours_s = results["transformers"][0], results["graftlm"][0]
        print(f"  {f'transformers generate, top_p {top_p}':<36} {rows * new_tokens / hf_s:>9.1f}")
        print(f"  {f'graftlm engine, top_p {top_p}':<36} {rows * new_tokens / ours_s:>9.1f}  {hf_s / ours_s:>14.2f}x")


if __name__ == "__main__":
    main()
