"""Which regime to use, with reasons, and what is wrong with the data for it.

The rules (in order), for the goal given, or else the one `assumed_goal` guesses
(from-scratch for a model graftlm builds with random weights (a preset), or with no base
and billions of tokens or pre-training shards; deep from 100M tokens; else format), which
the first reason names:
- A model built with random weights (a preset or a graftlm YAML spec) has no pre-trained
  base to fine-tune or adapt: it is pre-trained from scratch whatever the goal, and the
  reasons say how to fine-tune instead (a trained model's directory as --model).
- Pre-train from scratch only when no suitable base exists (`--goal from-scratch`) and
  the data runs to billions of tokens; otherwise fine-tune a base.
- Continued pre-training for a new domain when there is a lot of raw text (>= 100M
  tokens) and full training fits.
- Full fine-tuning for a deep change of behaviour when memory allows.
- LoRA when memory or money is short, or when several specialised variants are wanted
  (adapters are megabytes and swap on one base); QLoRA when even LoRA does not fit.
- When every regime that fits is over the budget, the cheapest of them, said to be over it.
"""

from __future__ import annotations

import re

GOALS = ("format", "domain", "deep", "variants", "from-scratch")
BILLION = 1e9


def fmt_params(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def data_warnings(regime: str, tokens: float, params: int, stats: dict | None) -> list[str]:
    """Too little or too repetitive data for `regime`."""
    warnings = []
    if regime == "pretrain" and tokens < 0.8 * 20 * params:  # within a fifth of it: no warning worth its line
        # With billions of tokens pre-training is on the table: name the size that suits them.
        size = f" (a model of ~{fmt_params(tokens / 20)} parameters is the size for it)" if tokens >= BILLION else ""
        warnings.append(f"{tokens:.3g} tokens is under the ~20 tokens per parameter "
                        f"({20 * params:.3g}) that compute-optimal pre-training wants{size}")
    if regime == "cpt" and tokens < 1e7:
        warnings.append(f"{tokens:.3g} tokens is little for continued pre-training (>= 10M helps)")
    if regime in ("sft", "dpo", "lora", "qlora", "grpo", "ppo") and stats and stats.get("rows") is not None:
        if stats["rows"] < 200:
            warnings.append(f"only {stats['rows']} rows: expect the model to memorise them")
    if stats and stats.get("rows"):
        duplicates = (stats.get("exact_duplicates") or 0) + (stats.get("near_duplicates") or 0)
        share = duplicates / stats["rows"]
        if share > 0.1:
            warnings.append(f"{share:.0%} of rows are exact or near duplicates: deduplicate first")
    return warnings


def fmt_share(share: float) -> str:
    """0.17 -> '17%', 0.056 -> '5.6%', 0.0061 -> '0.61%'."""
    percent = share * 100
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


def assumed_goal(goal: str | None, tokens: float, has_base: bool, random_init: bool = False,
                 pretraining_data: bool = False) -> str:
    """The goal the advice follows: the one given, else a guess from the data and the model.

    `random_init`: the model is one graftlm builds with random weights (a preset), so
    from scratch is the only way to train it, whatever goal was given.
    `pretraining_data`: the data is `graft prepare` shards (raw text, tokenized).
    """
    if random_init:
        return "from-scratch"
    if goal is not None:
        return goal
    if not has_base and (tokens >= BILLION or pretraining_data):
        return "from-scratch"
    return "deep" if tokens >= 1e8 else "format"


def _from_random_weights(goal: str | None, tokens: float, fits: dict[str, bool], costs: dict[str, float],
                         budget: float | None, model: str, data_objective: str | None) -> tuple[str, list[str]]:
    """A model with random weights (a preset) trains from scratch: the only regime that
    does not need a pre-trained base. The reasons say why, and how to fine-tune instead."""
    fine_tune = "to fine-tune or adapt a trained model instead, pass its directory as --model (e.g. runs/<name>/final)"
    size = re.fullmatch(r"preset '(\d+(?:\.\d+)?)([mb])'", model)
    if size:  # `1b` is the preset; `1B` a pre-trained model of that size, planned without its files
        fine_tune += f", or its size (--model {size.group(1)}{size.group(2).upper()}) to plan one of that size"
    built = f"{model} is built with random weights"
    if goal is None:
        reasons = [f"no --goal given: assumed 'from-scratch' ({built}, so there is no pre-trained base to "
                   f"fine-tune or adapt); {fine_tune}"]
    elif goal != "from-scratch":
        reasons = [f"--goal {goal} needs a pre-trained base, but {built}: planned as training from scratch; "
                   f"{fine_tune}"]
    else:
        reasons = []
    if not fits.get("pretrain"):
        reasons.append("pre-training does not fit this hardware: use more or larger devices, or a smaller model")
    elif budget is not None and costs["pretrain"] > budget:
        reasons.append(f"pre-training costs ${costs['pretrain']:,.2f}, over the budget of ${budget:,.2f}: train "
                       "on fewer tokens or a smaller model")
    elif tokens >= BILLION:
        reasons.append(f"{tokens / BILLION:.1f}B tokens, enough to learn a language: pre-train from scratch")
    else:
        reasons.append(f"{tokens:.3g} tokens is far too few to learn a language (that takes billions): from random "
                       "weights the model learns this corpus and little else")
    if data_objective in ("sft", "preference", "rl"):
        command = {"sft": "sft", "preference": "dpo", "rl": "grpo"}[data_objective]
        reasons.append(f"the data is {data_objective} rows: pre-train a base on raw text first (graft pretrain), "
                       f"then train it on them (graft {command} --model runs/<name>/final)")
    return "pretrain", reasons


def recommend(goal: str | None, tokens: float, params: int, has_base: bool, fits: dict[str, bool],
              costs: dict[str, float], budget: float | None, adapter_params: int | None = None,
              random_init: bool = False, pretraining_data: bool = False, model: str = "the model",
              data_objective: str | None = None) -> tuple[str, list[str]]:
    """(regime, reasons). `fits` and `costs` are keyed by regime name.

    Without a goal the first reason says which was assumed, so the ones after it (which
    follow that goal) read as a consequence of it, not as a claim about the data.
    `adapter_params`: what a LoRA adapter trains on this model, for the share the reasons
    quote (a tiny model's r=16 adapter is a sixth of it, a 7B model's under 1%).
    `random_init`, `pretraining_data`: as `assumed_goal`; `model` names the model and
    `data_objective` the data's rows (data stats' objective) in the reasons.
    """
    if random_init:
        return _from_random_weights(goal, tokens, fits, costs, budget, model, data_objective)
    share = (f"{fmt_share(adapter_params / params)} of the weights ({fmt_params(adapter_params)} of "
             f"{fmt_params(params)})" if adapter_params and params else "a small share of the weights")
    reasons = []
    if goal is None:
        goal = assumed_goal(None, tokens, has_base, pretraining_data=pretraining_data)
        scratch = (f"{tokens / BILLION:.1f}B tokens" if tokens >= BILLION
                   else "pre-training shards (graft prepare)")
        why = {"from-scratch": f"no base weights given and {scratch}",
               "deep": f"{tokens:.3g} tokens, enough to change much of a model",
               "format": f"{tokens:.3g} tokens, a narrow task's worth"}[goal]
        reasons.append(f"no --goal given: assumed '{goal}' ({why}); pass --goal to choose")
    over_budget = {r for r, c in costs.items() if budget is not None and c > budget}
    fitting = [r for r in costs if fits.get(r)]
    if fitting and all(r in over_budget for r in fitting):
        # No choice of regime keeps to the budget: say so, rather than a reason for the one picked.
        cheapest = min(fitting, key=costs.__getitem__)
        return cheapest, reasons + [f"every regime that fits costs more than the budget of ${budget:,.2f}; this "
                                    f"is the cheapest, at ${costs[cheapest]:,.2f}: raise the budget or train on "
                                    "fewer tokens"]

    def cheapest_adapter(why: str) -> tuple[str, list[str]]:
        regime = "lora" if fits.get("lora") and "lora" not in over_budget else "qlora"
        if regime == "qlora":
            lora = "is over the budget" if fits.get("lora") else "does not fit"
            why += f"; LoRA with its base unquantized {lora}, so the base goes to 4-bit (QLoRA)"
        if not fits.get(regime):
            why += "; even QLoRA does not fit this hardware: use more or larger devices, or a smaller base"
        return regime, reasons + [why]

    def full_or_adapter(why_full: str) -> tuple[str, list[str]]:
        if fits.get("sft") and "sft" not in over_budget:
            return "sft", reasons + [why_full + ", and full fine-tuning fits this hardware"]
        why = "full fine-tuning " + ("does not fit this hardware" if not fits.get("sft") else "is over the budget")
        return cheapest_adapter(why + ": an adapter gets most of the gain for a fraction of the memory")

    if goal == "from-scratch":
        if tokens >= BILLION and fits.get("pretrain") and "pretrain" not in over_budget:
            # Not "justified": under ~20 tokens per parameter the data warning that follows says
            # a smaller model would use this data better, and the two must not contradict.
            return "pretrain", reasons + [f"no base model to start from and {tokens / BILLION:.1f}B tokens of "
                                          "data, enough to learn a language: pre-train from scratch"]
        if tokens < BILLION:
            reasons.append(f"pre-training needs billions of tokens; {tokens:.3g} is far too few to learn "
                           "a language, so start from a pre-trained base instead")
        elif not fits.get("pretrain"):
            reasons.append("pre-training does not fit this hardware: start from a pre-trained base instead")
        else:
            reasons.append(f"pre-training costs ${costs['pretrain']:.0f}, over the budget: start from a "
                           "pre-trained base instead")
        # The fallback fine-tunes a base: all of it when there is data enough, else an adapter.
        if tokens >= 1e8:
            return full_or_adapter(f"{tokens:.3g} tokens are enough to fine-tune every weight of a base")
        return cheapest_adapter(f"with this little data, a low-rank adapter on the base trains {share}, cheaply")
    if goal == "variants":
        return cheapest_adapter("several specialised variants: one adapter each (megabytes) on one shared "
                                "base, swapped per request")
    if goal == "domain" and tokens >= 1e8 and fits.get("cpt") and "cpt" not in over_budget:
        return "cpt", reasons + [f"new domain and {tokens:.3g} tokens of raw text: continued pre-training "
                                 "moves the whole model to the domain"]
    if goal in ("deep", "domain"):
        return full_or_adapter("a deep change of behaviour needs every weight")
    return cheapest_adapter("teaching a format or a narrow task changes little of the model: a low-rank "
                            f"adapter learns it training {share}, cheaply")
