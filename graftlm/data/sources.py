"""Rows from data files: .txt, .jsonl, .json, .parquet (and .txt.gz / .jsonl.gz / .json.gz).

Design choices:
- A data path is a file, a folder (every supported file below it, recursively, in
  sorted order) or a glob (`data/*.jsonl`, `**` allowed). Several paths are read in the
  order given. A path that matches nothing, an empty file, or a binary file (a NUL byte
  or invalid UTF-8) is a `GraftError` naming the path: those are mistakes, never data.
- A `.txt` file is one document, read whole: pre-training text keeps its line breaks,
  and `shards.py` tokenizes long documents in exact line-aligned chunks, so size is no
  reason to cut a text into documents. A corpus larger than memory should come as many
  files (or JSONL with one document per line).
- Each row carries `source`, the place a person would look: `file:LINE` (1-based) for
  JSONL, `file:row N` (0-based) for JSON lists and Parquet, `file` for a text file.
- A malformed line (invalid JSON, not an object) does not stop reading: it becomes a
  row with `error` set, so `formats.py` applies one bad-row policy to every kind of
  bad row.
- A UTF-8 byte-order mark at the start of a file (Windows editors write one) is dropped,
  as `utf-8-sig` would: it is no part of the data. Invalid JSON is described in plain
  words with its column; a line or file that ends inside a string or an unfinished
  value is called cut short, which is what it nearly always is.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from graftlm.errors import GraftError

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_SNIFF_BYTES = 1 << 16


@dataclass
class Row:
    """One record: its fields, where it came from, and what is wrong with it (if anything)."""

    fields: dict = field(default_factory=dict)
    source: str = ""
    error: str | None = None
    from_text_file: bool = False  # the whole of a .txt file, under fields["text"]


def kind_of(path: Path) -> str | None:
    """The supported suffix of `path` ('.jsonl.gz', ...), or None."""
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def resolve_paths(paths: str | Path | list) -> list[Path]:
    """Expand files, folders and globs into a list of data files, in a stable order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise GraftError("no data path given")
    files: list[Path] = []
    for spec in paths:
        p = Path(spec).expanduser()
        if p.is_file():
            if kind_of(p) is None:
                raise GraftError(f"{p}: unsupported file type (use one of {', '.join(SUFFIXES)})")
            files.append(p)
            continue
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and kind_of(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise GraftError(f"{p}: folder holds no data file ({', '.join(SUFFIXES)})")
            files.extend(found)
            continue
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
        matches = [m for m in matches if m.is_file() and kind_of(m)]
        if not matches:
            raise GraftError(f"{spec}: matches no data file")
        files.extend(matches)
    return files


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _check_text_start(path: Path) -> None:
    """Empty and binary files are errors; reading the start finds nearly all of them."""
    try:
        with _open_binary(path) as f:
            head = f.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        raise GraftError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not head:
        raise GraftError(f"{path}: empty file")
    if not head.strip() and len(head) < _SNIFF_BYTES:  # read whole: nothing but whitespace
        raise GraftError(f"{path}: no text (only whitespace)")
    if b"\x00" in head:
        raise GraftError(f"{path}: binary file (NUL bytes), expected UTF-8 text")


def _read_text(path: Path) -> str:
    _check_text_start(path)
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise GraftError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise GraftError(f"{path}:{line}: not UTF-8 text (binary file?)") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise GraftError(f"{path}:{line}: binary file (NUL bytes), expected UTF-8 text")
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise GraftError(f"{path}: no text (only whitespace)")
    return text


def json_error_reason(e: json.JSONDecodeError, what: str) -> tuple[int, str]:
    """(line, why) for JSON that `json.loads` refused, in words, with the column.

    Text that ends early (a line or file cut short by a truncated download or copy) reads
    as such, not as the first stray character json met after the end (the newline, an
    "Invalid control character"). json's own messages ending in "at" take the column there.
    """
    stripped = e.doc.rstrip()
    if e.pos >= len(stripped) and len(stripped) < len(e.doc):
        try:  # json stopped in the trailing newline: ask again without it
            json.loads(stripped)
        except json.JSONDecodeError as inner:
            e = inner
    if e.msg.startswith("Unterminated string"):
        return e.lineno, f"the {what} is cut short: it ends inside the string that starts at column {e.colno}"
    if e.pos >= len(stripped):
        return e.lineno, f"the {what} is cut short: it ends before the JSON value does"
    message = e.msg.removesuffix(" at")
    return e.lineno, f"{message[:1].lower()}{message[1:]} at column {e.colno}"


def _rows_txt(path: Path) -> Iterator[Row]:
    yield Row({"text": _read_text(path)}, str(path), from_text_file=True)


def _rows_jsonl(path: Path) -> Iterator[Row]:
    _check_text_start(path)
    try:
        with _open_binary(path) as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise GraftError(f"{where}: not UTF-8 text (binary file?)") from None
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Row({}, where, error=f"invalid JSON ({json_error_reason(e, 'line')[1]})")
                    continue
                if not isinstance(value, dict):
                    yield Row({}, where, error=f"expected a JSON object, got {type(value).__name__}")
                    continue
                yield Row(value, where)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise GraftError(f"{path}: corrupt gzip file ({e})") from None


def _rows_json(path: Path) -> Iterator[Row]:
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        line, reason = json_error_reason(e, "file")
        raise GraftError(f"{path}:{line}: invalid JSON ({reason})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise GraftError(f'{path}: expected a list of objects or {{"data": [...]}}')
    if not value:
        raise GraftError(f"{path}: empty file (no rows)")
    for index, item in enumerate(value):
        where = f"{path}:row {index}"
        if isinstance(item, dict):
            yield Row(item, where)
        else:
            yield Row({}, where, error=f"expected a JSON object, got {type(item).__name__}")


def _rows_parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise GraftError(f"{path}: not a readable Parquet file ({e})") from None
    if table_file.metadata.num_rows == 0:
        raise GraftError(f"{path}: empty file (no rows)")
    index = 0
    for batch in table_file.iter_batches(batch_size=4096):
        for item in batch.to_pylist():
            yield Row(item, f"{path}:row {index}")
            index += 1


_READERS = {".txt": _rows_txt, ".txt.gz": _rows_txt, ".jsonl": _rows_jsonl,
            ".jsonl.gz": _rows_jsonl, ".json": _rows_json, ".json.gz": _rows_json,
            ".parquet": _rows_parquet}


def iter_rows(paths: str | Path | list) -> Iterator[Row]:
    """Every row of every file that `paths` names, in order (paths are checked first)."""
    for path in resolve_paths(paths):
        yield from _READERS[kind_of(path)](path)
