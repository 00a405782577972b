"""`graft plan`, `graft compare`, `graft report`: the cost side of graftlm on the command line.

Each handler computes with a plain function (`plan.make_plan`, `plan.check.check_run`,
`report.write_report`, `report.compare_runs`) and only prints: a rich table for people,
`--json` for scripts.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from graftlm.console import table_console
from graftlm.errors import GraftError
from graftlm.plan.hardware import THIS
from graftlm.placement import PRECISIONS

GOALS = ("format", "domain", "deep", "variants", "from-scratch")
DEFAULT_HARDWARE = "A100-80GB"


def register(subparsers) -> None:
    plan = subparsers.add_parser("plan", help="memory, FLOPs, time and money of each regime; which to use")
    plan.add_argument("--model", help="HF model dir, preset, config.json/.yaml, or a parameter count (7B)")
    plan.add_argument("--data", help="data files (counted with `graft data stats`), a `graft prepare` shard "
                                     "directory, or a token count (2B, 500M)")
    plan.add_argument("--tokenizer", metavar="DIR",
                      help="tokenizer directory: its vocabulary sizes a preset model, and data files are counted "
                           "with it (default: a shard directory's vocabulary)")
    plan.add_argument("--vocab-size", type=int, help="the vocabulary a preset model is built with (as --tokenizer)")
    plan.add_argument("--seq-len", type=int, default=None,
                      help="tokens per sequence (default: each regime's trainer default, train.seq_len)")
    plan.add_argument("--batch", type=int, default=None,
                      help="per device and micro-batch, as --train.batch-size counts it: sequences (DPO: pairs; "
                           "GRPO and PPO: prompts, each sampled group_size times; default: each regime's "
                           "trainer default, train.batch_size)")
    plan.add_argument("--hardware", default=None,
                      help=f"catalogue name, NAMExN for N devices, or '{THIS}' for the machine at hand "
                           f"(measured); default {DEFAULT_HARDWARE}; with --check: the run's own device")
    plan.add_argument("--hardware-file", help="a YAML file of extra devices (same layout as graftlm/hardware.yaml)")
    plan.add_argument("--price-per-hour", type=float, help="USD per device-hour (default: the catalogue's)")
    plan.add_argument("--budget", type=float, help="USD you can spend; costlier regimes are not advised")
    plan.add_argument("--goal", choices=GOALS, help="what the training is for")
    plan.add_argument("--precision", default="auto", choices=PRECISIONS,
                      help="as --train.precision (auto: what a run on --hardware picks: bf16 autocast, or "
                           "fp32 where bf16 is slow)")
    plan.add_argument("--activation-checkpointing", action="store_true")
    plan.add_argument("--lora-r", type=int, default=16)
    plan.add_argument("--epochs", type=float, default=1.0)
    plan.add_argument("--sharding", default="fsdp", choices=("fsdp", "ddp"), help="with several devices")
    plan.add_argument("--grpo-iterations", type=int, default=None,
                      help="GRPO: optimizer steps trained on each rollout, as --grpo.iterations (default: "
                           "the trainer's); generation runs once per rollout, training on every pass")
    plan.add_argument("--check", nargs="+", metavar="RUN_DIR", help="prediction vs measurement of finished runs")
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.set_defaults(handler=plan_command)

    compare = subparsers.add_parser("compare", help="one table and one plot across finished runs")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", default=None,
                         help="HTML file with the table and plot (default: compare.html beside the runs)")
    compare.add_argument("--price-per-hour", type=float, default=None,
                         help="USD per device-hour for the cost column (default: from the run's device)")
    compare.add_argument("--json", action="store_true")
    compare.set_defaults(handler=compare_command)

    report = subparsers.add_parser("report", help="(re)write RUN_DIR/report.html")
    report.add_argument("run", metavar="RUN_DIR")
    report.set_defaults(handler=report_command)


# -- formatting ------------------------------------------------------------------------------

def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def fmt_ratio(ratio: float) -> str:
    """1.0 -> '1.00x', 0.976 -> '0.98x', 0.00737 -> '0.00737x', 133.2 -> '133x'."""
    return f"{ratio:.2f}x" if 0.01 <= ratio < 100 else f"{ratio:.3g}x"


# -- graft plan ------------------------------------------------------------------------------

def plan_command(args) -> int:
    from graftlm.plan import PlanOptions, load_catalogue, make_plan, resolve_data, resolve_hardware, resolve_model
    from graftlm.plan.planner import builds_random_weights
    catalogue = load_catalogue(args.hardware_file)
    if args.check:
        return check_command(args, catalogue)
    hardware = resolve_hardware(args.hardware or DEFAULT_HARDWARE, catalogue)
    if not args.model or not args.data:
        raise GraftError("graft plan needs --model and --data (or --check RUN_DIR ...)")
    for name in ("seq_len", "batch", "lora_r", "grpo_iterations"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise GraftError(f"--{name.replace('_', '-')} must be at least 1")
    # Written to refuse NaN and infinity too (argparse's float takes both): every figure would be one.
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise GraftError(f"--epochs: must be > 0, got {args.epochs:g}")
    for flag, value in (("--price-per-hour", args.price_per_hour), ("--budget", args.budget)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise GraftError(f"{flag}: must be >= 0, got {value:g}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise GraftError("--vocab-size must be at least 1")
    tokenizer = None
    if args.tokenizer:
        from graftlm.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
    counter = model_tokenizer(args.model) if tokenizer is None else tokenizer
    tokens, stats = resolve_data(args.data, tokenizer=counter)
    if stats is not None and counter is not None and stats.get("tokens_counted_with") == "tokenizer":
        stats["tokenizer"] = str(args.tokenizer or args.model)
    # The vocabulary a run would build a preset with: given, the tokenizer's, or the shards'
    # (a model directory's own tokenizer only counts the data: the model keeps its vocabulary).
    vocab = args.vocab_size or (tokenizer.vocab_size if tokenizer else None) or (stats or {}).get("vocab_size")
    cfg, has_weights, source = resolve_model(args.model, vocab)
    precision = hardware.device.training_precision(args.precision)
    if precision != "fp32" and not hardware.device.fast_bf16:
        print(f"warning: --precision {precision} on {hardware.device.name}, which has no fast bf16: its time is "
              "planned at the catalogue's bf16 figure, but a bf16 run there is many times slower than fp32 "
              "(50x on an AVX2 CPU); --precision auto plans fp32, as a run trains", file=sys.stderr)
    options = PlanOptions(seq_len=args.seq_len, batch_size=args.batch, precision=precision,
                          activation_checkpointing=args.activation_checkpointing, lora_r=args.lora_r,
                          epochs=args.epochs, price_per_hour=args.price_per_hour, goal=args.goal,
                          budget=args.budget, sharding=args.sharding, grpo_iterations=args.grpo_iterations)
    result = make_plan(cfg, tokens, hardware, options, has_base=has_weights, data_stats=stats,
                       model_source=source, random_init=builds_random_weights(args.model))
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_plan(result)
    return 0


def model_tokenizer(model: str):
    """The tokenizer saved beside a model directory's weights (every run's final/ has one),
    to count data files as a run of that model would; None when it has none."""
    path = Path(model)
    if not (path / "tokenizer.json").is_file():
        return None
    from graftlm.tokenizer import load_tokenizer
    try:
        return load_tokenizer(path)
    except GraftError as e:
        print(f"warning: {e}; the data's tokens are estimated instead", file=sys.stderr)
        return None


def data_lines(result: dict) -> list[str]:
    """'data 86k tokens (counted with DIR's tokenizer) x 1 epoch(s); fp32', and, when the
    count is an estimate, a line that says so and how to get the real one."""
    from rich.markup import escape
    data, stats, opts = result["data"], result["data"]["stats"] or {}, result["options"]
    counted = stats.get("tokens_counted_with") or ""
    how = ""
    if counted.startswith("estimate"):
        how = " [yellow](estimated)[/]"
    elif stats.get("tokenizer"):
        how = f" (counted with {escape(stats['tokenizer'])}'s tokenizer)"
    elif "graft prepare" in counted:
        how = " (counted by graft prepare)"
    lines = [f"[bold]data[/] {fmt_count(data['tokens'])} tokens{how} x {opts['epochs']:g} epoch(s); "
             f"{opts['precision']}"]
    if counted.startswith("estimate"):
        lines.append("  [yellow]estimated[/] as UTF-8 bytes / 4, with no tokenizer to count them: pass --tokenizer "
                     "DIR, or as --model a directory holding its tokenizer.json, for the real count")
    if stats.get("pair_tokens") and "dpo" in result["regimes"]:
        lines.append(f"[bold]dpo[/] trains on both sequences of each pair, each reply after its prompt: "
                     f"{fmt_count(result['regimes']['dpo']['tokens'])} tokens")
    sampled = {name: r["rollouts"] for name, r in result["regimes"].items() if r.get("rollouts")}
    if sampled:
        lines.append(rollout_line(sampled, stats.get("prompts") or {}, data["tokens"]))
    return lines


def rollout_line(sampled: dict, prompts: dict, data_tokens: float) -> str:
    """'rollouts: 300 prompts (59 tokens on average) x 4 completions (grpo), 1 (ppo) ...':
    what GRPO and PPO are costed on, where it differs from the data's own tokens."""
    first = next(iter(sampled.values()))
    groups = ", ".join(f"{r['group']} ({name})" for name, r in sampled.items())
    tokens = ", ".join(f"{fmt_count(r['tokens'])} ({name})" for name, r in sampled.items())
    skipped = f"; {prompts['skipped']} rows without a prompt left out" if prompts.get("skipped") else ""
    return (f"[bold]rollouts[/] {first['prompts']:,} prompts ({first['prompt_tokens_mean']:.0f} tokens on average) "
            f"x {groups} completions of up to {first['completion_tokens_max']} sampled tokens: {tokens} tokens "
            f"per epoch, at most (completions may end sooner), where the data's {fmt_count(data_tokens)} "
            f"count its answers, which RL never trains on{skipped}")


def batch_shapes(result: dict) -> str:
    """'8 x 256 tokens (pretrain, cpt, ...); 32 x 256 tokens (grpo)', and where they came from."""
    shapes: dict[tuple[int, int, str], list[str]] = {}
    for name, r in result["regimes"].items():
        group = r.get("group_size")  # an RL batch: --batch's prompts, each sampled group_size times
        how = f": {r['batch_size'] // group} prompts x {group} completions" if group else ""
        shapes.setdefault((r["batch_size"], r["seq_len"], how), []).append(name)
    text = ", ".join(f"{b} x {s} tokens" + (f" ({', '.join(names)}{how})" if len(shapes) > 1 else "")
                     for (b, s, how), names in shapes.items())
    opts = result["options"]
    assumed = [flag for flag, key in (("--batch", "batch_size"), ("--seq-len", "seq_len")) if opts[key] is None]
    if assumed:  # say which figures the plan chose, and how to change them
        text += f"; {' and '.join(assumed)} not given: what each trainer uses by default"
        sampled = [name for name, r in result["regimes"].items() if r.get("rollouts")]
        if sampled and opts["seq_len"] is None:
            text += f" ({', '.join(sampled)}: the longest prompt and a whole completion)"
    return text


def print_plan(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table
    console = table_console()
    hw = result["hardware"]
    opts = result["options"]
    model = result["model"]
    weights = ("" if model["has_weights"] else " (random weights: a new model)" if model.get("random_init")
               else " (no weights given)")
    console.print(f"[bold]model[/] {escape(model['source'])}: {fmt_count(model['params'])} parameters{weights}")
    for line in data_lines(result):
        console.print(line)
    console.print(f"[bold]batch[/] per device: {batch_shapes(result)}")
    # The catalogue counts GiB; every figure printed here is in the tables' decimal units.
    console.print(f"[bold]hardware[/] {hw['name']}: {fmt_bytes(hw['memory_gb'] * 2**30)} per device "
                  f"({fmt_bytes(hw['reserved_gb'] * 2**30)} reserved), {hw['peak_tflops']:.3g} TFLOP/s "
                  f"{'fp32' if opts['precision'] == 'fp32' else 'bf16'}, MFU {hw['mfu']:.0%}")

    memory = Table(title="memory per device (peak = what must fit)", show_lines=False)
    rows = [("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer"),
            ("weight copies (bf16)", "weight_copies"), ("activations", "activations"),
            ("activations, checkpointed", "activations_checkpointed"), ("logits (chunked)", "logits"),
            ("reference model", "reference_model"), ("KV cache (rollouts)", "kv_cache"),
            ("critic (PPO)", "critic"), ("critic activations", "critic_activations"),
            ("reward model", "reward_model")]
    memory.add_column("", no_wrap=True)  # row names whole: narrow columns wrap their figures instead
    for name in result["regimes"]:
        memory.add_column(name, justify="right")
    regimes = list(result["regimes"].values())
    for label, key in rows:
        memory.add_row(label, *(fmt_bytes(r["memory"][key]) for r in regimes))
    memory.add_row("[bold]peak[/]", *(f"[bold]{fmt_bytes(r['memory']['peak'])}[/]" for r in regimes))
    memory.add_row("peak, checkpointed", *(fmt_bytes(r["peak_with_checkpointing"]) for r in regimes))
    memory.add_row("fits", *("[green]yes[/]" if r["fits"] else
                             ("[yellow]with ckpt[/]" if r["fits_with_checkpointing"] else "[red]no[/]")
                             for r in regimes))
    memory.add_row("largest batch (RL: prompts)", *(f"{r['largest_batch']} ({r['largest_batch_with_checkpointing']} ckpt)"
                                      for r in regimes))
    console.print(memory)

    compute = Table(title="compute, time, money, artefact")
    for column in ("regime", "trainable", "FLOPs", "time", "cost (USD)", "artefact"):
        compute.add_column(column, justify="left" if column == "regime" else "right")
    for r in regimes:
        # The time is the FLOPs at this hardware's speed whether or not the run fits in its
        # memory: marked as the memory table's "fits" row is, so no row reads as doable when it is not.
        mark = ("" if r["fits"] else " [yellow](with ckpt)[/]" if r["fits_with_checkpointing"]
                else " [red](does not fit)[/]")
        compute.add_row(r["description"], fmt_count(r["params_trainable"]), f"{r['flops']:.3g}",
                        fmt_time(r["time_s"]) + mark, f"{r['cost_usd']:,.2f}",
                        f"{r['artifact']} {fmt_bytes(r['artifact_bytes'])}")
    console.print(compute)
    for r in regimes:  # GRPO's and PPO's sampling is costed by what bounds it, not at MFU alone
        generation = r["time_detail"].get("generation")
        if generation:
            bound = {"memory bandwidth": f"memory bandwidth ({fmt_count(hw['bandwidth'])}B/s: each decode step "
                                         "reads every weight)",
                     "per-operator overhead": f"the host's per-operator overhead ({r['decode_ops']:,} eager "
                                              f"operators a decode step, {hw['op_overhead_us']:.3g} us each; "
                                              f"--{r['regime']}.sampling.compile fuses them)",
                     }.get(r["generation_bound"], r["generation_bound"])
            console.print(f"  {r['regime']}: {fmt_time(r['time_s'])} = {fmt_time(r['time_s'] - generation)} of training "
                          f"+ {fmt_time(generation)} ({generation / r['time_s']:.0%}) sampling a token at a time, "
                          f"bound by {bound}", highlight=False)
    for r in regimes:  # QLoRA's time is not all FLOPs: say how much goes to dequantizing its base
        dequant = r["time_detail"].get("NF4 dequantization")
        if dequant:
            rate = hw["nf4_dequant_rate"]["params_per_s"]
            console.print(f"  {r['regime']}: {fmt_time(r['time_s'])} = {fmt_time(r['time_detail']['matmuls'])} of matmuls "
                          f"+ {fmt_time(dequant)} ({dequant / r['time_s']:.0%}) dequantizing the NF4 base "
                          f"in each micro-batch's {', '.join(r['dequant_detail'])}; "
                          f"{fmt_count(rate)} params/s, {hw['nf4_dequant_source']}", highlight=False)

    rec = result["recommendation"]
    chosen = next(r for r in regimes if r["regime"] == rec["regime"])
    if chosen["fits"] or chosen["fits_with_checkpointing"]:
        console.print(f"[bold green]recommendation:[/] {rec['description']}")
    else:  # on the line a reader takes as the answer, not only in the reasons below it
        console.print(f"[bold red]recommendation, though it does not fit this hardware:[/] {rec['description']}")
    for reason in rec["reasons"]:
        console.print(f"  - {reason}")
    for r in regimes if not model.get("random_init") else []:  # a new model has one regime to warn of
        for warning in r["data_warnings"]:
            if r["regime"] != rec["regime"]:
                console.print(f"  [yellow]{r['regime']}[/]: {warning}")


CHECK_LABELS = {"peak memory (bytes)": "peak tensors", "time (s)": "time in steps (s)",
                "time: NF4 dequantization (s)": "  of which NF4 dequantization (s)"}


def check_command(args, catalogue) -> int:
    from graftlm.plan.check import check_run
    from graftlm.plan.hardware import resolve_hardware
    hardware = resolve_hardware(args.hardware, catalogue) if args.hardware else None
    results = [check_run(Path(run), hardware, catalogue) for run in args.check]
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    from rich.markup import escape
    from rich.table import Table
    console = table_console()
    for result in results:
        # A heading line, not the table's title: a title wraps at the narrow table's width.
        console.print(f"[bold]{escape(str(result['run']))}[/bold]: {result['objective']} / {result['parameterization']} "
                      f"on {result['device']}", highlight=False)
        table = Table()
        # A ratio, not a signed error, so that which way the plan is off reads at a glance
        # (1.05x: the plan says 5% more than the run measured).
        for column in ("figure", "predicted", "measured", "predicted / measured"):
            table.add_column(column, justify="left" if column == "figure" else "right")
        for name, fig in result["figures"].items():
            show = fmt_bytes if "memory" in name else (lambda v: "-" if v is None else f"{v:.4g}")
            # The JSON key names its unit (bytes); the table's cells carry theirs ("168.4 MB").
            # Named for what is compared (the JSON keys stay: scripts and demo.py read them): the
            # step's live tensors, as `graft compare` names them, and the time in training
            # steps (summary.json's train_time_s), not the command's wall time.
            label = CHECK_LABELS.get(name, name)
            if name == "FLOPs" and len(result["flops_detail"]) > 1:  # what the trainer counts; the time counts more
                label = "FLOPs (training passes)"
            ratio = fig.get("ratio")
            if ratio is None and fig["predicted"] is not None and fig["measured"] and not fig["compared"]:
                ratio = "not compared"  # another device's time, or RSS beside tensors: no error to speak of
            table.add_row(label, show(fig["predicted"]), show(fig["measured"]),
                          "-" if ratio is None else ratio if isinstance(ratio, str) else fmt_ratio(ratio))
        console.print(table)
        console.print(f"  time assumes {escape(result['assumed'])}", highlight=False)
        if len(result["flops_detail"]) > 1:  # work beside the policy's: in the time, not in the FLOPs row
            parts = ", ".join(f"{part} {flops:.4g}" for part, flops in result["flops_detail"].items())
            console.print(f"  time counts the FLOPs of {parts}", highlight=False)
        for note in result["notes"]:
            console.print(f"  note: {escape(note)}", highlight=False)
        if result["memory_measured_as"] == "peak_memory_bytes" and result["device"] == "cpu":
            console.print("  note: on CPU the measured peak is the process's RSS (interpreter and libraries included: "
                          "not compared with the tensors the plan predicts); a one-process eager run counts its "
                          "tensors")
        if result["memory_seq_len"] != result["seq_len"]:
            console.print(f"  note: peak tensors at the measured step's width, {result['memory_seq_len']} tokens "
                          f"(seq_len {result['seq_len']}: rows are padded to the longest in their batch)")
    return 0


# -- graft compare / graft report --------------------------------------------------------------

def _beside(runs: list[Path]) -> Path:
    """The folder that holds the runs (runs/ for runs/a runs/b), not wherever the command ran."""
    resolved = [r.resolve() for r in runs]
    common = Path(os.path.commonpath(resolved))
    return common.parent if common in resolved else common


def compare_command(args) -> int:
    from graftlm.report import compare_runs
    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else _beside(runs) / "compare.html"
    rows = compare_runs(runs, out, args.price_per_hour)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    from rich.table import Table
    table = Table(title=f"{len(rows)} runs (plot: {out})")
    priced = args.price_per_hour is not None  # no price, no cost column: it would be dashes
    scored = any(row["val_score"] for row in rows)  # RL's reward, preference accuracy
    columns = ("run", "regime", "precision", "trainable", "tokens", "wall time", "peak tensors", "peak RSS",
               *(["cost (USD)"] if priced else []), "train loss", "val loss", *(["val score"] if scored else []))
    for column in columns:
        text = column in ("run", "regime", "precision")  # whole names, never cut to "lora-mo…"
        table.add_column(column, justify="left" if text else "right", no_wrap=text)
    for row in rows:
        cost = ["-" if row["cost_usd"] is None else f"{row['cost_usd']:.4f}"] if priced else []
        table.add_row(row["run"], row["regime"], row["precision"] or "-", fmt_count(row["params_trainable"]),
                      fmt_count(row["tokens"]), fmt_time(row["time_s"]), fmt_bytes(row["peak_tensor_bytes"]),
                      fmt_bytes(row["peak_rss_bytes"]), *cost,
                      "-" if row["final_train_loss"] is None else f"{row['final_train_loss']:.4f}",
                      "-" if row["final_val_loss"] is None else f"{row['final_val_loss']:.4f}",
                      *([row["val_score"] or "-"] if scored else []))
    console = table_console(min_width=150)  # a dozen columns: narrower, every header wraps
    console.print(table)
    console.print("  peak tensors: the most live tensor bytes in a training step (what `graft plan` predicts); "
                  "peak RSS: the process's resident memory on the host (interpreter and libraries too)")
    return 0


def report_command(args) -> int:
    from graftlm.report import write_report
    print(write_report(Path(args.run)))
    return 0
