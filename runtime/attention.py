"""Causal attention in query blocks, written with XLA's own ops — tune's `runtime.attention=xla`.

A training row's attention is causal (and, in a packed row, kept inside each example): the scores
above the diagonal are computed and then thrown away. This splits the queries into blocks of
`block` rows; the queries of block i attend to the keys up to the end of that block only, so the
upper triangle is skipped in whole blocks and each block's softmax is exact — no running maximum
is needed, because every key a query can see is in its block's key range. With n blocks the score
matrices hold T²·(n+1)/2n elements instead of T² (the plan's memory figure counts them so,
core/packing.attention_blocks), and the products cost as much less.

Grouped-query attention is computed on grouped heads ([B, K, G, T, S] scores for K key/value
heads shared by G query heads each): the keys and values are never repeated G times.

Measured against jax.nn.dot_product_attention (its XLA implementation) by
benchmarks/attention_cost.py; the logit tests compare the model with transformers.

`segment_attention` is `runtime.attention=pallas`: one fused kernel (Pallas's flash attention, a
Triton program on NVIDIA GPUs) that computes the scores block by block in on-chip memory, never
materialising them, and keeps the examples of a packed row apart by their segment ids — what
cuDNN's kernel, which takes a dense [T, T] mask, cannot do cheaply. Off a GPU it runs in Pallas's
interpreter (slowly: that is how the tests check its numbers on a CPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from core.packing import PALLAS_BLOCK, attention_blocks

_MASKED = float(jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def masked_softmax(scores, seen):
    """jax.nn.softmax(jnp.where(seen, scores, _MASKED), axis=-1) in float32 — the same operations, so
    the same values — whose backward pass keeps only the probabilities p: the gradient of the
    scores is p ⊙ (g − Σ p ⊙ g), which is 0 wherever the mask hid a key (p = 0 there), as the
    where's own gradient would make it. Differentiated by autodiff instead (JAX's softmax without its
    custom rule, the default under jax_softmax_custom_jvp=False), a layer keeps the masked scores,
    their exponentials, the probabilities and the broadcast boolean mask, all [B, K, G, T, S], for the
    backward pass: on a CPU the layer scan spends its time writing them out and reading them back."""
    x = jnp.where(seen, scores, _MASKED)
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _masked_softmax_fwd(scores, seen):
    p = masked_softmax(scores, seen)
    return p, p


def _masked_softmax_bwd(p, g):
    return p * (g - jnp.sum(p * g, axis=-1, keepdims=True)), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def soft_cap(x, cap: float | None):
    """cap·tanh(x / cap): Gemma 2's soft-capping of attention scores and logits (None: x)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def causal_attention(q, k, v, mask, *, scale: float, block: int, softcap: float | None = None,
                     window: int = 0):
    """q [B,T,N,H], k and v [B,T,K,H] (N a multiple of K) → [B,T,N,H] in q's dtype.

    mask: [B,1,T,T] bool that is causal already (a query never sees a later key), or None for plain
    causal attention. Scores, softmax and the weighted sum of values accumulate in float32; with
    `softcap` the scaled scores are soft-capped before the mask (as transformers). window > 0: the
    mask also limits each query to the `window` keys up to its own (a sliding-window layer), so a
    block's keys start at its first query's window — the blocks skip the keys before it as they
    skip those after them."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    qg = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)          # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)       # [B, K, T, H]
    outs = []
    for s, e in attention_blocks(T, block):
        lo = max(0, s - window + 1) if window > 0 and mask is not None else 0
        scores = soft_cap(jnp.einsum("bkgth,bksh->bkgts", qg[:, :, :, s:e], kt[:, :, lo:e],
                                     preferred_element_type=jnp.float32) * scale, softcap)
        if mask is None:
            seen = jnp.arange(s, e)[:, None] >= jnp.arange(e)[None, :]       # [t, s]
        else:
            seen = mask[:, :, None, s:e, lo:e]                               # [B, 1, 1, t, s]
        probs = masked_softmax(scores, jnp.broadcast_to(seen, scores.shape))
        outs.append(jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), vt[:, :, lo:e],
                               preferred_element_type=jnp.float32))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q.dtype)


def cached_attention(q, k, v, mask, *, scale: float, softcap: float | None):
    """Decoding's attention over a KV cache with soft-capped scores, which XLA's
    dot_product_attention does not offer: q [B,T,N,H], k and v [B,S,K,H], mask [B,1,T,S] bool
    (a query always sees its own slot) → [B,T,N,H] in q's dtype, on grouped heads."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    scores = soft_cap(jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
                      * scale, softcap)
    probs = jax.nn.softmax(jnp.where(mask[:, :, None], scores, _MASKED), axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)


def segment_attention(q, k, v, segment_ids, *, scale: float):
    """q [B,T,N,H], k and v [B,T,K,H] → [B,T,N,H]: causal attention inside each segment
    (segment_ids [B,T] int32; None: one sequence per row), as Pallas's fused flash-attention
    kernel with its fused backward pass. T is a multiple of PALLAS_BLOCK (the compiler checks).
    The kernel has no grouped heads: keys and values are repeated to the N query heads (their
    gradients are summed back by the repeat's transpose)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_mha

    N, K = q.shape[2], k.shape[2]
    if N != K:
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return pallas_mha.mha(q, k, v, segment_ids, sm_scale=scale, causal=True,
                          block_sizes=pallas_mha.BlockSizes(
                              block_q=PALLAS_BLOCK, block_k=PALLAS_BLOCK, block_q_dkv=32,
                              block_kv_dkv=32, block_q_dq=32, block_kv_dq=32),
                          interpret=jax.default_backend() != "gpu")
