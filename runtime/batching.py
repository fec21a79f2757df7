"""Token examples → training batches, prepared ahead of the step: fixed-shape packed rows, or unpacked
rows cut per batch to one of a few lengths (`trim`).

An example is its token ids (prompt + response, ending with the end token) and its prompt length
(or, for a conversation, a per-token mask of its supervised spans).
Inside a row an example of L tokens takes L-1 slots: input ids[:-1], target ids[1:] (its last token is
never an input that predicts anything of the same example). A target is supervised — loss_mask 1 —
when it lies in the example's response span, end token included. Targets never cross example
boundaries: attention is limited to the segment, and positions restart at 0 in each segment.

Which examples share a row is core/packing.py's rule (best-fit-decreasing; the compiler counts
the plan's steps with it): the row count depends only on the multiset of lengths, so every epoch has
the same number of steps. The epoch's randomness (seed + epoch) permutes examples of equal length
before the stable sort, and permutes the rows. Unpacked mode puts one example per row, shuffled.

A step consumes grad_accum × batch_size rows; the last step of an epoch is completed with empty rows
(all mask 0), which add nothing to the loss (normalised by the supervised-token count). Every
supervised target of every example is therefore seen exactly once per epoch — or, under
data.balance=oversample, as often as the epoch repeats its example (core/balance.py). Under
data.balance=weighted a batch also carries `loss_weight` (float32): each supervised target's class
weight, 0 elsewhere.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from core.packing import epoch_rows, steps_per_epoch, trimmed_length
from core.token_cache import Ragged

FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclass(frozen=True)
class BatchShape:
    grad_accum: int
    batch_size: int
    seq_len: int

    @property
    def rows(self) -> int:
        return self.grad_accum * self.batch_size


def fill_row(out: dict[str, np.ndarray], r: int, examples: Sequence[tuple]) -> None:
    """Write examples (ids, prompt_len[, mask]) into row r of the [rows, seq_len] arrays in `out`.
    `mask` (per token: supervised) replaces the prompt length's rule where an example supervises
    several spans (the assistant turns of a conversation)."""
    t = 0
    for seg, (ids, prompt_len, *mask) in enumerate(examples, start=1):
        n = len(ids) - 1
        out["tokens"][r, t:t + n] = ids[:-1]
        out["targets"][r, t:t + n] = ids[1:]
        # target j is ids[j+1]: supervised when j+1 >= prompt_len (the response, end token included)
        out["loss_mask"][r, t:t + n] = (mask[0][1:] if mask and mask[0] is not None
                                        else np.arange(1, n + 1) >= prompt_len)
        out["segment_ids"][r, t:t + n] = seg
        out["positions"][r, t:t + n] = np.arange(n)
        t += n


class Batcher:
    """Epoch plans and batches for one split. Everything is a function of (seed, epoch, index)."""

    def __init__(self, ids: Sequence[np.ndarray], prompt_lens: Sequence[int], shape: BatchShape, *,
                 pack: bool, seed: int, loss_tokens: int | None = None,
                 masks: Sequence[np.ndarray] | None = None, unit: int = 1,
                 labels: Sequence[int] | None = None, index: Sequence[int] | None = None,
                 weights: Sequence[float] | None = None,
                 head_labels: Sequence[int] | None = None, trim: int = 0):
        """unit: examples that always share a row, side by side (2 for a preference pair: chosen,
        rejected); rows are packed by unit. labels: one int per unit, written to every token of
        the unit as the batch's `unit_label` (KTO's desirable/undesirable). index: the units an
        epoch holds, an index may repeat (data.balance=oversample); None: each unit once.
        weights: one float per example, its supervised tokens' loss weight, written as the
        batch's float32 `loss_weight` (data.balance=weighted: the loss is Σ w·CE / Σ w).
        head_labels: one int per example, its label's index (-1: none), written as the batch's
        `head_label` (index + 1) at the example's last prompt token, 0 everywhere else
        (adapter.head=classifier: where the head reads the example, runtime/head.py).
        trim (unpacked rows only; core.packing.trim_granule): a batch's rows are cut to its longest
        example rounded up to a multiple of `trim` slots, so its arrays are [.., .., ≤ seq_len];
        0: always seq_len."""
        # one flat array per split (core/token_cache.Ragged), not an object per example: a
        # million examples cost their tokens, memory-mapped, and a few arrays of counts
        self.ids = Ragged.of(ids, dtype=np.int32)
        self.prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
        self.masks = None if masks is None else Ragged.of(masks, dtype=bool)
        self.shape, self.pack, self.seed = shape, pack, int(seed)
        self.trim = 0 if pack else int(trim)
        self.loss_tokens = loss_tokens      # supervised targets a micro-batch may hold (None: any)
        self.unit = int(unit)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int32)
        self.index = None if index is None else np.asarray(index, dtype=np.int64)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        self.head_labels = None if head_labels is None else np.asarray(head_labels, dtype=np.int32)
        if len(self.ids) % self.unit:
            raise ValueError(f"{len(self.ids)} examples do not form units of {self.unit}")
        slots = np.maximum(self.ids.lengths - 1, 0)          # core.packing.example_slots
        self.lengths = slots.reshape(-1, self.unit).sum(axis=1) if len(slots) else slots
        if self.index is not None:          # the epoch's units: packing sees every copy
            self.lengths = self.lengths[self.index]
        too_long = np.flatnonzero(self.lengths > shape.seq_len)
        if len(too_long):
            i = int(too_long[0])
            raise ValueError(f"example {i} takes {int(self.lengths[i])} row slots; rows hold "
                             f"seq_len={shape.seq_len} (the compiler truncates to data.max_length)")
        self._rows_cache: dict[int, list[list[int]]] = {}
        self.rows_per_epoch = len(self.epoch_rows(0))

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.rows_per_epoch, self.shape.rows)

    @property
    def supervised_tokens(self) -> int:
        """Supervised targets per epoch."""
        if self.index is not None:          # a unit the epoch repeats counts each time
            per = np.array([np.count_nonzero(m[1:]) for m in self.masks]) if self.masks is not None \
                else np.maximum(self.ids.lengths - np.maximum(self.prompt_lens, 1), 0)
            return int(per.reshape(-1, self.unit).sum(axis=1)[self.index].sum())
        if self.masks is not None:
            flat = self.masks.flat
            return int(np.count_nonzero(flat)) - int(np.count_nonzero(self.masks.firsts()))
        return int(np.maximum(self.ids.lengths - np.maximum(self.prompt_lens, 1), 0).sum())

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._rows_cache:              # keep one epoch: plans are cheap to redo
            self._rows_cache = {epoch: epoch_rows(self.lengths, self.shape.seq_len, pack=self.pack,
                                                  seed=self.seed, epoch=epoch)}
        return self._rows_cache[epoch]

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Step `index` of `epoch`: int32 arrays [grad_accum, batch_size, seq_len] (unpacked with
        `trim`: [grad_accum, batch_size, the batch's trimmed length])."""
        a, b, t = self.shape.grad_accum, self.shape.batch_size, self.shape.seq_len
        rows = self.epoch_rows(epoch)[index * a * b:(index + 1) * a * b]
        fields = FIELDS + (("unit_label",) if self.labels is not None else ()) + \
            (("head_label",) if self.head_labels is not None else ())
        out = {k: np.zeros((a * b, t), dtype=np.int32) for k in fields}
        if self.weights is not None:
            out["loss_weight"] = np.zeros((a * b, t), dtype=np.float32)
        u = self.unit
        for r, row in enumerate(rows):
            if self.index is not None:
                row = [int(self.index[i]) for i in row]
            members = [j for i in row for j in range(i * u, (i + 1) * u)]
            fill_row(out, r, [(self.ids[i], int(self.prompt_lens[i]),
                               None if self.masks is None else self.masks[i]) for i in members])
            if self.weights is not None:    # segment s is members[s - 1]; 0 is padding
                seg_w = np.concatenate([[0.0], self.weights[members]]).astype(np.float32)
                out["loss_weight"][r] = seg_w[out["segment_ids"][r]] * out["loss_mask"][r]
            if self.head_labels is not None:    # each example's last prompt token: label + 1
                t0 = 0
                for i in members:
                    out["head_label"][r, t0 + max(int(self.prompt_lens[i]) - 1, 0)] = \
                        self.head_labels[i] + 1
                    t0 += len(self.ids[i]) - 1
            if self.labels is not None:
                t0 = 0
                for i in row:
                    n = sum(len(self.ids[j]) - 1 for j in range(i * u, (i + 1) * u))
                    out["unit_label"][r, t0:t0 + n] = self.labels[i]
                    t0 += n
        if self.trim:       # unpacked: rows are filled from slot 0, padding after
            t = trimmed_length(int((out["segment_ids"] > 0).sum(axis=1).max(initial=0)), t,
                               self.trim)
            out = {k: np.ascontiguousarray(v[:, :t]) for k, v in out.items()}
        batch = {k: v.reshape(a, b, t) for k, v in out.items()}
        if self.loss_tokens is not None:
            most = int(batch["loss_mask"].sum(axis=(1, 2)).max())
            if most > self.loss_tokens:     # the plan's bound is exact; this would drop targets
                raise RuntimeError(f"a micro-batch holds {most} supervised targets, more than the "
                                   f"plan's runtime.loss_tokens={self.loss_tokens}")
        return batch

    def positions_from(self, epoch: int, index: int) -> Iterator[tuple[int, int]]:
        """(epoch, index) of every step from the given one on, epochs without end."""
        while True:
            for i in range(index, self.steps_per_epoch):
                yield epoch, i
            epoch, index = epoch + 1, 0

    def epoch_batches(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.steps_per_epoch):
            yield self.batch(epoch, i)


class Prefetcher:
    """Builds batches on a background thread, `depth` steps ahead, and puts them on device.

    `place` turns a host batch into device arrays (with the data sharding); it runs on the thread, so the
    host→device copy overlaps the step too. Iterating yields (epoch, index, batch); an exception in the
    thread is raised in the consumer."""

    _DONE = object()

    def __init__(self, batcher: Batcher, start: tuple[int, int], n_steps: int, place, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._args = (batcher, start, n_steps, place)
        self._thread = threading.Thread(target=self._work, name="tune-batches", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self):
        batcher, (epoch, index), n_steps, place = self._args
        try:
            positions = batcher.positions_from(epoch, index)
            for _ in range(n_steps):
                e, i = next(positions)
                if not self._put((e, i, place(batcher.batch(e, i)))):
                    return
            self._put(self._DONE)
        except BaseException as err:                  # noqa: BLE001 — handed to the consumer
            self._put(err)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
