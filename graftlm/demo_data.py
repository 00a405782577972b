"""Data that graftlm generates for its demo: nothing downloaded, nothing from ../shared.

A small world of templated sentences, "<subject> <verb> <object> <place>", and two
tasks about them with checkable one-word answers:

- mood:  "mood: the cat fears the river by the sea"   -> "sad"   (set by the verb)
- where: "where: the cat fears the river by the sea"  -> "sea"   (set by the place)

Both are learnable by a model of about a million parameters in a minute or two on a
laptop CPU (tasks that copy or reorder letters need far more steps before attention
finds the pattern). The pre-training corpus holds the same world in prose ("... by the
sea, and the cat was sad.") and some small talk in the chat format (greetings, one-word
replies, a sentence repeated back), so a base model has seen the facts, the chat tokens
and the world's words at the start of a reply, but not the questions: few-shot prompting
of the base is the "prompting alone" baseline that fine-tuning must beat. Held-out prompts are
sentences that never occur in training data. Everything is seeded and deterministic.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

SUBJECTS = ["the cat", "a small dog", "my friend", "the old man", "a young girl", "the teacher",
            "our neighbour", "the baker", "a tired horse", "the king", "the sailor", "a little bird"]
VERBS = {"likes": "happy", "finds": "happy", "paints": "happy", "visits": "happy",
         "fears": "sad", "loses": "sad", "misses": "sad", "breaks": "sad"}
OBJECTS = ["a red ball", "the river", "an apple", "the green door", "a long letter", "the moon",
           "a wooden box", "the old bridge", "a quiet song", "the garden gate"]
PLACES = {"by the sea": "sea", "near the house": "house", "at the fair": "fair",
          "in the market": "market", "under the tree": "tree", "on the hill": "hill"}

TASKS = ("mood", "where")
# Small talk in the chat format, so that the base has seen the chat template's special
# tokens (as base models trained for chat have); without it, the first fine-tuning steps
# go to learning what <|im_end|> is, which frozen-base LoRA can barely do.
GREETINGS = [("hello", "hello, how are you?"), ("good morning", "good morning to you."),
             ("how are you?", "I am well, thank you."), ("thank you", "you are welcome."),
             ("goodbye", "goodbye, see you soon."), ("who are you?", "I am a small model.")]
# Replies that are one word of the world, as the tasks' answers are. The prose has these
# words only after a space (" sea"), which the tokenizer makes one token; a reply starts
# without one, and "sea" alone was split into pieces ("se", "a") that the base had never
# produced. LoRA, whose adapters leave the (tied) embeddings frozen, could not learn to
# emit them: in the quick demo every adapter scored 0% and answered "hre".
WORD_REPLIES = [("name a place", place) for place in PLACES.values()] + \
               [("how do you feel?", mood) for mood in sorted(set(VERBS.values()))]
# Small talk that repeats the user's sentence: the base learns to carry words from the
# user's turn into its reply, the skill both tasks build on (a base trained on real chat
# has it). With it, LoRA learned both tasks in 60 steps on 200-step bases from 2 of 2
# pre-training seeds, against 1 of 2 without.
REPEAT_SHARE = 0.5  # of the small talk


def answer(task: str, sentence: tuple[str, str, str, str]) -> str:
    _, verb, _, place = sentence
    return VERBS[verb] if task == "mood" else PLACES[place]


def text_of(sentence: tuple[str, str, str, str]) -> str:
    return " ".join(sentence)


def prose(sentence: tuple[str, str, str, str]) -> str:
    subject = sentence[0]
    line = f"{text_of(sentence)}, and {subject} was {VERBS[sentence[1]]}."
    return line[0].upper() + line[1:]


def small_talk(rng: random.Random, seen: list) -> str:
    if rng.random() < REPEAT_SHARE:
        sentence = text_of(rng.choice(seen))
        user, assistant = f"repeat: {sentence}", sentence
    else:
        user, assistant = rng.choice(GREETINGS + WORD_REPLIES)
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>"


def prompt_text(task: str, sentence) -> str:
    return f"{task}: {text_of(sentence)}"


def wrong_answer(task: str, sentence, rng: random.Random) -> str:
    options = sorted(set(VERBS.values()) if task == "mood" else set(PLACES.values()))
    return rng.choice([o for o in options if o != answer(task, sentence)])


def generate(out: str | Path, seed: int = 0, train_rows: int = 2000, heldout_rows: int = 200,
             corpus_lines: int = 8000) -> dict[str, Path]:
    """Write the demo's corpus and task files under `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    world = list(itertools.product(SUBJECTS, VERBS, OBJECTS, PLACES))
    rng.shuffle(world)
    heldout, seen = world[:heldout_rows], world[heldout_rows:]

    paths = {"corpus": out / "corpus.txt"}
    lines = [small_talk(rng, seen) if i % 5 == 4 else prose(rng.choice(seen)) for i in range(corpus_lines)]
    paths["corpus"].write_text("\n".join(lines) + "\n")
    for task in TASKS:
        train = rng.sample(seen, train_rows)
        for split, sentences in (("train", train), ("test", heldout)):
            path = paths[f"{task}_{split}"] = out / f"{task}_{split}.jsonl"
            with path.open("w") as fh:
                for s in sentences:
                    fh.write(json.dumps({"prompt": prompt_text(task, s), "completion": answer(task, s),
                                         "answer": answer(task, s)}) + "\n")
        # Preference pairs for DPO: the right answer against a wrong one.
        path = paths[f"{task}_pairs"] = out / f"{task}_pairs.jsonl"
        with path.open("w") as fh:
            for s in train:
                fh.write(json.dumps({"prompt": prompt_text(task, s), "chosen": answer(task, s),
                                     "rejected": wrong_answer(task, s, rng)}) + "\n")
    return paths
