"""The token cache a plan names (`data.cache`), read: the token data the runtime trains and scores
on. compiler/examples.py writes it; this reads it, once per process.

Files: `<key>.npz` — per split (train, val, test, test_plain) `{split}_ids` (int32, all examples' ids
end to end), `{split}_offsets` (int64, where each example starts; one more than examples),
`{split}_prompt_lens` (int32) and, for conversations, `{split}_mask` — plus `<key>.json` (stats,
test references, labels).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Examples:
    """The token data of a plan. `split(name)` → (ids per example, prompt lengths)."""
    path: str
    arrays: dict = field(repr=False)
    references: list = field(repr=False)       # test answers (response text, no end token)
    labels: list = field(repr=False)           # sorted distinct normalised train answers ([] if many)
    stats: dict = field(repr=False)
    plain_references: list = field(default_factory=list, repr=False)   # test_plain's answers

    def split(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        ids = self.arrays.get(f"{name}_ids")
        if ids is None:
            return [], np.zeros(0, dtype=np.int32)
        offsets = self.arrays[f"{name}_offsets"]
        n = len(offsets) - 1
        return (np.split(ids, offsets[1:-1]) if n > 0 else []), self.arrays[f"{name}_prompt_lens"]

    def references_of(self, name: str) -> list[str]:
        """The answers of a test split (test, or test_plain: the same rows without retrieval)."""
        if name == "test":
            return self.references
        return self.plain_references if name == "test_plain" else []

    def masks(self, name: str) -> list[np.ndarray] | None:
        """Per example, which tokens are supervised (predicted with loss) — only for splits whose
        examples supervise more than one span (conversations); None: every token after the
        prompt."""
        mask = self.arrays.get(f"{name}_mask")
        if mask is None:
            return None
        offsets = self.arrays[f"{name}_offsets"]
        return np.split(mask.astype(bool), offsets[1:-1]) if len(offsets) > 1 else []

    def supervised_counts(self, name: str) -> np.ndarray:
        """Supervised targets per example (the first token is never a target)."""
        masks = self.masks(name)
        if masks is not None:
            return np.asarray([int(m[1:].sum()) for m in masks], dtype=np.int64)
        lengths = self.lengths(name)
        plens = self.arrays.get(f"{name}_prompt_lens", np.zeros(len(lengths), dtype=np.int32))
        return np.maximum(lengths - np.maximum(plens.astype(np.int64), 1), 0)

    @property
    def unit(self) -> int:
        """Examples that always share a row: 1, or 2 for preference data (chosen, rejected; KTO:
        completion, KL completion), consecutive in every split."""
        return int(self.stats.get("unit", 1))

    def unit_labels(self, name: str) -> np.ndarray | None:
        """KTO: per unit, 1 for a desirable completion, 0 for an undesirable one; else None."""
        return self.arrays.get(f"{name}_unit_labels")

    def unit_lengths(self, name: str) -> np.ndarray:
        """Per unit, the token count of one example that takes as many row slots as the unit's
        examples together (what the packing rule and the step count see)."""
        lengths = self.lengths(name)
        if self.unit == 1 or not len(lengths):
            return lengths
        return lengths.reshape(-1, self.unit).sum(axis=1) - (self.unit - 1)

    def unit_supervised(self, name: str) -> np.ndarray:
        counts = self.supervised_counts(name)
        if self.unit == 1 or not len(counts):
            return counts
        return counts.reshape(-1, self.unit).sum(axis=1)

    def lengths(self, name: str) -> np.ndarray:
        offsets = self.arrays.get(f"{name}_offsets")
        return np.diff(offsets) if offsets is not None else np.zeros(0, dtype=np.int64)


def load_examples(cache: str | Path) -> Examples:
    """The token data at `cache` (a plan's data.cache). Read once per process: later calls for the
    same, unchanged files return the same object (the compiler, the trainer and the evaluation of
    one `tune` run share one read)."""
    if not cache:
        raise FileNotFoundError("the plan names no token cache (it has no examples); compile the plan "
                                "again with data")
    path = Path(cache)
    meta_path = path.with_suffix(".json")
    try:
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (path, meta_path))
    except FileNotFoundError:
        missing = path if not path.is_file() else meta_path
        raise FileNotFoundError(f"the plan's token cache {missing} is missing (deleted, or the plan "
                                "was compiled on another machine); compile the plan again to rebuild "
                                "it") from None
    hit = _LOADED.get(str(path))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    examples = to_examples(path, arrays, meta)
    remember(path, examples, stamp)
    return examples


# path → (file stamps, Examples): the last few token caches this process read or wrote
_LOADED: dict[str, tuple] = {}
_KEEP = 2


def to_examples(path: Path, arrays: dict, meta: dict) -> Examples:
    return Examples(path=str(path), arrays=arrays, references=list(meta["test"]["references"]),
                    labels=list(meta.get("labels") or []), stats=meta.get("stats") or {},
                    plain_references=list((meta.get("test_plain") or {}).get("references") or []))


def remember(path: Path, examples: Examples, stamp: tuple | None = None) -> None:
    if stamp is None:
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (path, path.with_suffix(".json")))
    _LOADED.pop(str(path), None)
    _LOADED[str(path)] = (stamp, examples)
    while len(_LOADED) > _KEEP:
        _LOADED.pop(next(iter(_LOADED)))
