"""The train step: loss normalisation, accumulation, supervision span, what is (not) trained."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import schedule, synthetic_examples
from runtime.batching import Batcher, BatchShape
from runtime.model import EXACT, LoraConfig
from runtime.build import optimizer as make_optimizer
from runtime.train import accumulate, lr_schedule, make_train_step, split_model
from runtime.weights import load_pretrained

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
CHUNK = 16


@pytest.fixture(scope="module")
def split(tiny_llama_dir):
    """(graphdef, lora, frozen) of the tiny model, LoRA B made non-zero so every LoRA leaf has a
    gradient (B starts at zero, which leaves A's gradient zero)."""
    model = load_pretrained(tiny_llama_dir, lora=LORA, rngs=nnx.Rngs(0), compute=EXACT)
    graphdef, lora, frozen = split_model(model)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(lora))))
    lora = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, p.dtype), lora)
    return graphdef, lora, frozen


@pytest.fixture(scope="module")
def acc(split):
    graphdef = split[0]
    return jax.jit(lambda lora, frozen, batch: accumulate(graphdef, lora, frozen, batch, None,
                                                          ce_chunk=CHUNK, dropout=False,
                                                          loss_tokens=None, packed=True))


def _batch(ids, prompt_lens, shape, pack=False, seed=0):
    b = Batcher(ids, prompt_lens, shape, pack=pack, seed=seed)
    assert b.steps_per_epoch == 1
    return {k: jnp.asarray(v) for k, v in b.batch(0, 0).items()}


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


def test_accumulation_equals_one_big_batch(split, acc):
    _, lora, frozen = split
    ids, pl = synthetic_examples(8, seed=3)
    big = _batch(ids, pl, BatchShape(1, 8, 32))
    small = {k: v.reshape(4, 2, 32) for k, v in big.items()}
    l1, n1, g1 = acc(lora, frozen, big)
    l4, n4, g4 = acc(lora, frozen, small)
    assert float(n1) == float(n4) == sum(len(x) - p for x, p in zip(ids, pl))
    np.testing.assert_allclose(float(l4 / n4), float(l1 / n1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        assert float(jnp.max(jnp.abs(b))) > 0
        assert _rel(a / n4, b / n1) < 1e-5
    # and it is not the mean of micro-batch means (micro-batches hold different token counts)
    means = [acc(lora, frozen, {k: v[i:i + 1] for k, v in small.items()}) for i in range(4)]
    assert abs(np.mean([float(l / n) for l, n, _ in means]) - float(l1 / n1)) > 1e-4


def test_packed_loss_equals_unpacked(split, acc):
    _, lora, frozen = split
    ids, pl = synthetic_examples(8, seed=4, max_len=16)
    unpacked = _batch(ids, pl, BatchShape(1, 8, 32), pack=False)
    b = Batcher(ids, pl, BatchShape(1, 4, 32), pack=True, seed=0)
    assert b.rows_per_epoch < 8                      # several examples share rows
    packed = _batch(ids, pl, BatchShape(1, 4, 32), pack=True)
    assert int((packed["segment_ids"].max(axis=-1) > 1).sum()) > 0
    lu, nu, gu = acc(lora, frozen, unpacked)
    lp, np_, gp = acc(lora, frozen, packed)
    assert float(nu) == float(np_)
    np.testing.assert_allclose(float(lp / np_), float(lu / nu), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)):
        assert _rel(a, b) < 1e-4
    # unpacked rows need no segment mask: plain causal attention (what fused kernels take) is exact
    graphdef = split[0]
    causal = jax.jit(lambda lora, frozen, batch: accumulate(graphdef, lora, frozen, batch, None,
                                                            ce_chunk=CHUNK, dropout=False,
                                                            loss_tokens=None, packed=False))
    lc, nc, gc = causal(lora, frozen, unpacked)
    assert float(nc) == float(nu)
    np.testing.assert_allclose(float(lc), float(lu), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gu)):
        assert _rel(a, b) < 1e-5


def test_only_the_response_is_supervised(split, acc):
    _, lora, frozen = split
    ids, pl = synthetic_examples(4, seed=5)
    batch = _batch(ids, pl, BatchShape(1, 4, 32))
    mask = np.asarray(batch["loss_mask"])
    seg = np.asarray(batch["segment_ids"])
    # the mask is exactly the response targets: row r supervises len - prompt_len targets, the last ones
    tokens = np.asarray(batch["tokens"])[0]
    for x, p in zip(ids, pl):
        r = next(r for r in range(4) if np.array_equal(tokens[r, :len(x) - 1], x[:-1]))
        want = np.zeros(32, bool)
        want[p - 1:len(x) - 1] = True
        assert (mask[0, r].astype(bool) == want).all()
    base, n, _ = acc(lora, frozen, batch)
    tgt = np.asarray(batch["targets"]).copy()
    prompt_targets = (mask == 0) & (seg > 0)
    tgt[prompt_targets] = (tgt[prompt_targets] + 7) % 96
    same, _, _ = acc(lora, frozen, dict(batch, targets=jnp.asarray(tgt)))
    assert float(same) == pytest.approx(float(base), rel=1e-6)
    tgt = np.asarray(batch["targets"]).copy()
    r, t = np.argwhere(mask == 1)[0][1:]
    tgt[0, r, t] = (tgt[0, r, t] + 7) % 96
    changed, _, _ = acc(lora, frozen, dict(batch, targets=jnp.asarray(tgt)))
    assert abs(float(changed) - float(base)) > 1e-4


def _fresh(tiny_llama_dir):
    model = load_pretrained(tiny_llama_dir, lora=LORA, rngs=nnx.Rngs(0), compute=EXACT)
    return split_model(model)


def test_steps_lower_the_loss_and_train_only_lora(tiny_llama_dir):
    graphdef, lora, frozen = _fresh(tiny_llama_dir)
    frozen_before = jax.tree.map(np.array, frozen)
    lora_leaves = jax.tree_util.tree_flatten_with_path(lora)[0]
    opt, lr_fn = make_optimizer(schedule(12, lr=1e-2, lr_schedule="constant"))
    opt_state = opt.init(lora)
    # the optimizer holds state for the LoRA leaves only: moments shaped exactly like them
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(lora)
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    n_opt = sum(np.size(x) for x in jax.tree.leaves(opt_state))
    assert n_opt < 2 * sum(x.size for x in jax.tree.leaves(lora)) + 8 < n_frozen
    assert all("lora" in jax.tree_util.keystr(p).lower() for p, _ in lora_leaves)

    step = make_train_step(graphdef, opt, lr_fn, ce_chunk=CHUNK, dropout=False, loss_tokens=None, packed=True)
    ids, pl = synthetic_examples(8, seed=6)
    batch = _batch(ids, pl, BatchShape(2, 4, 32))
    rng = jax.random.PRNGKey(0)
    losses = []
    for s in range(12):
        lora, opt_state, m = step(lora, opt_state, frozen, batch, rng, jnp.int32(s))
        losses.append(float(m["loss"]))
        assert float(m["n_tokens"]) == sum(len(x) - p for x, p in zip(ids, pl))
    assert losses[-1] < losses[0] - 0.1, losses
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
        assert np.array_equal(np.asarray(a), b)


def test_dropout_is_a_function_of_the_step(tiny_llama_dir):
    lora_cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.3, targets=("q_proj", "v_proj"))
    model = load_pretrained(tiny_llama_dir, lora=lora_cfg, rngs=nnx.Rngs(0), compute=EXACT)
    graphdef, lora, frozen = split_model(model)
    lora = jax.tree.map(lambda p: p + 0.1, lora)
    opt, lr_fn = make_optimizer(schedule(4))
    step = make_train_step(graphdef, opt, lr_fn, ce_chunk=CHUNK, dropout=True, donate=False,
                           loss_tokens=None, packed=True)
    batch = _batch(*synthetic_examples(4, seed=7), BatchShape(1, 4, 32))
    rng = jax.random.PRNGKey(3)
    s = opt.init(lora)
    a = step(lora, s, frozen, batch, rng, jnp.int32(5))[2]["loss"]
    b = step(lora, s, frozen, batch, rng, jnp.int32(5))[2]["loss"]
    c = step(lora, s, frozen, batch, rng, jnp.int32(6))[2]["loss"]
    assert float(a) == float(b) and float(a) != float(c)


def test_lr_schedule():
    f = lr_schedule(1.0, 4, 20, "cosine")
    lrs = [float(f(s)) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert 0 < lrs[-1] < 0.05
    g = lr_schedule(2.0, 0, 10, "linear")
    assert float(g(0)) == pytest.approx(2.0) and float(g(5)) == pytest.approx(1.0)
    assert float(lr_schedule(2.0, 2, 10, "constant")(9)) == pytest.approx(2.0)


def test_mesh_from_the_plan():
    from core.errors import PlanError
    from core.plan import MeshAxes
    from runtime.mesh import frozen_spec, make_mesh

    assert dict(make_mesh(MeshAxes(1, 1, 1)).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(PlanError, match="needs 4 devices, but jax sees 1"):
        make_mesh(MeshAxes(2, 2, 1))
    assert frozen_spec((30, 576, 1536), 4, stacked=True) == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert frozen_spec((49152, 576), 4, stacked=False) == jax.sharding.PartitionSpec("fsdp")
    assert frozen_spec((30, 7), 4, stacked=True) == jax.sharding.PartitionSpec()
    assert frozen_spec((576,), 1, stacked=False) == jax.sharding.PartitionSpec()


_SHARDED = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from conftest import schedule, synthetic_examples
from core.plan import MeshAxes
from runtime.batching import Batcher, BatchShape
from runtime.mesh import frozen_shardings, make_mesh, put_batch, replicated
from runtime.model import EXACT, LoraConfig
from runtime.build import optimizer as make_optimizer
from runtime.train import make_train_step, split_model
from runtime.weights import load_pretrained

assert jax.device_count() == 4
host = Batcher(*synthetic_examples(16, seed=1), BatchShape(2, 4, 32), pack=True, seed=0).batch(0, 0)
out = []
for spec, devices in ((MeshAxes(1, 1, 1), jax.devices()[:1]), (MeshAxes(2, 2, 1), None)):
    mesh = make_mesh(spec, devices)
    g, lora, frozen = split_model(load_pretrained(sys.argv[1], rngs=nnx.Rngs(0),
                                  lora=LoraConfig(4, 8.0, 0.0, ("q_proj", "v_proj"))))
    frozen = jax.device_put(frozen, frozen_shardings(mesh, frozen))
    if spec.fsdp > 1:
        assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(frozen))
    lora = jax.device_put(lora, replicated(mesh))
    opt, lr_fn = make_optimizer(schedule(10, lr=1e-2))
    state = jax.device_put(opt.init(lora), replicated(mesh))
    step = make_train_step(g, opt, lr_fn, ce_chunk=16, dropout=False, loss_tokens=None, packed=True,
                           state_sharding=replicated(mesh))
    for i in range(2):
        lora, state, m = step(lora, state, frozen, put_batch(host, mesh), jax.random.PRNGKey(0), jnp.int32(i))
    out.append((float(m["loss"]), [np.asarray(x) for x in jax.tree.leaves(lora)]))
(l1, p1), (l4, p4) = out
assert abs(l1 - l4) < 1e-5 * abs(l1), (l1, l4)
assert max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p4)) < 1e-5
print("OK")
"""


def test_sharded_mesh_matches_one_device(tiny_llama_dir):
    """data=2 × fsdp=2 over 4 (simulated) devices: the same steps as one device."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))
    r = subprocess.run([sys.executable, "-c", _SHARDED, str(tiny_llama_dir)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
