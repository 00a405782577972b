"""Data files with a UTF-8 byte-order mark, and JSONL lines cut short."""

from __future__ import annotations

import gzip
import json

import pytest

from graftlm.data.sources import iter_rows
from graftlm.errors import GraftError

BOM = "\ufeff"
ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("name, text", [
    ("d.jsonl", BOM + _jsonl(ROWS)),
    ("d.jsonl", BOM + _jsonl(ROWS).replace("\n", "\r\n")),
    ("d.json", BOM + json.dumps(ROWS)),
    ("d.json", BOM + json.dumps({"data": ROWS})),
])
def test_a_byte_order_mark_loses_no_row(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    rows = list(iter_rows(path))
    assert [r.error for r in rows] == [None, None]
    assert [r.fields for r in rows] == ROWS


def test_a_byte_order_mark_in_a_gzipped_jsonl_loses_no_row(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress((BOM + _jsonl(ROWS)).encode("utf-8")))
    assert [r.fields for r in iter_rows(path)] == ROWS


def test_a_text_file_keeps_no_byte_order_mark(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes((BOM + "hello\nworld\n").encode("utf-8"))
    [row] = iter_rows(path)
    assert row.fields["text"] == "hello\nworld\n"


def test_a_byte_order_mark_after_the_first_line_is_still_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((json.dumps(ROWS[0]) + "\n" + BOM + json.dumps(ROWS[1]) + "\n").encode("utf-8"))
    rows = list(iter_rows(path))
    assert rows[0].error is None and rows[1].error is not None


def test_a_line_cut_short_inside_a_string_says_so(tmp_path):
    good = json.dumps({"question": "q" * 300, "answer": "a " * 300})
    cut = good[:200]  # ends inside the question string
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + cut + "\n" + good + "\n")
    rows = list(iter_rows(path))
    assert [r.error is None for r in rows] == [True, False, True]
    assert rows[1].source == f"{path}:2"
    assert rows[1].error == ("invalid JSON (the line is cut short: it ends inside the string "
                             "that starts at column 14)")
    assert "control character" not in rows[1].error and "at," not in rows[1].error


@pytest.mark.parametrize("line, error", [
    ('{"prompt": "a", "completion": ', "invalid JSON (the line is cut short: it ends before the JSON value does)"),
    ('{"prompt": "a"', "invalid JSON (the line is cut short: it ends before the JSON value does)"),
    ('{"prompt": "a" "completion": "b"}', "invalid JSON (expecting ',' delimiter at column 16)"),
    ('{"prompt": "a\tb"}', "invalid JSON (invalid control character at column 14)"),
    ('{"prompt": "a"} x', "invalid JSON (extra data at column 17)"),
])
def test_other_json_errors_name_a_column_in_plain_words(tmp_path, line, error):
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\r\n")
    [row] = iter_rows(path)
    assert row.source == f"{path}:1"
    assert row.error == error


def test_a_cut_short_json_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "compl')
    with pytest.raises(GraftError) as e:
        list(iter_rows(path))
    assert str(e.value) == (f"{path}:3: invalid JSON (the file is cut short: it ends inside the string "
                            "that starts at column 19)")


def test_held_out_text_for_merge_keeps_no_byte_order_mark(tmp_path):
    from graftlm.adapters_cli import read_eval_text
    path = tmp_path / "held_out.txt"
    path.write_bytes((BOM + "held-out text\n").encode("utf-8"))
    assert read_eval_text(str(path))[0] == "held-out text\n"
