"""The training commands: `graft pretrain`, and `sft`, `dpo`, `reward`, `grpo`, `ppo` as
their objective modules appear. Every one has the same options (the run config, plus
the objective's own section) and calls `runs.run_training`.
"""

from __future__ import annotations

import argparse

from graftlm.config import add_config_arguments, build_config, flatten, read_recipe
from graftlm.errors import ConfigError

# command -> objective (graftlm/objectives/<objective>.py with a SPEC)
TRAINING_COMMANDS = {"pretrain": "clm", "sft": "sft", "dpo": "dpo", "reward": "reward",
                     "grpo": "grpo", "ppo": "ppo"}
FULL = ("full", "none")


def register(subparsers) -> None:
    # Each objective's section and help, read without its module, which imports torch: an
    # objective whose module has no SPEC yet gets its command, which says so when it runs.
    from graftlm.objectives import available
    from graftlm.objectives.configs import HELP
    from graftlm.run_config import run_config_class

    present = set(available())
    for command, objective in TRAINING_COMMANDS.items():
        if objective not in present:
            continue
        parser = subparsers.add_parser(command, help=HELP[objective], description=HELP[objective])
        add_config_arguments(parser, run_config_class(objective))
        parser.add_argument("--adapter", dest="cfg:adapter.kind", default=argparse.SUPPRESS,
                            metavar="KIND", help="short for --adapter.kind: lora, qlora, dora, or full")
        parser.add_argument("--parallel", dest="cfg:parallel.mode", default=argparse.SUPPRESS,
                            choices=("none", "ddp", "fsdp"), help="short for --parallel.mode (under torchrun)")
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--resume", action="store_true",
                          help="resume from the newest valid checkpoint (automatic when there is one)")
        mode.add_argument("--fresh", action="store_true",
                          help="start over, deleting the run directory's checkpoints and results")
        parser.add_argument("--allow-config-change", action="store_true",
                            help="resume although the model, seed, batch size, gradient accumulation, "
                                 "adapter settings, world size or data changed")
        parser.set_defaults(handler=train_command, objective=objective)


def config_for(args: argparse.Namespace):
    """The run config the command line and recipe make, and the dotted fields they gave
    (a continued run takes the others from what it recorded)."""
    from graftlm.run_config import run_config_class

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    recipe = getattr(args, "recipe", None)
    recipe_data = read_recipe(recipe) if recipe else {}
    given = [f"--{k}" for k in overrides if k.startswith("adapter.") and k != "adapter.kind"]
    if "adapter.kind" in overrides:
        full = str(overrides["adapter.kind"]).lower() in FULL  # replaces the recipe's section, if any
    else:
        section = recipe_data.get("adapter")
        full = isinstance(section, dict) and str(section.get("kind", "")).lower() in FULL
        if full:
            given += [f"adapter.{k} in {recipe}" for k in section if k != "kind"]
    if full:
        # Full training has no adapter: a rank or target given with it would be silently ignored.
        if given:
            raise ConfigError(f"adapter kind 'full' trains every weight and takes no adapter field, but "
                              f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} given: drop "
                              f"{'it' if len(given) == 1 else 'them'}, or choose lora, qlora or dora")
        overrides = {k: v for k, v in overrides.items() if not k.startswith("adapter.")}
        overrides["adapter"] = None
    cfg = build_config(run_config_class(args.objective), recipe_data, overrides)
    _refuse_fsdp_fields_outside_fsdp(cfg, overrides, recipe, recipe_data)
    return cfg, [*flatten(recipe_data), *overrides]


def _refuse_fsdp_fields_outside_fsdp(cfg, overrides: dict, recipe: str | None, recipe_data: dict) -> None:
    """An FSDP-only field (`parallel.fsdp_*`) set by the user under another mode would be
    silently ignored: refuse it, as full training refuses adapter fields."""
    if cfg.parallel.mode == "fsdp":
        return
    given = [f"--{k.replace('_', '-')}" for k in overrides if k.startswith("parallel.fsdp_")]
    section = recipe_data.get("parallel")
    if isinstance(section, dict):
        given += [f"parallel.{k} in {recipe}" for k in section
                  if str(k).startswith("fsdp_") and f"parallel.{k}" not in overrides]
    if given:
        raise ConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --parallel fsdp "
                          f"only, but the parallel mode is {cfg.parallel.mode}: drop "
                          f"{'it' if len(given) == 1 else 'them'}, or choose --parallel fsdp")


def train_command(args: argparse.Namespace) -> int:
    from graftlm.runs import run_training

    cfg, given = config_for(args)
    summary = run_training(cfg, resume=True if args.resume else None, fresh=args.fresh,
                           allow_config_change=args.allow_config_change, given=given)
    if summary:
        val = summary.get("final_val_loss")
        bpb = summary.get("val_bpb")
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, "
              f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {100 * summary['mfu']:.1f}%, "
              f"train loss {summary['final_train_loss']:.4f}"
              + (f", val loss {val:.4f}" if val is not None else "")
              + (f", val bpb {bpb:.4f}" if bpb is not None else ""))
    return 0
