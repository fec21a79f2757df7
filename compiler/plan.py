"""The Plan: everything the runtime needs, compiled, checked and content-hashed.

A Plan is a frozen dataclass that round-trips through JSON (sorted keys, so the same plan is the same
bytes). Its hash covers what determines the training result: the resolved config (data paths stand in
as their files' sha256, the run directory and prompt are left out), the data file hashes, the model's
config and tokenizer hashes and the token examples' cache key. Timestamps, run directories and
estimates are not in it, so recompiling an unchanged recipe gives the same hash.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

PLAN_VERSION = 1
VOLATILE_CONFIG_KEYS = ("run", "prompt")


@dataclass(frozen=True)
class Plan:
    version: int
    hash: str
    config: dict            # the resolved, validated config (schema.validate output)
    recipe: dict | None     # name, path, description, chain, data_sources
    model: dict             # ModelInfo fields
    data: dict              # files, hashes, row counts, splits, token stats, cache + key
    template: dict          # prompt/response/system/chat, fields used, two rendered examples
    adapter: dict           # rank, alpha, dropout, targets, trainable params
    schedule: dict          # optimisation settings and step counts
    resources: dict         # devices, mesh, memory and time estimates
    warnings: tuple = field(default_factory=tuple)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return _jsonable(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        names = {f.name for f in fields(cls)}
        missing = names - set(d)
        if missing:
            raise ValueError(f"plan lacks {', '.join(sorted(missing))}")
        version = int(d["version"])
        if version > PLAN_VERSION:
            raise ValueError(f"plan version {version} is newer than this tune understands "
                             f"({PLAN_VERSION}); upgrade tune")
        kw = {k: copy.deepcopy(d[k]) for k in names}
        kw["warnings"] = tuple(kw["warnings"] or ())
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path) -> "Plan":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def write(self, path) -> Path:
        """Write plan.json atomically (a temporary file in the same directory, then os.replace)."""
        return write_atomic(Path(path), self.to_json())

    # -- hash -----------------------------------------------------------------------------------
    def expected_hash(self) -> str:
        return content_hash(self.config, self.data, self.model)

    def is_consistent(self) -> bool:
        return self.expected_hash() == self.hash


def hashed_config(config: dict, data: dict) -> dict:
    """The config as it enters the hash: data paths replaced by their files' sha256, volatile keys
    dropped."""
    cfg = copy.deepcopy(config)
    for key in VOLATILE_CONFIG_KEYS:
        cfg.pop(key, None)
    d = cfg.get("data") or {}
    sha = data.get("sha256") or {}
    for key, name in (("path", "train"), ("test_path", "test")):
        if d.get(key) is not None:
            d[key] = "sha256:" + str(sha.get(name))
    return cfg


def content_hash(config: dict, data: dict, model: dict) -> str:
    material = {
        "config": hashed_config(config, data),
        "data": {"sha256": data.get("sha256"), "key": data.get("key")},
        "model": {"config_hash": model.get("config_hash"),
                  "tokenizer_hash": model.get("tokenizer_hash")},
        "version": PLAN_VERSION,
    }
    blob = json.dumps(_jsonable(material), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def write_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
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


def _jsonable(x):
    """Plain JSON types: tuples → lists, Paths → str, numpy scalars → Python, dict keys → str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and type(x).__module__ == "numpy":
        return x.item()
    if isinstance(x, float) and x != x:  # NaN is not JSON
        return None
    return x
