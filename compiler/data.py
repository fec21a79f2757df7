"""Read a data table, clean it, sample it and carve a validation split — all before any token exists.

Tables are JSONL, JSON, CSV or Parquet, chosen by the file suffix (or `data.format`). A row is a dict
of field → value. Problems a user can fix are PlanErrors that name the file and, for JSONL and CSV,
the 1-based line.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
from pathlib import Path
from typing import NamedTuple

from core.errors import PlanError
from core.prompting import CLEANING, Refused, TextPolicy, cleaner

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}
REASONS = ("missing_field", "empty_field", "duplicate")
# A row's key for where it was read (with_origins); never a field's name, which is always a string.
ORIGIN = ("tune", "origin")


# ------------------------------------------------------------------------------ reading

def table_format(path: str | Path, *, key: str, fmt: str = "auto") -> str:
    """The table format of `path`: `fmt` unless it is "auto", else from the suffix."""
    names = sorted(set(FORMATS.values()))
    if fmt and fmt != "auto":
        if fmt not in names:
            raise PlanError("data.format", f"unknown format `{fmt}`.",
                            hint=f"one of: auto, {', '.join(names)}.")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise PlanError(key, f"cannot tell the table format of `{Path(path).name}` from its suffix "
                        f"`{suffix or '(none)'}`.",
                        hint=f"supported: {', '.join(sorted(FORMATS))}; or set data.format to one of "
                             f"{', '.join(names)}.", file=str(path))
    return FORMATS[suffix]


MAX_FILE_MB = 1024        # a data file larger than this is refused before it is read


def read_table(path: str | Path, *, key: str, fmt: str = "auto",
               max_mb: float = MAX_FILE_MB) -> list[dict]:
    """All rows of the table at `path`, as dicts. `key` is the config key that named the file."""
    path = Path(path).expanduser()
    shown = str(path)
    check_file(path, key, max_mb)
    kind = table_format(path, key=key, fmt=fmt)
    if kind == "parquet":
        rows = _read_parquet(path, key=key)
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")  # tolerate a byte-order mark (Excel writes one)
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise PlanError(key, f"not UTF-8 text (byte {e.start}: {e.reason}).", file=shown,
                            line=line, hint="save the file as UTF-8.") from None
        del raw                              # the text is all that is read from here on
        if not text.strip():
            raise PlanError(key, "the file is empty.", file=shown)
        if kind == "jsonl":
            rows = _parse_jsonl(text, key=key, file=shown)
        elif kind == "json":
            rows = _parse_json(text, key=key, file=shown)
        else:
            rows = _parse_csv(text, key=key, file=shown)
    if not rows:
        raise PlanError(key, "the file has no rows.", file=shown)
    return rows


def table_fields(rows: list[dict]) -> list[str]:
    """The fields of a table, in order of first appearance (over its first 1,000 rows)."""
    seen: dict[str, None] = {}
    for r in rows[:1000]:
        for k in r:
            if k != ORIGIN:
                seen.setdefault(str(k), None)
    return list(seen)


def check_file(path: Path, key: str, max_mb: float) -> None:
    """A regular file of a size worth reading, or a PlanError that says what the path is."""
    import stat

    shown = str(path)
    try:
        st = path.stat()
    except RuntimeError:            # Python < 3.13 raises this for a symbolic link loop
        raise PlanError(key, "is a symbolic link loop.", file=shown) from None
    except OSError as e:
        if path.is_symlink():
            what = "a symbolic link loop" if e.errno == 40 else "a broken symbolic link"
            raise PlanError(key, f"is {what}.", file=shown,
                            hint="point it at a data file.") from None
        raise PlanError(key, "file not found.", file=shown,
                        hint=f"relative paths are read from the current directory, {os.getcwd()}.") \
            from None
    if not stat.S_ISREG(st.st_mode):
        what = ("a directory" if stat.S_ISDIR(st.st_mode) else "a named pipe (FIFO)"
                if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise PlanError(key, f"is {what}, not a data file.", file=shown,
                        hint="name one .jsonl, .json, .csv or .parquet file.")
    if st.st_size > max_mb * 2**20:
        raise PlanError(key, f"is {st.st_size / 2**20:,.3g} MB, more than data.max_file_mb="
                        f"{max_mb:g}; it is refused before it is read (the whole table is held in "
                        "memory).", file=shown,
                        hint="sample it first, or raise data.max_file_mb if this machine has the "
                             "memory (several times the file's size).")


def _parse_jsonl(text: str, *, key: str, file: str) -> list[dict]:
    # Lines are split on "\n" only: JSON strings may hold a raw U+2028, which str.splitlines() would
    # split. A trailing "\r" is whitespace to json.
    lines = text.split("\n")
    body = [ln for ln in lines if ln.strip()]
    # Fast path: the whole file as one JSON array, in C. Any surprise (a bad line, two values on a
    # line, a non-object) falls through to the line-by-line pass, which says where.
    try:
        rows = json.loads("[" + ",".join(body) + "]")
        if len(rows) == len(body) and all(type(r) is dict for r in rows) and _utf8(rows):
            return rows
    except (ValueError, RecursionError):
        pass
    rows = []
    decode = json.loads
    for n, ln in enumerate(lines, start=1):
        if not ln.strip():
            continue
        try:
            row = decode(ln)
        except ValueError as e:
            raise PlanError(key, f"line {n} is not valid JSON: {e}.", file=file, line=n,
                            hint="JSONL holds one JSON object per line.") from None
        except RecursionError:
            raise PlanError(key, f"line {n} nests JSON arrays or objects too deeply to read.",
                            file=file, line=n, hint="a row is an object of field → value.") from None
        if not isinstance(row, dict):
            raise PlanError(key, f"line {n} is a JSON {_json_type(row)}, not an object.", file=file,
                            line=n, hint='each line must be an object such as {"text": ..., "label": ...}.')
        if not _utf8([row]):
            raise PlanError(key, f"line {n} holds a lone surrogate escape (such as \\ud800): text "
                            "that is not valid Unicode.", file=file, line=n,
                            hint="fix or drop that row; it usually comes from text cut in the "
                                 "middle of an emoji.")
        rows.append(row)
    return rows


def _utf8(rows: list) -> bool:
    """Whether every string in the rows is valid Unicode (JSON's \\ud800 escapes decode to lone
    surrogates, which no tokenizer takes)."""
    try:
        json.dumps(rows, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_json(text: str, *, key: str, file: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line under a .json name (pandas/datasets do this)
            return _parse_jsonl(text, key=key, file=file)
        raise PlanError(key, f"not valid JSON: {e}.", file=file, line=e.lineno) from None
    except RecursionError:
        raise PlanError(key, "the JSON nests arrays or objects too deeply to read.", file=file,
                        hint='write [{"text": ..., "label": ...}, ...] or JSONL.') from None
    if not _utf8([data]):
        raise PlanError(key, "the file holds a lone surrogate escape (such as \\ud800): text that "
                        "is not valid Unicode.", file=file, hint="fix or drop the rows that hold it.")
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict):  # a single object: one row (JSONL of one line reads the same)
        data = [data]
    if not isinstance(data, list):
        raise PlanError(key, f"the file holds a JSON {_json_type(data)}; expected a list of objects.",
                        file=file, hint='write [{"text": ..., "label": ...}, ...] or JSONL.')
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise PlanError(key, f"item {i} of the list is a JSON {_json_type(row)}, not an object.",
                            file=file, hint="every item must be an object of field → value.")
    return data


def _parse_csv(text: str, *, key: str, file: str) -> list[dict]:
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))   # long fields are data, not errors
    reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": quoted fields keep theirs
    rows = []
    try:
        header = reader.fieldnames
        if not header:
            raise PlanError(key, "the CSV file has no header row.", file=file, line=1,
                            hint="the first line names the fields, e.g. `text,label`.")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise PlanError(key, f"the header names {', '.join(map(repr, dupes))} more than once.",
                            file=file, line=1)
        for row in reader:
            if None in row:
                raise PlanError(key, f"line {reader.line_num} has {len(header) + len(row[None])} "
                                f"values for {len(header)} header fields.", file=file,
                                line=reader.line_num,
                                hint="quote values that contain the delimiter, e.g. \"a, b\".")
            if any(v not in (None, "") for v in row.values()):  # skip all-empty lines
                rows.append(row)
    except csv.Error as e:
        raise PlanError(key, f"CSV error on line {reader.line_num}: {e}.", file=file,
                        line=reader.line_num) from None
    return rows


def _read_parquet(path: Path, *, key: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 — pyarrow raises several kinds for a bad file
        raise PlanError(key, f"cannot read Parquet: {e}", file=str(path)) from None


def _json_type(value) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null", dict: "object"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------ values, clean text

def prepare_rows(rows: list[dict], *, fields: list[str], messages: str | None, policy: TextPolicy,
                 key: str, file: str, locate) -> tuple[list[dict], dict[str, int]]:
    """The rows (changed in place) with the fields the template reads checked and cleaned: a
    template field must hold
    text or a finite number (a list, object, boolean, NaN or Infinity is an error naming file and
    line — it would be trained as its Python repr; null drops the row, counted by clean_rows), a
    conversation field a conversation (compiler/conversations.py);
    every text is Unicode-normalised, its whitespace treated, and the model's control tokens in it
    escaped (encoded as plain text) or refused. `locate(i)` → (line or None, where) of row i.
    Returns (rows, {what: texts changed}) for the plan."""
    from compiler.conversations import normalise

    counts = dict.fromkeys(CLEANING, 0)
    clean = cleaner(policy, counts)
    out = []
    for i, row in enumerate(rows):
        new = row                           # cleaned in place: a copy would double the rows' memory
        for f in fields:
            v = row.get(f)
            if v is None:
                continue                    # clean_rows drops the row, and counts it
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                line, where = locate(i)
                raise PlanError(key, f"field `{f}` of {where} is a JSON {_json_type(v)}, not text or "
                                "a number; it would be trained as its Python repr.", file=file,
                                line=line, hint=("a conversation? use template=conversation "
                                                 f"(template.messages={f})." if isinstance(v, list)
                                                 else "write the value as text, e.g. \"yes\"."))
            if isinstance(v, float) and not math.isfinite(v):
                line, where = locate(i)
                raise PlanError(key, f"field `{f}` of {where} is {json_number(v)}, not a finite "
                                f"number; it would be trained as the text {str(v)!r}.", file=file,
                                line=line, hint=f"write it as text (\"{json_number(v)}\") if that "
                                "is the answer, or null for a missing value (the row is then "
                                "dropped and counted).")
            try:
                new[f] = clean(v if isinstance(v, str) else str(v))
            except Refused as e:
                line, where = locate(i)
                raise PlanError(key, f"field `{f}` of {where} contains the model's control token "
                                f"{e.args[0]!r} (data.control_tokens=refuse).", file=file,
                                line=line, hint="remove it, or set data.control_tokens=escape to "
                                                "train it as plain text.") from None
        if messages is not None and row.get(messages) is not None:
            try:
                turns = normalise(row[messages])
                new[messages] = [{"role": t["role"], "content": clean(t["content"])} for t in turns]
            except (ValueError, Refused) as e:
                line, where = locate(i)
                what = (f"contains the model's control token {e.args[0]!r} "
                        "(data.control_tokens=refuse)" if isinstance(e, Refused) else str(e))
                raise PlanError(key, f"the conversation `{messages}` of {where} {what}.", file=file,
                                line=line, hint='turns are [{"role": "user", "content": ...}, '
                                '{"role": "assistant", "content": ...}] (OpenAI) or [{"from": '
                                '"human", "value": ...}, {"from": "gpt", "value": ...}] '
                                "(ShareGPT).") from None
        out.append(new)
    return out, counts


def json_number(v: float) -> str:
    """A non-finite float as JSON readers write it: NaN, Infinity, -Infinity."""
    return "NaN" if v != v else "Infinity" if v > 0 else "-Infinity"


def with_origins(rows: list[dict], file: str, locate) -> list[dict]:
    """The rows read_table returned from `file`, each remembering where it was read (`origin(row)`;
    `locate` is the file's row_locator), so that a check made after cleaning, sampling and
    splitting have reordered them still names the file and line."""
    for i, row in enumerate(rows):
        row[ORIGIN] = (file, i, locate)
    return rows


class Origin(NamedTuple):
    """Where a row was read."""
    file: str
    index: int                      # its place among the file's rows (read_table's order)
    line: int | None                # 1-based line (JSONL, CSV), else None
    where: str                      # "line N", "item i of the list" (JSON), "row i" (Parquet)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else f"{self.file} ({self.where})"


def origin(row: dict) -> Origin | None:
    """Where a row read with with_origins was read, or None for a row made otherwise."""
    found = row.get(ORIGIN)
    if found is None:
        return None
    file, i, locate = found
    return Origin(file, i, *locate(i))


def row_locator(path: str | Path, *, fmt: str = "auto"):
    """locate(i) → (1-based line or None, "line N" / "item i" / "row i") of the i-th row read_table
    returned from `path` (computed only when asked: errors are rare)."""
    kind = table_format(path, key="data.path", fmt=fmt)
    lines: list[int] = []

    def locate(i: int) -> tuple[int | None, str]:
        if kind == "json":
            return None, f"item {i} of the list"
        if kind == "parquet":
            return None, f"row {i + 1}"
        if not lines:
            text = Path(path).read_bytes().decode("utf-8-sig", "replace")
            if kind == "jsonl":
                lines.extend(n for n, ln in enumerate(text.split("\n"), start=1) if ln.strip())
            else:
                reader = csv.DictReader(io.StringIO(text, newline=""))
                start = 2
                for row in reader:
                    if any(v not in (None, "") for v in row.values()):
                        lines.append(start)
                    start = reader.line_num + 1
        return (lines[i], f"line {lines[i]}") if i < len(lines) else (None, f"row {i + 1}")

    return locate


# ------------------------------------------------------------------------------ cleaning

def clean_rows(rows: list[dict], *, fields: list[str], dedupe: bool = True
               ) -> tuple[list[dict], dict[str, int]]:
    """Keep rows whose used fields are all present and non-blank; drop exact duplicates over the used
    fields (first one kept). Returns (kept rows, {reason: count}) with every reason present."""
    counts = dict.fromkeys(REASONS, 0)
    fields = list(fields)
    kept, seen = [], set()
    for row in rows:
        values = []
        reason = None
        for f in fields:
            v = row.get(f)
            if v is None:
                reason = "missing_field"
                break
            s = v if isinstance(v, str) else str(v)
            if not s.strip():
                reason = reason or "empty_field"
            values.append(s)
        if reason is None and dedupe:
            sig = tuple(values)
            if sig in seen:
                reason = "duplicate"
            else:
                seen.add(sig)
        if reason:
            counts[reason] += 1
        else:
            kept.append(row)
    return kept, counts


# ------------------------------------------------------------------------------ sampling, splits

def sample_rows(rows: list[dict], max_rows: int | None, seed: int) -> list[dict]:
    """At most max_rows rows, a fixed-seed sample kept in file order (None or ≥ len: all)."""
    if max_rows is None or max_rows >= len(rows):
        return list(rows)
    keep = sorted(random.Random(f"tune-sample-{seed}").sample(range(len(rows)), max(int(max_rows), 0)))
    return [rows[i] for i in keep]


def split_validation(rows: list[dict], val_fraction: float, seed: int,
                     val_rows: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, val): min(round(n · val_fraction), val_rows) fixed-seed rows held out (at least one
    when the fraction and the cap are positive and two rows exist; val_rows None = no cap), both in
    file order. Rows past the cap stay in training: a validation pass costs a forward pass over
    every held-out row each time it runs, and a few hundred rows measure a loss well enough."""
    n = len(rows)
    if not val_fraction or val_fraction <= 0 or n < 2 or (val_rows is not None and val_rows <= 0):
        return list(rows), []
    n_val = min(max(1, round(n * float(val_fraction))), n - 1)
    if val_rows is not None:
        n_val = min(n_val, int(val_rows))
    val_idx = set(random.Random(f"tune-val-{seed}").sample(range(n), n_val))
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [r for i, r in enumerate(rows) if i in val_idx]
    return train, val
