"""`graft demo`: the three regimes end to end, on data graftlm generates, in minutes.

Stages, each introduced with a short explanation as it starts:
1. data: a corpus and two tasks with held-out splits (`demo_data.py`);
2. pre-training: a byte-level BPE tokenizer and a tiny base model from scratch;
3. fine-tuning: full SFT on the `where` task, then DPO on preference pairs;
4. LoRA: the same SFT as a LoRA adapter and as QLoRA (4-bit base);
5. two adapters on one base (`where`, `mood`): swapped at generation time, and one
   batch whose rows use different adapters;
6. the bill: held-out accuracy of every variant beside the base prompted with a few
   examples, trainable parameters, peak memory, time and artefact size
   (`graft compare`, `report.html`), and what `graft plan` predicted for each run.

Every stage runs the same commands a user would type (`graft pretrain`, `graft sft`,
...) through `cli.main`, so the demo exercises exactly what the README documents.
`--quick` runs the same stages with fewer steps and rows (the end-to-end test).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from graftlm.console import table_console
from graftlm.errors import GraftError, make_directory


@dataclass(frozen=True)
class DemoSize:
    pretrain_batch: int
    pretrain_steps: int
    sft_batch: int
    sft_steps: int
    dpo_steps: int
    lora_steps: int
    qlora_steps: int
    eval_rows: int


FULL = DemoSize(pretrain_batch=16, pretrain_steps=600, sft_batch=32, sft_steps=150, dpo_steps=40,
                lora_steps=500, qlora_steps=500, eval_rows=200)
# Quick mode's adapters learn only on a base that knows the world: on 60-step bases LoRA
# kept guessing (held-out accuracy 0-62% after 120-150 steps, learning rates 2e-3 to 2e-2),
# on 200-step bases from 4 seeds it reached 85-100% within 100 steps (QLoRA: 80), the
# steps the slowest seed needed. Full SFT is done (100%) by step 40 on such a base.
QUICK = DemoSize(pretrain_batch=8, pretrain_steps=200, sft_batch=32, sft_steps=40, dpo_steps=10,
                 lora_steps=100, qlora_steps=80, eval_rows=40)

STAGES = {
    "data": ("Data", "graftlm writes a small world of sentences and two tasks about them: `where` "
             "(where does it happen?) and `mood` (happy or sad?). Held-out questions use sentences "
             "that no training file contains. Nothing is downloaded."),
    "pretrain": ("Pre-training", "A tokenizer (byte-level BPE) and a base model of about a million "
                 "parameters, trained from random weights on the corpus (next-token prediction). The "
                 "base knows the world's sentences but has never seen a question."),
    "sft": ("Fine-tuning: SFT, then DPO", "Full supervised fine-tuning updates every weight of the base "
            "on question/answer pairs; DPO then pushes the SFT model toward preferred answers and away "
            "from rejected ones, against a frozen copy of itself as the reference."),
    "lora": ("LoRA and QLoRA", "The same SFT, but the base stays frozen and only small low-rank "
             "adapters train; QLoRA stores the frozen base in 4-bit NF4. What they save is a file of "
             "kilobytes instead of a whole model."),
    "adapters": ("Two adapters, one base", "A second adapter learns the `mood` task. Both load onto one "
                 "copy of the base; generation swaps them per request, and one batch mixes them row by row."),
    "bill": ("Evaluation and the bill", "Held-out accuracy of every variant, next to what each run "
             "cost, and what `graft plan` predicted before it ran."),
}


def _cli(*argv: str) -> None:
    from graftlm.cli import main

    status = main([str(a) for a in argv])
    if status != 0:
        raise GraftError(f"demo stage failed: graft {' '.join(map(str, argv))} (exit {status})")


def _train(command: str, name: str, model, data, steps: int, lr: float, runs: Path, *extra) -> Path:
    # fp32 on the CPU: for a model this small, bf16 autocast costs more in casts than it saves.
    _cli(command, "--model", model, "--data", data, "--name", name, "--out", runs, "--fresh",
         "--train.max_steps", steps, "--optim.lr", lr, "--optim.warmup_steps", max(2, steps // 10),
         "--train.precision", "fp32", "--train.save_every", 0, "--train.log_every", 10,
         "--tensorboard", "false", *extra)
    return runs / name


def _stage(console: Console, key: str, number: int) -> None:
    title, text = STAGES[key]
    # Wrapped inside the panel: the console's soft wrap would crop a panel's text at its edge.
    console.print(Panel(text, title=f"[bold]{number}/{len(STAGES)} {title}", expand=False), soft_wrap=False)


def _accuracy(evaluate, model_dir, data, rows, adapters=None, few_shot=0) -> dict:
    result = evaluate(model_dir, data, adapters=adapters, few_shot=few_shot, max_rows=rows,
                      max_new_tokens=4)
    return {name: m["exact_match"] for name, m in result["metrics"].items()}


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def swap_and_mix(base_dir: Path, adapters: dict[str, Path], prompts: dict[str, str]) -> list[tuple]:
    """Generate each prompt with each adapter (swapping), then all in one mixed batch."""
    from graftlm.adapters import load_adapter
    from graftlm.engine import Engine, SamplingParams
    from graftlm.models.hf import load_model
    from graftlm.tokenizer import load_tokenizer

    model = load_model(base_dir)
    tokenizer = load_tokenizer(base_dir)
    for name, path in adapters.items():
        load_adapter(model, path, name)
    engine = Engine(model, tokenizer)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    chats = {task: tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
             for task, p in prompts.items()}
    rows = []
    names = list(adapters)
    for name in [None, *names]:  # swapped: one adapter for the whole batch
        outs = engine.generate(list(chats.values()), greedy, adapters=[name] * len(chats))
        rows += [(name or "base", task, _first_line(o.text)) for task, o in zip(chats, outs)]
    mixed_names = [names[i % len(names)] for i in range(len(chats))]
    outs = engine.generate(list(chats.values()), greedy, adapters=mixed_names)
    rows += [(f"mixed batch: {n}", task, _first_line(o.text)) for n, task, o in zip(mixed_names, chats, outs)]
    return rows


# What the demo writes at the top of its --out: all it replaces when it runs again.
DEMO_ENTRIES = ("data", "tokenizer", "shards", "runs", "report.html", "demo.json")


def _clear(out: Path) -> None:
    """Empty `out` for a new demo; refused when it holds anything the demo did not write
    (`--out .` would otherwise delete the working directory)."""
    make_directory(out, "--out", create=False)
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GraftError(f"--out {out}: holds {shown}, which the demo did not write; the demo replaces its "
                         "directory, so give it a new or empty one (or an earlier demo's)")
    shutil.rmtree(out)


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    from graftlm.demo_data import generate
    from graftlm.eval import evaluate
    from graftlm.plan.check import check_run
    from graftlm.report import compare_runs

    size = QUICK if quick else FULL
    console = table_console()
    started = time.perf_counter()
    out = Path(out)
    runs = out / "runs"
    _clear(out)

    _stage(console, "data", 1)
    data = generate(out / "data", train_rows=2000, heldout_rows=size.eval_rows)
    console.print(f"  {data['corpus']}: {sum(1 for _ in data['corpus'].open())} lines; "
                  f"tasks: where / mood, {size.eval_rows} held-out questions each")

    _stage(console, "pretrain", 2)
    tok, shards = out / "tokenizer", out / "shards"
    _cli("tokenizer", "train", "--data", data["corpus"], "--vocab-size", 512, "--out", tok)
    _cli("prepare", "--data", data["corpus"], "--tokenizer", tok, "--out", shards)
    base = _train("pretrain", "base", "small", shards, size.pretrain_steps, 1e-2, runs,
                  "--tokenizer", tok, "--train.batch_size", size.pretrain_batch, "--train.seq_len", 128,
                  "--train.eval_every", max(size.pretrain_steps // 3, 1))
    base_model = base / "final"

    _stage(console, "sft", 3)
    sft_args = ("--train.batch_size", size.sft_batch, "--train.seq_len", 64, "--train.eval_every", 0)
    sft = _train("sft", "sft", base_model, data["where_train"], size.sft_steps, 3e-3, runs, *sft_args)
    dpo = _train("dpo", "dpo", sft / "final", data["where_pairs"], size.dpo_steps, 2e-4, runs,
                 "--train.batch_size", 16, "--train.seq_len", 64, "--train.eval_every", 0, "--dpo.beta", 0.1)

    _stage(console, "lora", 4)
    lora_args = ("--adapter.r", 16, "--adapter.alpha", 32, "--adapter.target_modules", "all-linear")
    lora = _train("sft", "lora", base_model, data["where_train"], size.lora_steps, 5e-3, runs,
                  *sft_args, "--adapter", "lora", *lora_args)
    qlora = _train("sft", "qlora", base_model, data["where_train"], size.qlora_steps, 5e-3, runs,
                   *sft_args, "--adapter", "qlora", *lora_args)

    _stage(console, "adapters", 5)
    mood = _train("sft", "lora-mood", base_model, data["mood_train"], size.lora_steps, 5e-3, runs,
                  *sft_args, "--adapter", "lora", *lora_args)
    first = json.loads(data["where_test"].open().readline())["prompt"].split(": ", 1)[1]
    swaps = swap_and_mix(base_model, {"where": lora / "final", "mood": mood / "final"},
                         {"where": f"where: {first}", "mood": f"mood: {first}"})
    # The prompt on its own line: as a title it wrapped to the narrow table's width.
    console.print(f"  one base, two adapters, one prompt: '{first}'")
    table = Table()
    for column in ("adapter", "task", "answer"):
        table.add_column(column)
    for row in swaps:
        table.add_row(*row)
    console.print(table)

    _stage(console, "bill", 6)
    where_test = data["where_test"]
    accuracy = _accuracy(evaluate, base_model, where_test, size.eval_rows,
                         adapters={"lora": lora / "final", "qlora": qlora / "final"}, few_shot=3)
    accuracy["sft"] = _accuracy(evaluate, sft / "final", where_test, size.eval_rows)["base"]
    accuracy["dpo"] = _accuracy(evaluate, dpo / "final", where_test, size.eval_rows)["base"]
    mood_acc = _accuracy(evaluate, base_model, data["mood_test"], size.eval_rows,
                         adapters={"mood": mood / "final"}, few_shot=3)

    run_dirs = [base, sft, dpo, lora, qlora, mood]
    rows = compare_runs(run_dirs, out / "report.html")
    variant_accuracy = {"base": accuracy.get("base+3-shot"), "sft": accuracy["sft"], "dpo": accuracy["dpo"],
                        "lora": accuracy["lora"], "qlora": accuracy["qlora"], "lora-mood": mood_acc["mood"]}
    bill = Table(title="what each regime bought, and what it cost (plan's prediction in brackets)")
    for column in ("run", "regime", "accuracy", "trained", "time s", "peak MB", "GFLOP", "saved"):
        bill.add_column(column, justify="right" if column not in ("run", "regime") else "left")
    summary_rows = []
    for run_dir, row in zip(run_dirs, rows):
        name = run_dir.name
        summary = json.loads((run_dir / "summary.json").read_text())
        check = check_run(run_dir, None)["figures"]
        memory, flops = check["peak memory (bytes)"], check["FLOPs"]
        acc = variant_accuracy.get(name)
        acc_text = "-" if acc is None else f"{acc:.0%}"
        if name == "base":
            acc_text = f"{acc:.0%} 3-shot" if acc is not None else "-"
        bill.add_row(name, row["regime"], acc_text,
                     f"{summary['params_trainable'] / summary['params_total']:.0%}",
                     f"{summary['wall_time_s']:.0f}",
                     f"{(memory['measured'] or 0) / 1e6:.0f} ({(memory['predicted'] or 0) / 1e6:.0f})",
                     f"{(flops['measured'] or 0) / 1e9:,.0f} ({(flops['predicted'] or 0) / 1e9:,.0f})",
                     f"{summary['artifact_bytes'] / 1e3:,.0f} kB")
        summary_rows.append({"run": name, "accuracy": acc, **{k: summary.get(k) for k in (
            "params_trainable", "params_total", "wall_time_s", "artifact_bytes", "peak_tensor_bytes",
            "peak_memory_bytes")},
            "plan_peak_memory_bytes": memory["predicted"], "plan_flops": flops["predicted"]})
    console.print(bill)
    console.print("  trained: share of parameters that get gradients; peak: the most tensor memory "
                  "live in a training step (weights, gradients, optimizer states, activations), what the "
                  "plan predicts; the process's RSS (interpreter and libraries too) is in summary.json")
    console.print(f"  `where` held-out accuracy of the base prompted with 3 examples: "
                  f"{accuracy.get('base+3-shot', 0):.0%}; `mood`: {mood_acc.get('base+3-shot', 0):.0%} "
                  f"(base) -> {mood_acc['mood']:.0%} (LoRA adapter)")
    console.print(f"  report: {out / 'report.html'}  (per run: {runs}/<name>/report.html)")
    console.print(f"  demo finished in {time.perf_counter() - started:.0f} s")
    result = {"accuracy": variant_accuracy, "mood": mood_acc, "runs": summary_rows, "swaps": swaps,
              "report": str(out / "report.html")}
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the three regimes end to end on generated data (minutes)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where the demo writes (replaced)")
    parser.add_argument("--quick", action="store_true", help="fewer steps: under 90 seconds, for tests")
    parser.set_defaults(handler=lambda args: run_demo(args.out, args.quick) and 0)
