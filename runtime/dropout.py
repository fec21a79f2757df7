"""LoRA dropout's keep mask: the same bits as `jax.random.bernoulli`, computed in one fused kernel.

On a CPU, JAX lowers its Threefry-2x32 hash as a rolled loop of five iterations (to keep compile
times short), so every dropout mask makes XLA write and read back two uint32 arrays of the input's
shape five times. In a LoRA training step that is one mask per adapted module and layer: on the
throughput benchmark's configuration (SmolLM2-135M, 8 × 128 tokens, seven adapted modules, rate
0.05) the masks took about 10% of the step's CPU time.

`keep_mask` computes the same function written out, round by round, as plain element-wise
operations, which XLA fuses into one loop over the elements: the same counters (the element's flat
index, as `jax.random.bits` numbers them under `jax_threefry_partitionable`, the default), the same
hash, the same conversion of the bits to a float in [0, 1) as `jax.random.uniform`, the same
comparison as `jax.random.bernoulli` — bit for bit the mask JAX would draw, about 6× faster on
that CPU. Keys of another implementation, the non-partitionable layout, and arrays of 2³² elements
or more go to `jax.random.bernoulli` itself.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, r: int):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 block cipher (20 rounds), as `jax.random`'s threefry2x32 primitive computes
    it: uint32 key words k1, k2 (scalars), uint32 counter words x1, x2 (any one shape)."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = _rotl(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _fused(key, shape) -> bool:
    if not jax.config.jax_threefry_partitionable or math.prod(shape) >= 2 ** 32:
        return False
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape == () and "threefry" in str(jax.random.key_impl(key))
    return key.shape == (2,) and key.dtype == jnp.uint32        # a raw (legacy) threefry key


def keep_mask(key, p: float, shape) -> jax.Array:
    """jax.random.bernoulli(key, p, shape): True with probability p, as a bool array of `shape`."""
    shape = tuple(int(d) for d in shape)
    if not _fused(key, shape):
        return jax.random.bernoulli(key, p, shape)
    k = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    counts = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    b1, b2 = threefry2x32(k[0], k[1], jnp.zeros(shape, jnp.uint32), counts)
    bits = b1 ^ b2                              # jax.random.bits' 32-bit words
    # jax.random.uniform: 23 random mantissa bits under the exponent of 1.0, minus 1
    u = lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
    return u < jnp.float32(p)
