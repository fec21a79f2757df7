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
