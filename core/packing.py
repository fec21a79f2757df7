"""Which examples share a row: the one packing rule, used by the compiler to count steps exactly and
by the runtime (runtime/batching.py) to build the rows. Pure numpy.

An example of L tokens takes L-1 row slots (input ids[:-1], target ids[1:]). Packing puts several
examples in one row of seq_len slots, best-fit-decreasing: longest first, each into the fullest row
it still fits in. The row count then depends only on the multiset of lengths, so every epoch has the
same number of steps and the compiler can count them without drawing the epoch's randomness.
Unpacked, each example is one row.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def example_slots(n_tokens: int) -> int:
    """Row slots an example of n_tokens occupies: one per (input, target) pair."""
    return max(int(n_tokens) - 1, 0)


def pack_rows(slots: Sequence[int], seq_len: int, rng: np.random.Generator) -> list[list[int]]:
    """Best-fit-decreasing packing of example slot counts into rows of seq_len slots.

    Returns rows as lists of example indices, in a random (rng) row order; examples with no slot are
    left out. Equal lengths are visited in random order. A row's free space is bucketed, so finding
    the fullest row that fits is a scan over at most seq_len buckets."""
    slots = np.asarray(slots, dtype=np.int64)
    if len(slots) and slots.max() > seq_len:
        raise ValueError(f"an example needs {int(slots.max())} slots, more than seq_len={seq_len}")
    perm = rng.permutation(len(slots))
    order = perm[np.argsort(-slots[perm], kind="stable")]
    rows: list[list[int]] = []
    free = np.zeros(seq_len + 1, dtype=np.int64)      # free[r] = number of rows with r slots left
    by_free: dict[int, list[int]] = {}                 # r → row ids with r slots left (a stack)
    for i in order:
        need = int(slots[i])
        if need == 0:
            continue
        fits = np.flatnonzero(free[need:])
        if len(fits):
            r = need + int(fits[0])
            row = by_free[r].pop()
            free[r] -= 1
        else:
            r, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(int(i))
        left = r - need
        free[left] += 1
        by_free.setdefault(left, []).append(row)
    return [rows[j] for j in rng.permutation(len(rows))]


def single_rows(slots: Sequence[int], rng: np.random.Generator) -> list[list[int]]:
    """Unpacked: one example per row, in random order (examples with no slot are left out)."""
    return [[int(i)] for i in rng.permutation(len(slots)) if slots[i] > 0]


def epoch_rows(slots: Sequence[int], seq_len: int, *, pack: bool, seed: int, epoch: int
               ) -> list[list[int]]:
    """The rows of one epoch: a function of (seed, epoch) only."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    return pack_rows(slots, seq_len, rng) if pack else single_rows(slots, rng)


def count_rows(lengths: Sequence[int], seq_len: int, *, pack: bool) -> int:
    """Rows per epoch for examples of these token counts (the same in every epoch): what
    len(epoch_rows(...)) gives, computed from how many examples there are of each length.

    pack_rows's best fit never tells rows with the same free space apart, so the count follows
    from the number of rows per free space alone, and examples of one length move in bulk: into
    the rows of the tightest free space that fits (as many as there are such rows, when a row then
    has no room for another), else one row takes as many as fit. A million examples cost
    milliseconds instead of seconds."""
    slots = np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)   # example_slots
    slots = slots[slots > 0]
    if not pack:
        return int(len(slots))
    if len(slots) and slots.max() > seq_len:
        raise ValueError(f"an example needs {int(slots.max())} slots, more than seq_len={seq_len}")
    counts = np.bincount(slots, minlength=seq_len + 1)
    free = np.zeros(seq_len + 1, dtype=np.int64)        # free[r] = rows with r slots left
    rows = 0
    for need in range(seq_len, 0, -1):
        k = int(counts[need])
        while k:
            fits = np.flatnonzero(free[need:])
            if not len(fits):                            # new rows, each filled while it fits
                per = seq_len // need
                full, rest = divmod(k, per)
                rows += full + (1 if rest else 0)
                free[seq_len - per * need] += full
                if rest:
                    free[seq_len - rest * need] += 1
                break
            r = need + int(fits[0])
            if r - need < need:                          # each such row takes one: all at once
                m = min(k, int(free[r]))
                free[r] -= m
                free[r - need] += m
                k -= m
            else:                                        # the row stays the tightest fit
                q = min(k, r // need)
                free[r] -= 1
                free[r - q * need] += 1
                k -= q
    return rows


def row_fill(lengths: Sequence[int], seq_len: int, rows: int) -> float:
    """Share of an epoch's row slots that hold an example (the rest is padding)."""
    used = int(np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0).sum())   # example_slots
    return used / (rows * seq_len) if rows and seq_len else 0.0


def steps_per_epoch(rows: int, rows_per_step: int) -> int:
    """Optimizer steps to see every row once; the last step is completed with empty rows."""
    return max(1, math.ceil(rows / max(1, rows_per_step)))


def supervised_capacity(lengths: Sequence[int], supervised: Sequence[int], seq_len: int, rows: int,
                        *, pack: bool, multiple: int = 8) -> int:
    """An upper bound on the supervised targets one micro-batch of `rows` rows can hold, whatever
    the epoch's packing — the size of the buffer the loss gathers them into, so that the output
    head runs on supervised positions only.

    An example of L tokens has `supervised` targets (L - max(p, 1) for prompt length p) in L - 1
    slots. Unpacked, the bound is exact: the `rows` largest counts. Packed, it is the fractional knapsack
    of rows × seq_len slots filled with the examples richest in supervised targets per slot (no
    packing can beat it). Rounded up to a multiple of `multiple`, at most rows × seq_len."""
    lengths = np.asarray(lengths, dtype=np.int64)
    sup = np.asarray(supervised, dtype=np.int64)
    slots = np.maximum(lengths - 1, 0)
    keep = (sup > 0) & (slots > 0)
    sup, slots = sup[keep], slots[keep]
    full = rows * seq_len
    if not len(sup):
        return min(full, multiple)
    if not pack:
        bound = float(np.sort(sup)[::-1][:rows].sum())
    else:
        order = np.argsort(-(sup / slots), kind="stable")
        cum = np.cumsum(slots[order])
        k = int(np.searchsorted(cum, full, side="right"))      # examples that fit whole
        bound = float(sup[order][:k].sum())
        if k < len(order):
            room = full - (int(cum[k - 1]) if k else 0)
            bound += sup[order][k] * room / slots[order][k]
    return int(min(full, multiple * math.ceil(bound / multiple)))


# ----------------------------------------------------------------------- unpacked rows, trimmed

TRIM_PARTS = 4     # an unpacked batch is cut to a multiple of 1/TRIM_PARTS of the row length


def trim_granule(seq_len: int, attention: str) -> int:
    """Unpacked rows (runtime.pack=false) hold one example each, padded to seq_len. A batch is cut
    to its longest example's length rounded up to a multiple of this granule — a quarter of the row
    (a multiple of 8; of PALLAS_BLOCK under fused attention kernels, which take only such lengths) —
    so a step computes about the tokens it has, as a padded-per-batch loop does, while the step
    compiles for at most TRIM_PARTS lengths. 0: never cut (rows too short to split)."""
    step = PALLAS_BLOCK if attention in ("pallas", "cudnn") else 8
    granule = step * math.ceil(seq_len / TRIM_PARTS / step)
    return granule if granule < seq_len else 0


def trimmed_length(used: int, seq_len: int, granule: int) -> int:
    """The length a batch whose longest row uses `used` slots is cut to (seq_len if granule is 0)."""
    if granule <= 0:
        return seq_len
    return min(seq_len, granule * max(1, math.ceil(used / granule)))


# ------------------------------------------------------------------------------ attention blocks

# runtime.attention=pallas (runtime/attention.segment_attention): query and key rows per block of its
# forward kernel; a training row's length must be a multiple.
PALLAS_BLOCK = 128


def attention_blocks(T: int, block: int) -> list[tuple[int, int]]:
    """The query spans [start, end) of causal attention in blocks of `block` rows (runtime/attention.py):
    block 0 (or ≥ T) is the whole row at once."""
    if block <= 0 or block >= T:
        return [(0, T)]
    return [(s, min(s + block, T)) for s in range(0, T, block)]


def scores(T: int, block: int) -> int:
    """Score elements of one head of one row: each block's queries × the keys up to its end."""
    return sum((e - s) * e for s, e in attention_blocks(T, block))
