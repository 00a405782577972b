"""Causal language modelling: next-token prediction on token shards (pre-training and
continued pre-training).

Design choices:
- Sample i is the i-th window of `seq_len + 1` tokens of the split (consecutive windows
  share one boundary token, so no token is skipped): `input_ids` are its first
  `seq_len` tokens and `labels` its last `seq_len`. Every token is predicted once per epoch, and "each
  sample exactly once" is checkable by window index.
- Windows run across document boundaries (EOS separated), as in GPT-2 style
  pre-training; `clm.document_mask` restricts attention to each document instead
  (restarting positions), at the cost of an explicit attention mask.
- The loss is the summed token cross-entropy and the count of predicted tokens; the
  model computes per-token log-probs inside its forward (`targets=`), chunked, so the
  [tokens, vocab] logits of a batch never exist at once.
- Validation bits per byte use the split's UTF-8 bytes per token from meta.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from graftlm.data.shards import check_tokenizer, open_shards
from graftlm.errors import GraftError
from graftlm.objectives import DataSplits, ObjectiveSpec
from graftlm.objectives.configs import HELP, ClmConfig
from graftlm.objectives.logprobs import IGNORE_INDEX


class TokenWindows:
    """Non-overlapping windows of `seq_len + 1` tokens over a split's token sequence
    (anything with `len()` and contiguous slices, e.g. a memory-mapped `ShardSplit`)."""

    def __init__(self, tokens, seq_len: int, eos_id: int | None = None, document_mask: bool = False):
        self.tokens_seq, self.seq_len = tokens, seq_len
        self.eos_id, self.document_mask = eos_id, document_mask
        self.tokens = len(tokens)
        # Windows share their boundary token: window i predicts tokens i*L+1 .. (i+1)*L.
        self.count = max(0, (self.tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        start = index * self.seq_len
        window = torch.from_numpy(np.asarray(self.tokens_seq[start:start + self.seq_len + 1], dtype=np.int64))
        sample = {"input_ids": window[:-1], "labels": window[1:]}
        if self.document_mask and self.eos_id is not None:
            # A new document starts after each EOS; positions restart with it.
            is_eos = (window[:-1] == self.eos_id).long()
            document_ids = torch.cumsum(is_eos, 0) - is_eos
            starts = torch.cat([torch.ones(1, dtype=torch.bool), document_ids[1:] != document_ids[:-1]])
            first = torch.cummax(torch.where(starts, torch.arange(self.seq_len), 0), 0).values
            sample["document_ids"] = document_ids
            sample["position_ids"] = torch.arange(self.seq_len) - first
            # An EOS would predict the next document's first token, which it cannot see.
            sample["labels"] = sample["labels"].masked_fill(is_eos.bool(), IGNORE_INDEX)
        return sample


class CausalLM:
    name = "clm"

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        targets = batch["labels"]
        if "loss_mask" in batch:
            targets = targets.masked_fill(~batch["loss_mask"].bool(), IGNORE_INDEX)
        logp = model(batch["input_ids"], position_ids=batch.get("position_ids"),
                     document_ids=batch.get("document_ids"), targets=targets)
        valid = targets != IGNORE_INDEX
        # where(), not multiply: a masked position's arbitrary value must not leak NaN.
        return -torch.where(valid, logp, 0.0).sum(), valid.sum(), {}


def build_dataset(cfg, tokenizer) -> DataSplits:
    shards = open_shards(cfg.data)
    meta, seq_len = shards.meta, cfg.train.seq_len
    check_tokenizer(meta, tokenizer)
    eos, mask = meta.get("eos_id"), cfg.clm.document_mask
    train = TokenWindows(shards.split("train"), seq_len, eos, mask)
    if len(train) == 0:
        raise GraftError(f"{cfg.data}: the train split has {train.tokens} tokens, fewer than one "
                         f"window of train.seq_len + 1 = {seq_len + 1}")
    val, bytes_per_token = None, None
    if cfg.clm.val_split:
        split = shards.split(cfg.clm.val_split)
        val = TokenWindows(split, seq_len, eos, mask)
        if split.info.get("tokens") and split.info.get("bytes"):
            # EOS separators have no bytes; counting them as tokens slightly lowers bpb,
            # exactly as it does for every tool that reports bpb on EOS-joined text.
            bytes_per_token = split.info["bytes"] / split.info["tokens"]
    return DataSplits(
        train=train, val=val if val is not None and len(val) else None,
        val_bytes_per_token=bytes_per_token, vocab_size=meta.get("vocab_size"),
        identity={"data": str(Path(cfg.data).resolve()), "train_tokens": train.tokens,
                  "train_samples": len(train), "seq_len": seq_len})


def build_objective(cfg, model) -> CausalLM:
    return CausalLM()


SPEC = ObjectiveSpec(
    name="clm", help=HELP["clm"], config_cls=ClmConfig, build_dataset=build_dataset, build_objective=build_objective)
