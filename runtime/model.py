"""One NNX decoder for the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM), Gemma 2/3 and
Phi-3.

The differences between these models are a handful of switches of the `ModelConfig` the compiler read
from the Hugging Face config.json (core/architecture.py): grouped-query attention, RoPE scaling,
tied embeddings, q/k/v biases (Qwen2), per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3),
sliding-window attention (some Mistral / Qwen configs, Gemma's local layers); and Gemma's scaled
embedding, (1 + w) norms, GELU gate, sandwich norms, query_pre_attn_scalar, soft-capped scores and
logits (Gemma 2) and second RoPE base for the local layers (Gemma 3); Phi-3's fused qkv_proj and
gate_up_proj, partial rotary embedding and LongRoPE. Everything else is one code path, written to
match `transformers` to ~1e-5 in float32.

Layout. Parameters keep the Hugging Face orientation, so loading and exporting are copies, not
transposes: a linear layer's `weight` is [out, in], LoRA's `lora_A` is [r, in] and `lora_B` [out, r]
(PEFT's shapes), the embedding and the untied output head are [V, D]. The decoder layers are ONE
`Block` whose every variable carries a leading layer axis [L, ...]; the forward pass scans over that
axis with `jax.lax.scan`, so XLA compiles one layer instead of L (compile time independent of depth),
and the remat policy wraps the scanned body.

State paths mirror the Hugging Face names: `layers/self_attn/q_proj/weight` holds
`model.layers.{i}.self_attn.q_proj.weight` for every i (see runtime/weights.py).

Everything the trainer differentiates and optimises is a `LoRAParam`: the LoRA factors, DoRA's
magnitude vectors, and the existing weights of modules trained in full (adapter.train_modules), which
are `FullParam`, a subclass, as is a classification head's new layer (`score`, adapter.head).
Every other weight is a plain `nnx.Param`, frozen:
`graphdef, trained, frozen = nnx.split(model, LoRAParam, ...)`.

Adapter kinds. LoRA: y = W x + b + s·B A x, s = alpha/r (or alpha/√r, rsLoRA). DoRA (Liu et al. 2024,
as PEFT computes it): y = (m / ‖W + s·B A‖) ⊙ (W x + s·B A x) + b, with the row norms ‖·‖ of the
adapted weight treated as a constant in the backward pass (the paper's §4.3, PEFT's `.detach()`), and
the magnitude m [out] starting at ‖W‖ so the adapted model starts as the base. Quantised base weights
(adapter.quantize, runtime/quant.py) are dequantised inside the matmul and never kept for the
backward pass.

Precision. Everything computes in the compute dtype (`dtype`), norms and softmax in float32. With
`matmul_dtype=bfloat16` under float32 compute, the frozen weights' products (and their input
gradients) take bfloat16 operands and return float32 (`mixed_matmul`): on a CPU with native bfloat16
dot products that is about 3× faster than float32, and the rest of the step is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from core.architecture import LINEAR_NAMES, ModelConfig, full_module_names, lora_scale
from runtime import quant
from runtime.dropout import keep_mask
from runtime.attention import cached_attention, causal_attention, segment_attention, soft_cap

REMAT_POLICIES = ("none", "dots", "full")
ATTENTION = ("xla", "cudnn", "pallas")

# The one trainable variable type. Flax ships it as a subclass of nnx.Param; it is re-exported here so
# that the model, the trainer and the exporter all name the same class.
LoRAParam = nnx.LoRAParam
ADAPTER_KINDS = ("lora", "dora", "full")    # full: no LoRA targets, every module in train_modules
QUANTIZE = ("none",) + quant.FORMATS


class FullParam(LoRAParam):
    """An existing weight trained in full alongside the adapters (adapter.train_modules). A LoRAParam
    subclass, so every split that takes the trainable state takes it too; exported as PEFT's
    `modules_to_save`."""


# ----------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class ComputeSpec:
    """How the model computes, one frozen value (runtime/build.compute_spec makes it from a plan's
    runtime section; nothing else does): dtype, the compute dtype; param_dtype, the frozen weights'
    storage; matmul_dtype, the operand dtype of the frozen weights' products (None: the compute
    dtype; bfloat16 under float32 compute multiplies in bfloat16 with float32 results —
    mixed_matmul — while norms, attention, softmax, residuals and LoRA stay float32); remat, the
    layer's rematerialisation policy; attention, the kernel for training and scoring (decoding with
    a cache uses XLA's); attention_block, query rows per causal block of the xla kernel (0: whole
    rows)."""
    dtype: object
    param_dtype: object
    matmul_dtype: object
    remat: str
    attention: str
    attention_block: int

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; expected one of "
                             f"{', '.join(REMAT_POLICIES)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown attention {self.attention!r}; expected one of "
                             f"{', '.join(ATTENTION)}")

    def but(self, **changes) -> "ComputeSpec":
        import dataclasses

        return dataclasses.replace(self, **changes)


# The exact float32 reference — what the tests compare with transformers and PEFT, and what a model
# built outside a plan (a test, a benchmark) computes unless told otherwise. Not a plan's default:
# every plan-driven model is built by runtime/build.py from the plan's own spec.
EXACT = ComputeSpec(dtype=jnp.float32, param_dtype=jnp.float32, matmul_dtype=None, remat="none",
                    attention="xla", attention_block=0)


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]            # linear modules of the model (ModelConfig.linear_names)
    rslora: bool = False                # rank-stabilised: scale alpha / sqrt(rank)
    kind: str = "lora"                  # lora | dora
    train_modules: tuple[str, ...] = ()  # existing modules trained in full (architecture.full_module_names)
    quantize: str = "none"              # none | int8 | nf4: how the frozen linear weights are stored
    head: int = 0                       # labels of a classification head (adapter.head=classifier;
                                        # 0: none): a trained [head, hidden] layer, `score`

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in LINEAR_NAMES]
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; expected a subset of {list(LINEAR_NAMES)}")
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; expected one of {ADAPTER_KINDS}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"unknown quantisation {self.quantize!r}; expected one of {QUANTIZE}")
        both = sorted(set(self.targets) & set(self.train_modules))
        if both:
            raise ValueError(f"{both} are both LoRA targets and trained in full")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)


# ------------------------------------------------------------------------------------ small pieces

def _dropped(x, keep, rate: float):
    """Dropout of x by its keep mask (runtime/dropout.keep_mask: jax.random.bernoulli's, fused)."""
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _dropped_a(x, keep, a, rate: float):
    return jnp.einsum("...i,ri->...r", _dropped(x, keep, rate), a)


# LoRA's A(dropout(x)): the backward pass redoes the (cheap) dropping from x and the mask instead of
# keeping a dropped copy of x per adapted module — q, k and v drop the same x with three masks, and
# x is kept once for all three.
_dropped_a = jax.checkpoint(_dropped_a, static_argnums=(3,))


def lora_a_init(key, shape):
    """PEFT's init of A [.., r, in]: kaiming_uniform(a=√5) = U(±1/√in). B starts at 0, so the adapted
    model starts exactly as the base model."""
    bound = 1.0 / math.sqrt(shape[-1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


HEAD_INIT = 0.02           # a new classification head starts at N(0, (HEAD_INIT / √hidden)²)


def head_init(key, shape):
    """A new classification head [labels, hidden], float32: small random logits at first, so that
    the adapter gets a gradient from the first step (a zero head would pass none back)."""
    return (HEAD_INIT / math.sqrt(shape[-1])) * jax.random.normal(key, shape, jnp.float32)


def _dequantized_matmul(x, codes, scales, fmt, shape, dtype):
    return jnp.einsum("...i,oi->...o", x, quant.dequantize(codes, scales, fmt, shape, dtype))


# Rematerialised: the backward pass dequantises again instead of keeping every layer's float weight,
# which would undo the memory quantisation saves.
_dequantized_matmul = jax.checkpoint(_dequantized_matmul, static_argnums=(3, 4, 5))


@jax.custom_vjp
def mixed_matmul(x, w):
    """x Wᵀ for a frozen W [out, in] with bfloat16 operands and float32 products (runtime.matmul_dtype:
    bfloat16 under a float32 compute dtype). Both the forward product and the input gradient g W are
    one bfloat16 × bfloat16 → float32 dot — the form XLA:CPU runs on AVX512-BF16 (about 3× its float32
    matmuls) — where autodiff's own transpose would produce a bfloat16 result (no faster than
    float32). W gets no gradient: it is frozen (a module trained in full keeps the plain path)."""
    return jnp.einsum("...i,oi->...o", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32).astype(x.dtype)


MIXED_MATMUL = "mixed_matmul"   # the name its outputs carry, so runtime.remat=dots saves them too


def _mixed_fwd(x, w):
    return mixed_matmul(x, w), w


def _mixed_bwd(w, g):
    # g has the output's dtype, which is x's
    dx = jnp.einsum("...o,oi->...i", g.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32)
    return dx.astype(g.dtype), None


mixed_matmul.defvjp(_mixed_fwd, _mixed_bwd)


def row_norms(w) -> jax.Array:
    """‖W_r‖ for each output row r of W [..., out, in], in float32."""
    w = jnp.asarray(w, jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=-1))


class Linear(nnx.Module):
    """y = x Wᵀ (+ b) + (alpha/r)·B(A(dropout(x))), or DoRA's rescaled form (see the module doc).
    W is [out, in] (torch layout), stored in param_dtype, or quantised (`quantize`: codes in `weight`,
    their scales in `weight_scale`). The LoRA factors and DoRA's magnitude are stored in float32
    whatever the base dtype (they are what the optimiser updates) and cast to the compute dtype for
    the matmul. trained=True: W (and b) are trained in full (FullParam)."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, lora: LoraConfig | None, dtype,
                 param_dtype, rngs: nnx.Rngs, trained: bool = False, quantize: str = "none",
                 matmul_dtype=None):
        self.dtype, self.shape = dtype, (d_out, d_in)
        self.quantize = "none" if trained else quantize
        # bfloat16 operands for a float32 compute dtype: the frozen product goes through mixed_matmul
        self.mixed = (not trained and matmul_dtype is not None
                      and jnp.dtype(matmul_dtype) == jnp.bfloat16 and jnp.dtype(dtype) == jnp.float32)
        param = FullParam if trained else nnx.Param
        key = rngs.params()
        if self.quantize == "int8":      # random codes: a stand-in until real weights are loaded
            self.weight = nnx.Param(jax.random.randint(key, (d_out, d_in), -127, 128, jnp.int8))
            self.weight_scale = nnx.Param(jnp.full((d_out,), 0.02 * 1.7 / 127, jnp.float32))
        elif self.quantize == "nf4":
            codes, scales = quant.stored_shapes("nf4", d_out, d_in)
            self.weight = nnx.Param(jax.random.randint(key, codes, 0, 256, jnp.int32).astype(jnp.uint8))
            self.weight_scale = nnx.Param(jnp.full(scales, 0.05, jnp.float32))
        else:
            self.weight = param(0.02 * jax.random.normal(key, (d_out, d_in), param_dtype))
            self.weight_scale = None
        self.bias = param(jnp.zeros((d_out,), param_dtype)) if bias else None
        if lora is None:
            self.lora_A = self.lora_B = self.lora_magnitude_vector = None
            return
        self.lora_A = LoRAParam(lora_a_init(rngs.params(), (lora.rank, d_in)))
        self.lora_B = LoRAParam(jnp.zeros((d_out, lora.rank), jnp.float32))
        self.scale = lora.scale
        self.rate = lora.dropout
        self.lora_magnitude_vector = LoRAParam(row_norms(self.dense_weight(jnp.float32))) \
            if lora.kind == "dora" else None

    def dense_weight(self, dtype):
        """W [out, in] in `dtype` (dequantised when stored quantised)."""
        if self.weight_scale is None:
            return self.weight[...].astype(dtype)
        return quant.dequantize(self.weight[...], self.weight_scale[...], self.quantize, self.shape,
                                dtype)

    def _base(self, x):
        if self.weight_scale is None:
            if self.mixed:
                return checkpoint_name(mixed_matmul(x, self.weight[...]), MIXED_MATMUL)
            return jnp.einsum("...i,oi->...o", x, self.weight[...].astype(self.dtype))
        return _dequantized_matmul(x, self.weight[...], self.weight_scale[...], self.quantize,
                                   self.shape, self.dtype)

    def delta(self) -> jax.Array:
        """The LoRA update s·B A [out, in] in float32."""
        return self.scale * jnp.einsum("or,ri->oi", self.lora_B[...].astype(jnp.float32),
                                       self.lora_A[...].astype(jnp.float32))

    def __call__(self, x, dropout_key=None):
        x = x.astype(self.dtype)
        base = self._base(x)
        y = base if self.bias is None else base + self.bias[...].astype(self.dtype)
        if self.lora_A is None:
            return y
        dropped = dropout_key is not None and self.rate > 0
        a = self.lora_A[...].astype(self.dtype)
        if dropped:
            keep = keep_mask(dropout_key, 1.0 - self.rate, x.shape)
            h = _dropped_a(x, keep, a, self.rate)
            xd = _dropped(x, keep, self.rate) if self.lora_magnitude_vector is not None else None
        else:
            xd = x
            h = jnp.einsum("...i,ri->...r", x, a)
        h = self.scale * jnp.einsum("...r,or->...o", h, self.lora_B[...].astype(self.dtype))
        if self.lora_magnitude_vector is None:
            return y + h
        # DoRA: m / ‖W + s·BA‖ per output row, the norm a constant for the gradient (as PEFT).
        norm = jax.lax.stop_gradient(row_norms(self.dense_weight(jnp.float32) + self.delta()))
        g = (self.lora_magnitude_vector[...].astype(jnp.float32) / norm).astype(self.dtype)
        # With dropout PEFT rescales the base output of the dropped input (one more matmul).
        return y + (g - 1) * (self._base(xd) if dropped else base) + g * h


class RMSNorm(nnx.Module):
    """Normalised in float32 (as transformers does), whatever the compute dtype; scaled by
    (offset + w): offset 1 for Gemma, whose norms store w around 0."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, trained: bool = False,
                 offset: float = 0.0):
        self.eps, self.dtype, self.offset = eps, dtype, offset
        self.weight = (FullParam if trained else nnx.Param)(
            jnp.full((dim,), 1.0 - offset, param_dtype))

    def __call__(self, x):
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        return ((w + self.offset if self.offset else w) * x).astype(self.dtype)


class Embedding(nnx.Module):
    """Token embeddings [V, D], times `scale` (Gemma's √D, rounded to the weight's dtype first, as
    transformers does)."""

    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 trained: bool = False, scale: float = 1.0):
        self.dtype, self.scale = dtype, scale
        self.weight = (FullParam if trained else nnx.Param)(
            0.02 * jax.random.normal(rngs.params(), (vocab, dim), param_dtype))

    def __call__(self, tokens):
        w = self.weight[...]
        x = jnp.take(w, tokens, axis=0)
        if self.scale != 1.0:
            x = x * jnp.asarray(self.scale, w.dtype)
        return x.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig, *, local: bool = False, long: bool = False) -> np.ndarray:
    """Inverse frequencies [rotary_dim/2], computed in float32 like transformers, incl. its
    scalings. local: those of Gemma 3's sliding layers (cfg.local_rope_theta, unscaled); long:
    LongRoPE's for sequences past the pretraining length (its long_factor; else short_factor)."""
    dim = cfg.rotary_dim or cfg.head_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    scaling = {} if local else dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", "default")
    if kind == "longrope":
        factors = np.asarray(scaling["long_factor" if long else "short_factor"], np.float32)
        return (1.0 / (factors * np.float32(theta) ** exponents)).astype(np.float32)
    inv = (1.0 / (theta ** exponents)).astype(np.float32)
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(positions, inv_freq):
    """cos, sin [B, T, rotary_dim] in float32 for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)     # transformers' half-split layout
    return jnp.cos(angles), jnp.sin(angles)


def model_rope_tables(cfg: ModelConfig, positions, *, local: bool = False):
    """cos, sin of `positions` [B, T] as the model turns them: with LongRoPE (Phi-3), the short or
    the long factors by the furthest position in the call — as transformers picks them by the
    sequence length — and both scaled by its attention_factor."""
    scaling = dict(cfg.rope_scaling or ())
    if local or scaling.get("rope_type") != "longrope":
        return rope_tables(positions, rope_inv_freq(cfg, local=local))
    short = rope_tables(positions, rope_inv_freq(cfg))
    long = rope_tables(positions, rope_inv_freq(cfg, long=True))
    beyond = jnp.max(positions) + 1 > scaling["original_max_position_embeddings"]
    factor = np.float32(scaling["attention_factor"])
    return tuple(jnp.where(beyond, b, a) * factor for a, b in zip(short, long))


def apply_rope(x, cos, sin):
    """x [B, T, N, H]; the "rotate_half" convention of transformers (first half / second half of each
    head pair up), not the interleaved one of the original Llama code. Tables narrower than the
    head (Phi-3's partial rotary) turn its first dimensions and pass the rest through."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def _lora_for(lora: LoraConfig | None, name: str) -> LoraConfig | None:
    return lora if lora is not None and name in lora.targets else None


def _linear_kw(lora: LoraConfig | None, name: str) -> dict:
    """Linear's LoRA, trained and quantize arguments for the module `name`."""
    return dict(lora=_lora_for(lora, name), trained=_trained(lora, name),
                quantize="none" if lora is None else lora.quantize)


def _trained(lora: LoraConfig | None, name: str) -> bool:
    return lora is not None and name in lora.train_modules


# ---------------------------------------------------------------------------------- decoder block

class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, lora, compute: ComputeSpec, rngs: nnx.Rngs):
        dtype, param_dtype, matmul_dtype = compute.dtype, compute.param_dtype, compute.matmul_dtype
        self.cfg, self.dtype = cfg, dtype
        self.attention, self.block = compute.attention, compute.attention_block
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, matmul_dtype=matmul_dtype)
        if cfg.fused:       # Phi-3: one projection, q then k then v along its output
            self.qkv_proj = Linear(D, (N + 2 * K) * H, bias=False, **_linear_kw(lora, "qkv_proj"),
                                   **common)
        else:
            self.q_proj = Linear(D, N * H, bias=cfg.attention_bias, **_linear_kw(lora, "q_proj"),
                                 **common)
            self.k_proj = Linear(D, K * H, bias=cfg.attention_bias, **_linear_kw(lora, "k_proj"),
                                 **common)
            self.v_proj = Linear(D, K * H, bias=cfg.attention_bias, **_linear_kw(lora, "v_proj"),
                                 **common)
        self.o_proj = Linear(N * H, D, bias=cfg.o_bias, **_linear_kw(lora, "o_proj"), **common)
        if cfg.qk_norm:
            norm = dict(dtype=dtype, param_dtype=param_dtype, offset=cfg.norm_offset)
            self.q_norm = RMSNorm(H, cfg.rms_norm_eps, **norm, trained=_trained(lora, "q_norm"))
            self.k_norm = RMSNorm(H, cfg.rms_norm_eps, **norm, trained=_trained(lora, "k_norm"))
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, mask, keys, cache=None, window: int = 0):
        """x [B,T,D]; mask [B,1,T,S] bool, or None for plain causal attention (for "pallas": the
        segment ids [B,T], or None); keys: 4 dropout keys or None; window: this layer's sliding
        window when the mask holds it (the xla kernel then skips the key blocks before it), else 0.
        cache: None (attend over these T tokens, S = T) or (k [B,S,K,H], v, index): the new keys and
        values are written at slots [index, index+T) and attention runs over all S slots.
        Returns (y [B,T,D], (k, v) of these T tokens, rotated) — the caller stores them."""
        B, T, _ = x.shape
        cfg = self.cfg
        k_drop = keys if keys is not None else (None,) * 4
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if cfg.fused:
            q, k, v = jnp.split(self.qkv_proj(x, k_drop[0]), [N * H, (N + K) * H], axis=-1)
        else:
            q, k, v = (self.q_proj(x, k_drop[0]), self.k_proj(x, k_drop[1]),
                       self.v_proj(x, k_drop[2]))
        q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = k, v
        if cache is not None:
            k_cache, v_cache, index = cache
            k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        # K/V keep their kv-head count: both paths do grouped-query attention natively.
        # attention: "xla" (runs everywhere; causal query blocks, runtime/attention.py) or "cudnn"
        # (a fused flash-attention kernel on NVIDIA GPUs). Decoding with a cache attends over the
        # cache's slots with XLA's dot_product_attention.
        scale = cfg.head_dim ** -0.5 if cfg.query_scale is None else cfg.query_scale
        attention = "xla" if cache is not None else self.attention
        if cache is None and attention == "xla":
            out = causal_attention(q, k, v, mask, scale=scale, block=self.block,
                                   softcap=cfg.attn_softcap, window=window)
        elif cfg.attn_softcap is not None:
            if cache is None:
                raise ValueError(f"{attention} attention has no soft-capping; use xla")
            out = cached_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask,
                                   scale=scale, softcap=cfg.attn_softcap)
        elif cache is None and attention == "pallas":
            out = segment_attention(q, k, v, mask, scale=scale)
        else:
            out = jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                               mask=mask, scale=scale, is_causal=mask is None,
                                               implementation=attention)
        return self.o_proj(out.reshape(B, T, -1), k_drop[3]), (k, v)


@jax.checkpoint
def _swiglu(gate, up):
    """silu(gate) · up, rematerialised: the backward pass keeps only its two inputs and recomputes
    the sigmoid (cheap) instead of saving three more [tokens, intermediate] arrays per layer."""
    return jax.nn.silu(gate) * up


@jax.checkpoint
def _geglu(gate, up):
    """Gemma's gelu(gate) · up, GELU's tanh form (transformers' gelu_pytorch_tanh), rematerialised
    like _swiglu."""
    return jax.nn.gelu(gate, approximate=True) * up


GATES = {"silu": _swiglu, "gelu_tanh": _geglu}


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, lora, compute: ComputeSpec, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        common = dict(bias=False, dtype=compute.dtype, param_dtype=compute.param_dtype, rngs=rngs,
                      matmul_dtype=compute.matmul_dtype)
        self.fused = cfg.fused
        if cfg.fused:       # Phi-3: gate then up along one projection's output
            self.gate_up_proj = Linear(D, 2 * F, **_linear_kw(lora, "gate_up_proj"), **common)
        else:
            self.gate_proj = Linear(D, F, **_linear_kw(lora, "gate_proj"), **common)
            self.up_proj = Linear(D, F, **_linear_kw(lora, "up_proj"), **common)
        self.down_proj = Linear(F, D, **_linear_kw(lora, "down_proj"), **common)
        self.gate = GATES[cfg.activation]

    def __call__(self, x, keys):
        k = keys if keys is not None else (None,) * 3
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x, k[0]), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x, k[0]), self.up_proj(x, k[1])
        return self.down_proj(self.gate(gate, up), k[2])


_EXPERT_DOT = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0])


def expert_dot(x, w, groups, *, preferred=None):
    """Rows x [M, in], sorted by expert, through each group's own matrix of w [E, out, in]:
    groups [E] counts the rows of each expert in order. [M, out]."""
    return jax.lax.ragged_dot_general(x, w, groups, _EXPERT_DOT, preferred_element_type=preferred)


class ExpertLinear(nnx.Module):
    """A mixture's experts' copies of one linear layer: W [E, out, in] (transformers 5's 3-D
    parameter, e.g. mlp.experts.gate_up_proj), applied to token rows grouped by expert (a grouped
    matmul: jax.lax.ragged_dot). LoRA per expert, as PEFT's target_parameters: A [E, r, in] and B
    [E, out, r] (PEFT stores them as [E·r, in] and [out, r·E]: runtime/weights.py converts), each
    expert's update s·B_e A_e; no dropout, no DoRA (PEFT has neither for parameters)."""

    def __init__(self, experts: int, d_in: int, d_out: int, *, lora: LoraConfig | None, dtype,
                 param_dtype, rngs: nnx.Rngs, matmul_dtype=None):
        self.dtype, self.shape = dtype, (experts, d_out, d_in)
        self.mixed = (matmul_dtype is not None and jnp.dtype(matmul_dtype) == jnp.bfloat16
                      and jnp.dtype(dtype) == jnp.float32)
        self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), self.shape, param_dtype))
        if lora is None:
            self.lora_A = self.lora_B = None
            return
        self.lora_A = LoRAParam(lora_a_init(rngs.params(), (experts, lora.rank, d_in)))
        self.lora_B = LoRAParam(jnp.zeros((experts, d_out, lora.rank), jnp.float32))
        self.scale = lora.scale

    def __call__(self, x, groups):
        x = x.astype(self.dtype)
        if self.mixed:
            y = expert_dot(x.astype(jnp.bfloat16), self.weight[...].astype(jnp.bfloat16), groups,
                           preferred=jnp.float32).astype(self.dtype)
        else:
            y = expert_dot(x, self.weight[...].astype(self.dtype), groups)
        if self.lora_A is None:
            return y
        h = expert_dot(x, self.lora_A[...].astype(self.dtype), groups)
        return y + self.scale * expert_dot(h, self.lora_B[...].astype(self.dtype), groups)


class Router(nnx.Module):
    """The router's weight [E, D] (mlp.gate.weight), frozen."""

    def __init__(self, experts: int, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (experts, dim),
                                                         param_dtype))


class Experts(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, lora, compute: ComputeSpec, rngs: nnx.Rngs):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        common = dict(dtype=compute.dtype, param_dtype=compute.param_dtype, rngs=rngs,
                      matmul_dtype=compute.matmul_dtype)
        self.gate_up_proj = ExpertLinear(E, D, 2 * F, lora=_lora_for(lora, "gate_up_proj"),
                                         **common)
        self.down_proj = ExpertLinear(E, F, D, lora=_lora_for(lora, "down_proj"), **common)


class MoE(nnx.Module):
    """A mixture-of-experts MLP (Mixtral, Qwen3-MoE), as transformers computes it: router logits
    x Gᵀ, their softmax in float32, each token's top experts_per_token experts (ties go to the
    lower expert index), their weights renormalised to sum to 1 where the model does
    (norm_topk_prob; Mixtral always), and the weighted sum of those experts' gated MLPs. No token
    is dropped (no capacity limit): the token-expert pairs are sorted by expert and run through
    grouped matmuls. Also returns the layer's load-balancing statistics (load_balance)."""

    def __init__(self, cfg: ModelConfig, *, lora, compute: ComputeSpec, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, compute.dtype
        self.gate = Router(cfg.num_experts, cfg.hidden_size, param_dtype=compute.param_dtype,
                           rngs=rngs)
        self.experts = Experts(cfg, lora=lora, compute=compute, rngs=rngs)
        self.act = GATES[cfg.activation]

    def __call__(self, x, keys, token_weights=None):
        """x [B, T, D] → (y [B, T, D], (per-expert routed-token count [E], per-expert probability
        sum [E]), each over the tokens weighted by token_weights [B, T] (default all 1))."""
        cfg = self.cfg
        B, T, D = x.shape
        E, k = cfg.num_experts, cfg.experts_per_token
        flat = x.reshape(B * T, D).astype(self.dtype)
        logits = jnp.einsum("nd,ed->ne", flat, self.gate.weight[...].astype(self.dtype))
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, chosen = jax.lax.top_k(probs, k)                          # [N, k]
        if cfg.norm_topk_prob:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
        pairs = chosen.reshape(-1)                                      # [N·k]
        order = jnp.argsort(pairs, stable=True)
        token = order // k
        groups = jnp.bincount(pairs, length=E).astype(jnp.int32)
        rows = flat[token]
        gate, up = jnp.split(self.experts.gate_up_proj(rows, groups), 2, axis=-1)
        out = self.experts.down_proj(self.act(gate, up), groups)
        out = out * top.reshape(-1)[order][:, None].astype(out.dtype)
        y = jnp.zeros_like(flat).at[token].add(out)
        w = jnp.ones((B * T,), jnp.float32) if token_weights is None else \
            token_weights.reshape(-1).astype(jnp.float32)
        counts = jnp.zeros((E,), jnp.float32).at[pairs].add(jnp.repeat(w, k))
        return y.reshape(B, T, D), (counts, jnp.einsum("ne,n->e", probs, w))


def load_balance(counts, prob_sums, tokens, experts: int):
    """transformers' load_balancing_loss_func (Switch Transformer's eq. 4–6, over all layers at
    once): E · Σ_e f_e · P_e, f_e the share of routed (token, expert) pairs that went to e and P_e
    its mean router probability, both summed over the layers [L, E] and divided by layers ×
    tokens (`tokens`: Σ of the token weights of one layer)."""
    rows = counts.shape[0] * jnp.maximum(tokens, 1.0)
    return experts * jnp.sum((jnp.sum(counts, 0) / rows) * (jnp.sum(prob_sums, 0) / rows))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x)). With sandwich norms (Gemma
    2/3) the attention's and the MLP's outputs are normalised too before they are added:
    x + norm(attn(norm(x))), then + norm(mlp(norm(x))) — post_attention_layernorm then normalises
    the attention's output, and pre_/post_feedforward_layernorm wrap the MLP."""

    def __init__(self, cfg: ModelConfig, *, lora, compute: ComputeSpec, rngs: nnx.Rngs):
        norm = dict(dtype=compute.dtype, param_dtype=compute.param_dtype, offset=cfg.norm_offset)

        def rms(name):
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm, trained=_trained(lora, name))

        self.input_layernorm = rms("input_layernorm")
        self.self_attn = Attention(cfg, lora=lora, compute=compute, rngs=rngs)
        self.post_attention_layernorm = rms("post_attention_layernorm")
        self.moe = bool(cfg.num_experts)
        self.mlp = (MoE if self.moe else MLP)(cfg, lora=lora, compute=compute, rngs=rngs)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = rms("pre_feedforward_layernorm")
            self.post_feedforward_layernorm = rms("post_feedforward_layernorm")

    def __call__(self, x, cos, sin, mask, dropout_key=None, cache=None, token_weights=None,
                 window: int = 0):
        """(x, (k, v) of these tokens, router statistics: MoE's, or None for a dense MLP)."""
        # One independent dropout mask per adapted module, as PEFT has one nn.Dropout per module.
        keys = None if dropout_key is None else tuple(jax.random.split(dropout_key, 7))
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask,
                               None if keys is None else keys[:4], cache, window)
        mlp_keys = None if keys is None else keys[4:]
        stats = None

        def mlp(z):
            nonlocal stats
            if not self.moe:
                return self.mlp(z, mlp_keys)
            z, stats = self.mlp(z, mlp_keys, token_weights)
            return z

        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(
                mlp(self.pre_feedforward_layernorm(x))), kv, stats
        x = x + h
        x = x + mlp(self.post_attention_layernorm(x))
        return x, kv, stats


# ------------------------------------------------------------------------------------ the model

class Cache(NamedTuple):
    """KV cache for decoding; a plain pytree, so it goes through jit/scan as is.
    k, v: [L, B, S, K, H] in the compute dtype (keys already rotated); positions, valid: [B, S] — the
    RoPE position of the token in each slot and whether the slot holds a real token; index: int32
    scalar, the next slot to write (shared by the batch)."""
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    valid: jax.Array
    index: jax.Array


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "dots":    # keep matmul outputs without batch dims (the projections), recompute the rest
        policy_fn = jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names(MIXED_MATMUL))   # inside a custom_vjp
        return jax.checkpoint(fn, policy=policy_fn, prevent_cse=False)
    if policy == "full":    # keep only the layer inputs
        return jax.checkpoint(fn, prevent_cse=False)
    raise ValueError(f"unknown remat policy {policy!r}; expected one of {', '.join(REMAT_POLICIES)}")


def _window_mask(mask, q_pos, k_pos, window):
    """Restrict mask [B,1,T,S] to keys fewer than `window` positions back (window 0 = no limit)."""
    near = (q_pos[:, None, :, None] - k_pos[:, None, None, :]) < window
    return mask & ((window == 0) | near)


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, lora: LoraConfig | None = None,
                 compute: ComputeSpec = EXACT, rngs: nnx.Rngs):
        """compute: the plan's ComputeSpec (runtime/build.py); EXACT, the float32 reference, for a
        model built outside a plan."""
        dtype, param_dtype = compute.dtype, compute.param_dtype
        self.cfg, self.lora, self.compute, self.dtype = cfg, lora, compute, dtype
        if lora is not None:
            unknown = sorted(set(lora.train_modules) - set(full_module_names(cfg)))
            if unknown:
                raise ValueError(f"cannot train {unknown} in full; this model's modules are "
                                 f"{list(full_module_names(cfg))}")
            absent = sorted(set(lora.targets) - set(cfg.linear_names()))
            if absent:
                raise ValueError(f"LoRA targets {absent} are not linear modules of this model; "
                                 f"its are {list(cfg.linear_names())}")
        # A tied head IS the embedding: training either name trains the one shared matrix.
        tied_trained = cfg.tie_word_embeddings and _trained(lora, "lm_head")
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs,
                                      trained=_trained(lora, "embed_tokens") or tied_trained,
                                      scale=cfg.embed_scale)

        # One Block whose variables are stacked [L, ...]: vmap the constructor over L keys.
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_blocks(key):
            return Block(cfg, lora=lora, compute=compute, rngs=nnx.Rngs(key))

        self.layers = make_blocks(jax.random.split(rngs.params(), cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                            trained=_trained(lora, "norm"), offset=cfg.norm_offset)
        self.unembed = None if cfg.tie_word_embeddings else (
            FullParam if _trained(lora, "lm_head") else nnx.Param)(
            0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        # adapter.head=classifier: a new layer, trained (a FullParam: split, optimised, saved and
        # exported as PEFT's modules_to_save with the adapter), float32 like the LoRA factors
        self.score = FullParam(head_init(rngs.params(), (lora.head, cfg.hidden_size))) \
            if lora is not None and lora.head else None

    # -- training / scoring

    def __call__(self, tokens, *, positions=None, segment_ids=None, deterministic=True, rngs=None,
                 router_loss=False, token_mask=None):
        """tokens [B,T] int → hidden states [B,T,D] after the final norm, in the compute dtype.
        positions [B,T] (default 0..T-1) restart at 0 in each packed segment; segment_ids [B,T]: a token
        attends to earlier tokens of its own segment only. Segment 0 is padding: padding attends to
        padding (so no row is fully masked and nothing is NaN) and no real token attends to it.
        segment_ids None: one sequence per row (any padding at its end), plain causal attention with
        no mask — what fused attention kernels (cuDNN) take. LoRA dropout runs when
        deterministic=False and rngs (an nnx.Rngs with a `dropout` stream, or a PRNG key) is given.
        router_loss=True: returns (hidden, the routers' load-balancing loss over the real tokens —
        token_mask [B, T] where given, else segment > 0, else all — a float32 scalar; 0 for a dense
        model)."""
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        windows = self._windows()
        mask = None
        if self.compute.attention == "pallas":      # the kernel takes the segment ids themselves
            if windows is not None:
                raise ValueError("pallas attention has no sliding window; use xla")
            mask = segment_ids
        elif segment_ids is not None or windows is not None:
            if segment_ids is None:
                segment_ids = jnp.ones((B, T), jnp.int32)
            causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
            mask = mask[:, None]                                        # [B, 1, T, T]
        cos, sin, which = self._rope(positions)

        keys = None
        use_dropout = (not deterministic and self.lora is not None and self.lora.dropout > 0)
        if use_dropout:
            if rngs is None:
                raise ValueError("LoRA dropout (deterministic=False) needs rngs")
            key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
            keys = jax.random.split(key, self.cfg.num_layers)

        graphdef, state = nnx.split(self.layers)
        real = token_mask if token_mask is not None or segment_ids is None else segment_ids > 0
        real = None if real is None else real.astype(jnp.float32)

        skip = self._skipped_window(T)

        def layer(x, xs):
            layer_state, key, window, rope = xs
            m = mask if window is None else _window_mask(mask, positions, positions, window)
            c, s = (cos, sin) if rope is None else (cos[rope], sin[rope])

            def run(w):
                def body(x):
                    return nnx.merge(graphdef, layer_state)(x, c, s, m, key, token_weights=real,
                                                            window=w)
                return body

            if not skip:
                x, _, stats = run(0)(x)
            elif all(self.cfg.sliding_windows):             # every layer slides, by one window
                x, _, stats = run(skip)(x)
            else:           # local and global layers in one scan (Gemma): each takes its branch
                x, _, stats = jax.lax.cond(window > 0, run(skip), run(0), x)
            return x, stats

        x = self.embed_tokens(tokens)
        x, stats = jax.lax.scan(_remat(layer, self.compute.remat), x,
                                (state, keys, windows, which))
        hidden = self.norm(x)
        if not router_loss:
            return hidden
        if stats is None:
            return hidden, jnp.zeros((), jnp.float32)
        tokens_seen = jnp.float32(B * T) if real is None else jnp.sum(real)
        return hidden, load_balance(*stats, tokens_seen, self.cfg.num_experts)

    def lm_head(self) -> jax.Array:
        """Output projection [V, D] in the compute dtype (the embedding when tied)."""
        w = self.embed_tokens.weight if self.unembed is None else self.unembed
        return w[...].astype(self.dtype)

    def logits(self, hidden) -> jax.Array:
        """Full float32 logits [..., V] (soft-capped where the model caps them: Gemma 2) — for
        scoring and tests; training uses runtime.loss instead."""
        return soft_cap(jnp.einsum("...d,vd->...v", hidden, self.lm_head(),
                                   preferred_element_type=jnp.float32), self.cfg.final_softcap)

    def head_weight(self) -> jax.Array:
        """The classification head [labels, D] in the compute dtype (adapter.head=classifier)."""
        if self.score is None:
            raise ValueError("the model has no classification head (adapter.head=classifier)")
        return self.score[...].astype(self.dtype)

    def head_logits(self, hidden) -> jax.Array:
        """The classification head's float32 logits [..., labels] of final hidden states [..., D]
        (each example's last prompt token's: runtime/head.py)."""
        return jnp.einsum("...d,nd->...n", hidden, self.head_weight(),
                          preferred_element_type=jnp.float32)

    def _skipped_window(self, T: int) -> int:
        """The sliding window whose keys the xla kernel's blocks can skip in rows of T tokens
        (one window for every sliding layer, blocks of queries, a row longer than a window and a
        block), else 0."""
        windows = {w for w in self.cfg.sliding_windows if w}
        block = self.compute.attention_block
        if len(windows) != 1 or self.compute.attention != "xla" or not 0 < block < T:
            return 0
        (window,) = windows
        return window if window + block < T else 0

    def _windows(self):
        if not self.cfg.sliding_windows:
            return None
        return jnp.asarray(self.cfg.sliding_windows, jnp.int32)

    def _rope(self, positions):
        """(cos, sin, which): RoPE's tables [B, T, head_dim] for positions [B, T], and which None.
        Where the sliding layers turn at their own base (Gemma 3), both tables stacked [2, B, T,
        head_dim] — the global layers' first — and which [L] int32, each layer's."""
        cos, sin = model_rope_tables(self.cfg, positions)
        if self.cfg.local_rope_theta is None or not self.cfg.sliding_windows:
            return cos, sin, None
        local_cos, local_sin = model_rope_tables(self.cfg, positions, local=True)
        which = jnp.asarray([int(w > 0) for w in self.cfg.sliding_windows], jnp.int32)
        return jnp.stack([cos, local_cos]), jnp.stack([sin, local_sin]), which

    # -- decoding with a KV cache

    def init_cache(self, batch: int, max_len: int) -> Cache:
        cfg = self.cfg
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return Cache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                     positions=jnp.zeros((batch, max_len), jnp.int32),
                     valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    def decode(self, tokens, positions, cache: Cache, *, valid=None, last=None, head=False,
               segment_ids=None):
        """Append T tokens per row to the cache and return their logits.

        tokens, positions: [B, T]; valid: [B, T] bool (default all True) marks real tokens — padding is
        written to the cache but never attended to, so prompts may be LEFT- or RIGHT-padded, as long as
        positions count real tokens only (e.g. cumsum(valid) - 1). Prefill with the padded prompts
        (T = prompt length), then call with T = 1 per generated token (positions = previous + 1).
        The caller keeps cache.index + T <= max_len (static shapes: no bounds check under jit).
        last: optional [B] int index into T; then only those rows' logits are returned, [B, V],
        instead of [B, T, V] (avoids the full prefill logits). Logits are float32. head=True: the
        classification head's logits instead of the vocabulary's (adapter.head=classifier).
        segment_ids [B, T] (optional): the T tokens are several sequences packed in a row, each
        continuing what the cache holds: a token attends to every slot before cache.index and to
        the earlier tokens of its own segment only.
        Returns (logits, new cache)."""
        B, T = tokens.shape
        S = cache.k.shape[2]
        valid = jnp.ones((B, T), bool) if valid is None else valid.astype(bool)
        index = cache.index
        k_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
        k_pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, index))
        q_slot = index + jnp.arange(T)
        k_slot = jnp.arange(S)
        # Causal in slot order; a query always sees its own slot, so a padding row is never empty.
        mask = (k_slot[None, :] <= q_slot[:, None])[None] & (
            k_valid[:, None, :] | (k_slot[None, :] == q_slot[:, None])[None])
        if segment_ids is not None:
            k_seg = jax.lax.dynamic_update_slice(jnp.zeros((B, S), segment_ids.dtype),
                                                 segment_ids, (0, index))
            mask = mask & ((k_slot < index)[None, None, :]
                           | (k_seg[:, None, :] == segment_ids[:, :, None]))
        mask = mask[:, None]                                            # [B, 1, T, S]
        cos, sin, which = self._rope(positions)
        windows = self._windows()
        graphdef, state = nnx.split(self.layers)

        # The cache goes through the scan as per-layer inputs and the T new keys/values come out as
        # per-layer outputs, written with ONE update after the scan. (Carrying the whole [L, ...]
        # cache through the scan makes XLA copy all of it at every layer: ~4x slower steps.)
        def layer(x, xs):
            layer_state, k_layer, v_layer, window, rope = xs
            m = mask if window is None else _window_mask(mask, positions, k_pos, window)
            c, s = (cos, sin) if rope is None else (cos[rope], sin[rope])
            x, (k, v), _ = nnx.merge(graphdef, layer_state)(x, c, s, m, None,
                                                            (k_layer, v_layer, index))
            return x, (k.astype(k_layer.dtype), v.astype(v_layer.dtype))

        x = self.embed_tokens(tokens)
        x, (k_new, v_new) = jax.lax.scan(layer, x, (state, cache.k, cache.v, windows, which))
        k_cache = jax.lax.dynamic_update_slice(cache.k, k_new, (0, 0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(cache.v, v_new, (0, 0, index, 0, 0))
        hidden = self.norm(x)
        if last is not None:
            hidden = jnp.take_along_axis(hidden, last[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        new_cache = Cache(k=k_cache, v=v_cache, positions=k_pos, valid=k_valid, index=index + T)
        return (self.head_logits(hidden) if head else self.logits(hidden)), new_cache
