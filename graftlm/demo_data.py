"""Data that graftlm generates for its demo: nothing downloaded, nothing from ../shared.

Two tasks with checkable answers, on letters written with spaces so that every letter
is one token whatever the tokenizer learns:

- reverse: "reverse: q w e" -> "e w q"
- sort:    "sort: q w e"    -> "e q w"

The pre-training corpus mixes simple English sentences with statements of the same
two operations in prose ("the letters q w e reversed are e w q."), so a base model
has seen the skill but not the chat format: few-shot prompting of the base is the
"prompting alone" baseline that fine-tuning must beat. Held-out prompts use letter
sequences that never occur in training data. Everything is seeded and deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SUBJECTS = ["the cat", "a small dog", "my friend", "the old man", "a young girl", "the teacher",
            "our neighbour", "the baker", "a tired horse", "the king"]
VERBS = ["sees", "likes", "finds", "paints", "carries", "watches", "follows", "remembers"]
OBJECTS = ["a red ball", "the river", "an apple", "the green door", "a long letter", "the moon",
           "a wooden box", "the market", "a quiet song", "the garden"]
PLACES = ["in the morning", "near the house", "after dinner", "by the sea", "on a cold day",
          "before the rain", "at the fair"]

TASKS = {
    "reverse": lambda xs: list(reversed(xs)),
    "sort": lambda xs: sorted(xs),
}


def letters_key(xs: list[str]) -> str:
    return " ".join(xs)


def prose(task: str, xs: list[str]) -> str:
    verb = {"reverse": "reversed", "sort": "sorted"}[task]
    return f"the letters {letters_key(xs)} {verb} are {letters_key(TASKS[task](xs))}."


def prompt_text(task: str, xs: list[str]) -> str:
    return f"{task}: {letters_key(xs)}"


def _sequences(rng: random.Random, count: int, exclude: set[str]) -> list[list[str]]:
    out, seen = [], set(exclude)
    while len(out) < count:
        xs = rng.sample(LETTERS, rng.randint(3, 5))
        key = letters_key(xs)
        if key not in seen:
            seen.add(key)
            out.append(xs)
    return out


def generate(out: str | Path, seed: int = 0, corpus_lines: int = 6000, train_rows: int = 1500,
             heldout_rows: int = 100) -> dict[str, Path]:
    """Write the demo's corpus and task files under `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    heldout = {task: _sequences(rng, heldout_rows, set()) for task in TASKS}
    reserved = {letters_key(xs) for seqs in heldout.values() for xs in seqs}

    lines = []
    for i in range(corpus_lines):
        if i % 3 == 0:
            s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
            lines.append(s[0].upper() + s[1:])
        else:
            task = rng.choice(list(TASKS))
            (xs,) = _sequences(rng, 1, reserved)
            lines.append(prose(task, xs))
    paths = {"corpus": out / "corpus.txt"}
    paths["corpus"].write_text("\n".join(lines) + "\n")

    for task, fn in TASKS.items():
        train = _sequences(rng, train_rows, reserved)
        for split, seqs in (("train", train), ("test", heldout[task])):
            path = out / f"{task}_{split}.jsonl"
            with path.open("w") as fh:
                for xs in seqs:
                    fh.write(json.dumps({"prompt": prompt_text(task, xs),
                                         "completion": letters_key(fn(xs)),
                                         "answer": letters_key(fn(xs))}) + "\n")
            paths[f"{task}_{split}"] = path
        # Preference pairs: the right answer against a plausible wrong one (the input
        # copied, or the other task's answer), for DPO.
        path = out / f"{task}_pairs.jsonl"
        with path.open("w") as fh:
            for xs in train[: train_rows // 2]:
                right = fn(xs)
                wrong = xs if xs != right else TASKS["sort" if task == "reverse" else "reverse"](xs)
                if wrong == right:
                    continue
                fh.write(json.dumps({"prompt": prompt_text(task, xs), "chosen": letters_key(right),
                                     "rejected": letters_key(wrong)}) + "\n")
        paths[f"{task}_pairs"] = path
    return paths


def few_shot_prefix(task: str, k: int = 3, seed: int = 1) -> str:
    """The "prompting alone" baseline: k worked examples in the corpus's prose form."""
    rng = random.Random(seed)
    return "\n".join(prose(task, rng.sample(LETTERS, 4)) for _ in range(k)) + "\n"
