"""What attention costs one decoder layer of a training step on this machine, at a packed row's
shape: forward and backward of SmolLM2-135M's attention (9 query heads, 3 key/value heads, head
size 64) over rows of two equal segments, causal within each — as tune's packed rows compute it.

Four ways, the same result: jax.nn.dot_product_attention (XLA's implementation), tune's
`runtime.attention=xla` (runtime/attention.py: grouped heads) over whole rows
(`runtime.attention_block=0`) and in causal query blocks (`--block`, default the runtime's 128),
and that with bfloat16 operands (float32 scores).

    python benchmarks/attention_cost.py                     # batch 8, rows of 768 (the medical recipe)
    python benchmarks/attention_cost.py --batch 8 --seq 128

Prints milliseconds per layer (best of --repeat), × the model's 30 layers, and the effective
GFLOP/s of the four matrix products over whole rows (forward QKᵀ and PV, backward twice that;
blocks skip part of that work, so their figure is the whole-row equivalent).
"""
from __future__ import annotations

import argparse
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=768)
    ap.add_argument("--block", type=int, default=None, help="query rows per block (default: tune's)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from runtime.attention import causal_attention
    from compiler.schema import BY_PATH
    block = BY_PATH["runtime.attention_block"].default if args.block is None else args.block

    B, T, N, K, H, layers = args.batch, args.seq, 9, 3, 64, 30
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, T, K, H))
    v = jax.random.normal(keys[2], (B, T, K, H))
    seg = jnp.concatenate([jnp.full((B, T // 2), 1), jnp.full((B, T - T // 2), 2)], axis=1)
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & jnp.tril(jnp.ones((T, T), bool))

    def library(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=H ** -0.5)

    def tune(q, k, v, block, dtype=jnp.float32):
        q, k, v = (x.astype(dtype) for x in (q, k, v))
        return causal_attention(q, k, v, mask, scale=H ** -0.5, block=block).astype(jnp.float32)

    flops = 3 * 2 * (2 * B * N * T * T * H)          # QKᵀ and PV over whole rows, forward once and
                                                     # backward twice (blocks skip some: same count)
    ref = None
    print(f"attention of one layer, forward + backward: batch {B}, rows of {T} (two segments), "
          f"{N} heads / {K} kv heads × {H}; {jax.devices()[0].platform}")
    for name, fn in (("jax.nn.dot_product_attention", library),
                     ("tune, whole rows", lambda q, k, v: tune(q, k, v, 0)),
                     (f"tune, blocks of {block}", lambda q, k, v: tune(q, k, v, block)),
                     (f"tune, blocks of {block}, bfloat16",
                      lambda q, k, v: tune(q, k, v, block, jnp.bfloat16))):
        step = jax.jit(jax.value_and_grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2)))
        out = jax.block_until_ready(step(q, k, v))
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = jax.block_until_ready(step(q, k, v))
            best = min(best, time.perf_counter() - t)
        ref = float(out[0]) if ref is None else ref
        print(f"  {name:36} {best * 1e3:8.1f} ms/layer  × {layers} layers {best * layers:6.2f} s  "
              f"{flops / best / 1e9:6.1f} GFLOP/s  (loss {float(out[0]) / ref:.6f} of the first)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
