"""LoRA dropout's fused keep mask (runtime/dropout.py) against jax.random.bernoulli: the same bits,
so training with dropout draws the masks it drew before the mask was fused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.dropout import keep_mask, threefry2x32


@pytest.mark.parametrize("shape", [(8, 128, 576), (3, 5, 7), (1,), (2, 1, 33)])
@pytest.mark.parametrize("p", [0.95, 0.5, 0.1])
def test_keep_mask_is_jax_bernoulli(shape, p):
    for key in jax.random.split(jax.random.key(7), 3):
        want = jax.random.bernoulli(key, p, shape)
        got = jax.jit(keep_mask, static_argnums=(1, 2))(key, p, shape)
        assert got.shape == shape and got.dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_raw_key_and_eager_call():
    key = jax.random.PRNGKey(3)              # a legacy uint32[2] key
    np.testing.assert_array_equal(np.asarray(keep_mask(key, 0.9, (4, 64))),
                                  np.asarray(jax.random.bernoulli(key, 0.9, (4, 64))))


def test_threefry_known_answer():
    # Threefry-2x32, 20 rounds: the Random123 known-answer vectors
    # (key 0, counter 0 → 0x6b200159 0x99ba4efe; all ones → 0x1cb996fc 0xbb002be7)
    z = np.uint32(0)
    assert [int(v) for v in threefry2x32(z, z, jnp.uint32(0), jnp.uint32(0))] == [0x6B200159,
                                                                                0x99BA4EFE]
    f = np.uint32(0xFFFFFFFF)
    assert [int(v) for v in threefry2x32(f, f, jnp.uint32(f), jnp.uint32(f))] == [0x1CB996FC,
                                                                                0xBB002BE7]


def test_other_key_impl_falls_back():
    key = jax.random.key(5, impl="rbg")
    np.testing.assert_array_equal(np.asarray(keep_mask(key, 0.8, (16, 16))),
                                  np.asarray(jax.random.bernoulli(key, 0.8, (16, 16))))


def test_mask_rate():
    m = np.asarray(keep_mask(jax.random.key(0), 0.95, (512, 576)))
    assert abs(m.mean() - 0.95) < 0.002


def test_dropped_lora_a_keeps_x_once_and_matches_autodiff():
    from runtime.model import _dropped_a
    rate = 0.1
    kx, ka, *km = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(kx, (2, 8, 32))
    a = jax.random.normal(ka, (3, 4, 32))
    keeps = [keep_mask(k, 1 - rate, x.shape) for k in km[:3]]

    def ours(x, a):         # q, k and v: one input, three masks
        return sum((_dropped_a(x, keeps[i], a[i], rate) ** 2).sum() for i in range(3))

    def plain(x, a):
        return sum((jnp.einsum("...i,ri->...r", jnp.where(keeps[i], x / (1 - rate), 0), a[i])
                    ** 2).sum() for i in range(3))

    for g, w in zip(jax.grad(ours, (0, 1))(x, a), jax.grad(plain, (0, 1))(x, a)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    _, backward = jax.vjp(ours, x, a)
    kept = [v for v in jax.tree.leaves(backward) if v.shape == x.shape and v.dtype == x.dtype]
    assert len(kept) == 1           # x once, not a dropped copy per module
