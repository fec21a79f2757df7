"""The data stage remembered: what reading, cleaning, splitting and tokenising the data files gave
(the files' stats, the token data's stats, the data warnings), keyed by the files' content and every
setting those steps read. A second compile of the same inputs — `tune run`, `tune train` after
`tune plan`, a sweep's runs, a resumed run — then reads no row: it hashes the files and loads the
token cache, so its time and memory no longer grow with the data.

`<TUNE_HOME>/cache/data/<key>.json`. The token cache it names must still be there with the same key,
else the stage runs again. Retrieval (retrieval.corpus) always runs the stage: its index is cached on
its own.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from core.files import sha256_file, tune_home, write_atomic
from core.plan import TableStats, from_jsonable, to_jsonable

VERSION = 1


def cache_dir() -> Path:
    return tune_home() / "cache" / "data"


def key_of(config: dict, model, command: str, files: dict, length=None) -> str | None:
    """The key of a data stage, or None when it is not remembered (retrieval). `files`: config key
    → the resolved data file (a Path), files (a list) or None. `length`: data.max_length=auto's
    rule (compiler/examples.LengthRule), whose cap comes from the model and the memory estimate,
    not from the config."""
    if config["retrieval"]["corpus"] is not None:
        return None
    from compiler.examples import CACHE_VERSION

    try:
        identities = {k: _identity(v) for k, v in sorted(files.items())}
    except OSError:
        return None                  # unreadable: the stage runs and says so
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": VERSION, "examples": CACHE_VERSION,
        "command": "train" if command in ("train", "plan", "run") else command,
        "data": config["data"], "template": config["template"], "objective": config["objective"],
        "seed": config["schedule"]["seed"],
        "model": [model.tokenizer_hash, model.chat_template, model.eos_token, model.bos_token],
        "files": identities, "length": None if length is None else repr(length),
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _identity(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_identity(v) for v in value]
    if hasattr(value, "files") and hasattr(value, "url"):     # a Hub split (compiler/hub.py)
        return [value.url, repr(getattr(value, "source", None)), _identity(list(value.files))]
    if isinstance(value, (str, Path)) and Path(value).is_file():
        return [str(value), os.path.getsize(value), sha256_file(value)]
    return repr(value)


def load(key: str | None) -> dict | None:
    """The remembered stage: {"train", "test" (TableStats or None), "stats" (the token data's),
    "warnings"}; None when there is none, it is unreadable, or its token cache is gone."""
    if key is None:
        return None
    try:
        doc = json.loads((cache_dir() / f"{key}.json").read_text(encoding="utf-8"))
        if doc.get("version") != VERSION or doc.get("key") != key:
            return None
        stats = doc["stats"]
        npz = Path(stats["cache"])
        meta = json.loads(npz.with_suffix(".json").read_text(encoding="utf-8"))
        if not npz.is_file() or meta.get("key") != stats["key"]:
            return None
        return {"train": _stats(doc["train"]), "test": _stats(doc["test"]), "stats": stats,
                "warnings": list(doc["warnings"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None                  # missing or damaged: the stage runs again and rewrites it


def _stats(doc) -> TableStats | None:
    return None if doc is None else from_jsonable(TableStats, doc, "data")


def save(key: str | None, *, train: TableStats | None, test: TableStats | None, stats: dict,
         warnings: list[str]) -> None:
    if key is None or not stats.get("cache"):
        return
    doc = {"version": VERSION, "key": key, "train": to_jsonable(train) if train else None,
           "test": to_jsonable(test) if test else None, "stats": stats, "warnings": warnings}
    try:
        write_atomic(cache_dir() / f"{key}.json", json.dumps(doc, ensure_ascii=False))
    except OSError:
        pass                         # an unwritable cache costs the next compile time, nothing else
