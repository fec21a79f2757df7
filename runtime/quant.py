"""Frozen base weights stored quantised (adapter.quantize), dequantised inside the matmul.

- int8: symmetric per output channel. Row r of W [out, in] is stored as int8 codes q and one float32
  scale s_r = max|W_r| / 127; W ≈ q · s. Error per weight ≤ s_r / 2.
- nf4: 4-bit NormalFloat as in the QLoRA paper (and bitsandbytes): the weight, flattened row-major,
  is cut into blocks of 64; each block is divided by its absolute maximum (kept in float32) and every
  value replaced by the nearest of 16 levels that are quantiles of a standard normal (the table
  below, bitsandbytes' own). Two codes per byte. Error per weight ≤ absmax · (largest gap between
  levels) / 2 = 0.152 · absmax. The absmax is not itself quantised (no "double quantisation"): 4.5
  bits per weight instead of 4.127.

Both work on stacked weights [..., out, in] (the leading axes are the layers): quantising runs on the
host (numpy) while weights load, one tensor at a time, so the float weights never reach the device;
dequantising is jnp, inside the jitted step. The LoRA factors are never quantised.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "nf4")
BLOCK = 64
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                0.44070982933044434, 0.5626170039176331, 0.7229568362236023, 1.0], np.float32)
# Largest distance from any value in [-1, 1] to its nearest level, as a fraction of the absmax.
NF4_MAX_ERROR = float(np.max(np.diff(NF4)) / 2)


def stored_shapes(fmt: str, d_out: int, d_in: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(codes shape, scales shape) of one [d_out, d_in] weight."""
    if fmt == "int8":
        return (d_out, d_in), (d_out,)
    if fmt == "nf4":
        blocks = math.ceil(d_out * d_in / BLOCK)
        return (blocks * BLOCK // 2,), (blocks,)
    raise ValueError(f"unknown quantisation {fmt!r}; expected one of {', '.join(FORMATS)}")


def stored_bytes(fmt: str, d_out: int, d_in: int) -> int:
    codes, scales = stored_shapes(fmt, d_out, d_in)
    return math.prod(codes) + 4 * math.prod(scales)        # one-byte codes, float32 scales


def quantize(w: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """W [..., out, in] (any float dtype) → (codes, scales): int8 [..., out, in] + float32 [..., out],
    or packed uint8 [..., blocks·32] + float32 [..., blocks]."""
    w = np.asarray(w, np.float32)
    lead, (d_out, d_in) = w.shape[:-2], w.shape[-2:]
    if fmt == "int8":
        absmax = np.abs(w).max(axis=-1)
        scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale[..., None]), -127, 127).astype(np.int8)
        return q, scale
    if fmt != "nf4":
        raise ValueError(f"unknown quantisation {fmt!r}; expected one of {', '.join(FORMATS)}")
    _, (blocks,) = stored_shapes(fmt, d_out, d_in)
    flat = w.reshape(*lead, d_out * d_in)
    pad = blocks * BLOCK - d_out * d_in
    flat = np.pad(flat, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, blocks, BLOCK)
    absmax = np.abs(flat).max(axis=-1)
    absmax = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
    normed = flat / absmax[..., None]
    # nearest level: the levels are sorted, so compare with the midpoints between them
    idx = np.searchsorted((NF4[1:] + NF4[:-1]) / 2, normed).astype(np.uint8)
    idx = idx.reshape(*lead, blocks * BLOCK)
    packed = (idx[..., 0::2] << 4) | idx[..., 1::2]
    return packed.astype(np.uint8), absmax


def dequantize(codes, scales, fmt: str, shape: tuple[int, int], dtype=jnp.float32):
    """(codes, scales) of [..., out, in] → the weight in `dtype` (jnp; also right for numpy input)."""
    d_out, d_in = shape
    if fmt == "int8":
        return (codes.astype(jnp.float32) * scales[..., None]).astype(dtype)
    hi = (codes >> 4).astype(jnp.int32)
    lo = (codes & 15).astype(jnp.int32)
    idx = jnp.stack([hi, lo], axis=-1).reshape(*codes.shape[:-1], -1)
    lead = codes.shape[:-1]
    values = jnp.asarray(NF4)[idx].reshape(*lead, -1, BLOCK) * scales[..., None]
    return values.reshape(*lead, -1)[..., :d_out * d_in].reshape(*lead, d_out, d_in).astype(dtype)


def error_bound(w: np.ndarray, fmt: str) -> np.ndarray:
    """Per-weight bound on |W − dequantize(quantize(W))| (float32, W's shape): half a quantisation
    step of the weight's row (int8) or block (nf4)."""
    w = np.asarray(w, np.float32)
    if fmt == "int8":
        return np.broadcast_to(np.abs(w).max(axis=-1, keepdims=True) / 127.0 / 2, w.shape)
    lead, (d_out, d_in) = w.shape[:-2], w.shape[-2:]
    _, (blocks,) = stored_shapes(fmt, d_out, d_in)
    flat = np.pad(w.reshape(*lead, -1), [(0, 0)] * len(lead) + [(0, blocks * BLOCK - d_out * d_in)])
    absmax = np.abs(flat.reshape(*lead, blocks, BLOCK)).max(axis=-1, keepdims=True)
    bound = np.broadcast_to(absmax * NF4_MAX_ERROR, (*lead, blocks, BLOCK)).reshape(*lead, -1)
    return bound[..., :d_out * d_in].reshape(w.shape)
