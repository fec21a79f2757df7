"""compiler/data.py: reading tables (and where they are broken), cleaning, sampling, splitting."""
from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from compiler.data import clean_rows, read_table, sample_rows, split_validation
from core.errors import PlanError
from core.files import sha256_file


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"text": f"row {i}", "label": "Yes" if i % 2 else "No"} for i in range(100)]


# ------------------------------------------------------------------------------ JSONL

def test_jsonl_reads_rows_and_skips_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n\n   \n{"text": "b", "label": "y"}\r\n', encoding="utf-8")
    assert read_table(p, key="data.path") == [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a\u2028b\u0085c", "label": "x"}\n', encoding="utf-8")
    assert read_table(p, key="data.path")[0]["text"] == "a\u2028b\u0085c"


def test_jsonl_broken_line_names_file_and_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) for r in ROWS[:60]]
    lines[56] = '{"text": "oops", "label": }'          # line 57
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.path")
    err = e.value
    assert (err.key, err.file, err.line) == ("data.path", str(p), 57)
    assert "57" in err.message and "Expecting value" in err.message
    assert f"{p}:57:" in str(err)


def test_jsonl_line_count_ignores_blank_lines_before_the_error(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"a": 1}\n\n\n{"a": 2} {"a": 3}\n', encoding="utf-8")
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.path")
    assert e.value.line == 4 and "Extra data" in e.value.message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.test_path")
    assert (e.value.key, e.value.line) == ("data.test_path", 2)
    assert "array, not an object" in e.value.message


def test_missing_file_names_it_and_the_working_directory(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.path")
    assert e.value.key == "data.path" and e.value.file == str(p)
    assert "file not found" in e.value.message and os.getcwd() in e.value.hint


def test_directory_is_not_a_table(tmp_path):
    with pytest.raises(PlanError, match="directory"):
        read_table(tmp_path, key="data.path")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.path")
    assert "empty" in e.value.message and e.value.file == str(p)


def test_unknown_extension_lists_supported(tmp_path):
    p = tmp_path / "data.xlsx"
    p.write_text("x")
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.path")
    assert ".jsonl" in e.value.hint and ".csv" in e.value.hint and ".parquet" in e.value.hint
    assert "`.xlsx`" in e.value.message


def test_format_override_reads_any_suffix(tmp_path):
    p = write_jsonl(tmp_path / "data.txt", ROWS[:3])
    assert read_table(p, key="data.path", fmt="jsonl") == ROWS[:3]
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.path", fmt="xml")
    assert e.value.key == "data.format"


def test_not_utf8(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.path")
    assert e.value.line == 2 and "UTF-8" in e.value.message


def test_jsonl_10k_rows_is_fast(tmp_path):
    rows = [{"text": f"headline number {i} about stocks and bonds", "label": "Neutral", "id": i}
            for i in range(10_000)]
    p = write_jsonl(tmp_path / "big.jsonl", rows)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        got = read_table(p, key="data.path")
        best = min(best, time.perf_counter() - t)
    assert got == rows
    print(f"\nread_table: 10k JSONL rows in {best * 1e3:.1f} ms")
    assert best < 0.1


# ------------------------------------------------------------------------------ JSON, CSV, Parquet

def test_json_list_and_data_wrapper(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS[:5]))
    assert read_table(p, key="data.path") == ROWS[:5]
    p.write_text(json.dumps({"data": ROWS[:5]}))
    assert read_table(p, key="data.path") == ROWS[:5]


def test_json_file_holding_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "d.json", ROWS[:4])       # what datasets' to_json writes
    assert read_table(p, key="data.path") == ROWS[:4]


def test_json_errors(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n{"a": 1},\n{"a": }\n]')
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.path")
    assert e.value.line == 3 and e.value.file == str(p)
    p.write_text('"just a string"')
    with pytest.raises(PlanError, match="expected a list of objects"):
        read_table(p, key="data.path")
    p.write_text('[{"a": 1}, 7]')
    with pytest.raises(PlanError, match="item 1"):
        read_table(p, key="data.path")
    p.write_text("[]")
    with pytest.raises(PlanError, match="no rows"):
        read_table(p, key="data.path")


def test_csv_reads_quoted_fields_and_bom(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes('\ufefftext,label\r\n"a, with comma",Yes\r\n"two\nlines",No\r\n'.encode("utf-8"))
    assert read_table(p, key="data.path") == [{"text": "a, with comma", "label": "Yes"},
                                              {"text": "two\nlines", "label": "No"}]


def test_csv_row_with_too_many_values_names_the_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,Yes\nb,No\nc, unquoted, comma,No\n")
    with pytest.raises(PlanError) as e:
        read_table(p, key="data.path")
    assert e.value.line == 4 and "4 values for 2 header fields" in e.value.message


def test_csv_header_only_has_no_rows(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\n")
    with pytest.raises(PlanError, match="no rows"):
        read_table(p, key="data.path")


def test_parquet_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:7]), p)
    assert read_table(p, key="data.path") == ROWS[:7]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(PlanError) as e:
        read_table(bad, key="data.path")
    assert e.value.file == str(bad) and "Parquet" in e.value.message


def test_sha256_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc" * 1000)
    assert sha256_file(p) == hashlib.sha256(b"abc" * 1000).hexdigest()


# ------------------------------------------------------------------------------ cleaning

def test_clean_rows_counts_each_reason():
    rows = [
        {"text": "a", "label": "x"},
        {"text": "a", "label": "x", "extra": 1},     # duplicate over the used fields
        {"text": "b"},                               # missing label
        {"text": "c", "label": None},                # missing (null)
        {"text": "   ", "label": "x"},               # blank
        {"text": "d", "label": ""},                  # empty
        {"text": "e", "label": 0},                   # 0 is a value
        {"text": "f", "label": "y", "unused": ""},   # an unused empty field does not matter
    ]
    kept, counts = clean_rows(rows, fields=["text", "label"])
    assert kept == [rows[0], rows[6], rows[7]]
    assert counts == {"missing_field": 2, "empty_field": 2, "duplicate": 1}


def test_clean_rows_without_dedupe_and_always_all_reasons():
    rows = [{"text": "a"}, {"text": "a"}]
    kept, counts = clean_rows(rows, fields=["text"], dedupe=False)
    assert kept == rows and counts == {"missing_field": 0, "empty_field": 0, "duplicate": 0}


# ------------------------------------------------------------------------------ sampling, splits

def test_sample_rows_fixed_seed_and_file_order():
    a = sample_rows(ROWS, 10, seed=1)
    assert a == sample_rows(ROWS, 10, seed=1) and len(a) == 10
    assert a == sorted(a, key=ROWS.index)                # file order kept
    assert a != sample_rows(ROWS, 10, seed=2)
    assert sample_rows(ROWS, None, seed=1) == ROWS and sample_rows(ROWS, 1000, seed=1) == ROWS


def test_split_validation_fixed_seed_disjoint_complete():
    train, val = split_validation(ROWS, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val, key=ROWS.index) == ROWS
    assert (train, val) == split_validation(ROWS, 0.1, seed=0)
    assert val != split_validation(ROWS, 0.1, seed=1)[1]
    assert split_validation(ROWS, 0, seed=0) == (ROWS, [])
    assert len(split_validation(ROWS[:5], 0.01, seed=0)[1]) == 1     # a positive fraction holds one out


# ------------------------------------------------------------------------------ what a path is

def test_paths_that_are_not_data_files_say_what_they_are(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere.jsonl")
    for path, what in ((tmp_path / "fifo", "a named pipe (FIFO)"), ("/dev/null", "a device"),
                       (tmp_path / "loop1", "a symbolic link loop"), (tmp_path, "a directory"),
                       (tmp_path / "dangling", "a broken symbolic link"),
                       (tmp_path / "absent.jsonl", "file not found")):
        with pytest.raises(PlanError) as e:
            read_table(path, key="data.path")
        assert what in str(e.value) and e.value.key == "data.path"


def test_size_ceiling_and_long_csv_fields(tmp_path):
    import csv

    path = tmp_path / "long.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerow(["short", "A"])
        w.writerow(["x" * 200_000, "B"])                # over csv's default 128 KiB field limit
        w.writerow(["after", "C"])
    rows = read_table(path, key="data.path")
    assert [r["label"] for r in rows] == ["A", "B", "C"] and len(rows[1]["text"]) == 200_000
    with pytest.raises(PlanError, match=r"more than data.max_file_mb=0.1"):
        read_table(path, key="data.path", max_mb=0.1)
