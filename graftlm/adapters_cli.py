"""`graft merge`: fold a PEFT-format adapter into its base and write an HF model.

The adapter is loaded onto the base exactly as it was trained (for a QLoRA adapter,
onto the NF4-quantized base), merged, and written with `models.hf.save_model`, with the
base's tokenizer copied. Merging a QLoRA adapter dequantizes the NF4 base first, so the
merged model is the model the adapter was trained with, in full precision; the command
reports the held-out loss before and after merging so that any change is visible.
Without `--eval-data` the loss is measured on a short built-in English passage
(`DEFAULT_EVAL_TEXT`), and the command says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from graftlm import adapters
from graftlm.errors import GraftError

DEFAULT_EVAL_TEXT = (
    "The river ran high after a week of rain, and the old ferry could no longer cross it. "
    "People from the village gathered on the bank to decide what to do. Some wanted to wait "
    "for the water to fall; others argued that the market in town would not wait for them. "
    "In the end the miller offered his cart and two horses, and they took the long road over "
    "the hills, arriving late in the evening, tired but with every basket still full. "
    "Years later, the children who had ridden on that cart still told the story of the flood, "
    "and each time the road grew a little longer and the horses a little braver."
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a LoRA / QLoRA / DoRA adapter into its base model",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="base model directory (Hugging Face layout)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT layout)")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--eval-data", help="held-out text for the loss check: .txt, or .jsonl with a 'text' field "
                                       "(default: a short built-in English passage)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens of held-out text to use (default 8192)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    p.set_defaults(handler=merge_command)


def read_eval_text(path: str | None) -> tuple[str, str]:
    """(text, what it is) for the held-out loss."""
    if path is None:
        return DEFAULT_EVAL_TEXT, "the built-in English passage (pass --eval-data for your own held-out text)"
    file = Path(path)
    if not file.exists():
        raise GraftError(f"{file}: --eval-data file does not exist")
    if file.suffix != ".jsonl":
        return file.read_text(errors="replace"), str(file)
    from graftlm.data.sources import iter_rows

    texts = []
    for row in iter_rows(file):  # file:line in every error, as for training data
        if row.error:
            raise GraftError(f"{row.source}: {row.error}")
        if not isinstance(row.fields.get("text"), str):
            raise GraftError(f"{row.source}: expected an object with a 'text' string")
        texts.append(row.fields["text"])
    return "\n\n".join(texts), str(file)


@torch.no_grad()
def heldout_loss(model, token_ids: list[int], seq_len: int) -> float:
    """Mean next-token cross-entropy over `token_ids`, in rows of `seq_len`."""
    from graftlm.objectives.logprobs import cross_entropy, shift_targets
    total, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, seq_len):
        row = torch.tensor(token_ids[start:start + seq_len]).unsqueeze(0)
        if row.shape[1] < 2:
            break
        hidden = model(row, output_hidden=True)
        loss, n = cross_entropy(hidden.float(), model.lm_head.weight.float(), shift_targets(row))
        total, count = total + loss.item(), count + int(n)
    return total / max(count, 1)


def merge_command(args) -> int:
    from graftlm.models.hf import load_model, save_model
    from graftlm.tokenizer import load_tokenizer

    base_dir = Path(args.model)
    model = load_model(base_dir, dtype=torch.float32)
    kind = adapters.read_adapter_config(args.adapter).get("graftlm_kind")
    adapters.load_adapter(model, args.adapter)
    token_ids, what = None, None
    if (base_dir / "tokenizer.json").exists():
        text, what = read_eval_text(args.eval_data)
        token_ids = load_tokenizer(base_dir).encode(text)[: args.eval_tokens]
    elif args.eval_data:
        raise GraftError(f"{base_dir}: no tokenizer.json, so --eval-data cannot be tokenized")
    seq_len = min(model.config.max_seq_len, 512)
    before = heldout_loss(model, token_ids, seq_len) if token_ids else None
    merged = adapters.merge_and_unload(model, dtype=torch.float32)
    after = heldout_loss(merged, token_ids, seq_len) if token_ids else None
    out = save_model(merged, args.out, tokenizer_dir=base_dir, dtype=DTYPES[args.dtype])
    base_note = " (NF4 base dequantized before merging)" if kind == "qlora" else ""
    print(f"merged {args.adapter} into {base_dir}{base_note} -> {out}")
    if before is None:
        print("held-out loss: not measured (the base model directory has no tokenizer.json)")
    else:
        print(f"held-out loss on {what}, {len(token_ids)} tokens: adapter as trained {before:.4f}, "
              f"merged {after:.4f} (change {after - before:+.4f})")
    return 0
