"""Cross-entropy without the [B, T, V] float32 logits, and only where the loss is.

For SmolLM2 (V = 49152) at B·T = 16k tokens the full float32 logits are 3.2 GB, and autodiff would keep
them for the backward pass. Instead the flattened tokens are scanned in chunks: each chunk's logits are
made, reduced to (logsumexp − target logit), and dropped; `jax.checkpoint` on the chunk function makes
the backward pass recompute a chunk's logits rather than store them. Peak extra memory: chunk × V.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from runtime.attention import soft_cap


def chunked_cross_entropy(hidden, lm_head_w, targets, mask, chunk: int, softcap=None):
    """hidden [B,T,D] (compute dtype), lm_head_w [V,D], targets [B,T] int, mask [B,T] bool/float,
    chunk: tokens per chunk. Returns (Σ mask·CE as a float32 scalar, Σ mask as float32).
    Logits are accumulated in float32 from the compute-dtype matmul (and soft-capped by `softcap`,
    the model's final_softcap); logsumexp in float32. Targets under mask 0 may be anything (e.g.
    -100)."""
    B, T, D = hidden.shape
    n = B * T
    chunk = max(1, min(int(chunk), n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = hidden.reshape(n, D)
    m = mask.reshape(n).astype(jnp.float32)
    t = jnp.where(m > 0, targets.reshape(n), 0).astype(jnp.int32)   # never gather out of range
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad))
        m = jnp.pad(m, (0, pad))
    h = h.reshape(n_chunks, chunk, D)
    t = t.reshape(n_chunks, chunk)
    m = m.reshape(n_chunks, chunk)
    w = lm_head_w.astype(hidden.dtype)

    @jax.checkpoint
    def chunk_loss(w, h, t, m):
        logits = soft_cap(jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32),
                          softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(m > 0, (lse - target_logit) * m, 0.0))

    def body(total, xs):
        return total + chunk_loss(w, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, m))
    return total, jnp.sum(m)


def supervised_cross_entropy(hidden, lm_head_w, targets, mask, *, capacity: int, chunk: int,
                             softcap=None):
    """chunked_cross_entropy over the supervised positions only: they are gathered (in order) into a
    buffer of `capacity` positions — an upper bound the compiler computed from the data
    (compiler/packing.supervised_capacity) — so the output head, forward and backward, runs on
    `capacity` tokens instead of all B·T (for classification, a few percent of them). The same
    sums; only the order of the additions differs. A capacity of B·T or more gathers nothing.
    A float mask weighs each position's CE (data.balance=weighted): (Σ w·CE, Σ w)."""
    B, T, D = hidden.shape
    if capacity >= B * T:
        return chunked_cross_entropy(hidden, lm_head_w, targets, mask, chunk, softcap)
    m = mask.reshape(-1)
    flat = m > 0
    idx = jnp.nonzero(flat, size=capacity, fill_value=0)[0]
    valid = jnp.arange(capacity) < jnp.sum(flat)
    h = hidden.reshape(B * T, D)[idx]
    t = targets.reshape(-1)[idx]
    w = jnp.where(valid, m[idx].astype(jnp.float32), 0.0)    # a float mask keeps its weights
    return chunked_cross_entropy(h[None], lm_head_w, t[None], w[None], chunk, softcap)


def head_cross_entropy(hidden, head_w, head_label, *, capacity: int, weight=None):
    """The classification head's loss (adapter.head=classifier, runtime/head.py): hidden [B,T,D]
    (compute dtype), head_w [n, D], head_label [B,T] int — k + 1 at an example's last prompt token
    when its label is k, 0 elsewhere — and weight [B,T] float or None: each position's loss weight
    (data.balance=weighted's `loss_weight`, its example's class weight where a target is
    supervised — as the last prompt token's is: it predicts the answer's first token).
    Returns (Σ w·CE, Σ w) over the marked positions as float32 scalars (w = 1 without weights):
    their ratio is the (weighted) mean over the examples.
    The marked positions are gathered first into a buffer of `capacity` (an example has at least
    one supervised target, so the plan's runtime.loss_tokens bounds them), so the head runs on those
    only; a capacity of B·T or more gathers nothing."""
    B, T, D = hidden.shape
    h, label = hidden.reshape(B * T, D), head_label.reshape(B * T)
    w = jnp.ones((B * T,), jnp.float32) if weight is None else weight.reshape(B * T).astype(
        jnp.float32)
    if capacity < B * T:
        idx = jnp.nonzero(label > 0, size=capacity, fill_value=0)[0]
        valid = jnp.arange(capacity) < jnp.sum(label > 0)
        h, label, w = h[idx], jnp.where(valid, label[idx], 0), w[idx]
    logits = jnp.einsum("nd,kd->nk", h, head_w.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    k = jnp.maximum(label - 1, 0)
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, k[:, None], axis=-1)[:, 0]
    w = jnp.where(label > 0, w, 0.0)
    return jnp.sum(w * ce), jnp.sum(w)
