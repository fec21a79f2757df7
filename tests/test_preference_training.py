"""Preference objectives and full fine-tuning through the runtime, on the tiny word-level model:
each objective trains from a reference equal to the policy (its first step is the loss at zero
margin) and logs TRL's metrics; held-out pairs are scored base vs tuned into eval.json and the
report; SFT → preference with init.run (the SFT model is both the start and the reference, also
after a resume); an interrupted preference run resumes to the uninterrupted adapter; adapter.kind=full
trains every weight and writes a transformers checkpoint; a diverging step stops a preference run
cleanly; a sweep ranks its runs by preference accuracy; a mesh of 8 devices trains as one."""
from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import diverge_at, pref_plan, tiny_plan
from core.records import EvalFile
from runtime.run import train

TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
               "logps/rejected")


def _steps(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_each_objective_starts_at_zero_margin_and_learns(objective, tiny_chat_dir, tmp_path):
    # KTO's loss moves with β·log-ratio and its KL estimate is noisy on small batches: at the usual
    # β 0.1 and two rows a step the toy's few steps barely show it
    settings = dict(beta=1.0, batch_size=4, max_steps=32) if objective == "kto" else \
        dict(max_steps=16)
    plan = pref_plan(tiny_chat_dir, tmp_path, objective=objective, epochs=40, lr=3e-2,
                     eval_every=8, **settings)
    train(plan, tmp_path / "run")
    steps = _steps(tmp_path / "run")
    first = steps[0]
    for key in TRL_METRICS:
        assert key in first and math.isfinite(first[key]), key
    if objective in ("dpo", "ipo", "kto"):          # the policy is the reference at step 1
        # (two passes of one model, compiled apart: equal to float32's rounding, not always bitwise)
        assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    if objective == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    if objective == "kto":
        assert "kl" in first and first["kl"] == 0
    if objective == "orpo":
        assert first["nll_loss"] > 0
    later = steps[-6:]
    assert np.mean([r["loss"] for r in later]) < first["loss"]
    assert np.mean([r["rewards/margins"] for r in later]) > 0       # chosen pulled above rejected
    assert any("val_loss" in json.loads(x) for x in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


def test_held_out_pairs_scored_base_and_tuned(tiny_chat_dir, tmp_path):
    from runtime.evaluate import evaluate_before_after
    from runtime.report import write_report

    # a preference that carries over to new prompts: one fixed reply preferred to random words
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"w{t}" for t in rng.integers(30, 96, size=n))   # noqa: E731
    rows = [{"prompt": words(int(rng.integers(3, 9))), "chosen": "w20 w21 w22",
             "rejected": words(3)} for _ in range(48)]
    plan = pref_plan(tiny_chat_dir, tmp_path, max_steps=24, epochs=20, lr=3e-2, n_test=12,
                     rows=rows)
    train(plan, tmp_path / "run")
    ev = evaluate_before_after(plan, tmp_path / "run", verbose=False)
    assert isinstance(ev, EvalFile) and set(ev.entries) == {"base", "tuned"}
    base, tuned = ev.entries["base"], ev.entries["tuned"]
    assert base.metric == tuned.metric == "preference_accuracy" and base.n == tuned.n == 12
    assert tuned.value > base.value and tuned.get("mean_margin") > base.get("mean_margin")
    assert tuned.get("reward_accuracy") is not None and base.get("reward_accuracy") is None
    samples = tuned.get("samples")
    assert len(samples) == 4 and all({"prompt", "chosen", "rejected", "base", "tuned"} <= set(x)
                                     for x in samples)
    # the packed scoring gives each reply's log-probability as a forward pass over it alone does
    import jax

    from runtime import build
    from runtime.preference_eval import Pairs, score

    pairs, model = Pairs(plan), build.scoring_model(plan)
    got = score(plan, model, pairs)
    for i in range(len(pairs)):
        for side, seq in (("chosen", pairs.chosen[i]), ("rejected", pairs.rejected[i])):
            logp = jax.nn.log_softmax(model.logits(model(seq[None, :-1])))[0]
            p = pairs.prompt_lens[i]
            want = float(sum(logp[t - 1, seq[t]] for t in range(p, len(seq))))
            assert got[side][i] == pytest.approx(want, abs=1e-4)
            assert got[f"n_{side}"][i] == len(seq) - p
    doc = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert doc["metric"] == "preference_accuracy" and doc["delta"] == tuned.value - base.value
    html = write_report(tmp_path / "run").read_text()
    assert "Answers side by side" in html and "reward accuracy" in html
    assert (tmp_path / "run" / "plots" / "rewards.png").is_file()


def test_sft_then_dpo_starts_from_and_is_referenced_to_the_sft_model(tiny_chat_dir, tmp_path):
    """init.run: the preference run starts from the SFT adapter, whose model is its reference —
    also when the run is interrupted and resumed (the reference is not the resumed state)."""
    from runtime import build
    from runtime.mesh import make_mesh

    sft = tiny_plan(tiny_chat_dir, tmp_path / "sft-data", max_steps=6, epochs=5, lr=3e-2)
    sft.write(tmp_path / "sft" / "plan.json")           # as `tune` writes it beside the run
    train(sft, tmp_path / "sft")
    plan = pref_plan(tiny_chat_dir, tmp_path, init_run=tmp_path / "sft", max_steps=6, epochs=20,
                     lr=3e-2, checkpoint_every=3)
    assert plan.objective.reference == "init" and plan.objective.init_sha256
    _, trained, _ = build.training_model(plan, make_mesh(plan.runtime.mesh))
    b = np.asarray(trained["layers"]["self_attn"]["q_proj"]["lora_B"][...])
    saved = _adapter(tmp_path / "sft")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(b[0], saved)                       # where training starts

    whole = train(plan, tmp_path / "whole")
    first = _steps(tmp_path / "whole")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)      # policy = reference = SFT
    # the policy's forward pass is differentiated, the reference's is not: two XLA programs, equal
    # to float32 rounding (a wrong reference, e.g. the base model, is off by ~0.1 or more)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6)

    def ctrl_c(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(SystemExit):
        train(plan, tmp_path / "resumed", on_step=ctrl_c)
    resumed = train(plan, tmp_path / "resumed")
    assert resumed.resumed_from == 4 and resumed.steps == whole.steps == 6
    np.testing.assert_allclose([r["loss"] for r in _steps(tmp_path / "resumed")],
                               [r["loss"] for r in _steps(tmp_path / "whole")], rtol=1e-6)
    a, c = _adapter(tmp_path / "whole"), _adapter(tmp_path / "resumed")
    for k in a:
        np.testing.assert_allclose(c[k], a[k], rtol=0, atol=1e-6, err_msg=k)

    (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").write_bytes(b"changed")
    with pytest.raises(RuntimeError, match="gone or changed since the plan was compiled"):
        train(plan, tmp_path / "third")


def test_full_fine_tuning_trains_every_weight_and_writes_a_transformers_model(tiny_chat_dir,
                                                                              tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from runtime import build

    plan = tiny_plan(tiny_chat_dir, tmp_path, kind="full", max_steps=3, lr=1e-2)
    assert plan.adapter.kind == "full" and plan.adapter.targets == ()
    assert plan.adapter.trainable_params == plan.model.params
    train(plan, tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()
    model_dir = tmp_path / "run" / "model"
    before = load_file(str(tiny_chat_dir / "model.safetensors"))
    after = load_file(str(model_dir / "model.safetensors"))
    assert set(after) == set(before)
    assert all(not np.array_equal(after[k], before[k]) for k in before), \
        [k for k in before if np.array_equal(after[k], before[k])]
    ids = np.array([[5, 11, 12, 13, 14, 6]], np.int32)
    ours = build.scoring_model(plan, model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.logits(ours(ids))), ref, atol=1e-4, rtol=0)


def test_full_fine_tuning_under_dpo_keeps_a_reference_copy(tiny_chat_dir, tmp_path):
    plan = pref_plan(tiny_chat_dir, tmp_path, kind="full", max_steps=4, epochs=20, lr=1e-3)
    assert plan.objective.reference == "base"
    assert plan.estimates.memory["reference"] > 0
    train(plan, tmp_path / "run")
    steps = _steps(tmp_path / "run")
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["rewards/margins"] != 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_export_of_a_full_run(tune_cli, tiny_chat_dir, tmp_path):
    """A fully trained run has no PEFT adapter to export (exit 2, the formats it has); merged is its
    model."""
    plan = tiny_plan(tiny_chat_dir, tmp_path, kind="full", max_steps=1)
    plan.write(tmp_path / "run" / "plan.json")
    train(plan, tmp_path / "run")
    rc, out, err = tune_cli("export", f"run={tmp_path / 'run'}", "format=peft")
    assert rc == 2 and "adapter.kind=full" in err and "format=merged" in err
    rc, out, err = tune_cli("export", f"run={tmp_path / 'run'}", "format=merged",
                            f"out={tmp_path / 'merged'}")
    assert rc == 0, err
    a = load_file(str(tmp_path / "merged" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_diverging_preference_run_stops_cleanly(tiny_chat_dir, tmp_path, monkeypatch):
    """The divergence stop holds for a preference objective: a DPO step whose loss is not finite
    (made so at step 4) stops the run there with exit code 3, keeps the metrics and the checkpoint
    before it and writes no adapter."""
    from core.errors import Diverged
    from runtime import checkpoint

    plan = pref_plan(tiny_chat_dir, tmp_path, max_steps=6, epochs=20, lr=3e-2, checkpoint_every=2)
    diverge_at(monkeypatch, 4)
    with pytest.raises(Diverged) as err:
        train(plan, tmp_path / "run")
    assert err.value.exit_code == 3 and err.value.step == 4
    rows = _steps(tmp_path / "run")
    assert [r["step"] for r in rows if r.get("loss") is not None] == [1, 2, 3]
    assert all(math.isfinite(r["rewards/margins"]) for r in rows if r.get("loss") is not None)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["step_00000002.npz"]
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_a_preference_sweep_ranks_its_runs_by_preference_accuracy(tune_cli, tiny_chat_dir,
                                                                  tmp_path):
    """`tune -m` over DPO learning rates with sweep.metric=metric: each run scored on the held-out
    pairs, sweep.json ranking them by preference accuracy."""
    from core.records import EvalFile, SweepFile

    pref_plan(tiny_chat_dir, tmp_path / "data", n_train=24, n_val=4, n_test=8)   # writes the pairs
    rc, out, err = tune_cli(
        "-m", f"model.path={tiny_chat_dir}", f"data.path={tmp_path / 'data' / 'pairs.jsonl'}",
        f"data.test_path={tmp_path / 'data' / 'pairs_test.jsonl'}", "objective=dpo",
        "data.max_length=32", "data.dedupe=false", "template.chat=false", "schedule.max_steps=3",
        "schedule.batch_size=2", "schedule.warmup=0", "schedule.lr=1e-4,3e-2",
        "adapter.targets=[q_proj,v_proj]", "eval.max_new_tokens=2", "runtime.checkpoint_every=0",
        "runtime.dtype=float32", "sweep.metric=metric", "hydra.sweep.dir=sweep")
    assert rc == 0, err
    doc = SweepFile.read(tmp_path / "sweep")
    assert doc.criterion == "metric" and len(doc.runs) == 2
    for r in doc.runs:
        ev = EvalFile.read(tmp_path / "sweep" / r.run)
        assert r.status == "ok" and r.metric == "preference_accuracy" and r.steps == 3
        assert r.metric_value == ev.entries["tuned"].value and r.val_loss > 0
    assert doc.best == max(doc.runs, key=lambda r: r.metric_value).run


# Trains the tiny DPO plan on one mesh ("data,fsdp,tensor") into RUN_ROOT and prints its losses.
_MESH = r"""
import json, sys
from pathlib import Path
from conftest import pref_plan
from core.plan import MeshAxes
from runtime.run import train
model_dir, root, spec = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
plan = pref_plan(model_dir, root, objective=sys.argv[4], batch_size=8, grad_accum=2, max_steps=3,
                 epochs=20, lr=3e-2, mesh=MeshAxes(*map(int, spec.split(","))))
train(plan, root / spec.replace(",", "-"))
rows = [json.loads(l) for l in (root / spec.replace(",", "-") / "metrics.jsonl").open()]
print(json.dumps({"losses": [r["loss"] for r in rows if "loss" in r],
                  "margins": [r["rewards/margins"] for r in rows if "loss" in r]}))
"""


@pytest.mark.slow
def test_a_mesh_of_eight_devices_trains_as_one(tiny_chat_dir, tmp_path, objective="dpo"):
    """data 2 × fsdp 2 × tensor 2 on 8 simulated devices: the one-device losses and rewards at
    every step (the reference state laid out like the trained one)."""
    import subprocess
    import sys

    from tests.test_scaling import _env

    out = {}
    for spec, devices in (("1,1,1", 1), ("2,2,2", 8)):
        r = subprocess.run([sys.executable, "-c", _MESH, str(tiny_chat_dir), str(tmp_path), spec,
                            objective], env=_env(devices), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        out[spec] = json.loads(r.stdout.strip().splitlines()[-1])
    one, many = out["1,1,1"], out["2,2,2"]
    assert len(one["losses"]) == 3
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(many["margins"], one["margins"], rtol=1e-4, atol=1e-6)
