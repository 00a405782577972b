"""Token shards for pre-training: written by `graft prepare`, read by memory map.

Layout of a shard directory (see docs/ARCHITECTURE.md):
  meta.json       {"format": "graftlm-shards-v1", "dtype", "vocab_size", "eos_id",
                   "tokenizer": {"path", "sha256", "vocab_sha256"},
                   "splits": {"train": {"files", "tokens", "documents", "bytes"}, "val": ...}}
  train-00000.bin raw little-endian token ids, each document followed by EOS
  val-00000.bin

Design choices:
- uint16 when every id fits (vocab_size <= 65536), else uint32: half the disk and page
  cache for the common small vocabularies.
- Validation split, deterministic: when the data is a few documents (up to
  `FEW_DOCUMENTS`, such as one big .txt like tinyshakespeare, or a folder of books), each
  text is cut at the line boundary nearest to `1 - val_fraction` of its characters, so
  validation holds the last part of each and the fraction asked. Otherwise whole
  documents go to validation by a hash of their text (`val_fraction`, independent of
  file order), or the last `val_docs` documents do. Either way the validation split is
  never empty.
- Long documents are tokenized in chunks cut just before a line that starts with a
  non-space character: byte-level BPE never merges across such a boundary, so the ids
  are exactly those of the whole text, and the chunks keep every core busy through
  `tokenizers`' parallel `encode_batch`.
- `bytes` counts the UTF-8 bytes of each split's text (EOS excluded), for bits per
  byte. `sha256` is the tokenizer.json file's; `vocab_sha256` hashes the vocabulary
  itself, so a re-saved copy of the same tokenizer still matches.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from graftlm.errors import GraftError, read_json

FORMAT = "graftlm-shards-v1"
CHUNK_CHARS = 1 << 16
FILE_TOKENS = 1 << 28  # a new file every 256M tokens
_BATCH_CHARS = 1 << 22
_CHUNK_BREAK = re.compile(r"\n(?=\S)")


# -- tokenizer identity -----------------------------------------------------------------


def tokenizer_identity(tokenizer) -> dict:
    path = Path(tokenizer.path) / "tokenizer.json" if tokenizer.path else None
    sha = hashlib.sha256(path.read_bytes()).hexdigest() if path and path.exists() else None
    vocab = json.dumps(sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items()),
                       ensure_ascii=False)
    return {"path": str(tokenizer.path) if tokenizer.path else None, "sha256": sha,
            "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()}


def check_tokenizer(meta: dict, tokenizer, model_vocab_size: int | None = None) -> None:
    """Raise `GraftError` when `tokenizer` (or a model's vocabulary) does not fit the shards."""
    where = meta.get("_dir", "shards")
    if tokenizer is not None:
        if tokenizer.vocab_size != meta["vocab_size"]:
            raise GraftError(f"{where}: tokenizer vocabulary has {tokenizer.vocab_size} tokens, "
                             f"the shards were made with {meta['vocab_size']}")
        if tokenizer.eos_id != meta["eos_id"]:
            raise GraftError(f"{where}: tokenizer EOS id {tokenizer.eos_id} differs from the "
                             f"shards' {meta['eos_id']}")
        if tokenizer_identity(tokenizer)["vocab_sha256"] != meta["tokenizer"]["vocab_sha256"]:
            raise GraftError(f"{where}: tokenizer vocabulary differs from the one the shards were "
                             f"made with ({meta['tokenizer']['path']})")
    if model_vocab_size is not None and model_vocab_size < meta["vocab_size"]:
        raise GraftError(f"{where}: the model's vocabulary ({model_vocab_size}) is smaller than "
                         f"the shards' ({meta['vocab_size']})")


# -- splitting --------------------------------------------------------------------------


def split_single_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val) of one text, cut at the line boundary nearest to 1 - val_fraction."""
    target = int(len(text) * (1 - val_fraction))
    after = text.find("\n", target)
    before = text.rfind("\n", 0, target)
    candidates = [i + 1 for i in (before, after) if 0 <= i < len(text) - 1]
    if not candidates:
        raise GraftError("cannot split a single-line text into train and validation: "
                         "give more documents or --val-docs 0")
    cut = min(candidates, key=lambda i: abs(i - target))
    return text[:cut], text[cut:]


def in_val_by_hash(text: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `size` characters at boundaries BPE never crosses."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        match = _CHUNK_BREAK.search(text, start + size)
        if match is None:
            break
        pieces.append(text[start:match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


# -- writing ----------------------------------------------------------------------------


@dataclass
class _SplitWriter:
    directory: Path
    name: str
    dtype: np.dtype
    files: list[str] = field(default_factory=list)
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    _handle: object = None
    _in_file: int = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._handle is None or self._in_file >= FILE_TOKENS:
                self._open_next()
            take = ids[:FILE_TOKENS - self._in_file]
            take.astype(self.dtype.newbyteorder("<"), copy=False).tofile(self._handle)
            self._in_file += len(take)
            self.tokens += len(take)
            ids = ids[len(take):]

    def _open_next(self) -> None:
        if self._handle is not None:
            self._handle.close()
        name = f"{self.name}-{len(self.files):05d}.bin"
        self.files.append(name)
        self._handle = open(self.directory / name, "wb")
        self._in_file = 0

    def close(self) -> dict:
        if self._handle is None:
            self._open_next()  # an empty split still has its (empty) file
        self._handle.close()
        return {"files": self.files, "tokens": self.tokens, "documents": self.documents,
                "bytes": self.bytes}


def _batches(documents: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str, bool]]]:
    """Groups of (split, chunk, ends_document), about _BATCH_CHARS each."""
    batch, size = [], 0
    for split, text in documents:
        chunks = chunk_text(text)
        for i, chunk in enumerate(chunks):
            batch.append((split, chunk, i == len(chunks) - 1))
            size += len(chunk)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def write_shards(documents: Iterable[tuple[str, str]], tokenizer, out: str | Path,
                 progress=None) -> dict:
    """Tokenize (split, text) documents into a shard directory; returns meta.

    `progress(chars)` is called as text is consumed (for a progress bar).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.eos_id is None:
        raise GraftError("the tokenizer has no EOS token to separate documents")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    writers = {name: _SplitWriter(out, name, dtype) for name in ("train", "val")}
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    starts_document = {"train": True, "val": True}
    for batch in _batches(documents):
        encoded = tokenizer.encode_batch([chunk for _, chunk, _ in batch])
        for (split, chunk, ends), ids in zip(batch, encoded):
            writer = writers[split]
            if starts_document[split] and bos is not None:
                writer.write(np.array([bos], dtype=np.int64))
            writer.write(np.asarray(ids, dtype=np.int64))
            writer.bytes += len(chunk.encode("utf-8"))
            if ends:
                writer.write(eos)
                writer.documents += 1
            starts_document[split] = ends
            if progress is not None:
                progress(len(chunk))
    meta = {"format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "tokenizer": tokenizer_identity(tokenizer),
            "splits": {name: w.close() for name, w in writers.items()}}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out / "meta.json")
    return meta


def assign_splits(texts: Iterable[str], val_fraction: float = 0.1,
                  val_docs: int | None = None) -> Iterator[tuple[str, str]]:
    """(split, text) for each document, by the policy in the module docstring. The
    arguments are checked here, before anything is read or written (`--out` made)."""
    if val_docs is None and not 0 <= val_fraction < 1:
        raise GraftError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_docs is not None and val_docs < 0:
        raise GraftError(f"val_docs must be >= 0, got {val_docs}")
    return _assigned(iter(texts), val_fraction, val_docs)


# Up to this many documents (and characters), each is split at its own line boundary:
# held out whole by hash, one of two files would be half the text.
FEW_DOCUMENTS, FEW_CHARS = 16, 64 * 2**20


def _assigned(texts: Iterator[str], val_fraction: float, val_docs: int | None) -> Iterator[tuple[str, str]]:
    first = next(texts, None)
    if first is None:
        raise GraftError("no documents to prepare")
    head = [first]
    if val_docs == 0 or (val_docs is None and val_fraction == 0):
        yield from (("train", text) for text in _chain(head, texts))
        return
    size = len(head[0])
    for text in texts:  # read ahead, to see whether there are only a few
        head.append(text)
        size += len(text)
        if len(head) > FEW_DOCUMENTS or size > FEW_CHARS:
            break
    else:
        if len(head) == 1:  # --val-docs cannot hold out part of one document: the fraction applies
            train, val = split_single_text(head[0], val_fraction or 0.1)
            yield "train", train
            yield "val", val
            return
        parts = _split_each(head, val_fraction) if val_docs is None else None
        if parts is not None:
            yield from parts
            return
    rest = _chain(head, texts)
    if val_docs is not None:  # the last val_docs documents, by position
        held: list[str] = []
        for text in rest:
            held.append(text)
            if len(held) > val_docs:
                yield "train", held.pop(0)
        for text in held:
            yield "val", text
        return
    any_val, last = False, None
    for text in rest:
        if last is not None:
            yield last
        split = "val" if in_val_by_hash(text, val_fraction) else "train"
        any_val |= split == "val"
        last = (split, text)
    # Never an empty validation split when one was asked for: the last document goes there.
    yield ("val", last[1]) if not any_val else last


def _split_each(documents: list[str], val_fraction: float) -> list[tuple[str, str]] | None:
    """(split, text) of a few documents, each cut at the line boundary nearest to
    1 - val_fraction (whole to train when it has no line to cut at); None when none has."""
    parts, cut = [], False
    for text in documents:
        try:
            train, val = split_single_text(text, val_fraction)
        except GraftError:
            parts.append(("train", text))
            continue
        parts += [("train", train), ("val", val)]
        cut = True
    return parts if cut else None


def _chain(head: list, tail: Iterator) -> Iterator:
    yield from head
    yield from tail


# -- reading ----------------------------------------------------------------------------


class ShardSplit:
    """All tokens of one split as one sequence, over memory-mapped files (no copy)."""

    def __init__(self, directory: Path, info: dict, dtype: str):
        self.memmaps = []
        for name in info["files"]:
            path = directory / name
            if not path.exists():
                raise GraftError(f"{path}: shard file listed in meta.json is missing")
            if path.stat().st_size:
                self.memmaps.append(np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r"))
        self.info = info
        self._ends = np.cumsum([len(m) for m in self.memmaps], dtype=np.int64)
        if int(self._ends[-1] if len(self._ends) else 0) != info["tokens"]:
            raise GraftError(f"{directory}: shard files hold {int(self._ends[-1]) if len(self._ends) else 0} "
                             f"tokens, meta.json says {info['tokens']}")

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: slice) -> np.ndarray:
        """tokens[start:stop] as an array (slices only; crossing file boundaries is fine)."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardSplit supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        if len(self.memmaps) == 1:
            return self.memmaps[0][start:stop]
        parts = []
        for m, end in zip(self.memmaps, self._ends):
            begin = int(end) - len(m)
            lo, hi = max(start, begin), min(stop, int(end))
            if lo < hi:
                parts.append(m[lo - begin:hi - begin])
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.memmaps[0].dtype)


@dataclass
class ShardSet:
    directory: Path
    meta: dict

    def split(self, name: str) -> ShardSplit:
        if name not in self.meta["splits"]:
            raise GraftError(f"{self.directory}: no split '{name}' (has {', '.join(self.meta['splits'])})")
        return ShardSplit(self.directory, self.meta["splits"][name], self.meta["dtype"])


def open_shards(directory: str | Path) -> ShardSet:
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise GraftError(f"{directory}: no meta.json (make shards with `graft prepare`)")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise GraftError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    meta["_dir"] = str(directory)
    return ShardSet(directory, meta)
