"""Files: where tune keeps its caches, content hashes, and writes that never leave half a file.

Shared by the compiler and the runtime (pure Python: no JAX, no Hydra).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def tune_home() -> Path:
    """$TUNE_HOME, default ~/.cache/tune: the converted embedded model, the token caches, and the
    CPU's best measured matmul rate (compiler/estimates.cpu_matmul_flops)."""
    return Path(os.environ.get("TUNE_HOME") or Path.home() / ".cache" / "tune").expanduser()


def sha256_file(*paths: str | Path) -> str:
    """Hex sha256 of a file's bytes (of several files': their bytes one after another, as the file
    they are the pieces of), read in 1 MiB pieces."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | Path, data: str | bytes | Callable) -> Path:
    """Write `path` so that a reader (or a crash) sees the old file or the new one, never half of one:
    a temporary file in the same directory, flushed and fsynced, then renamed over `path`.
    `data` is text (UTF-8), bytes, or a function that writes into the open binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_json(path: str | Path, obj, *, indent: int | None = 2) -> Path:
    """`obj` as JSON (UTF-8, not ASCII-escaped), written atomically."""
    return write_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
