"""Batching: packing keeps every supervised target exactly once and never lets one example see another."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from core.packing import pack_rows
from runtime.batching import Batcher, BatchShape, Prefetcher


def _examples(n=57, seed=0, vocab=1000, max_len=40):
    rng = np.random.default_rng(seed)
    ids, prompt_lens = [], []
    for i in range(n):
        length = int(rng.integers(3, max_len + 1))
        # first token encodes the example index so targets can be traced back to their example
        x = rng.integers(10, vocab, size=length).astype(np.int32)
        x[0] = vocab + i
        ids.append(x)
        prompt_lens.append(int(rng.integers(1, length)))
    return ids, prompt_lens


def _supervised(ids, prompt_lens):
    """Multiset of (example, target position, token) that must be supervised."""
    out = Counter()
    for e, (x, p) in enumerate(zip(ids, prompt_lens)):
        for j in range(max(p, 1), len(x)):
            out[(e, j, int(x[j]))] += 1
    return out


def _collect(batcher, epoch, vocab=1000):
    """Walk every row of the epoch: check the row invariants, return the supervised targets seen."""
    seen = Counter()
    for b in batcher.epoch_batches(epoch):
        assert all(v.dtype == np.int32 and v.shape == (batcher.shape.grad_accum, batcher.shape.batch_size,
                                                        batcher.shape.seq_len) for v in b.values())
        flat = {k: v.reshape(-1, v.shape[-1]) for k, v in b.items()}
        for r in range(flat["tokens"].shape[0]):
            seg, pos = flat["segment_ids"][r], flat["positions"][r]
            tok, tgt, mask = flat["tokens"][r], flat["targets"][r], flat["loss_mask"][r]
            assert not mask[seg == 0].any(), "padding is never supervised"
            nz = np.flatnonzero(seg)
            if len(nz) == 0:
                continue
            assert (nz == np.arange(len(nz))).all(), "segments are contiguous from the row start"
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                assert (pos[where] == np.arange(len(where))).all(), "positions restart per segment"
                e = int(tok[where[0]]) - vocab  # the first token names the example
                assert 0 <= e
                for j, t in enumerate(where):
                    if mask[t]:
                        seen[(e, pos[t] + 1, int(tgt[t]))] += 1
                # the target of a segment's last slot is its own last token, never the next example's
                assert tgt[where[-1]] == batcher.ids[e][-1]
                assert len(where) == len(batcher.ids[e]) - 1
    return seen


@pytest.mark.parametrize("pack", [True, False])
def test_every_supervised_target_once(pack):
    ids, pl = _examples()
    b = Batcher(ids, pl, BatchShape(2, 3, 64), pack=pack, seed=7)
    want = _supervised(ids, pl)
    for epoch in (0, 1):
        assert _collect(b, epoch) == want


def test_packed_and_unpacked_hold_the_same_targets():
    ids, pl = _examples(seed=3)
    packed = Batcher(ids, pl, BatchShape(1, 4, 128), pack=True, seed=1)
    single = Batcher(ids, pl, BatchShape(1, 4, 128), pack=False, seed=1)
    assert _collect(packed, 0) == _collect(single, 0)
    assert packed.steps_per_epoch < single.steps_per_epoch == -(-len(ids) // 4)
    assert packed.supervised_tokens == sum(_supervised(ids, pl).values())


def test_order_is_a_function_of_seed_and_epoch():
    ids, pl = _examples()
    a = Batcher(ids, pl, BatchShape(1, 2, 64), pack=True, seed=5)
    b = Batcher(ids, pl, BatchShape(1, 2, 64), pack=True, seed=5)
    c = Batcher(ids, pl, BatchShape(1, 2, 64), pack=True, seed=6)
    for k in ("tokens", "loss_mask", "segment_ids"):
        assert np.array_equal(a.batch(0, 3)[k], b.batch(0, 3)[k])
    assert not np.array_equal(a.batch(0, 0)["tokens"], c.batch(0, 0)["tokens"])
    assert not np.array_equal(a.batch(0, 0)["tokens"], a.batch(1, 0)["tokens"])
    # the same number of steps every epoch, whatever the shuffle
    assert len(a.epoch_rows(0)) == len(a.epoch_rows(1)) == len(c.epoch_rows(0))


def test_packing_is_tight():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=2000)
    rows = pack_rows(lengths, 256, rng)
    assert sorted(i for r in rows for i in r) == list(range(2000))
    assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
    assert len(rows) <= int(np.ceil(lengths.sum() / 256 * 1.02)) + 1


def test_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        Batcher([np.arange(20, dtype=np.int32)], [5], BatchShape(1, 1, 8), pack=True, seed=0)


def test_prefetcher_yields_in_order_across_epochs_and_reraises():
    ids, pl = _examples(n=10)
    b = Batcher(ids, pl, BatchShape(1, 2, 64), pack=False, seed=0)
    assert b.steps_per_epoch == 5
    with Prefetcher(b, (0, 3), 6, place=lambda x: x) as pf:
        got = [(e, i) for e, i, _ in pf]
    assert got == [(0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (1, 3)]

    def boom(_):
        raise RuntimeError("bad batch")

    with Prefetcher(b, (0, 0), 3, place=boom) as pf, pytest.raises(RuntimeError, match="bad batch"):
        list(pf)


def test_unpacked_batches_are_trimmed_to_their_longest_row():
    from core.packing import trim_granule, trimmed_length
    assert trim_granule(128, "xla") == 32 and trim_granule(2048, "cudnn") == 512
    assert trim_granule(128, "pallas") == 0 and trim_granule(20, "xla") == 8
    assert [trimmed_length(u, 128, 32) for u in (0, 1, 32, 33, 97, 128)] == [32, 32, 32, 64, 128, 128]
    ids, pl = _examples(seed=5, max_len=110)
    full = Batcher(ids, pl, BatchShape(2, 3, 128), pack=False, seed=2)
    cut = Batcher(ids, pl, BatchShape(2, 3, 128), pack=False, seed=2, trim=32)
    lengths = set()
    for i in range(cut.steps_per_epoch):
        a, b = full.batch(0, i), cut.batch(0, i)
        t = b["tokens"].shape[-1]
        lengths.add(t)
        used = int((a["segment_ids"] > 0).sum(axis=-1).max())
        assert t % 32 == 0 and used <= t < used + 32 or t == 128
        for k in a:                     # the same rows, step by step; what is cut is padding only
            np.testing.assert_array_equal(a[k][..., :t], b[k])
            assert not a[k][..., t:].any()
    assert len(lengths) > 1
    packed = Batcher(ids, pl, BatchShape(2, 3, 128), pack=True, seed=2, trim=32)
    assert packed.batch(0, 0)["tokens"].shape[-1] == 128     # packed rows are never cut


def test_unpacked_training_cut_to_batch_lengths_matches_full_rows(tiny_chat_dir, tmp_path,
                                                                  monkeypatch):
    """runtime.pack=false: a run whose batches are cut to their longest example computes the losses
    of the same run on whole rows, compiling its step once per length and logging each compile."""
    import json

    import core.packing
    from conftest import tiny_plan
    from runtime.run import train

    plan = tiny_plan(tiny_chat_dir, tmp_path / "data", pack=False, seq_len=64, max_steps=6,
                     epochs=1)

    def losses(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], [r for r in rows if "compile_s" in r]

    train(plan, tmp_path / "cut")
    cut, compiles = losses(tmp_path / "cut")
    monkeypatch.setattr(core.packing, "trim_granule", lambda seq_len, attention: 0)
    train(plan, tmp_path / "whole")
    whole, once = losses(tmp_path / "whole")
    np.testing.assert_allclose(cut, whole, rtol=2e-5)
    assert len(once) == 1 and 1 < len(compiles) <= core.packing.TRIM_PARTS
