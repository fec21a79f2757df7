"""What only a GPU runs: device detection, the fused attention kernels (cuDNN's; Pallas's, compiled
by Triton) against tune's XLA attention,
bfloat16 logits against transformers, and a whole run through the command line (plan → bfloat16
training → PEFT adapter → evaluation). Skipped without an NVIDIA GPU; the rest of the suite runs
on a GPU too (jax takes it by default), in float32 where it compares with a reference.

    pytest -m gpu          # `make gpu-check` runs these, then benchmarks/gpu.py
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from runtime.attention import causal_attention, segment_attention
from runtime.model import EXACT
from runtime.weights import load_pretrained


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpus(), reason="needs an NVIDIA GPU")]


# ------------------------------------------------------------------------------------- devices

def test_compiler_sees_the_gpus_jax_sees():
    """The compiler finds devices without jax (nvidia-smi); it must find what the runtime gets."""
    from compiler.estimates import detect_devices

    found, gpus = detect_devices(), _gpus()
    assert (found["platform"], found["count"]) == ("gpu", len(gpus))
    kind, jax_kind = found["kind"].lower(), gpus[0].device_kind.lower()
    assert kind in jax_kind or jax_kind in kind, (found["kind"], gpus[0].device_kind)
    limit = (gpus[0].memory_stats() or {}).get("bytes_limit")
    if limit:       # XLA's allocator takes a share of the device's memory, never more
        assert found["memory"] >= limit
    assert found["peak_flops"], f"{found['kind']}: no peak FLOP/s for the step-time estimate"


# ----------------------------------------------------------------------------------- attention

def _qkv(T, *, B=2, N=8, K=2, H=64, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), dtype)
    return q, k, v, jax.random.normal(ks[3], (B, T, N, H), jnp.float32)


def _attention(kind: str, scale: float, segments=None):
    mask = None
    if segments is not None:
        T = segments.shape[1]
        mask = (segments[:, :, None] == segments[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))
        mask = mask[:, None]
    if kind == "pallas":
        return lambda q, k, v: segment_attention(q, k, v, segments, scale=scale)
    if kind == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                            implementation="cudnn")
    return lambda q, k, v: causal_attention(q, k, v, mask, scale=scale, block=128)


@pytest.mark.parametrize("T, packed", [(128, False), (640, False), (640, True)])
def test_fused_attention_matches_xla_attention(T, packed):
    """bfloat16, grouped heads (8 query heads over 2 key/value heads), rows of one block and of
    five: the outputs and the gradients of q, k and v against float32. Packed: row 0 holds
    examples of 200, 300 and 100 tokens and 40 of padding, kept apart by segment ids (cuDNN is
    left out there: tune runs it on rows of one sequence)."""
    q, k, v, dout = _qkv(T)
    scale = 64 ** -0.5
    segments = None
    if packed:
        row = np.concatenate([np.full(n, i, np.int32) for i, n in ((1, 200), (2, 300), (3, 100),
                                                                   (0, 40))])
        segments = jnp.asarray(np.stack([row, np.ones(T, np.int32)]))

    def run(kind, *xs):
        fn = _attention(kind, scale, segments)
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * dout)  # noqa: E731
        out = jax.jit(fn)(*xs)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*xs)
        return [np.asarray(a, np.float32) for a in (out, *grads)]

    with jax.default_matmul_precision("highest"):
        ref = run("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    for kind in ("xla", "pallas") if packed else ("xla", "cudnn", "pallas"):
        got = run(kind, q, k, v)
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
            err = np.abs(g - r).max() / np.abs(r).max()
            assert err < 2e-2, f"{kind} {name}: max error {err:.3g} of the largest value"


# -------------------------------------------------------------------------------------- logits

def _ids(B=2, T=64, vocab=128, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral-window", "smollm-tied"])
def test_float32_logits_on_gpu_match_transformers(hf_tiny, kind):
    ref_model, path = hf_tiny(kind)
    ids = _ids()
    with jax.default_matmul_precision("highest"):
        model = load_pretrained(path)
        got = np.asarray(model.logits(model(jnp.asarray(ids))))
    np.testing.assert_allclose(got, _torch_logits(ref_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_bfloat16_logits_with_either_attention_match_transformers(hf_tiny, kind):
    """What a GPU plan runs by default: bfloat16 weights and compute, cuDNN attention when rows
    hold one sequence; against transformers in float32 on the CPU."""
    ref_model, path = hf_tiny(kind)
    ids = _ids()
    ref = _torch_logits(ref_model, ids)
    got = {}
    for attention in ("xla", "cudnn"):
        model = load_pretrained(path, compute=EXACT.but(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                          attention=attention))
        got[attention] = np.asarray(model.logits(model(jnp.asarray(ids))), np.float32)
    scale = np.abs(ref).max()
    for attention, logits in got.items():
        assert np.abs(logits - ref).max() < 0.05 * scale, attention
        assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.9, attention
    assert np.abs(got["xla"] - got["cudnn"]).max() < 0.02 * scale


# ------------------------------------------------------------------------- a whole run, via CLI

WORDS = [f"w{i}" for i in range(20, 50)]
CLASSES = {"w60": WORDS[:10], "w61": WORDS[10:20], "w62": WORDS[20:]}


def _rows(n, seed):
    """text: five words; label: the class most of them come from (learnable from the words)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = list(CLASSES)[i % 3]
        words = list(rng.choice(CLASSES[label], 4)) + [str(rng.choice(WORDS))]
        rows.append({"text": " ".join(rng.permutation(words)), "label": label})
    return rows


@pytest.fixture(scope="module")
def chat_model_dir(hf_tiny, tiny_chat_dir, tmp_path_factory):
    """hf_tiny's Llama (weights drawn large enough for its head to say something after a few LoRA
    steps) with tiny_chat_dir's word-level tokenizer and chat template."""
    import shutil

    out = tmp_path_factory.mktemp("gpu-chat")
    for src in (hf_tiny("llama")[1], tiny_chat_dir):
        for f in src.iterdir():
            if f.suffix in (".json", ".safetensors") and not (out / f.name).exists():
                shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def gpu_run(tmp_path, monkeypatch, capsys, chat_model_dir):
    """gpu_run(*overrides) -> run dir: `tune` in-process on a tiny chat model, with a three-class
    table of its words; fails unless it exits 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNE_RECIPE_PATH", raising=False)
    for name, n, seed in (("train.jsonl", 240, 0), ("test.jsonl", 30, 1)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
    from tune.cli import main

    def run(*overrides, name="run"):
        capsys.readouterr()
        rc = main([f"model.path={chat_model_dir}", f"data.path={tmp_path / 'train.jsonl'}",
                   f"data.test_path={tmp_path / 'test.jsonl'}", "data.max_length=32",
                   "template.prompt='Q {text} A'", "schedule.batch_size=4", "schedule.lr=5e-3",
                   "schedule.epochs=2", "eval.max_new_tokens=2", f"hydra.run.dir={tmp_path / name}",
                   *overrides])
        out, err = capsys.readouterr()
        assert rc == 0, out + err
        return tmp_path / name

    return run


@pytest.mark.parametrize("attention, overrides", [
    ("xla", ["runtime.pack=true"]),
    ("cudnn", ["runtime.pack=false"]),
    ("pallas", ["runtime.attention=pallas", "data.max_length=128", "schedule.batch_size=1"])])
def test_run_on_gpu_trains_in_bfloat16_and_exports(gpu_run, chat_model_dir, attention, overrides):
    """A GPU plan resolves to bfloat16, and to cuDNN attention for rows of one sequence (XLA's for
    packed rows unless Pallas's kernel is asked for); the run learns the task, and its adapter in
    PEFT (float32, CPU) gives the logits tune gives on the GPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.plan import Plan
    from runtime.build import scoring_model as load_model

    run_dir = gpu_run(*overrides, name=f"run-{attention}")
    text = (run_dir / "plan.json").read_text()
    rt = json.loads(text)["runtime"]
    assert (rt["devices"]["platform"], rt["dtype"], rt["attention"]) == ("gpu", "bfloat16", attention)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    plan = Plan.from_json(text)
    assert len(losses) == plan.schedule.total_steps and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])

    result = json.loads((run_dir / "eval.json").read_text())
    assert result["tuned"]["value"] > max(result["base"]["value"], 0.6)

    ids = _ids(B=2, T=24, vocab=96)
    model = load_model(plan, run_dir / "adapter")
    got = np.asarray(model.logits(model(jnp.asarray(ids))), np.float32)
    base = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32)
    ref = _torch_logits(PeftModel.from_pretrained(base, run_dir / "adapter").eval(), ids)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
