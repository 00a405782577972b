"""Which regime to use, with reasons, and what is wrong with the data for it.

The rules (in order):
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

GOALS = ("format", "domain", "deep", "variants", "from-scratch")
BILLION = 1e9


def data_warnings(regime: str, tokens: float, params: int, stats: dict | None) -> list[str]:
    """Too little or too repetitive data for `regime`."""
    warnings = []
    if regime == "pretrain" and tokens < 20 * params:
        warnings.append(f"{tokens:.3g} tokens is under the ~20 tokens per parameter "
                        f"({20 * params:.3g}) that compute-optimal pre-training wants")
    if regime == "cpt" and tokens < 1e7:
        warnings.append(f"{tokens:.3g} tokens is little for continued pre-training (>= 10M helps)")
    if regime in ("sft", "dpo", "lora", "qlora", "grpo") and stats and stats.get("rows") is not None:
        if stats["rows"] < 200:
            warnings.append(f"only {stats['rows']} rows: expect the model to memorise them")
    if stats and stats.get("rows"):
        duplicates = (stats.get("exact_duplicates") or 0) + (stats.get("near_duplicates") or 0)
        share = duplicates / stats["rows"]
        if share > 0.1:
            warnings.append(f"{share:.0%} of rows are exact or near duplicates: deduplicate first")
    return warnings


def recommend(goal: str | None, tokens: float, params: int, has_base: bool, fits: dict[str, bool],
              costs: dict[str, float], budget: float | None) -> tuple[str, list[str]]:
    """(regime, reasons). `fits` and `costs` are keyed by regime name."""
    reasons = []
    over_budget = {r for r, c in costs.items() if budget is not None and c > budget}
    fitting = [r for r in costs if fits.get(r)]
    if fitting and all(r in over_budget for r in fitting):
        # No choice of regime keeps to the budget: say so, rather than a reason for the one picked.
        cheapest = min(fitting, key=costs.__getitem__)
        return cheapest, [f"every regime that fits costs more than the budget of ${budget:,.2f}; this is the "
                          f"cheapest, at ${costs[cheapest]:,.2f}: raise the budget or train on fewer tokens"]

    def cheapest_adapter(why: str) -> tuple[str, list[str]]:
        regime = "lora" if fits.get("lora") and "lora" not in over_budget else "qlora"
        if regime == "qlora":
            lora = "is over the budget" if fits.get("lora") else "does not fit"
            why += f"; LoRA with its base unquantized {lora}, so the base goes to 4-bit (QLoRA)"
        if not fits.get(regime):
            why += "; even QLoRA does not fit this hardware: use more or larger devices, or a smaller base"
        return regime, reasons + [why]

    if goal == "from-scratch" or not has_base and goal is None and tokens >= BILLION:
        if tokens >= BILLION and fits.get("pretrain") and "pretrain" not in over_budget:
            return "pretrain", [f"no base model to start from and {tokens / BILLION:.1f}B tokens of data: "
                                "pre-training from scratch is justified"]
        if tokens < BILLION:
            reasons.append(f"pre-training needs billions of tokens; {tokens:.3g} is far too few to learn "
                           "a language, so start from a pre-trained base instead")
        elif not fits.get("pretrain"):
            reasons.append("pre-training does not fit this hardware")
        else:
            reasons.append(f"pre-training costs ${costs['pretrain']:.0f}, over the budget")
    if goal == "variants":
        return cheapest_adapter("several specialised variants: one adapter each (megabytes) on one shared "
                                "base, swapped per request")
    if goal == "domain" and tokens >= 1e8 and fits.get("cpt") and "cpt" not in over_budget:
        return "cpt", reasons + [f"new domain and {tokens:.3g} tokens of raw text: continued pre-training "
                                 "moves the whole model to the domain"]
    if goal in ("deep", "domain") or goal is None and tokens >= 1e8:
        if fits.get("sft") and "sft" not in over_budget:
            return "sft", reasons + ["a deep change of behaviour needs every weight, and full fine-tuning "
                                     "fits this hardware"]
        why = "full fine-tuning " + ("does not fit this hardware" if not fits.get("sft") else "is over the budget")
        return cheapest_adapter(why + ": an adapter gets most of the gain for a fraction of the memory")
    return cheapest_adapter("teaching a format or a narrow task changes little of the model: a low-rank "
                            "adapter learns it with ~1% of the trainable weights, cheaply")
