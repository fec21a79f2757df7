"""Balancing a classification task's training labels (data.balance): which training examples an
epoch holds under `oversample`, and each class's loss weight under `weighted`.

Shared by the compiler, which counts the plan's steps from the balanced epoch and shows the counts,
and the runtime, which draws the epoch's rows from it: one function of the same inputs (each
training example's class, as the token cache records it, data.balance_max_factor and
schedule.seed), so both see the same examples and a resumed run the same epochs. The token cache
itself never changes with the balance: only which of its training examples an epoch repeats does.
Pure numpy.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

BALANCES = ("none", "oversample", "weighted")


def oversampled_counts(counts: Sequence[int], max_factor: float) -> list[int]:
    """Training examples per class after oversampling: each class grows to the largest class's
    count, but to at most max_factor times its own (never below its own)."""
    top = max(counts, default=0)
    return [max(int(n), min(top, math.floor(max_factor * int(n)))) for n in counts]


def oversample(classes: np.ndarray, n_classes: int, max_factor: float, seed: int) -> np.ndarray:
    """The training examples one epoch holds under data.balance=oversample, as indices into the
    training split, sorted (an index repeats): every example once, and each smaller class's
    examples again until it has oversampled_counts' count — whole copies of the class first, the
    rest a fixed-seed sample of it (drawn once: every epoch holds the same examples, in its own
    order). classes: each training example's class (its label's index in the plan's label set)."""
    classes = np.asarray(classes, dtype=np.int64)
    counts = np.bincount(classes, minlength=n_classes)
    target = oversampled_counts(counts.tolist(), max_factor)
    by_class = np.split(np.argsort(classes, kind="stable"), np.cumsum(counts)[:-1])
    rng = random.Random(f"tune-balance-{seed}")
    parts = [np.arange(len(classes), dtype=np.int64)]
    for members, want in zip(by_class, target):
        extra = want - len(members)
        if extra <= 0:
            continue
        whole, rest = divmod(extra, len(members))
        parts.append(np.tile(members, whole))
        parts.append(members[sorted(rng.sample(range(len(members)), rest))])
    return np.sort(np.concatenate(parts))


def class_weights(counts: Sequence[int], max_factor: float = math.inf) -> tuple[float, ...]:
    """data.balance=weighted: each class's loss weight w_c ∝ N / (K · n_c) (N training examples,
    K classes, n_c the class's count), capped at max_factor times the largest class's weight — the
    same bound oversampling has, so a class of one example does not outweigh the rest — then scaled
    so that the mean weight per training example is 1 (Σ_c n_c · w_c = N)."""
    n = np.asarray(counts, dtype=np.float64)
    if not len(n) or (n <= 0).any():
        raise ValueError(f"class counts must all be positive, got {list(counts)}")
    w = n.sum() / (len(n) * n)
    w = np.minimum(w, max_factor * w.min())
    w *= n.sum() / float((w * n).sum())
    return tuple(float(x) for x in w)


def is_imbalanced(counts: Sequence[int], *, ratio: float = 3.0, top_share: float = 0.7) -> bool:
    """Whether a label set's training counts are skewed enough that accuracy mostly rewards the
    largest class: the largest at least `ratio` times the smallest, or at least `top_share` of the
    rows."""
    if len(counts) < 2:
        return False
    top, total = max(counts), sum(counts)
    return top >= ratio * min(counts) or top >= top_share * total
