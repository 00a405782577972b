"""Preference and RL steps on the CPU: graftlm's `graft dpo` / `graft grpo` against TRL's
DPOTrainer / GRPOTrainer, same model, same data, same batch, in one run.

The model is a random transformers LlamaForCausalLM of graftlm's `10m` preset shape (hidden
256, 6 layers, 8 heads, 4 KV heads, intermediate 704, tied embeddings: 6.5M parameters)
with a byte-level BPE tokenizer of 8192 tokens (graftlm's `train_tokenizer`, ChatML
template) trained on the data, saved once to a temporary directory that both sides load
from. Each side is its own subprocess of this file, so peak RSS is its own: graftlm runs
its CLI's entry point (`graft dpo|grpo` with a run directory, `graftlm.cli.main`) with its
trainer's `train_step` and its engine's `generate` wrapped in a clock; TRL runs its
trainer's `train()`, timed from one optimizer step's end to the next by a callback (its
loop's bookkeeping between steps included; graftlm's logging between steps is not, a few
ms), its `_generate_single_turn` (transformers' `generate`, use_vllm False) wrapped too.
Each step is timed in wall and in CPU seconds. With one thread per side (`--threads 1`,
the default) steps are compared by CPU time, what a step cost its core: on a shared host
the wall time also holds the time a step waited for a core (here 2x the CPU time at
load average 5; the CPU times of one side's steps agreed within 7%). Untimed first:
`--warmup` steps on both sides, and on graftlm's also its second, which runs under its
tensor-memory tracker. A side's figure is its fastest timed step (noise only adds time),
the median beside it, and the fastest of `--repeats` rounds.

- DPO: 4 preference pairs per step from HH-RLHF harmless (/work/shared/data) as chat
  messages (prompt = the conversation, chosen / rejected = the last assistant turn), the
  first 4 whose longer side fits 128 tokens whole, so that neither side truncates. The
  data set is those 4 pairs, so every step trains on the same 8 sequences at the same
  padded width on both sides (tokens per step printed; the token ids are the same, both
  rendering with the tokenizer's chat template). Sigmoid loss, beta 0.1, the reference's
  forward every step (no precomputed log-probs); full fine-tuning (reference: a frozen
  copy) and LoRA r=16, alpha 32, every linear layer but the head (reference: the base with
  the adapter off; TRL through a peft LoraConfig). TRL's DPO step also computes the
  entropy, mean logits and top-1 accuracy it logs: that is its default step, timed as is.
- GRPO: 4 GSM8K questions per step (the data set is those 4), 4 completions each (TRL:
  per_device_train_batch_size 16 = generation_batch_size, num_generations 4), at most 32
  new tokens, temperature 1.0, top-p 1, no top-k, KL beta 0.04 (a reference on both
  sides), one optimizer step per rollout, advantages scaled by the group's std, loss
  normalised by the step's completion tokens (TRL's `dapo`). Reward: the share of digits
  in a completion (`digit_reward` below; both call it once per batch, TRL's form): cheap,
  and varied enough that advantages are not all 0. A random model rarely samples a stop
  token, so completions are ~32 tokens on both sides (printed; graftlm also stops on
  <|im_end|>, TRL on EOS only). `rest s` = the step less its generation, timed the same
  way on both sides.

Both sides: float32 weights, fused AdamW, grad clip 1.0, constant lr 1e-5, no dropout,
no activation checkpointing (TRL 1.16's configs default to gradient_checkpointing=True and
bf16=True; both turned off here, as graftlm runs by default), no checkpoint inside the timed
steps, `--threads` torch threads (OMP_NUM_THREADS). `--precision auto` is what
`--train.precision auto` picks: bf16 autocast on a CPU with AVX-512 BF16 / AMX (TRL:
bf16=True, its autocast; a LoRA base stored in bf16 on both sides), float32 on one without,
where a bf16 matmul is ~50x slower; the bf16 path has not been run on this (AVX2) host.

    .venv/bin/python bench/rl_step.py [--steps 2] [--warmup 1] [--repeats 1] [--threads 1]
        [--only graft-dpo trl-dpo ...] [--precision auto|bf16-autocast|fp32]

Default: DPO full and LoRA and GRPO full, both sides (6 processes): 2.5 minutes on this
2-core host at load averages 2-6 (TRL's imports alone take up to 30 s a process there);
`--only graft-grpo-lora trl-grpo-lora` adds GRPO with LoRA, and `graft-grpo-compiled` /
`graft-grpo-lora-compiled` graftlm's with `--grpo.sampling.compile` (compiled in the
untimed first step). Caveats: the host is shared and
the sides run one after another; by wall time the LoRA DPO ratio moved from 1.07x to 4.14x
between two runs here, by CPU time the ratios stayed within 1.32x-1.45x (DPO), 1.77x-2.08x
(DPO LoRA) and 1.34x-1.58x (GRPO) over three runs (raise --repeats, which also prints each
round's ratio). CPU time still grows with the other processes' use of caches and memory
bandwidth. One thread per side by default: at load average 5, two threads per process spin
against the other processes' (a 16-row rollout took 1.1 s on 1 thread, 20-28 s on 2); on
an idle host, `--threads 2` measures the threaded step (by wall time). Peak RSS includes
each library's imports (TRL's: transformers, datasets, accelerate). Small batches on a
small model: fixed per-step costs weigh more than they would at scale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = Path("/work/shared/data/hh_rlhf_harmless_test.jsonl.gz")
GSM8K = Path("/work/shared/data/gsm8k_train.jsonl")
# graftlm's `10m` preset shape: with train_step.py's 30M shape one DPO step of 16 sequences of
# up to 256 tokens took 40-60 s on this loaded 2-core AVX2 host (~40 GFLOP/s in float32).
SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
VOCAB = 8192
PAIRS, MAX_LENGTH, DPO_BETA = 4, 128, 0.1
PROMPTS, GROUP, NEW_TOKENS, GRPO_BETA = 4, 4, 32, 0.04
RANK, ALPHA, LR = 16, 32, 1e-5
SIDES = ("graft-dpo", "trl-dpo", "graft-dpo-lora", "trl-dpo-lora", "graft-grpo", "trl-grpo",
         "graft-grpo-lora", "trl-grpo-lora", "graft-grpo-compiled", "graft-grpo-lora-compiled")
DEFAULT_SIDES = SIDES[:6]


def digit_reward(completions, **kwargs) -> list[float]:
    """Share of a completion's characters that are digits. TRL passes chat completions as
    message lists, graftlm as text: both reach the same string."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


# -- the shared model and data ---------------------------------------------------------------

def prepare(work: Path) -> dict:
    """Tokenizer, random Llama and both data files in `work`; returns what was chosen."""
    import torch
    import transformers

    from graftlm.data.formats import load_examples
    from graftlm.data.render import RenderConfig, Renderer
    from graftlm.tokenizer import load_tokenizer, train_tokenizer

    pairs, _ = load_examples([HH], "preference")
    questions = [json.loads(line) for line in GSM8K.read_text().splitlines()[:2000]]
    texts = [m["content"] for p in pairs for m in p["prompt"] + p["chosen"] + p["rejected"]]
    texts += [q["question"] + "\n" + q["answer"] for q in questions]
    model_dir = work / "model"
    train_tokenizer(iter(texts), VOCAB).save(model_dir)
    tok = load_tokenizer(model_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                      pad_token_id=tok.pad_id, **SHAPE)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)

    renderer = Renderer(tok, RenderConfig(max_length=100_000))
    picked = []  # (pair, its tokens: prompt twice, chosen and rejected)
    for pair in pairs:
        r = renderer.render_pair(pair)
        if r is not None and len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) <= MAX_LENGTH:
            picked.append((pair, len(r.prompt_ids) * 2 + len(r.chosen_ids) + len(r.rejected_ids)))
        if len(picked) == PAIRS:
            break
    with open(work / "dpo.jsonl", "w") as f:
        for pair, _ in picked:  # TRL's conversational preference columns, which graftlm reads too
            f.write(json.dumps({k: pair[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    with open(work / "grpo.jsonl", "w") as f:
        for q in questions[:PROMPTS]:
            f.write(json.dumps({"prompt": [{"role": "user", "content": q["question"]}], "answer": q["answer"]}) + "\n")
    prompt_tokens = sum(len(renderer.render_prompt({"prompt": [{"role": "user", "content": q["question"]}]}))
                        for q in questions[:PROMPTS])
    return {"dpo_tokens": sum(n for _, n in picked), "grpo_prompt_tokens": prompt_tokens * GROUP}


# -- each side in its own process (`--side`), timing each optimizer step --------------------------

def clock() -> tuple[float, float]:
    """(wall, CPU) seconds. With one thread per side the CPU time is what a step costs its
    core: the time the step waited for a core on a busy host is in the wall time only."""
    return time.perf_counter(), time.process_time()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def graft_side(side: str, work: Path, steps: int, warmup: int, precision: str) -> dict:
    """`graft dpo|grpo` (graftlm's CLI entry point, in this process) with its trainer's
    step and its engine's generation wrapped in a clock."""
    from graftlm import cli, engine, trainer

    objective = "dpo" if "dpo" in side else "grpo"
    # Its second step runs under the tensor-memory tracker (`Trainer._tracked_step`): untimed too.
    warmup = max(warmup, 2)
    argv = [objective, "--model", str(work / "model"), "--data", str(work / f"{objective}.jsonl"),
            "--out", str(work / "runs"), "--name", side, "--fresh", "--device", "cpu", "--seed", "0",
            "--tensorboard", "false", "--train.max-steps", str(warmup + steps), "--train.precision", precision,
            "--train.eval-every", "0", "--train.save-every", "0", "--optim.lr", str(LR),
            "--optim.warmup-steps", "0", "--optim.schedule", "constant", f"--{objective}.val-fraction", "0"]
    if objective == "dpo":
        argv += ["--train.batch-size", str(PAIRS), "--dpo.max-length", str(MAX_LENGTH), "--dpo.loss", "sigmoid",
                 "--dpo.beta", str(DPO_BETA)]
    else:
        argv += ["--train.batch-size", str(PROMPTS), "--grpo.sampling.group-size", str(GROUP),
                 "--grpo.sampling.max-new-tokens", str(NEW_TOKENS), "--grpo.sampling.temperature", "1.0",
                 "--grpo.beta", str(GRPO_BETA), "--grpo.reward", f"{Path(__file__).resolve()}:digit_reward"]
    if "-lora" in side:
        argv += ["--adapter", "lora", "--adapter.r", str(RANK), "--adapter.alpha", str(ALPHA)]
    if side.endswith("-compiled"):  # the rollouts' decode step compiled at the first (untimed) step
        argv += ["--grpo.sampling.compile", "true"]

    marks, generation = [], []
    train_step, generate = trainer.Trainer.train_step, engine.Engine.generate

    def timed_step(self):  # data, forward (GRPO: with its rollout), backward, optimizer
        wall, cpu = clock()
        record = train_step(self)
        now = clock()
        marks.append((now[0] - wall, now[1] - cpu, peak_rss()))
        return record

    def timed_generate(self, *args, **kwargs):
        wall, cpu = clock()
        out = generate(self, *args, **kwargs)
        now = clock()
        generation.append((now[0] - wall, now[1] - cpu))
        return out

    trainer.Trainer.train_step, engine.Engine.generate = timed_step, timed_generate
    # The run's own lines go to stderr: stdout's last line is this side's result.
    with contextlib.redirect_stdout(sys.stderr):
        status = cli.main(argv)
    if status:
        sys.exit(f"graft {objective} exited with {status}")
    records = [json.loads(line) for line in (work / "runs" / side / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r][warmup:]
    result = {"wall": [m[0] for m in marks[warmup:]], "cpu": [m[1] for m in marks[warmup:]],
              "tokens": [r["step_tokens"] for r in timed], "peak_rss": marks[-1][2]}
    if generation:
        result["generation"] = generation[warmup:]
        result["completion_length"] = statistics.mean(r["train_completion_length"] for r in timed)
    return result


def trl_side(side: str, work: Path, steps: int, warmup: int, precision: str) -> dict:
    """TRL's trainer, `train()`, timed by a callback at each optimizer step's end."""
    import torch
    import transformers
    import trl
    from datasets import Dataset

    bf16 = precision == "bf16-autocast"
    lora = side.endswith("-lora")
    total_steps = warmup + steps
    data = work / ("dpo.jsonl" if "dpo" in side else "grpo.jsonl")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "model")
    common = dict(output_dir=str(work / "trl" / side), report_to="none", use_cpu=True, bf16=bf16, seed=0,
                  max_steps=total_steps, gradient_accumulation_steps=1, learning_rate=LR,
                  lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch_fused",
                  logging_steps=total_steps, save_strategy="no", gradient_checkpointing=False,
                  disable_tqdm=True, dataloader_num_workers=0,
                  # A LoRA base in bf16 under bf16 autocast, as graftlm stores it (adapter.base_dtype auto).
                  model_init_kwargs={"dtype": torch.bfloat16 if bf16 and lora else torch.float32})
    peft_config = None
    if lora:
        import peft
        peft_config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM")

    marks, generation, lengths = [], [], []

    class Clock(transformers.TrainerCallback):
        # From one step's end to the next's: data, forward (GRPO: with its rollout), backward, optimizer.
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append((*clock(), 0, 0))

        def on_step_end(self, args, state, control, **kwargs):
            tokens = state.num_input_tokens_seen if "grpo" in side else trainer._total_train_tokens
            marks.append((*clock(), tokens, peak_rss()))
            if "grpo" in side:  # read before the step's log() clears TRL's metrics
                lengths.append(trainer._metrics["train"]["completions/mean_length"][-1])

    if "dpo" in side:
        args = trl.DPOConfig(per_device_train_batch_size=PAIRS, max_length=MAX_LENGTH, beta=DPO_BETA,
                             loss_type=["sigmoid"], precompute_ref_log_probs=False, **common)
        trainer = trl.DPOTrainer(model=str(work / "model"), args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
    else:
        # per_device_train_batch_size counts completions in TRL: 4 prompts x 4 generations,
        # all generated at once (steps_per_generation 1) and trained on in one step.
        args = trl.GRPOConfig(per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                              steps_per_generation=1, num_iterations=1, max_completion_length=NEW_TOKENS,
                              temperature=1.0, top_p=1.0, top_k=0, beta=GRPO_BETA, loss_type="dapo",
                              scale_rewards="group", disable_dropout=True, use_vllm=False, **common)
        trainer = trl.GRPOTrainer(model=str(work / "model"), reward_funcs=digit_reward, args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                  peft_config=peft_config, callbacks=[Clock()])
        generate = trainer._generate_single_turn  # transformers' generate, and its padding

        def timed_generate(*args, **kwargs):
            wall, cpu = clock()
            out = generate(*args, **kwargs)
            now = clock()
            generation.append((now[0] - wall, now[1] - cpu))
            return out

        trainer._generate_single_turn = timed_generate
    trainer.train()
    steady = range(warmup + 1, len(marks))
    result = {"wall": [marks[i][0] - marks[i - 1][0] for i in steady],
              "cpu": [marks[i][1] - marks[i - 1][1] for i in steady],
              "tokens": [marks[i][2] - marks[i - 1][2] for i in steady], "peak_rss": marks[-1][3]}
    if generation:
        result["generation"] = generation[warmup:]
        result["completion_length"] = statistics.mean(lengths[warmup:])
    return result


# -- one table per objective -------------------------------------------------------------------

def summarize(run: dict, basis: str) -> dict:
    """A side's fastest step by `basis` ("cpu" or "wall"; on a shared host noise only adds
    time), with that step's other clock, tokens and generation, and the median step."""
    fastest = min(range(len(run[basis])), key=run[basis].__getitem__)
    out = {"step_s": run[basis][fastest], "wall_s": run["wall"][fastest], "cpu_s": run["cpu"][fastest],
           "median_s": statistics.median(run[basis]), "tokens": run["tokens"][fastest], "peak_rss": run["peak_rss"]}
    if "generation" in run:
        out["generation_s"] = run["generation"][fastest][0 if basis == "wall" else 1]
        out["completion_length"] = run["completion_length"]
    return out


def print_table(title: str, rows: dict, pairs: list[tuple[str, str]], rounds: list[dict]) -> None:
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return
    rl = any("generation_s" in r for r in rows.values())
    print(f"\n{title}")
    head = f"{'side':<26}{'steps/s':>8}{'s/step':>8}{'median':>8}{'wall s':>8}{'CPU s':>7}{'tokens/step':>12}"
    head += f"{'tokens/s':>9}" + (f"{'gen s':>7}{'rest s':>8}{'compl len':>10}" if rl else "")
    print(head + f"{'peak RSS MiB':>13}{'speed vs TRL':>13}{'RSS vs TRL':>11}")
    peer_of = dict(pairs)
    for side, r in rows.items():
        line = (f"{side:<26}{1 / r['step_s']:>8.3f}{r['step_s']:>8.2f}{r['median_s']:>8.2f}{r['wall_s']:>8.2f}"
                f"{r['cpu_s']:>7.2f}{r['tokens']:>12,}{r['tokens'] / r['step_s']:>9,.0f}")
        if rl:
            line += f"{r['generation_s']:>7.2f}{r['step_s'] - r['generation_s']:>8.2f}{r['completion_length']:>10.1f}"
        line += f"{r['peak_rss'] / 2**20:>13,.0f}"
        peer = rows.get(peer_of.get(side, ""))
        if peer:
            line += f"{peer['step_s'] / r['step_s']:>12.2f}x{r['peak_rss'] / peer['peak_rss']:>10.2f}x"
            # The same ratio within each round: how far the host's drift moves it.
            per_round = [x[peer_of[side]] / x[side] for x in rounds if side in x and peer_of[side] in x]
            line += f" [rounds: {' '.join(f'{x:.2f}' for x in per_round)}]" if len(per_round) > 1 else ""
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps first (graftlm: at least 2, its second is instrumented)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over every side; each side's fastest counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per side (OMP_NUM_THREADS); with 1, steps are compared by CPU time")
    parser.add_argument("--only", nargs="+", choices=SIDES, default=list(DEFAULT_SIDES))
    parser.add_argument("--precision", choices=("auto", "bf16-autocast", "fp32"), default="auto",
                        help="auto: bf16 autocast where this CPU computes bf16 fast, else fp32")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one subprocess's job
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.threads < 1 or args.repeats < 1:
        parser.error("--steps, --warmup, --threads and --repeats must be >= 1")
    if args.side:
        run_side = graft_side if args.side.startswith("graft") else trl_side
        result = run_side(args.side, args.work, args.steps, args.warmup, args.precision)
        print(json.dumps(result))
        return

    import torch

    from graftlm.placement import resolve_precision
    precision = resolve_precision(args.precision, torch.device("cpu"))
    # Nothing is fetched from the hub. Threads: on a shared 2-core host, 2 torch threads per
    # process spin against the other processes' (a 16-row rollout here: 1.1 s on 1 thread,
    # 20-28 s on 2 at load average 5), so the default is 1, and then CPU time is the measure.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    basis = "cpu" if args.threads == 1 else "wall"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rl_step-") as tmp:
        work = Path(tmp)
        shapes = prepare(work)
        best, rounds = {}, []
        for _ in range(args.repeats):  # rounds over every side, so a slow spell hits all alike
            rounds.append({})
            for side in args.only:
                out = subprocess.run([sys.executable, __file__, "--side", side, "--work", str(work),
                                      "--steps", str(args.steps), "--warmup", str(args.warmup),
                                      "--precision", precision], capture_output=True, text=True, cwd=ROOT,
                                     env=env, check=False)
                if out.returncode:
                    sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
                r = summarize(json.loads(out.stdout.strip().splitlines()[-1]), basis)
                rounds[-1][side] = r["step_s"]
                peak = max(r["peak_rss"], best.get(side, r)["peak_rss"])  # the largest of all rounds
                if side not in best or r["step_s"] < best[side]["step_s"]:
                    best[side] = r
                best[side]["peak_rss"] = peak
    print(f"CPU, {args.threads} thread(s) per side, {'bf16 autocast' if precision == 'bf16-autocast' else 'float32'}, "
          f"Llama hidden {SHAPE['hidden_size']} x {SHAPE['num_hidden_layers']} layers, vocab {VOCAB}; "
          f"{args.steps} timed steps per side after {args.warmup} untimed (graftlm: {max(args.warmup, 2)}), "
          f"{args.repeats} round(s); {time.perf_counter() - started:.0f} s in all")
    by = "CPU time (one thread: what the step cost its core)" if basis == "cpu" else "wall time"
    print(f"s/step: the fastest timed step by {by}, "
          "its median beside it, and that step's wall and CPU seconds; steps/s, tokens/s, gen s, rest s and speed "
          "vs TRL (TRL's s/step / this side's: > 1 faster) use s/step; RSS vs TRL = this side's peak / TRL's; "
          "tokens: without padding, the same on both sides")
    print_table(f"DPO, sigmoid, beta {DPO_BETA}: {PAIRS} pairs per step = {2 * PAIRS} sequences of at most "
                f"{MAX_LENGTH} tokens, {shapes['dpo_tokens']:,} tokens (the same pairs every step, on both "
                f"sides); reference forward every step; full fine-tuning and LoRA r={RANK} all-linear",
                {s: best.get(s) for s in SIDES if "dpo" in s},
                [("graft-dpo", "trl-dpo"), ("graft-dpo-lora", "trl-dpo-lora")], rounds)
    print_table(f"GRPO: {PROMPTS} prompts x {GROUP} completions per step, at most {NEW_TOKENS} new tokens, "
                f"temperature 1.0, KL beta {GRPO_BETA}; prompts {shapes['grpo_prompt_tokens']:,} tokens of the "
                "tokens/step (the rest: completions); gen s = generation, rest s = scoring, reference and "
                "policy forward, backward, optimizer",
                {s: best.get(s) for s in SIDES if "grpo" in s},
                [("graft-grpo", "trl-grpo"), ("graft-grpo-lora", "trl-grpo-lora"),
                 ("graft-grpo-compiled", "trl-grpo"), ("graft-grpo-lora-compiled", "trl-grpo-lora")], rounds)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
