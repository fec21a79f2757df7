"""data.balance: oversampling the smaller classes (counts, cap, steps, the epoch the runtime draws),
class-weighted loss (the weights, and a train step's loss against a numpy reference), the warning
about accuracy on imbalanced labels, and what is refused."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from core.errors import PlanError
from tests.conftest import clf_rows, write_jsonl
from tests.test_checks import flat, refused

SPLIT = {"Alpha": 240, "Beta": 48, "Gamma": 12}      # 80% / 16% / 4% of 300 rows


def skewed_rows(split=SPLIT):
    labels = [name for name, n in split.items() for _ in range(n)]
    rows = clf_rows(len(labels))
    for row, label in zip(rows, labels):
        row["label"] = label
    return rows


@pytest.fixture
def skewed(tmp_path):
    return write_jsonl(tmp_path / "data" / "train.jsonl", skewed_rows())


def compiled(path, tmp_path, **data):
    """The plan of the embedded model on `path` (no test file), with data.* overrides."""
    from compiler import schema
    from compiler.compile import compile_plan

    cfg = schema.defaults()
    cfg["data"].update(path=str(path), **data)
    return compile_plan(cfg, recipe_info=None, command="plan", cwd=tmp_path)


def _run_plan(tune_cli, *overrides):
    rc, out, err = tune_cli("plan", "hydra.run.dir=run", "data.path=data/train.jsonl", *overrides)
    assert rc == 0, err
    return out


# ------------------------------------------------------------------------------ oversample

def test_oversample_counts_cap_and_steps(tune_cli, skewed, tmp_path):
    out = _run_plan(tune_cli, "data.balance=oversample", "data.balance_max_factor=5",
                    "runtime.pack=false", "data.val_fraction=0")
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    d, s = doc["data"], doc["schedule"]
    before = {x["text"]: x["count"] for x in d["labels"]}
    assert before == SPLIT and d["sizes"]["train"] == 300
    # each class grows towards the largest, capped at 5× its own count: Beta reaches Alpha's 240,
    # Gamma stops at 60
    want = [240, 240, 60]
    assert d["balanced_counts"] == want
    assert d["balance"] == "oversample" and d["balance_max_factor"] == 5
    # unpacked: one example a row, so the epoch has exactly the balanced count of rows
    assert s["rows_per_epoch"] == sum(want)
    assert s["steps_per_epoch"] == math.ceil(sum(want) / s["global_batch"])
    assert s["total_steps"] == s["steps_per_epoch"]
    text = flat(out)
    assert "oversample (data.balance_max_factor=5)" in text
    assert "300 → 540 training examples" in text
    assert "Alpha 240 → 240 (×1) · Beta 48 → 240 (×5) · Gamma 12 → 60 (×5)" in text


def test_oversampled_epoch_is_the_plans_and_repeats_exactly(skewed, tmp_path):
    from core.token_cache import load_examples
    from runtime import build

    none = compiled(skewed, tmp_path)
    plan = compiled(skewed, tmp_path, balance="oversample")
    assert none.data.cache == plan.data.cache          # the token cache does not change
    assert none.hash != plan.hash
    assert plan.schedule.steps_per_epoch > none.schedule.steps_per_epoch
    assert plan.estimates.train_time_s > none.estimates.train_time_s
    # recompiling reads the remembered data stage: the same plan
    assert compiled(skewed, tmp_path, balance="oversample").hash == plan.hash
    a, _ = build.batches(plan)             # the step count check inside passes
    b, _ = build.batches(plan)
    classes = load_examples(plan.data.cache).classes("train")
    assert np.bincount(classes[a.index]).tolist() == list(plan.data.balanced_counts)
    # each example at least once; the draw and the epochs are functions of the seed (resume)
    assert set(a.index.tolist()) == set(range(len(classes)))
    assert np.array_equal(a.index, b.index)
    for epoch in (0, 1):
        assert a.epoch_rows(epoch) == b.epoch_rows(epoch)
        for k, v in a.batch(epoch, 1).items():
            assert np.array_equal(v, b.batch(epoch, 1)[k])


# ------------------------------------------------------------------------------ weighted

def test_weighted_class_weights_follow_the_formula(tune_cli, skewed, tmp_path):
    # Gamma's N / (K · n) is 20× Alpha's: a factor of 50 leaves the formula uncapped
    out = _run_plan(tune_cli, "data.balance=weighted", "data.balance_max_factor=50")
    d = json.loads((tmp_path / "run" / "plan.json").read_text())["data"]
    counts = [x["count"] for x in d["labels"]]
    n, k = sum(counts), len(counts)
    assert d["class_weights"] == pytest.approx([n / (k * c) for c in counts], rel=1e-12)
    assert sum(c * w for c, w in zip(counts, d["class_weights"])) / n == pytest.approx(1.0)
    assert d["balanced_counts"] is None
    text = flat(out)
    assert "weighted loss" in text and "validation loss is unweighted" in text
    assert f"Gamma {counts[-1]} × {d['class_weights'][-1]:.3g}" in text


TINY_LABELS = {"w20": 24, "w21": 8, "w22": 4}


def tiny_classification_plan(model_dir, workdir, **data):
    """A classification plan for the tiny word-level model: prompts of random words, answers one
    of TINY_LABELS (a skewed label set)."""
    from compiler import schema
    from compiler.compile import compile_plan

    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(f"w{t}" for t in rng.integers(30, 96, size=int(rng.integers(3, 9)))),
             "label": label} for label, n in TINY_LABELS.items() for _ in range(n)]
    path = write_jsonl(workdir / "tiny.jsonl", rows)
    cfg = schema.defaults()
    cfg["model"]["path"] = str(model_dir)
    cfg["data"].update(path=str(path), val_fraction=0.0, max_length=16, dedupe=False,
                       task="classification", **data)
    cfg["template"].update(prompt="{text}", response="{label}", chat=False)
    cfg["adapter"].update(rank=4, alpha=8.0, dropout=0.0)
    cfg["schedule"].update(batch_size=4, grad_accum=2, warmup=0, lr=1e-2)
    cfg["runtime"].update(pack=True, ce_chunk=16, dtype="float32", matmul_dtype="float32")
    return compile_plan(cfg, recipe_info=None, command="plan", cwd=workdir)


@pytest.mark.slow
def test_weighted_class_weights_capped_by_the_max_factor():
    from core.balance import class_weights

    counts = [240, 48, 12]
    w = class_weights(counts, 10)
    # Alpha : Beta : Gamma = 1 : 5 : min(20, 10); the mean weight per example stays 1
    assert w[1] / w[0] == pytest.approx(5.0) and w[2] / w[0] == pytest.approx(10.0)
    assert sum(c * x for c, x in zip(counts, w)) / sum(counts) == pytest.approx(1.0)
    assert class_weights(counts, 1) == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        class_weights([3, 0])


def test_weighted_default_cap_in_the_plan(tune_cli, skewed, tmp_path):
    _run_plan(tune_cli, "data.balance=weighted")
    w = json.loads((tmp_path / "run" / "plan.json").read_text())["data"]["class_weights"]
    assert w[2] / w[0] == pytest.approx(10.0)        # 20× by the formula, capped at 10


def test_weighted_step_loss_is_the_weighted_mean(tiny_chat_dir, tmp_path):
    """A weighted train step's loss is Σ w·CE / Σ w over the batch's supervised tokens, each
    weighted by its example's class weight — computed here in numpy from the model's logits. (One
    step compiled: a minute on a busy 2-core machine.)"""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from runtime import build
    from runtime.mesh import make_mesh, put_batch
    from runtime.train import make_train_step

    plan = tiny_classification_plan(tiny_chat_dir, tmp_path, balance="weighted")
    ids = {x.text: x.ids[0] for x in plan.data.labels}
    weight = dict(zip(ids.values(), plan.data.class_weights))
    batcher, val = build.batches(plan)
    batch = batcher.batch(0, 0)
    mask, w = batch["loss_mask"].astype(bool), batch["loss_weight"]
    # every supervised target carries its example's class weight (its label token's), 0 elsewhere
    assert (w[~mask] == 0).all()
    seg = batch["segment_ids"]
    for a, r, t in np.argwhere(mask):
        label = next(batch["targets"][a, r, j] for j in range(t, -1, -1)
                     if seg[a, r, j] == seg[a, r, t] and batch["targets"][a, r, j] in weight)
        assert w[a, r, t] == pytest.approx(weight[label])
    assert len({round(float(x), 6) for x in w[mask]}) > 1          # several classes in the batch

    mesh = make_mesh(plan.runtime.mesh)
    graphdef, lora, frozen = build.training_model(plan, mesh)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(lora))))
    lora = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, p.dtype), lora)
    model = nnx.merge(graphdef, frozen, lora)
    a, b, t = batch["tokens"].shape
    flat = {k: jnp.asarray(batch[k].reshape(a * b, t)) for k in ("tokens", "positions")}
    hidden = model(flat["tokens"], positions=flat["positions"],
                   segment_ids=jnp.asarray(seg.reshape(a * b, t)), deterministic=True)
    logits = np.asarray(hidden @ model.lm_head().T, dtype=np.float64).reshape(a, b, t, -1)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    ce = lse - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    want = float((w * ce).sum() / w.sum())
    plain = float((mask * ce).sum() / mask.sum())
    assert abs(want - plain) > 1e-3                     # the weights matter on this batch
    opt, lr_fn = build.optimizer(plan.schedule)
    # the plan's loss_tokens: the output head runs on the gathered supervised targets only
    step = make_train_step(graphdef, opt, lr_fn, ce_chunk=16, dropout=False,
                           loss_tokens=plan.runtime.loss_tokens, packed=True, donate=False)
    _, _, m = step(lora, opt.init(lora), frozen, put_batch(batch, mesh), jax.random.PRNGKey(0),
                   jnp.int32(0))
    assert float(m["loss"]) == pytest.approx(want, rel=1e-5)
    assert int(m["n_tokens"]) == int(mask.sum())         # tokens counted, not weights summed
    # all weights equal: the plain mean, as without weights (validation's loss)
    even = dict(batch, loss_weight=mask.astype(np.float32))
    _, _, m = step(lora, opt.init(lora), frozen, put_batch(even, mesh), jax.random.PRNGKey(0),
                   jnp.int32(0))
    assert float(m["loss"]) == pytest.approx(plain, rel=1e-5)
    assert val is None or "loss_weight" not in val.batch(0, 0)


# ------------------------------------------------------------------------------ the warning

def test_imbalance_warning_once_and_only_for_accuracy(skewed, tmp_path):
    def imbalance(plan):
        return [w for w in plan.warnings if "imbalanced" in w]

    plan = compiled(skewed, tmp_path)
    found = imbalance(plan)
    assert len(found) == 1
    top, total = plan.data.labels[0], sum(x.count for x in plan.data.labels)
    assert top.text == "Alpha" and f"`Alpha` is {top.count / total:.0%} of the {total} " in found[0]
    assert "data.balance=oversample" in found[0] and "eval.metric=macro_f1" in found[0]
    from compiler import schema
    from compiler.compile import compile_plan

    cfg = schema.defaults()
    cfg["data"]["path"] = str(skewed)
    cfg["eval"]["metric"] = "macro_f1"
    assert not imbalance(compile_plan(cfg, recipe_info=None, command="plan", cwd=tmp_path))
    balanced = write_jsonl(tmp_path / "data" / "even.jsonl", clf_rows(300))
    assert not imbalance(compiled(balanced, tmp_path))
    # already balancing: the warning names the metric only
    found = imbalance(compiled(skewed, tmp_path, balance="weighted"))
    assert len(found) == 1 and "data.balance" not in found[0] and "macro_f1" in found[0]


@pytest.mark.slow
def test_strong_weights_at_a_high_lr_warned(skewed, tmp_path):
    """data.balance=weighted with weights far apart warns above WEIGHTED_LR, naming both keys; a
    low lr, a gentle spread (balance_max_factor) or no weighting does not."""
    from compiler import schema
    from compiler.compile import WEIGHTED_LR, compile_plan

    def plan(lr, **data):
        cfg = schema.defaults()
        cfg["data"].update(path=str(skewed), **data)
        cfg["schedule"]["lr"] = lr
        return compile_plan(cfg, recipe_info=None, command="plan", cwd=tmp_path)

    def warned(p):
        return [w for w in p.warnings if "data.balance=weighted weighs" in w]

    high = plan(2e-3, balance="weighted")             # Gamma's weight is capped at 10× Alpha's
    w = high.data.class_weights
    found = warned(high)
    assert len(found) == 1 and f"{max(w) / min(w):.3g}× the largest class's" in found[0]
    assert "schedule.lr=0.002" in found[0] and "data.balance_max_factor" in found[0]
    assert not warned(plan(WEIGHTED_LR, balance="weighted"))
    assert not warned(plan(2e-3, balance="weighted", balance_max_factor=2))   # spread 2 < 4
    assert not warned(plan(2e-3)) and not warned(plan(2e-3, balance="oversample"))


# ------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("override, needle", [
    ("data.balance=sometimes", "must be one of none, oversample, weighted"),
    ("data.balance_max_factor=0.5", "must be at least 1"),
    ("data.balance_max_factor=abc", "must be a number"),
])
def test_bad_values_refused(tune_cli, skewed, tmp_path, override, needle):
    key = override.split("=")[0]
    refused(tune_cli("plan", "hydra.run.dir=run", "data.path=data/train.jsonl", override),
            key, needle, tmp_path=tmp_path)


@pytest.mark.parametrize("overrides, needle", [
    (["data.task=generation"], "data.task=generation has no label set"),
    (["objective=dpo"], "objective.kind=dpo trains on preference data"),
])
def test_balance_without_a_label_set_refused_before_reading(tune_cli, skewed, tmp_path, monkeypatch,
                                                            overrides, needle):
    """Refused from the config alone: no row is read (the refusal is bounded work)."""
    from compiler import data as data_mod

    read = []
    real = data_mod.read_table
    monkeypatch.setattr(data_mod, "read_table", lambda *a, **k: read.append(a) or real(*a, **k))
    text = refused(tune_cli("plan", "hydra.run.dir=run", "data.path=data/train.jsonl",
                            "data.balance=oversample", *overrides), "data.balance:", needle,
                   "Hint:", tmp_path=tmp_path)
    assert not read and "data.balance=none" in text
    # the compiler's part of the refusal (the command line's own start-up aside)
    from compiler import schema
    from compiler.compile import compile_plan

    cfg = schema.defaults()
    cfg["data"].update(path=str(skewed), balance="weighted")
    if overrides == ["objective=dpo"]:
        cfg["objective"]["kind"] = "dpo"
    else:
        cfg["data"]["task"] = "generation"
    with pytest.raises(PlanError, match="data.balance"):
        compile_plan(cfg, recipe_info=None, command="plan", cwd=tmp_path)
    assert not read


def test_balance_of_open_ended_answers_refused(tune_cli, tmp_path):
    rows = [{"text": f"Question {i}: what is {i} plus {i}?", "label": f"It is {2 * i}."}
            for i in range(60)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    refused(tune_cli("plan", "hydra.run.dir=run", "data.path=data/train.jsonl",
                     "data.balance=weighted"), "data.balance:", "open-ended (", "not a label set",
            "data.task=classification", tmp_path=tmp_path)
