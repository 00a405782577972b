"""Data sources: every file kind, folders, globs, and the file-level errors naming the path."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graftlm.data.sources import iter_rows, resolve_paths
from graftlm.errors import GraftError


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def test_each_file_kind_gives_rows_with_sources(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}, "", {"text": "y"}])
    write_jsonl(tmp_path / "c.jsonl.gz", [{"text": "z"}], opener=gzip.open)
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write("zipped text")
    (tmp_path / "e.json").write_text(json.dumps([{"text": "j0"}, {"text": "j1"}]))
    (tmp_path / "f.json").write_text(json.dumps({"data": [{"text": "k0"}]}))
    pq.write_table(pa.table({"text": ["p0", "p1"]}), tmp_path / "g.parquet")

    rows = list(iter_rows(tmp_path))
    got = [(r.fields["text"], r.source.replace(str(tmp_path) + "/", "")) for r in rows]
    assert got == [("line one\nline two\n", "a.txt"), ("x", "b.jsonl:1"), ("y", "b.jsonl:3"),
                   ("z", "c.jsonl.gz:1"), ("zipped text", "d.txt.gz"), ("j0", "e.json:row 0"),
                   ("j1", "e.json:row 1"), ("k0", "f.json:row 0"), ("p0", "g.parquet:row 0"),
                   ("p1", "g.parquet:row 1")]
    assert rows[0].from_text_file and not rows[1].from_text_file


def test_globs_and_folders_are_recursive_and_sorted(tmp_path):
    for name in ("b/2.txt", "b/1.txt", "a/x/3.txt", "a/.hidden/4.txt", "a/notes.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert [p.relative_to(tmp_path).as_posix() for p in resolve_paths(tmp_path)] == \
        ["a/x/3.txt", "b/1.txt", "b/2.txt"]
    assert [p.name for p in resolve_paths(str(tmp_path / "b" / "*.txt"))] == ["1.txt", "2.txt"]
    assert [p.name for p in resolve_paths(str(tmp_path / "**" / "3.txt"))] == ["3.txt"]


def test_invalid_json_line_is_a_bad_row_not_a_crash(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "{not json", "[1, 2]"])
    rows = list(iter_rows(path))
    assert [r.error is None for r in rows] == [True, False, False]
    assert rows[1].source.endswith("d.jsonl:2") and "invalid JSON" in rows[1].error
    assert "expected a JSON object" in rows[2].error


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"  \n\n", "no text \\(only whitespace\\)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    (b"caf\xe9 au lait\n", "not UTF-8"),
])
def test_empty_and_binary_files_are_errors_naming_the_path(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(GraftError, match=message) as info:
        list(iter_rows(path))
    assert str(path) in str(info.value)


def test_binary_jsonl_and_empty_json_list(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "a"}\n\x00\x01\x02')
    with pytest.raises(GraftError, match="binary file") as info:
        list(iter_rows(tmp_path / "b.jsonl"))
    assert "b.jsonl" in str(info.value)
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(GraftError, match="e.json: empty file"):
        list(iter_rows(tmp_path / "e.json"))


def test_paths_matching_nothing_are_errors(tmp_path):
    with pytest.raises(GraftError, match="nothing-here/\\*.jsonl: matches no data file"):
        resolve_paths(str(tmp_path / "nothing-here" / "*.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraftError, match="folder holds no data file"):
        resolve_paths(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(GraftError, match="x.csv: unsupported file type"):
        resolve_paths(tmp_path / "x.csv")


def test_text_after_a_long_run_of_whitespace_is_read(tmp_path):
    path = tmp_path / "late.txt"
    path.write_text(" " * 70_000 + "hello")  # past the first 64 KiB, which were read to sniff
    assert [r.fields["text"].strip() for r in iter_rows(path)] == ["hello"]
    path.write_text(" " * 70_000)
    with pytest.raises(GraftError, match="late.txt: no text"):
        list(iter_rows(path))
