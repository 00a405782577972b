"""Packing: rows share a sequence without seeing each other; per-row loss is unchanged."""

import numpy as np
import pytest
import torch

from graftlm.data.packing import documents_from_eos, pack_rows
from graftlm.errors import GraftError
from graftlm.models.config import ModelConfig
from graftlm.models.transformer import Decoder
from graftlm.objectives.logprobs import shift_targets, token_logprobs


def random_rows(n, vocab, seed=0, max_len=20):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(2, max_len))
        ids = rng.integers(3, vocab, length).tolist()
        mask = (rng.random(length) < 0.6).tolist()
        mask[-1] = True
        rows.append((ids, mask))
    return rows


def row_loss(model, ids, mask, position_ids=None, document_ids=None):
    """Summed -log p of the trained tokens, per document when document ids are given."""
    ids = torch.as_tensor(ids)[None]
    mask = torch.as_tensor(mask)[None]
    kwargs = {}
    if position_ids is not None:
        kwargs = {"position_ids": torch.as_tensor(position_ids)[None],
                  "document_ids": torch.as_tensor(document_ids)[None]}
    hidden = model(ids, output_hidden=True, **kwargs)
    targets = shift_targets(ids, mask)
    logp = token_logprobs(hidden, model.lm_head.weight, targets)
    return logp, targets != -100


@pytest.mark.parametrize("strategy", ["best_fit", "sequential"])
def test_packed_and_unpacked_give_the_same_per_row_loss(strategy):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=64)
    model = Decoder(cfg).eval()
    model.init_weights()
    rows = random_rows(9, cfg.vocab_size)
    packed = pack_rows(rows, seq_len=48, pad_id=0, strategy=strategy)
    assert len(packed) < len(rows)
    expected = []
    with torch.no_grad():
        for ids, mask in rows:
            logp, valid = row_loss(model, ids, mask)
            expected.append((float(-(logp * valid).sum()), int(valid.sum())))
        got = []
        for seq in packed:
            logp, valid = row_loss(model, seq["input_ids"], seq["loss_mask"], seq["position_ids"],
                                   seq["document_ids"])
            docs = seq["document_ids"]
            for doc in range(docs.max()):  # the last id is padding
                # target at position t belongs to the document of the token it predicts (t+1)
                in_doc = torch.zeros_like(valid)
                in_doc[0, :-1] = torch.as_tensor(docs[1:] == doc)
                got.append((float(-(logp * valid * in_doc).sum()), int((valid & in_doc).sum())))
    # Rows may be reordered by best-fit: compare as multisets of (loss, tokens).
    assert sorted((round(l, 4), n) for l, n in got) == sorted((round(l, 4), n) for l, n in expected)


def test_packed_sequence_layout():
    rows = [([5, 6, 7], [True, True, True]), ([8, 9], [False, True])]
    (seq,) = pack_rows(rows, seq_len=8, pad_id=0, strategy="sequential")
    assert seq["input_ids"].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert seq["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert seq["document_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    # a row's first token is never a target (it would be predicted from the previous row)
    assert seq["loss_mask"].tolist() == [False, True, True, False, True, False, False, False]


def test_best_fit_fills_sequences_and_too_long_rows_are_errors():
    rows = [([1] * n, [True] * n) for n in (7, 5, 3, 3, 2, 1, 1)]
    packed = pack_rows(rows, seq_len=8)
    assert len(packed) == 3  # 7+1, 5+3, 3+2+1 (22 tokens in 3 x 8)
    assert sum(int((s["input_ids"] != 0).sum()) for s in packed) == 22
    with pytest.raises(GraftError, match="do not fit a sequence of 4"):
        pack_rows([([1] * 5, [True] * 5)], seq_len=4)


def test_documents_from_eos():
    positions, docs = documents_from_eos(np.array([4, 5, 2, 6, 2, 2, 7]), eos_id=2)
    assert docs.tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 0]
