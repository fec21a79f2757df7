"""Validation sized for its purpose: data.val_rows caps the rows data.val_fraction holds out (the
rest are trained on), and the plan's time estimate counts the validation passes and the evaluation
after training beside the training steps, warning when they would outlast it."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from compiler import estimates
from compiler.data import split_validation
from core.plan import Plan

ROWS = [{"text": f"row {i}", "label": str(i % 3)} for i in range(2000)]


def flat(text: str) -> str:
    """Terminal output as one line of words: panel borders and line breaks removed."""
    return " ".join(text.replace("│", " ").split())


# ------------------------------------------------------------------------------ the split

def test_the_cap_holds_out_at_most_val_rows_and_trains_on_the_rest():
    train, val = split_validation(ROWS, 0.2, seed=0, val_rows=64)
    assert len(val) == 64 and len(train) == len(ROWS) - 64      # 400 by the fraction: 336 go back
    assert sorted(r["text"] for r in train + val) == sorted(r["text"] for r in ROWS)
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    order = {r["text"]: i for i, r in enumerate(ROWS)}
    assert [order[r["text"]] for r in val] == sorted(order[r["text"]] for r in val)   # file order
    assert [order[r["text"]] for r in train] == sorted(order[r["text"]] for r in train)


def test_the_capped_split_is_a_fixed_seed_sample():
    a = split_validation(ROWS, 0.2, seed=0, val_rows=64)
    assert a == split_validation(ROWS, 0.2, seed=0, val_rows=64)
    other = split_validation(ROWS, 0.2, seed=1, val_rows=64)
    assert len(other[1]) == 64 and other[1] != a[1]
    texts = [r["text"] for r in a[1]]
    assert texts != [r["text"] for r in ROWS[:64]]              # a sample, not the first rows


def test_a_cap_above_the_fraction_null_and_zero():
    uncapped = split_validation(ROWS, 0.05, seed=0)
    assert len(uncapped[1]) == 100
    assert split_validation(ROWS, 0.05, seed=0, val_rows=256) == uncapped   # the cap not reached
    assert split_validation(ROWS, 0.05, seed=0, val_rows=None) == uncapped
    assert split_validation(ROWS, 0.05, seed=0, val_rows=0) == (ROWS, [])    # no validation
    assert split_validation(ROWS, 0.0, seed=0, val_rows=64) == (ROWS, [])
    assert len(split_validation(ROWS[:5], 0.01, seed=0, val_rows=3)[1]) == 1  # at least one held out


# ------------------------------------------------------------------------------ the arithmetic

def test_validation_passes_follow_the_training_loop():
    # runtime/run.py: after every eval.every-th step before the last, and once at the end
    assert estimates.validation_passes(10, 0) == 1
    assert estimates.validation_passes(10, 3) == 4          # steps 3, 6, 9 and the end (10)
    assert estimates.validation_passes(9, 3) == 3           # 3, 6, and the end (9, not twice)
    assert estimates.validation_passes(1, 1) == 1
    assert estimates.validation_passes(0, 5) == 0


@pytest.mark.parametrize("pack", [True, False])
def test_validation_batches_match_the_runtime_batcher(pack):
    from runtime.batching import Batcher, BatchShape

    lengths = np.random.default_rng(1).integers(2, 120, size=300)
    ids = [np.arange(n, dtype=np.int32) for n in lengths]
    batcher = Batcher(ids, [1] * len(ids), BatchShape(grad_accum=2, batch_size=4, seq_len=128),
                      pack=pack, seed=0)
    assert estimates.validation_batches(lengths.tolist(), seq_len=128, pack=pack,
                                        rows_per_step=8) == batcher.steps_per_epoch
    assert estimates.validation_batches([], seq_len=128, pack=pack, rows_per_step=8) == 0


def test_a_forward_pass_costs_a_fraction_of_a_step():
    kw = dict(params=135_000_000, tokens_per_step=2048, trainable=1_800_000, head_params=28_000_000,
              head_tokens=256, attention_scores=30 * 8 * 9 * 256 * 256, head_dim=64,
              device={"platform": "gpu", "peak_flops": 989e12, "count": 1})
    for remat in ("none", "full"):
        step = estimates.step_time(remat=remat, **kw)
        forward = estimates.step_time(remat=remat, forward_only=True, **kw)
        assert step / 4 < forward < step / 2, remat
    cpu = dict(kw, device={"platform": "cpu"})
    assert estimates.step_time(**cpu, forward_only=True) < estimates.step_time(**cpu) / 1.5


def test_evaluation_time_counts_rows_models_and_decoding():
    kw = dict(models=2, mode="generate", token_s=1e-3, prefill=8000, new_tokens=16, batch_size=16)
    t = estimates.evaluation_time(rows=160, **kw)
    # 2 × (the prefill + 10 batches × 16 steps, each at least a 128-token forward)
    assert t == pytest.approx(2 * (8000 + 10 * 16 * 128) * 1e-3)
    assert estimates.evaluation_time(rows=160, **dict(kw, models=1)) == pytest.approx(t / 2)
    assert estimates.evaluation_time(rows=0, **kw) == 0
    # constrained: the longest label's steps within the label set, then free generation's
    constrained = estimates.evaluation_time(rows=160, **dict(kw, mode="constrained"),
                                            label_tokens=[2, 3])
    assert constrained == pytest.approx(2 * (8000 + 10 * 19 * 128) * 1e-3)
    choices = estimates.evaluation_time(rows=160, **dict(kw, mode="choices"), label_tokens=[2, 3])
    assert choices == pytest.approx(2 * (8000 + 10 * 16 * 2 * 4) * 1e-3)     # no decoding
    pairs = estimates.evaluation_time(rows=160, **dict(kw, mode="preference"), unit_tokens=90)
    assert pairs == pytest.approx(2 * 160 * 90 * 1e-3)


def test_prefill_tokens_are_the_decoders_padded_batches():
    from runtime.decode import _batches, bucket

    assert [estimates.prompt_bucket(n) for n in range(1, 700)] == [bucket(n) for n in range(1, 700)]
    lengths = np.random.default_rng(2).integers(5, 300, size=75)
    prompts = [[7] * int(n) for n in lengths]
    padded = sum(tokens.size for _, tokens, _, _ in _batches(prompts, 16, 0))
    assert estimates.prefill_tokens(lengths, 75, 16) == padded
    fewer = estimates.prefill_tokens(lengths, 20, 16)            # eval.limit=20: two batches
    assert 2 * 16 * 16 <= fewer <= 2 * 16 * bucket(int(lengths.max()))
    assert estimates.prefill_tokens(lengths, 0, 16) == 0


# ------------------------------------------------------------------------------ tune plan

def _write(path, n, *, start=0):
    """n distinct short rows in the tiny model's words."""
    rows = [{"text": f"w{11 + i % 80} w{11 + (i // 80) % 80} w{11 + (i // 6400) % 80} w90",
             "label": f"w{20 + i % 7}"} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def plan_with(tune_cli, tmp_path, tiny_chat_dir):
    """plan_with(*overrides, run=NAME) -> (Plan, printed text) of `tune plan` over 3,000 training
    rows (and 60 test rows) for the tiny model."""
    _write(tmp_path / "train.jsonl", 3000)
    _write(tmp_path / "test.jsonl", 60, start=5000)
    base = (f"model.path={tiny_chat_dir}", "data.path=train.jsonl", "data.max_length=32",
            "template.chat=false", "data.task=generation", "schedule.batch_size=8")

    def run(*overrides, name="run"):
        rc, out, err = tune_cli("plan", *base, *overrides, f"hydra.run.dir={name}")
        assert rc == 0, err
        return Plan.load(tmp_path / name / "plan.json"), flat(out)

    return run


def test_tune_plan_holds_out_the_cap_and_trains_on_the_rest(plan_with):
    plan, out = plan_with("data.val_fraction=0.1")        # 300 by the fraction, 256 by the cap
    d = plan.data
    assert d.val_rows == 256 and d.sizes["val"] == 256 and d.train.val == 256
    assert d.sizes["train"] + d.sizes["val"] == 3000 and d.train.train == 3000 - 256
    assert "256 rows held out from the train file (data.val_fraction=0.1, capped by " \
           "data.val_rows=256; the other 44 are trained on)" in out
    assert plan.config["data"]["val_rows"] == 256 and plan.is_consistent()
    uncapped, out = plan_with("data.val_fraction=0.1", "data.val_rows=null", name="uncapped")
    assert uncapped.data.sizes["val"] == 300 and uncapped.data.sizes["train"] == 2700
    assert "capped by data.val_rows" not in out and "300 rows held out" in out
    # the token cache is keyed by the split: another cap, other token data
    assert uncapped.data.key != d.key and uncapped.hash != plan.hash
    none, out = plan_with("data.val_rows=0", name="none")
    assert none.data.sizes["val"] == 0 and none.data.sizes["train"] == 3000
    assert none.estimates.validation_passes == 0 and none.estimates.validation_time_s == 0
    assert "none held out (data.val_rows=0" in out


def test_the_estimate_has_validation_and_evaluation_parts_that_grow(plan_with, tmp_path):
    small, out = plan_with("data.val_rows=32", "data.test_path=test.jsonl", "eval.every=20",
                           name="small")
    big, _ = plan_with("data.val_rows=512", "data.val_fraction=0.2", "data.test_path=test.jsonl",
                       "eval.every=20", name="big")
    doc = json.loads((tmp_path / "small" / "plan.json").read_text())["estimates"]
    for key in ("train_time_s", "validation_time_s", "validation_passes", "validation_batches",
                "eval_time_s", "eval_rows", "eval_models", "total_time_s"):
        assert key in doc, key
    e, b = small.estimates, big.estimates
    assert e.validation_passes == (small.schedule.total_steps - 1) // 20 + 1
    assert e.validation_time_s > 0 and e.validation_batches >= 1
    assert b.validation_time_s > e.validation_time_s and b.validation_batches > e.validation_batches
    assert e.eval_rows == 60 and e.eval_models == 2 and e.eval_time_s > 0
    assert e.total_time_s == pytest.approx(e.train_time_s + e.validation_time_s + e.eval_time_s)
    assert e.train_time_s == pytest.approx(e.step_time_s * small.schedule.total_steps)
    for line in ("training ~", f"validation {e.validation_passes} passes × 32 rows (forward only; "
                 "eval.every=20, data.val_rows=32)", "evaluation 60 test rows × base and tuned (generate",
                 "total ≈"):
        assert line in out, line
    limited, _ = plan_with("data.val_rows=32", "data.test_path=test.jsonl", "eval.every=20",
                           "eval.limit=10", name="limited")
    assert limited.estimates.eval_rows == 10
    assert limited.estimates.eval_time_s < e.eval_time_s


def test_a_warning_when_validation_outlasts_training(plan_with):
    heavy, out = plan_with("data.val_fraction=0.5", "data.val_rows=1500", "eval.every=1",
                           "schedule.max_steps=4", name="heavy")
    e = heavy.estimates
    assert e.validation_time_s > e.train_time_s
    warning = [w for w in heavy.warnings if "longer than training" in w]
    assert len(warning) == 1
    for key in ("data.val_rows=1500", "eval.every=1", "eval.limit=null"):
        assert key in warning[0], key
    assert "data.val_rows=1500" in out
    light, _ = plan_with("data.val_rows=16", "schedule.epochs=1", name="light")
    assert light.estimates.validation_time_s < light.estimates.train_time_s
    assert not [w for w in light.warnings if "longer than training" in w]


def test_a_big_test_file_is_scored_whole_with_a_warning_naming_eval_limit(plan_with, tmp_path,
                                                                          monkeypatch):
    import compiler.compile as compile_mod

    # the tiny model scores fast: what counts as long is lowered to see the rule at work
    monkeypatch.setattr(compile_mod, "EVAL_LONG_S", 0.0)
    _write(tmp_path / "big_test.jsonl", 1500, start=5000)
    whole, _ = plan_with("data.test_path=big_test.jsonl", name="whole")
    assert whole.eval.limit is None and whole.estimates.eval_rows == 1500   # every row, as before
    warning = [w for w in whole.warnings if "test rows takes about" in w]
    assert len(warning) == 1 and "all 1,500 test rows" in warning[0]
    assert "eval.limit=1000" in warning[0]
    sampled, _ = plan_with("data.test_path=big_test.jsonl", "eval.limit=1000", name="sampled")
    assert sampled.estimates.eval_rows == 1000
    assert sampled.estimates.eval_time_s < whole.estimates.eval_time_s
    assert not [w for w in sampled.warnings if "test rows takes about" in w]
    small, _ = plan_with("data.test_path=test.jsonl", name="small")      # 60 rows: no sample
    assert not [w for w in small.warnings if "test rows takes about" in w]


def test_a_negative_val_rows_exits_2_naming_the_key(tune_cli, tmp_path, tiny_chat_dir):
    _write(tmp_path / "train.jsonl", 50)
    t0 = time.perf_counter()
    rc, out, err = tune_cli("plan", f"model.path={tiny_chat_dir}", "data.path=train.jsonl",
                            "data.val_rows=-1", "hydra.run.dir=run")
    elapsed = time.perf_counter() - t0
    text = flat(out + err)
    assert rc == 2, text
    assert "data.val_rows" in text and "at least 0" in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()
    assert elapsed < 1.0, elapsed


# ------------------------------------------------------------------------------ against the runtime

@pytest.mark.slow
def test_the_estimated_passes_are_the_validations_training_runs(tiny_chat_dir, tmp_path):
    from conftest import tiny_plan
    from runtime.run import train

    plan = tiny_plan(tiny_chat_dir, tmp_path, n_train=16, n_val=4, batch_size=2, grad_accum=1,
                     max_steps=3, eval_every=2)
    assert plan.estimates.validation_passes == 2                   # after step 2, and at the end
    train(plan, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 3]
