"""Causal attention in query blocks (runtime/attention.py) against jax.nn.dot_product_attention:
values and gradients, plain causal and packed (segment) masks, grouped-query heads, partial blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compiler import estimates
from core import packing
from runtime.attention import causal_attention

B, T, N, K, H = 2, 23, 6, 2, 8


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), dtype)
    k = jax.random.normal(keys[1], (B, T, K, H), dtype)
    v = jax.random.normal(keys[2], (B, T, K, H), dtype)
    w = jax.random.normal(keys[3], (B, T, N, H), jnp.float32)          # a loss that weighs every output
    return q, k, v, w


def _packed_mask():
    """Row 0: segments of 9, 10 and 4 padding tokens (padding attends to padding); row 1: 23 + 0."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :9], seg[0, 9:19] = 1, 2
    seg[1, :] = 1
    causal = np.tril(np.ones((T, T), bool))
    return jnp.asarray((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def _loss(fn, w):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [0, 4, 8, 64])       # whole rows; blocks (the last partial); one
def test_blocks_equal_whole_row_attention(block, masked):
    q, k, v, w = _inputs()
    mask = _packed_mask() if masked else None
    scale = H ** -0.5

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, scale=scale)

    def blocked(q, k, v):
        return causal_attention(q, k, v, mask, scale=scale, block=block)

    np.testing.assert_allclose(blocked(q, k, v), reference(q, k, v), atol=2e-6, rtol=0)
    ref_grads = jax.jit(jax.grad(_loss(reference, w), argnums=(0, 1, 2)))(q, k, v)
    grads = jax.jit(jax.grad(_loss(blocked, w), argnums=(0, 1, 2)))(q, k, v)
    for g, g0 in zip(grads, ref_grads):
        np.testing.assert_allclose(g, g0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", [4, 8])
def test_window_blocks_skip_the_keys_before_the_window(block):
    """A sliding window of 6 in the mask: blocks that start their keys at their first query's window
    give the whole-row result and gradients, and never read a key before it (values there are NaN,
    which a product with a zero probability would still spread)."""
    q, k, v, w = _inputs()
    window, scale = 6, H ** -0.5
    i = np.arange(T)
    mask = _packed_mask() & jnp.asarray((i[:, None] - i[None, :]) < window)[None, None]

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)

    def skipping(q, k, v):
        return causal_attention(q, k, v, mask, scale=scale, block=block, window=window)

    np.testing.assert_allclose(skipping(q, k, v), reference(q, k, v), atol=2e-6, rtol=0)
    for g, g0 in zip(jax.grad(_loss(skipping, w), argnums=(0, 1, 2))(q, k, v),
                     jax.grad(_loss(reference, w), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, g0, atol=1e-5, rtol=0)
    # the last block's queries see no key before T - block - window + 1: poison those values
    first = (T - 1) // block * block - window + 1
    poisoned = v.at[:, :first].set(jnp.nan)
    last = slice((T - 1) // block * block, T)
    assert np.isfinite(np.asarray(skipping(q, k, poisoned)[:, last])).all()
    assert not np.isfinite(np.asarray(causal_attention(q, k, poisoned, mask, scale=scale,
                                                       block=block)[:, last])).all()


def test_bfloat16_operands_keep_float32_scores():
    q, k, v, _ = _inputs(jnp.bfloat16)
    out = causal_attention(q, k, v, None, scale=H ** -0.5, block=4)
    assert out.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True,
                                       scale=H ** -0.5)
    # bfloat16 keeps 8 bits of mantissa: the probabilities and the output round at about 2^-8
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=0)


def test_blocks_cover_the_row_and_count_the_scores():
    assert packing.attention_blocks(10, 0) == [(0, 10)]
    assert packing.attention_blocks(10, 16) == [(0, 10)]
    assert packing.attention_blocks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    # 4·4 + 4·8 + 2·10 score elements instead of 10·10
    assert packing.scores(10, 4) == 68 and packing.scores(10, 0) == 100
    # the plan's attention memory shrinks by the same factor
    kw = dict(params=10**6, trainable=10**4, layers=4, hidden=64, intermediate=128, heads=4,
              kv_heads=2, head_dim=16, vocab=100, batch=2, seq_len=1024, param_bytes=4,
              compute_bytes=4, remat="none", ce_chunk=64, devices=1, fsdp=1, tensor=1)
    whole = estimates.memory_per_device(**kw, attention_block=0)["attention"]
    blocked = estimates.memory_per_device(**kw, attention_block=128)["attention"]
    assert blocked / whole == pytest.approx(packing.scores(1024, 128) / 1024 ** 2, rel=1e-6)
    assert blocked / whole == pytest.approx(9 / 16)


# --------------------------------------------------------------- runtime.attention=pallas (fused)
# Pallas's flash-attention kernel (a Triton program on a GPU) runs here in Pallas's interpreter:
# the same program, so the same numbers, slowly.

def _segments(T=128):
    """Row 0: examples of 50 and 60 tokens, then 18 of padding (segment 0); row 1: one of 128."""
    seg = np.zeros((2, T), np.int32)
    seg[0, :50], seg[0, 50:110], seg[1] = 1, 2, 1
    return seg


@pytest.mark.parametrize("packed", [False, True])
def test_pallas_segment_attention_equals_xla(packed):
    from runtime.attention import segment_attention

    T, Np, Kp, Hp = 128, 4, 2, 16                     # grouped heads: 2 query heads per key head
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    q = jax.random.normal(keys[0], (2, T, Np, Hp))
    k = jax.random.normal(keys[1], (2, T, Kp, Hp))
    v = jax.random.normal(keys[2], (2, T, Kp, Hp))
    w = jax.random.normal(keys[3], (2, T, Np, Hp))
    seg = _segments(T) if packed else None
    causal = np.tril(np.ones((T, T), bool))
    mask = None if seg is None else jnp.asarray((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    scale = Hp ** -0.5

    def xla(q, k, v):
        return causal_attention(q, k, v, mask, scale=scale, block=64)

    def pallas(q, k, v):
        return segment_attention(q, k, v, None if seg is None else jnp.asarray(seg), scale=scale)

    np.testing.assert_allclose(pallas(q, k, v), xla(q, k, v), atol=2e-6, rtol=0)
    ref = jax.grad(_loss(xla, w), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(_loss(pallas, w), argnums=(0, 1, 2))(q, k, v)
    for g, g0 in zip(got, ref):
        np.testing.assert_allclose(g, g0, atol=2e-5, rtol=0)


def test_pallas_model_equals_xla_model_on_packed_rows(hf_tiny):
    """The whole decoder with runtime.attention=pallas: packed rows, positions restarting in each
    example, padding at the end — the logits of the xla model (itself tested against
    transformers)."""
    from runtime.model import EXACT
    from runtime.weights import load_pretrained

    _, path = hf_tiny("llama")
    seg = _segments()
    starts = np.concatenate([[True], seg[0, 1:] != seg[0, :-1]])
    pos0 = np.arange(128) - np.maximum.accumulate(np.where(starts, np.arange(128), 0))
    positions = jnp.asarray(np.stack([pos0, np.arange(128)]), jnp.int32)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 128)), jnp.int32)
    out = {}
    for attention in ("xla", "pallas"):
        model = load_pretrained(path, compute=EXACT.but(attention=attention))
        out[attention] = np.asarray(model.logits(model(ids, positions=positions,
                                                       segment_ids=jnp.asarray(seg))))
    np.testing.assert_allclose(out["pallas"], out["xla"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="sliding window"):
        model = load_pretrained(hf_tiny("mistral-window")[1], compute=EXACT.but(attention="pallas"))
        model(ids[:, :16])


def test_masked_softmax_matches_jax_softmax_and_keeps_only_probabilities():
    from runtime.attention import _MASKED, masked_softmax
    k1, k2 = jax.random.split(jax.random.key(0))
    s = 3 * jax.random.normal(k1, (2, 3, 16, 16))
    seen = jnp.broadcast_to(jnp.tril(jnp.ones((16, 16), bool)), s.shape)
    g = jax.random.normal(k2, s.shape)
    ref = jax.nn.softmax(jnp.where(seen, s, _MASKED), axis=-1)
    np.testing.assert_array_equal(np.asarray(masked_softmax(s, seen)), np.asarray(ref))
    want = jax.grad(lambda s: (jax.nn.softmax(jnp.where(seen, s, _MASKED), axis=-1) * g).sum())(s)
    got = jax.grad(lambda s: (masked_softmax(s, seen) * g).sum())(s)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
    assert np.all(np.asarray(got)[~np.asarray(seen)] == 0)        # no gradient through a hidden key
    _, backward = jax.vjp(lambda s: masked_softmax(s, seen) * g, s)   # its leaves: what is kept
    assert [x.shape for x in jax.tree.leaves(backward) if x.ndim == 4] == [s.shape, s.shape]  # p, g
