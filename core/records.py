"""The records a run directory holds besides the Plan, as types: train_summary.json (TrainSummary),
eval.json (EvalFile of EvalResults) and a sweep's sweep.json (SweepFile of SweepRuns). The runtime
writes them through these types; the report, the sweep, the commands and the benchmarks read them
through them. Each reads back what it wrote (`from_dict(to_dict()) == self`); a missing or unreadable
file reads as None.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.files import write_json


# ------------------------------------------------------------------------------ trained weights

ADAPTER = ("adapter", "adapter_model.safetensors")     # a PEFT adapter (LoRA, DoRA)
MODEL = ("model", "model.safetensors")                 # adapter.kind=full: a transformers checkpoint


def trained_dir(run_dir, kind: str) -> Path:
    """Where a run of adapter.kind `kind` keeps what it trained: adapter/, or model/ (full)."""
    return Path(run_dir) / (MODEL if kind == "full" else ADAPTER)[0]


def trained_file(run_dir, kind: str) -> Path:
    """The weights file training writes last into trained_dir: its presence means it finished."""
    return trained_dir(run_dir, kind) / (MODEL if kind == "full" else ADAPTER)[1]


def _read(path: Path) -> dict | None:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _known(cls, doc: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in doc.items() if k in names}


class _File:
    """A record kept as one JSON file, FILE, in a directory: write(dir) and read(dir) → the record,
    or None when the file is missing, unreadable or of another shape."""
    FILE: str

    def write(self, directory) -> Path:
        return write_json(Path(directory) / self.FILE, self.to_dict())

    @classmethod
    def read(cls, directory):
        doc = _read(Path(directory) / cls.FILE)
        try:
            return None if doc is None else cls.from_dict(doc)
        except (TypeError, KeyError):
            return None


# ------------------------------------------------------------------------------ train_summary.json

@dataclass(frozen=True)
class TrainSummary(_File):
    """What a finished training wrote: its steps, losses, speed and where it ran."""
    steps: int
    total_steps: int
    steps_per_epoch: int
    first_loss: float | None
    final_loss: float | None
    final_val_loss: float | None
    tokens_seen: int
    tokens_per_s_mean: float | None
    step_time_s_mean: float | None
    compile_s: float | None
    wall_s: float
    resumed_from: int | None
    devices: int
    backend: str
    dtype: str
    plan_hash: str

    FILE = "train_summary.json"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "TrainSummary":
        return cls(**_known(cls, doc))



# ------------------------------------------------------------------------------ eval.json

@dataclass(frozen=True)
class EvalResult:
    """One model's score on one set of test rows. `detail` holds what the metric adds (per_class,
    confusion, worst, ...); the per-example lists stay in eval_predictions.jsonl."""
    model: str
    metric: str
    value: float
    n: int
    mode: str | None = None
    adapter: str | None = None
    retrieval: bool | None = None
    max_new_tokens: int | None = None
    limit: int | None = None
    data_key: str | None = None
    seconds: float | None = None
    generated_tokens: int | None = None
    majority_baseline: float | None = None
    free: dict | None = None
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "detail"}
        return {**self.detail, **doc}

    @classmethod
    def from_dict(cls, doc: dict) -> "EvalResult":
        known = _known(cls, doc)
        known.pop("detail", None)
        detail = {k: v for k, v in doc.items() if k not in known and k != "detail"}
        known.setdefault("model", doc.get("model") or "tuned")
        return cls(**known, detail=detail)

    def get(self, key: str, default=None):
        """A field or a detail by name (per_class, confusion, worst, ...)."""
        if key != "detail" and key in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, key)
        return self.detail.get(key, default)

    def same_rows(self, other: "EvalResult") -> bool:
        """Whether both scored the same rows the same way (so they may share one eval.json). A
        classification head's tuned model (mode head) is compared with its base model as that
        was scored (it has no trained head)."""
        head = "head" in (self.mode, other.mode)
        keys = ("metric", "n", "data_key") + (() if head else ("mode",))
        return all(getattr(self, k) == getattr(other, k) for k in keys)


NO_RETRIEVAL = "_no_retrieval"
ENTRIES = ("base", "tuned", "base" + NO_RETRIEVAL, "tuned" + NO_RETRIEVAL)
# eval.json's four-way comparison of a retrieval plan: name → entry
FOUR_WAY = {"base": "base" + NO_RETRIEVAL, "base + retrieval": "base",
            "tuned": "tuned" + NO_RETRIEVAL, "tuned + retrieval": "tuned"}


@dataclass(frozen=True)
class EvalFile(_File):
    """eval.json: the results of the models scored on the same rows (base, tuned, and each without
    retrieval), the headline (tuned, else base) repeated at the top level, the change base → tuned
    and, with all four of a retrieval plan, the four-way comparison."""
    entries: dict                       # name (ENTRIES) → EvalResult

    FILE = "eval.json"

    @property
    def headline(self) -> EvalResult:
        return self.entries.get("tuned") or self.entries.get("base") or next(iter(self.entries.values()))

    @property
    def delta(self) -> float | None:
        if "base" in self.entries and "tuned" in self.entries:
            return self.entries["tuned"].value - self.entries["base"].value
        return None

    @property
    def four_way(self) -> dict | None:
        if all(name in self.entries for name in FOUR_WAY.values()):
            return {label: self.entries[name].value for label, name in FOUR_WAY.items()}
        return None

    def to_dict(self) -> dict:
        doc = self.headline.to_dict()
        for name in ENTRIES:
            if name in self.entries:
                doc[name] = self.entries[name].to_dict()
        if self.delta is not None:
            doc["delta"] = self.delta
        if self.four_way is not None:
            doc["four_way"] = self.four_way
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> "EvalFile":
        entries = {name: EvalResult.from_dict(doc[name]) for name in ENTRIES
                   if isinstance(doc.get(name), dict)}
        if not entries:                     # a single result, written before entries were kept
            entries = {doc.get("model") or "tuned": EvalResult.from_dict(
                {k: v for k, v in doc.items() if k not in ("delta", "four_way")})}
        return cls(entries)



# ------------------------------------------------------------------------------ sweep.json

@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: what it overrode (and which of those differ between runs), how it ended,
    its final losses, its task metric and its loss curve."""
    run: str
    overrides: dict
    status: str                         # ok | diverged | failed
    error: str | None
    wall_s: float | None
    loss: float | None
    val_loss: float | None
    metric: str | None
    metric_value: float | None
    steps: int | None
    curve: list                         # [[step, loss], ...]
    differs: dict = field(default_factory=dict)

    def score(self, criterion: str) -> float | None:
        """The value sweep.metric ranks by: val_loss or loss (lower is better), or the metric."""
        return {"val_loss": self.val_loss, "loss": self.loss, "metric": self.metric_value}[criterion]


@dataclass(frozen=True)
class SweepFile(_File):
    criterion: str
    best: str | None
    runs: tuple

    FILE = "sweep.json"

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "best": self.best,
                "runs": [dataclasses.asdict(r) for r in self.runs]}

    @classmethod
    def from_dict(cls, doc: dict) -> "SweepFile":
        return cls(criterion=doc["criterion"], best=doc.get("best"),
                   runs=tuple(SweepRun(**_known(SweepRun, r)) for r in doc.get("runs") or ()))

