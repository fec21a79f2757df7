"""adapter.head=classifier: a trained linear layer over the last prompt token's final hidden state,
one logit per label. What compile refuses and shows; the train step's loss against a plain
reference (packed and unpacked rows alike), its descent and its class weights; the PEFT export that
LlamaForSequenceClassification + PeftModel load with the same logits; evaluation by one forward
pass per row; `tune generate`'s label and probabilities; export formats refused."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_in_peft, write_jsonl

TINY_LABELS = ("w30", "w31", "w32")


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def tiny_rows(n, seed=0):
    """Rows in the tiny word-level model's words: the label is the prompt's first word mod 3."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = rng.integers(40, 96, size=int(rng.integers(3, 12)))
        rows.append({"text": " ".join(f"w{w}" for w in words),
                     "label": TINY_LABELS[int(words[0]) % 3]})
    return rows


def head_config(model_dir, data, *, pack=True, head="classifier", head_lr=None, head_probe=0.0,
                **schedule):
    from compiler import schema

    cfg = schema.defaults()
    cfg["model"]["path"] = str(model_dir)
    cfg["data"].update(path=str(data), val_fraction=0.1, max_length=32, dedupe=False,
                       task="classification")
    cfg["template"].update(prompt="{text}", response="{label}", chat=False)
    cfg["adapter"].update(rank=4, alpha=8.0, dropout=0.0, head=head, head_lr=head_lr,
                          head_probe=head_probe)
    cfg["schedule"].update(dict(lr=3e-3, batch_size=4, grad_accum=2, max_steps=6, warmup=0),
                           **schedule)
    cfg["runtime"].update(pack=pack, dtype="float32", matmul_dtype="float32", log_every=1,
                          checkpoint_every=0)
    return cfg


def head_plan(model_dir, data, **kw):
    from compiler.compile import compile_plan

    return compile_plan(head_config(model_dir, data, **kw), recipe_info=None, command="train")


@pytest.fixture
def tiny_data(tmp_path):
    return write_jsonl(tmp_path / "data" / "train.jsonl", tiny_rows(48))


# ------------------------------------------------------------------------------ compile

def test_head_refused_outside_a_classification_sft_task(tiny_chat_dir, tiny_data, tmp_path,
                                                         monkeypatch):
    from compiler import data as data_mod
    from compiler.compile import compile_plan
    from core.errors import PlanError

    read = []
    real = data_mod.read_table
    monkeypatch.setattr(data_mod, "read_table", lambda *a, **k: read.append(a) or real(*a, **k))
    for change, named in [({"data": {"task": "generation"}}, "data.task=generation"),
                          ({"objective": {"kind": "dpo"}}, "objective.kind=dpo"),
                          ({"adapter": {"kind": "full"}}, "adapter.kind=full")]:
        cfg = head_config(tiny_chat_dir, tiny_data)
        for section, values in change.items():
            cfg[section].update(values)
        with pytest.raises(PlanError) as e:
            compile_plan(cfg, recipe_info=None, command="train")
        assert not read                                 # refused before any row is read
        assert e.value.key == "adapter.head" and named in e.value.message and e.value.hint
    # open-ended answers: data.task=auto resolves to generation, and the head is refused naming
    # the training file
    rows = [{"text": r["text"], "label": r["text"]} for r in tiny_rows(48)]
    cfg = head_config(tiny_chat_dir, write_jsonl(tmp_path / "open.jsonl", rows))
    cfg["data"]["task"] = "auto"
    with pytest.raises(PlanError) as e:
        compile_plan(cfg, recipe_info=None, command="train")
    assert e.value.key == "adapter.head" and "open-ended" in e.value.message
    assert e.value.file.endswith("open.jsonl")


def test_cli_refuses_head_with_preference_objective(tune_cli, clf_data, tmp_path):
    rc, out, err = tune_cli("plan", f"data.path={clf_data()}", "adapter.head=classifier",
                            "objective=dpo", f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 2 and "adapter.head" in err and "Traceback" not in err + out
    assert not (tmp_path / "run" / "plan.json").exists()


def test_plan_shows_the_head(tune_cli, clf_data, tmp_path):
    rc, out, err = tune_cli("plan", f"data.path={clf_data()}", "adapter.head=classifier",
                            "adapter.head_lr=1e-3", f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 0, err
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    hidden = plan["model"]["config"]["hidden_size"]
    a = plan["adapter"]
    assert (a["head"], a["head_labels"], a["head_params"], a["head_lr"]) == \
        ("classifier", 3, 3 * hidden, 1e-3)
    labels = [x["text"] for x in plan["data"]["labels"]]          # the head's rows, in order
    assert sorted(labels) == ["Alpha", "Beta", "Gamma"]
    text = " ".join(out.replace("│", " ").split())      # the panel's lines, joined
    assert f"classifier: {3 * hidden:,} parameters (3 labels × {hidden} hidden" in text
    assert "lr 0.001" in text and f"3 labels: {', '.join(labels)}" in text
    assert "the tuned model answers by the classification head, the base model is decoded " \
           "within the label set" in text
    steps = plan["schedule"]["total_steps"]                # the default: the head alone first
    assert a["head_probe_steps"] == round(0.2 * steps) > 0
    assert f"alone for the first {a['head_probe_steps']} steps (adapter.head_probe)" in text


def test_adapter_lr_too_high_for_a_new_head_warned(tiny_chat_dir, tiny_data):
    def said(plan):
        return [w for w in plan.warnings if "new classification head" in w]

    high = said(head_plan(tiny_chat_dir, tiny_data))                  # lr 3e-3, no probe
    assert len(high) == 1 and "schedule.lr=0.003" in high[0] and "adapter.head_lr=2e-3" in high[0]
    assert "adapter.head_probe=0.2" in high[0]
    assert not said(head_plan(tiny_chat_dir, tiny_data, head_probe=0.2))   # the head goes first
    assert not said(head_plan(tiny_chat_dir, tiny_data, lr=2e-4))
    assert not said(head_plan(tiny_chat_dir, tiny_data, head="none"))


def test_head_evaluation_estimate_is_the_prefill_alone():
    from compiler.estimates import evaluation_time

    kw = dict(rows=64, token_s=1e-3, prefill=4000, new_tokens=16, batch_size=16,
              label_tokens=[3, 2])
    head = evaluation_time(models=1, mode="head", **kw)
    assert head == pytest.approx(4000 * 1e-3)
    assert evaluation_time(models=1, mode="constrained", **kw) > head
    assert evaluation_time(models=2, mode="head", **kw) == pytest.approx(2 * head)


def test_head_evaluation_counts_packed_rows_after_the_shared_start(tiny_chat_dir, tmp_path,
                                                                   monkeypatch):
    """The estimate counts what runtime/head.predict computes: each prompt's own tokens after the
    start they all share (a chat template's system turn), packed in rows of the longest one's
    bucket, a batch of rows at a time."""
    from compiler import estimates
    from compiler.compile import _shared_start
    from core.prompting import SHARED_MIN
    from core.token_cache import load_examples

    assert estimates.head_tokens([10] * 64, 64, 16) == 3 * 16 * 16      # 40 rows of 16, 3 calls
    assert estimates.head_tokens([10] * 64, 64, 16) < estimates.prefill_tokens([10] * 64, 64, 16)
    assert estimates.head_tokens([10, 30], 0, 16) == 0
    data = write_jsonl(tmp_path / "train.jsonl", tiny_rows(48))
    test = write_jsonl(tmp_path / "test.jsonl", tiny_rows(20, seed=5))
    chat = head_config(tiny_chat_dir, data)
    chat["data"]["test_path"] = str(test)
    chat["template"].update(chat=True, system="w1 w2 w3 w4 w5 w6 w7 w8 w9 w10")
    from compiler.compile import compile_plan

    plan = compile_plan(chat, recipe_info=None, command="train")
    ids, lens = load_examples(plan.data.cache).split("test")
    shared = _shared_start(ids, lens)
    assert shared >= max(10, SHARED_MIN)
    assert all(list(ids[i][:shared]) == list(ids[0][:shared]) for i in range(len(lens)))
    import core.prompting

    monkeypatch.setattr(core.prompting, "SHARED_MIN", 1 << 30)     # no start computed once
    whole = compile_plan(chat, recipe_info=None, command="train")
    assert _shared_start(ids, lens) == 0
    assert plan.estimates.eval_time_s < whole.estimates.eval_time_s


def test_plans_without_a_head_hash_as_before(tiny_chat_dir, tiny_data):
    """The keys this adds stay out of the hash at their defaults: existing runs keep their hash."""
    import dataclasses

    from core.plan import content_hash

    plan = head_plan(tiny_chat_dir, tiny_data, head="none")
    doc = plan.to_dict()
    assert doc["adapter"]["head"] == "none" and doc["config"]["adapter"]["head"] == "none"
    config = {**plan.config, "adapter": {k: v for k, v in plan.config["adapter"].items()
                                         if k not in ("head", "head_lr")}}
    assert content_hash(dataclasses.replace(plan, config=config)) == plan.hash


# ------------------------------------------------------------------------------ labels

def test_token_cache_records_each_examples_label(tiny_chat_dir, tmp_path):
    """The head's targets are the token cache's classes: a training answer's label by its text as
    labels are compared (case, spacing, a final full stop), a validation answer outside the set
    -1."""
    from core.token_cache import load_examples
    from runtime import build

    from compiler.data import split_validation

    rows = [{**r, "i": i} for i, r in enumerate(tiny_rows(48))]
    seed = head_config(tiny_chat_dir, "x")["schedule"]["seed"]
    train_rows, val_rows = split_validation(rows, 0.1, seed)      # the split compile makes
    want_train = [r["label"] for r in train_rows]
    want_val = [r["label"] for r in val_rows]
    want_train[0], want_val[0] = "w31", None
    train_rows[0]["label"] = " W31.\n"
    val_rows[0]["label"] = "w99"
    plan = head_plan(tiny_chat_dir, write_jsonl(tmp_path / "d" / "train.jsonl", rows))
    texts = [x.text for x in plan.data.labels]
    assert sorted(texts) == sorted(TINY_LABELS)
    ex = load_examples(plan.data.cache)
    train, val = ex.classes("train"), ex.classes("val")
    assert len(train) == len(train_rows) and len(val) == len(val_rows)
    assert train.tolist() == [texts.index(x) for x in want_train]
    assert val.tolist() == [-1 if x is None else texts.index(x) for x in want_val]
    _, v = build.batches(plan)
    assert np.array_equal(v.head_labels, val)


# ------------------------------------------------------------------------------ training

def _reference_ce(model, examples, plan) -> np.ndarray:
    """Plain CE of the head at each example's last prompt token, the label read from its answer's
    first token (the tiny model's word ids): all examples in one batch, right-padded (plain causal
    attention: exact for every real token), no packing."""
    ids, prompt_lens = examples
    texts = [x.text for x in plan.data.labels]
    tokens = np.zeros((len(ids), int(max(prompt_lens))), np.int32)
    for r, (x, p) in enumerate(zip(ids, prompt_lens)):
        tokens[r, :p] = x[:p]
    hidden = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)), np.float64)
    last = hidden[np.arange(len(ids)), np.asarray(prompt_lens) - 1]
    logits = last @ np.asarray(model.score[...], np.float64).T
    k = np.array([texts.index(f"w{int(x[p])}") for x, p in zip(ids, prompt_lens)])
    top = logits.max(axis=1)
    return np.log(np.exp(logits - top[:, None]).sum(axis=1)) + top - logits[np.arange(len(k)), k]


def test_train_step_loss_is_the_heads_cross_entropy_and_falls(tiny_chat_dir, tiny_data):
    from core.token_cache import load_examples
    from runtime import build
    from runtime.batching import Batcher, BatchShape
    from runtime.mesh import make_mesh, put_batch
    from runtime.train import make_eval_loss

    plan = head_plan(tiny_chat_dir, tiny_data, pack=True, head_lr=2e-2)
    mesh = make_mesh(plan.runtime.mesh)
    graphdef, trained, frozen = build.training_model(plan, mesh)
    packed, _ = build.batches(plan)
    train = load_examples(plan.data.cache).split("train")
    ref = _reference_ce(nnx.merge(graphdef, frozen, trained), train, plan)
    # the whole training split, one example per row (plain causal attention, no segments): each
    # example's CE once
    s = plan.schedule
    single = Batcher(*train, BatchShape(1, 16, s.seq_len), pack=False, seed=s.seed,
                     head_labels=load_examples(plan.data.cache).classes("train"))
    eval_fn = make_eval_loss(graphdef, ce_chunk=32, loss_tokens=None, packed=False, head=True)
    sums = [eval_fn(trained, frozen, put_batch(b, mesh)) for b in single.epoch_batches(0)]
    assert sum(float(c) for _, c in sums) == len(train[0])
    assert sum(float(x) for x, _ in sums) == pytest.approx(ref.sum(), rel=1e-5)
    # the same examples in packed rows: the step's loss (2 micro-batches of rows holding several
    # examples each) is the mean of their CE, and it falls over a few steps on them
    opt, lr_fn = build.optimizer(s, head_lr=plan.adapter.head_lr)
    opt_state, shardings = build.place_optimizer(mesh, opt, trained)
    step = build.train_step(plan, graphdef, opt, lr_fn, mesh, shardings)
    in_step = [i for row in packed.epoch_rows(0)[:s.grad_accum * s.batch_size] for i in row]
    assert len(in_step) > s.grad_accum * s.batch_size       # packed: rows hold several examples
    batch = put_batch(packed.batch(0, 0), mesh)
    seen = []
    for k in range(4):
        trained, opt_state, m = step(trained, opt_state, frozen, batch, jax.random.key(0),
                                     jnp.int32(k))
        seen.append(float(m["loss"]))
        if k == 0:
            assert int(m["n_tokens"]) == len(in_step)       # one per example, not per token
    assert seen[0] == pytest.approx(ref[in_step].mean(), rel=1e-5)
    assert seen[-1] < seen[0] - 0.05, seen


def test_head_probe_trains_the_head_alone_then_starts_the_adapter_afresh(tiny_chat_dir,
                                                                          tiny_data):
    """adapter.head_probe=2: in steps 0 and 1 only the head moves; at step 2 the adapter takes
    its first AdamW step (lr·sign(g), at the first warmup step of the schedule over the steps
    left) while the head's AdamW runs on."""
    from runtime import build
    from runtime.mesh import make_mesh, put_batch

    plan = head_plan(tiny_chat_dir, tiny_data, head_probe=2, head_lr=1e-2, warmup=2,
                     max_grad_norm=0)
    s, a = plan.schedule, plan.adapter
    assert a.head_probe_steps == 2 and s.total_steps == 6 and s.warmup_steps == 2
    opt, lr_fn = build.optimizer(s, head_lr=a.head_lr, head_probe=a.head_probe_steps)
    assert [float(lr_fn(k)) for k in range(4)] == pytest.approx(
        [0, 0, s.lr / 2, s.lr])                         # the adapter's lr: held, then warming up
    mesh = make_mesh(plan.runtime.mesh)
    graphdef, trained, frozen = build.training_model(plan, mesh)
    opt_state, shardings = build.place_optimizer(mesh, opt, trained)
    step = build.train_step(plan, graphdef, opt, lr_fn, mesh, shardings)
    packed, _ = build.batches(plan)

    def leaves(tree):
        return {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    batch = put_batch(packed.batch(0, 0), mesh)
    seen = [leaves(trained)]
    for k in range(3):
        trained, opt_state, m = step(trained, opt_state, frozen, batch, jax.random.key(0),
                                     jnp.int32(k))
        seen.append(leaves(trained))
        assert float(m["lr"]) == pytest.approx(float(lr_fn(k)))
    head = [n for n in seen[0] if "score" in n]
    rest = [n for n in seen[0] if "score" not in n]
    assert len(head) == 1 and rest
    for k in (1, 2):                                    # the probe: the head moves, nothing else
        assert not np.array_equal(seen[k][head[0]], seen[k - 1][head[0]])
        for n in rest:
            np.testing.assert_array_equal(seen[k][n], seen[0][n])
    # step 2: each adapter factor that has a gradient moves by AdamW's first step, lr·sign(g)
    # (bias-corrected moments), at lr = s.lr / 2 (the first of 2 warmup steps, started afresh)
    moved = [n for n in rest if not np.array_equal(seen[3][n], seen[2][n])]
    assert moved
    # (a little less where |g| is near AdamW's eps, and float32 rounding of the sum)
    for n in moved:
        d = np.abs(seen[3][n] - seen[2][n])
        d = d[d > 0]
        assert np.median(d) == pytest.approx(s.lr / 2, rel=1e-3)
        assert d.max() <= s.lr / 2 * (1 + 1e-3)
    # the head's AdamW was not restarted: its step 2 is not a first step's lr·sign(g)
    d = np.abs(seen[3][head[0]] - seen[2][head[0]])
    assert not np.allclose(d[d > 0], a.head_lr * float(lr_fn(2)) / s.lr, rtol=1e-3)

    # the probe's own step (what the run takes for steps 0 and 1): the head's loss on the hidden
    # states as constants, no backward pass through the model — the same loss and head update,
    # the adapter's gradient zero
    graphdef, trained, frozen = build.training_model(plan, mesh)
    probe = build.train_step(plan, graphdef, opt, lr_fn, mesh, shardings, probe=True)
    for fn in (step, probe):
        o, _ = build.place_optimizer(mesh, opt, trained)
        out = fn(jax.tree.map(jnp.copy, trained), o, frozen, batch, jax.random.key(0),
                 jnp.int32(0))
        got = leaves(out[0])
        assert all(np.array_equal(got[n], seen[0][n]) for n in rest)
        if fn is step:
            want, loss = got[head[0]], float(out[2]["loss"])
    np.testing.assert_allclose(got[head[0]], want, rtol=1e-5, atol=1e-7)
    assert float(out[2]["loss"]) == pytest.approx(loss, rel=1e-6)
    assert float(out[2]["grad_norm"]) > 0


def test_head_probe_resolved_warned_and_refused(tiny_chat_dir, tiny_data):
    from core.errors import PlanError

    assert head_plan(tiny_chat_dir, tiny_data, head_probe=0.5).adapter.head_probe_steps == 3
    assert head_plan(tiny_chat_dir, tiny_data).adapter.head_probe_steps == 0
    plan = head_plan(tiny_chat_dir, tiny_data, head="none", head_probe=0.3)
    assert plan.adapter.head_probe_steps == 0
    assert any("adapter.head_probe=0.3 is set, but adapter.head=none" in w for w in plan.warnings)
    from compiler import schema

    cfg = head_config(tiny_chat_dir, tiny_data, head="none")        # the default: nothing said
    cfg["adapter"]["head_probe"] = schema.BY_PATH["adapter.head_probe"].default
    from compiler.compile import compile_plan

    assert not any("head_probe" in w for w in compile_plan(cfg, recipe_info=None,
                                                           command="train").warnings)
    for probe in (6, 0.99):                                 # no step left for the adapter
        with pytest.raises(PlanError) as e:
            head_plan(tiny_chat_dir, tiny_data, head_probe=probe)
        assert e.value.key == "adapter.head_probe" and "never train" in e.value.message
    with pytest.raises(PlanError) as e:
        head_plan(tiny_chat_dir, tiny_data, head_probe=2.5)
    assert e.value.key == "adapter.head_probe" and "whole number of steps" in e.value.message


def test_head_loss_weights_each_example_by_its_label():
    from runtime.loss import head_cross_entropy

    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 6, 8)).astype(np.float32)
    w = rng.normal(size=(3, 8)).astype(np.float32)
    label = np.zeros((2, 6), np.int32)
    label[0, 2], label[0, 5], label[1, 3] = 1, 3, 2          # labels 0, 2, 1
    weight = np.where(label > 0, np.array([0, 0.5, 2.0, 1.5])[label], 0).astype(np.float32)
    weight[0, 0] = 9.0                                       # a weight where no example is read
    logits = hidden @ w.T
    ce = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(
        logits, np.maximum(label - 1, 0)[..., None], -1)[..., 0]
    for capacity, weighted in [(12, False), (4, True), (12, True)]:
        s, n = head_cross_entropy(jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(label),
                                  capacity=capacity,
                                  weight=jnp.asarray(weight) if weighted else None)
        ww = np.where(label > 0, weight if weighted else 1.0, 0.0)
        assert float(n) == pytest.approx(ww.sum())
        assert float(s) == pytest.approx(float((ww * ce).sum()), rel=1e-5)


def test_balance_weighted_weighs_each_example_by_its_class(tiny_chat_dir, tmp_path):
    """data.balance=weighted: the batch's loss weight at each example's last prompt token (what the
    head's loss reads) is its class's weight; the validation batches carry none."""
    from compiler.compile import compile_plan
    from runtime import build

    rows = tiny_rows(60)
    rows += [{**r, "label": TINY_LABELS[0]} for r in tiny_rows(30, seed=2)]   # imbalanced
    cfg = head_config(tiny_chat_dir, write_jsonl(tmp_path / "imb.jsonl", rows))
    cfg["data"]["balance"] = "weighted"
    plan = compile_plan(cfg, recipe_info=None, command="train")
    weights = dict(zip((x.text for x in plan.data.labels), plan.data.class_weights))
    assert len(set(weights.values())) > 1
    train, val = build.batches(plan)
    seen = 0
    for batch in train.epoch_batches(0):
        at = batch["head_label"] > 0
        want = np.array([weights[plan.data.labels[k - 1].text] for k in batch["head_label"][at]])
        np.testing.assert_allclose(batch["loss_weight"][at], want, rtol=1e-6)
        seen += int(at.sum())
    assert seen == plan.data.sizes["train"]
    assert "loss_weight" not in next(val.epoch_batches(0))


# ------------------------------------------------------------------------------ export

def test_peft_sequence_classification_reproduces_the_head(hf_tiny, tmp_path):
    """The adapter with its head loads into LlamaForSequenceClassification + PeftModel (no missing
    or unexpected keys) with the head's logits, and back into tune with the same head."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification

    from runtime.head import predict
    from runtime.model import LoraConfig, LoRAParam
    from runtime.peft import load_peft_adapter, read_lora_config, save_peft_adapter
    from runtime.weights import load_pretrained

    _, path = hf_tiny("llama")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"),
                      head=3)
    model = load_pretrained(path, lora=lora)
    state = nnx.state(model, LoRAParam)           # random non-zero factors and head, as if trained
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                                   for k, x in zip(keys, leaves)]))
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path),
                            lora=lora, labels=["Alpha", "Beta", "Gamma"], pad_token_id=0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.score.weight"].shape == (3, 64)
    labels = json.loads((out / "labels.json").read_text())
    assert labels["id2label"] == {"0": "Alpha", "1": "Beta", "2": "Gamma"}

    base = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, **labels)
    assert type(base).__name__ == "LlamaForSequenceClassification" and base.config.num_labels == 3
    peft = load_in_peft(base, out, tensors)         # the head's trained copy loads
    assert any("score.modules_to_save" in n for n, _ in peft.named_parameters())

    prompts = [list(np.random.default_rng(s).integers(1, 128, n)) for s, n in ((0, 9), (1, 4))]
    ours = predict(model, prompts, batch_size=2, pad_id=0)
    with torch.no_grad():
        theirs = np.concatenate([peft(torch.as_tensor([p])).logits.numpy() for p in prompts])
        padded = torch.as_tensor([prompts[0], prompts[1] + [0] * 5])    # right-padded with pad_id
        batched = peft(padded).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched, theirs, atol=1e-5, rtol=0)

    back = read_lora_config(out)
    assert back.head == 3
    again = load_peft_adapter(load_pretrained(path, lora=back), out)
    np.testing.assert_array_equal(np.asarray(again.score[...]), np.asarray(model.score[...]))
    np.testing.assert_allclose(predict(again, prompts, batch_size=1, pad_id=0), ours, atol=1e-6)
    # prompts that start alike (a system prompt): their shared tokens are computed once, and each
    # row's logits are still the sequence-classification model's of its whole prompt
    rng = np.random.default_rng(2)
    start = list(rng.integers(1, 128, 10))
    alike = [start + list(rng.integers(1, 128, n)) for n in (1, 6, 3)]
    from core.prompting import SHARED_MIN, shared_prefix

    assert shared_prefix(alike) >= max(10, SHARED_MIN)
    with torch.no_grad():
        theirs = np.concatenate([peft(torch.as_tensor([p])).logits.numpy() for p in alike])
    np.testing.assert_allclose(predict(model, alike, batch_size=2, pad_id=0), theirs, atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("kind", ["mistral-window", "gemma3", "qwen3"])
def test_packed_rows_after_a_shared_prefix_give_each_prompts_own_logits(hf_tiny, kind,
                                                                        monkeypatch):
    """Windowed attention (the prefix partly out of a window), two RoPE bases, q/k norms: the head
    over prompts packed in rows after a once-computed prefix — and over a prompt a row without
    one — equals the model's forward pass over each prompt alone."""
    from runtime import head
    from runtime.model import LoraConfig, LoRAParam
    from runtime.weights import load_pretrained

    _, path = hf_tiny(kind)
    model = load_pretrained(path, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                                                  targets=("q_proj", "v_proj"), head=3))
    state = nnx.state(model, LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                                   for k, x in zip(keys, leaves)]))
    rng = np.random.default_rng(4)
    start = list(rng.integers(1, 128, 9))
    prompts = [start + list(rng.integers(1, 128, n)) for n in (2, 8, 1, 5)]
    assert head.shared_prefix(prompts) >= 9
    calls = []
    packed_rows = head._head_rows

    def counted(graphdef, state, prefix, tokens, positions, segment_ids):
        calls.append((tokens.shape, sum(len(set(r[r > 0].tolist()))
                                        for r in np.asarray(segment_ids))))
        return packed_rows(graphdef, state, prefix, tokens, positions, segment_ids)

    monkeypatch.setattr(head, "_head_rows", counted)
    alone = np.stack([np.asarray(model.head_logits(model(jnp.asarray([p]))[0, -1]))
                      for p in prompts])
    shared = head.predict(model, prompts, batch_size=3, pad_id=0)
    np.testing.assert_allclose(shared, alone, atol=1e-5, rtol=0)
    # the 4 prompts' own 16 tokens fill one row of 16 (the shortest length bucket)
    assert calls == [((1, 16), 4)]
    calls.clear()
    alike = prompts + [start + list(rng.integers(1, 128, 12))]          # 28 own tokens: 2 rows
    alone = np.concatenate([alone, np.asarray(model.head_logits(
        model(jnp.asarray([alike[-1]]))[0, -1]))[None]])
    shared = head.predict(model, alike, batch_size=1, pad_id=0)        # a row a call, one shape
    np.testing.assert_allclose(shared, alone, atol=1e-5, rtol=0)
    assert [c[0] for c in calls] == [(1, 16), (1, 16)] and sum(c[1] for c in calls) == 5
    import core.prompting

    calls.clear()
    pack_max = core.prompting.PACK_MAX
    monkeypatch.setattr(core.prompting, "PACK_MAX", 8)                  # rows past it: a prompt a row
    whole = head.predict(model, alike, batch_size=3, pad_id=0)
    np.testing.assert_allclose(whole, alone, atol=1e-5, rtol=0)
    assert not calls
    monkeypatch.setattr(core.prompting, "PACK_MAX", pack_max)
    monkeypatch.setattr(core.prompting, "SHARED_MIN", 1 << 30)         # no start long enough
    whole = head.predict(model, alike, batch_size=3, pad_id=0)
    np.testing.assert_allclose(whole, alone, atol=1e-5, rtol=0)
    assert not calls
    assert head.shared_prefix(prompts[:1]) == 0 and head.shared_prefix([[1, 2], [1, 2, 3]]) == 1


# ------------------------------------------------------------------------------ a head run

@pytest.mark.slow
def test_head_run_evaluates_generates_and_exports(tune_cli, tiny_chat_dir, tmp_path, monkeypatch):
    """A 2-step head run: its tuned model is scored by the head (mode head, label texts, one forward
    pass per row), its base model by constrained decoding; `tune eval run=` scores it with no
    decoding at all; `tune generate` prints a label and the probabilities; `tune serve` and
    merged export are refused, peft export carries the head."""
    import runtime.decode as decode
    import runtime.evaluate as evaluate
    import runtime.head as head

    train = write_jsonl(tmp_path / "data" / "train.jsonl", tiny_rows(40))
    test = write_jsonl(tmp_path / "data" / "test.jsonl", tiny_rows(10, seed=1))
    run = tmp_path / "run"
    common = [f"model.path={tiny_chat_dir}", "template.chat=false", "data.max_length=32",
              "data.task=classification", "runtime.dtype=float32", "runtime.matmul_dtype=float32"]
    rc, out, err = tune_cli(f"data.path={train}", f"data.test_path={test}", *common,
                            "adapter.head=classifier", "schedule.max_steps=2",
                            "adapter.head_probe=1",
                            "schedule.batch_size=4", "eval.batch_size=4", f"hydra.run.dir={run}")
    assert rc == 0, err
    ev = json.loads((run / "eval.json").read_text())
    assert ev["tuned"]["mode"] == "head" and ev["base"]["mode"] == "constrained"
    assert ev["tuned"]["n"] == 10 and ev["tuned"]["rows_per_s"] > 0
    assert ev["tuned"]["max_new_tokens"] is None
    assert "delta" in ev
    rows = [json.loads(x) for x in (run / "eval_predictions.jsonl").read_text().splitlines()]
    tuned = [r for r in rows if r["model"] == "tuned"]
    assert len(tuned) == 10 and {r["prediction"] for r in tuned} <= set(TINY_LABELS)
    assert (run / "adapter" / "labels.json").is_file()
    # adapter.head_probe=1: the first step trains the head alone (the adapter's lr 0), the second
    # both
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                           .splitlines()) if "lr" in r}
    assert lrs[1] == 0 and lrs[2] > 0

    # tune eval run=DIR: one forward pass per row, batched, no decoding (these prompts share no
    # start: a prompt a row)
    calls = []
    forward = head._head_batch

    def counted(graphdef, state, tokens):
        calls.append(tokens.shape)
        return forward(graphdef, state, tokens)

    def no_decoding(*a, **k):
        raise AssertionError("a head run's tuned model is not decoded")

    monkeypatch.setattr(head, "_head_batch", counted)
    monkeypatch.setattr(evaluate, "classify", no_decoding)
    monkeypatch.setattr(evaluate, "greedy_generate", no_decoding)
    rc, out, err = tune_cli("eval", f"run={run}")
    assert rc == 0, err
    assert len(calls) == 3 and all(shape[0] == 4 for shape in calls)     # ceil(10 / 4) batches
    assert json.loads((run / "eval.json").read_text())["tuned"]["mode"] == "head"
    assert "base" in json.loads((run / "eval.json").read_text())         # kept beside it

    # tune generate: the label, then the labels' probabilities; no decoding either
    import runtime.generate as generate_mod     # imported before the patch: it binds the name

    monkeypatch.setattr(decode, "stream_tokens", no_decoding)
    monkeypatch.setattr(generate_mod, "stream_tokens", no_decoding)
    rc, out, err = tune_cli("generate", f"run={run}", "prompt=w41 w50 w60")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0] in TINY_LABELS
    shown = dict(part.rsplit(" ", 1) for part in lines[1].strip().split(" · "))
    assert set(shown) == set(TINY_LABELS) and sum(map(float, shown.values())) == \
        pytest.approx(1.0, abs=2e-3)
    assert max(shown, key=lambda k: float(shown[k])) == lines[0]

    # not served as a chat model
    rc, out, err = tune_cli("serve", f"run={run}", "port=0")
    assert rc == 2 and "classification head" in err and "tune generate" in err

    # export: merged refused naming `format`, nothing written; peft carries the head
    rc, out, err = tune_cli("export", f"run={run}", "format=merged", f"out={tmp_path / 'm'}")
    assert rc == 2 and "format" in err and "classification head" in err
    assert not (tmp_path / "m").exists()
    rc, out, err = tune_cli("export", f"run={run}", "format=peft", f"out={tmp_path / 'p'}")
    assert rc == 0, err
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert (tmp_path / "p" / "labels.json").is_file()
