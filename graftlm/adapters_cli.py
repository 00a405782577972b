"""`graft merge`: fold a PEFT-format adapter into its base and write an HF model.

The adapter is loaded onto the base exactly as it was trained (for a QLoRA adapter,
onto the NF4-quantized base), merged, and written with `models.hf.save_model`, with the
base's tokenizer copied. Merging a QLoRA adapter dequantizes the NF4 base first, so the
merged model is the model the adapter was trained with, in full precision. The command
reports the held-out loss of the base alone (did the adapter help on this text?), of the
adapter as trained and of the merged model as written
(read back: its weights rounded to `--dtype`), so that what merging costs is visible. For
a QLoRA adapter those two agree by construction, so it also reports the adapter on the
full-precision base: what merging into the original weights would give instead.
Without `--eval-data` the loss is measured on a short built-in English passage
(`DEFAULT_EVAL_TEXT`), and the command says so. `--out` is never the base or the
adapter directory, and a non-empty one is written into only with `--overwrite`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graftlm.errors import GraftError
from graftlm.placement import DTYPE_NAMES

DEFAULT_EVAL_TEXT = (
    "The river ran high after a week of rain, and the old ferry could no longer cross it. "
    "People from the village gathered on the bank to decide what to do. Some wanted to wait "
    "for the water to fall; others argued that the market in town would not wait for them. "
    "In the end the miller offered his cart and two horses, and they took the long road over "
    "the hills, arriving late in the evening, tired but with every basket still full. "
    "Years later, the children who had ridden on that cart still told the story of the flood, "
    "and each time the road grew a little longer and the horses a little braver."
)


def named_adapter(text: str) -> tuple[str, str]:
    """An `--adapter NAME=DIR` value (graft eval, graft serve), or a bare DIR named as a
    model directory is (`runs/lora/final` -> "lora"), as `graft generate --adapter` takes it."""
    from graftlm.run_config import name_of_model_dir
    name, sep, path = text.partition("=")
    if not sep:
        return name_of_model_dir(text), text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR or DIR, got {text!r}")
    return name, path


def add_allow_other_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-other-base", action="store_true",
                        help="load adapters although the base weights they record differ from this model's "
                             "(a fine-tuned variant of their base); the architecture must still match")


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a LoRA / QLoRA / DoRA adapter into its base model",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="base model directory (Hugging Face layout)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT layout)")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--eval-data", help="held-out text for the loss check: .txt, or .jsonl with a 'text' field "
                                       "(default: a short built-in English passage)")
    p.add_argument("--eval-tokens", type=int, default=8192,
                   help="tokens of held-out text to use (default 8192; 0: no loss check)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out although it is a non-empty directory (its model files are replaced)")
    add_allow_other_base(p)
    p.set_defaults(handler=merge_command)


def read_eval_text(path: str | None) -> tuple[str, str]:
    """(text, what it is) for the held-out loss."""
    if path is None:
        return DEFAULT_EVAL_TEXT, "the built-in English passage (pass --eval-data for your own held-out text)"
    file = Path(path)
    if not file.exists():
        raise GraftError(f"{file}: --eval-data file does not exist")
    if file.suffix != ".jsonl":
        return file.read_text(encoding="utf-8-sig", errors="replace"), str(file)
    from graftlm.data.sources import iter_rows

    texts = []
    for row in iter_rows(file):  # file:line in every error, as for training data
        if row.error:
            raise GraftError(f"{row.source}: {row.error}")
        if not isinstance(row.fields.get("text"), str):
            raise GraftError(f"{row.source}: expected an object with a 'text' string")
        texts.append(row.fields["text"])
    return "\n\n".join(texts), str(file)


def heldout_loss(model, token_ids: list[int], seq_len: int) -> float:
    """Mean next-token cross-entropy over `token_ids`, in rows of `seq_len`."""
    import torch

    from graftlm.objectives.logprobs import cross_entropy, shift_targets
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(token_ids) - 1, seq_len):
            row = torch.tensor(token_ids[start:start + seq_len]).unsqueeze(0)
            if row.shape[1] < 2:
                break
            hidden = model(row, output_hidden=True)
            loss, n = cross_entropy(hidden.float(), model.lm_head.weight.float(), shift_targets(row))
            total, count = total + loss.item(), count + int(n)
    return total / max(count, 1)


def check_out_dir(out: Path, base_dir: Path, adapter_dir: Path, overwrite: bool) -> None:
    """Refuse an --out that would destroy the inputs, or another directory's files unasked."""
    resolved, adapter = out.resolve(), adapter_dir.resolve()
    if resolved == base_dir.resolve():
        # Replacing the base would make every adapter trained on it refuse to load.
        raise GraftError(f"--out {out}: is the base model directory (--model); write the merged model elsewhere")
    if resolved == adapter or adapter in resolved.parents:
        raise GraftError(f"--out {out}: is the adapter directory (--adapter) or inside it; "
                         "write the merged model elsewhere")
    if resolved.exists() and not resolved.is_dir():
        raise GraftError(f"--out {out}: exists and is not a directory")
    if resolved.is_dir() and any(resolved.iterdir()) and not overwrite:
        raise GraftError(f"--out {out}: directory is not empty; pass --overwrite to write the merged model into it")


def _merge_reward_model(base_dir: Path, adapter_dir: Path, out: Path, allow_other_base: bool) -> int:
    """A reward model's adapter (`graft reward --adapter ...`) merged into its base: a
    reward model directory (`--ppo.reward`, `graft eval`)."""
    import torch

    from graftlm import adapters
    from graftlm.models.heads import load_scalar_adapter, save_scalar_model

    adapted = load_scalar_adapter(adapter_dir, base_dir, allow_other_base=allow_other_base)
    model = adapters.merge_and_unload(adapted, dtype=torch.float32)
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer.json").exists() else base_dir
    save_scalar_model(model, out, tokenizer_dir=tokenizer_dir)
    print(f"merged {adapter_dir} into {base_dir} -> {out} (a reward model)")
    print("held-out loss: not measured (a reward model has no language-model head)")
    return 0


def merge_command(args) -> int:
    import torch  # here, as every heavy import of this module: `graft --help` imports it

    from graftlm import adapters
    from graftlm.models.heads import is_scalar_adapter_dir
    from graftlm.models.hf import load_config, load_model, save_model

    base_dir = Path(args.model)
    if args.eval_tokens < 0 or args.eval_tokens == 1:  # a loss needs a token to predict from and one to predict
        raise GraftError(f"--eval-tokens: must be 0 (no loss check) or >= 2, got {args.eval_tokens}")
    check_out_dir(Path(args.out), base_dir, Path(args.adapter), args.overwrite)
    if is_scalar_adapter_dir(args.adapter):
        return _merge_reward_model(base_dir, Path(args.adapter), Path(args.out), args.allow_other_base)
    quantized = adapters.read_adapter_config(args.adapter).get("graftlm_kind") == "qlora"
    token_ids, what, not_measured = _eval_tokens(base_dir, args.eval_data, args.eval_tokens)
    measured = token_ids is not None
    seq_len = min(load_config(base_dir).max_seq_len, 512)
    # On a model of its own, first: loading the adapter as QLoRA quantizes its base in place.
    on_full_base = heldout_loss(_adapted(base_dir, args.adapter, args.allow_other_base, "lora"), token_ids,
                                seq_len) if quantized and measured else None
    # The base's own loss: whether the adapter helped on this text, beside what merging costs.
    base_alone = heldout_loss(load_model(base_dir, dtype=torch.float32), token_ids, seq_len) if measured else None
    model = _adapted(base_dir, args.adapter, args.allow_other_base)
    as_trained = heldout_loss(model, token_ids, seq_len) if measured else None
    out = save_model(adapters.merge_and_unload(model, dtype=torch.float32), args.out, tokenizer_dir=base_dir,
                     dtype=getattr(torch, args.dtype))
    del model  # merged in place
    # The model as written: its weights rounded to --dtype, read back (computing in float32).
    as_written = heldout_loss(load_model(out, dtype=torch.float32), token_ids, seq_len) if measured else None
    base_note = " (its NF4 base dequantized: the weights the adapter was trained on)" if quantized else ""
    print(f"merged {args.adapter} into {base_dir}{base_note} -> {out}")
    if as_trained is None:
        print(f"held-out loss: not measured ({not_measured})")
        return 0
    trained_on = "4-bit base" if quantized else "base"
    print(f"held-out loss on {what}, {len(token_ids)} tokens: base alone {base_alone:.4f}; {trained_on} + adapter "
          f"(as trained) {as_trained:.4f} -> merged, as written ({args.dtype}) {as_written:.4f} "
          f"(change {as_written - as_trained:+.4f})")
    if on_full_base is not None:
        print(f"for comparison, the adapter on the full-precision base: {on_full_base:.4f} (change "
              f"{on_full_base - as_trained:+.4f}): what merging into the original weights would give; the merged "
              "model keeps the 4-bit rounding of the base the adapter was trained with")
    return 0


def _eval_tokens(base_dir: Path, eval_data: str | None, eval_tokens: int) -> tuple[list[int] | None, str, str]:
    """(the held-out tokens, what text they are, why there are none)."""
    from graftlm.tokenizer import load_tokenizer

    if eval_tokens == 0:
        return None, "", "--eval-tokens 0 turns the check off"
    if not (base_dir / "tokenizer.json").exists():
        if eval_data:
            raise GraftError(f"{base_dir}: no tokenizer.json, so --eval-data cannot be tokenized")
        return None, "", "the base model directory has no tokenizer.json"
    text, what = read_eval_text(eval_data)
    token_ids = load_tokenizer(base_dir).encode(text)[:eval_tokens]
    if len(token_ids) < 2:
        raise GraftError(f"{what}: under 2 tokens of held-out text to measure the loss on")
    return token_ids, what, ""


def _adapted(base_dir: Path, adapter_dir: str, allow_other_base: bool, kind: str | None = None):
    """The base in float32 with the adapter loaded (`kind`: as that kind; default: as trained)."""
    import torch

    from graftlm import adapters
    from graftlm.models.hf import load_model

    model = load_model(base_dir, dtype=torch.float32)
    return adapters.load_adapter(model, adapter_dir, kind=kind, allow_other_base=allow_other_base)

