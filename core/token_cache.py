"""The token cache a plan names (`data.cache`), read: the token data the runtime trains and scores
on. compiler/examples.py writes it; this reads it, once per process.

Files: `<key>.npz` — per split (train, val, test, test_plain) `{split}_ids` (int32, all examples' ids
end to end), `{split}_offsets` (int64, where each example starts; one more than examples),
`{split}_prompt_lens` (int32) and, for conversations, `{split}_mask`; `train_class` and
`val_class` (each example's label, for a label set) — plus `<key>.json` (stats, test references,
labels).

The arrays are memory-mapped, not read: a process touches only the examples it batches, so its
memory does not grow with the data (np.savez stores members uncompressed, each an .npy at an
offset of the zip file). Per split, examples are a Ragged sequence over the flat ids — one array
and its offsets, not an array object per example.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class Ragged(Sequence):
    """Examples end to end: `flat` holds them all, example i is flat[offsets[i]:offsets[i + 1]]
    (a view). A Sequence of arrays without an object per example."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def of(cls, arrays: Sequence, dtype=np.int32) -> "Ragged":
        if isinstance(arrays, Ragged):
            return arrays
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = (np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if len(arrays)
                else np.zeros(0, dtype=dtype))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def __eq__(self, other) -> bool:
        if not isinstance(other, (Ragged, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(np.array_equal(a, b) for a, b in zip(self, other))

    __hash__ = None

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def firsts(self) -> np.ndarray:
        """Each non-empty example's first element."""
        starts = self.offsets[:-1][self.lengths > 0]
        return self.flat[starts]


@dataclass(frozen=True)
class Examples:
    """The token data of a plan. `split(name)` → (ids per example, prompt lengths)."""
    path: str
    arrays: dict = field(repr=False)
    references: list = field(repr=False)       # test answers (response text, no end token)
    labels: list = field(repr=False)           # sorted distinct normalised train answers ([] if many)
    stats: dict = field(repr=False)
    plain_references: list = field(default_factory=list, repr=False)   # test_plain's answers

    def split(self, name: str) -> tuple[Ragged, np.ndarray]:
        """(ids of each example, prompt lengths) of a split."""
        ids = self.arrays.get(f"{name}_ids")
        if ids is None:
            return Ragged(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64)), \
                np.zeros(0, dtype=np.int32)
        return Ragged(ids, self.arrays[f"{name}_offsets"]), self.arrays[f"{name}_prompt_lens"]

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
        return Ragged(mask, self.arrays[f"{name}_offsets"])

    def supervised_counts(self, name: str) -> np.ndarray:
        """Supervised targets per example (the first token is never a target)."""
        masks = self.masks(name)
        if masks is not None:
            starts = np.minimum(masks.offsets[:-1], max(len(masks.flat) - 1, 0))
            per = np.add.reduceat(masks.flat.astype(np.int64), starts) \
                if len(masks.flat) else np.zeros(len(masks), dtype=np.int64)
            per[masks.lengths == 0] = 0
            firsts = np.zeros(len(masks), dtype=np.int64)
            firsts[masks.lengths > 0] = masks.firsts()
            return per - firsts
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

    def classes(self, name: str) -> np.ndarray | None:
        """Per example of a split, its label's index in the label set (the plan's data.labels
        order; -1 for a validation answer outside it): what data.balance counts and weighs and the
        classification head learns. The train and val splits of a label set have it; None
        elsewhere."""
        return self.arrays.get(f"{name}_class")

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
    arrays = _mapped(path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    examples = to_examples(path, arrays, meta)
    remember(path, examples, stamp)
    return examples


def _mapped(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, memory-mapped (read where a member is compressed)."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with np.load(path) as npz:
                    out[name] = npz[name]
                continue
            f.seek(info.header_offset)
            local = f.read(30)                 # the member's local header: its name and extra field
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") \
                + int.from_bytes(local[28:30], "little")
            f.seek(start)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                           np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"{path}: member {name} holds objects")
            if not int(np.prod(shape)):
                out[name] = np.zeros(shape, dtype=dtype)
                continue
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                  order="F" if fortran else "C")
    return out


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
