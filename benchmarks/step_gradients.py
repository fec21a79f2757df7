"""One training step's loss and LoRA gradients, saved, so that two source trees can be compared:
does a speed change compute the same step?

Runs the plan's micro-batch accumulation (runtime/train.accumulate: forward, loss, backward) on the
first batch of epoch 0 with dropout on (a fixed key), from LoRA factors moved off their start
(B = 0 at the start would leave A without a gradient), and writes the loss and every gradient to
an .npz. `--compare A.npz B.npz` prints the losses and the relative difference of the gradients
(‖a − b‖ / ‖a‖ over all of them, and the worst single tensor).

    python benchmarks/step_gradients.py PLAN.json --out new.npz
    git worktree add /tmp/old <commit>
    python benchmarks/step_gradients.py PLAN.json --tree /tmp/old --out old.npz
    python benchmarks/step_gradients.py --compare old.npz new.npz

Read the difference against the precision's own: the same comparison between a plan and its
runtime.matmul_dtype=float32 twin gives the size of bfloat16 rounding.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gradients(plan_path: Path, out: Path) -> None:
    import jax
    import numpy as np

    from core.plan import Plan
    from runtime import run as R
    from runtime import train as T

    plan = Plan.load(plan_path)
    s = R.setup(plan, Path(tempfile.mkdtemp(prefix="tune-grad-")))
    batch = s.place(s.batcher.batch(0, 0))
    leaves, tree = jax.tree.flatten(s.lora)
    lora = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
                                     for i, x in enumerate(leaves)])
    rt = plan.runtime
    loss, n, grads = jax.jit(lambda lora, frozen, b, k: T.accumulate(
        s.graphdef, lora, frozen, b, k, ce_chunk=rt.ce_chunk, dropout=plan.adapter.dropout > 0,
        loss_tokens=rt.loss_tokens, packed=rt.pack)[:3])(lora, s.frozen, batch, jax.random.key(123))
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(grads)}
    np.savez(out, loss=np.asarray(loss), tokens=np.asarray(n), **flat)
    print(f"loss {float(loss):.6f} over {int(n)} supervised tokens → {out}")


def compare(a_path: Path, b_path: Path) -> None:
    import numpy as np
    a, b = np.load(a_path), np.load(b_path)
    num = den = worst = 0.0
    worst_name = ""
    for k in a.files:
        if k in ("loss", "tokens"):
            continue
        d, n = float(np.linalg.norm(a[k] - b[k])), float(np.linalg.norm(a[k]))
        num, den = num + d * d, den + n * n
        if n and d / n > worst:
            worst, worst_name = d / n, k
    print(f"loss {float(a['loss']):.6f} vs {float(b['loss']):.6f}; gradients: relative difference "
          f"{(num / den) ** 0.5:.3g} over all, worst tensor {worst:.3g} ({worst_name})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("plan", nargs="?", type=Path)
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree to import tune from")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return 0
    if args.plan is None or args.out is None:
        ap.error("give a plan and --out (or --compare A B)")
    if args.tree.resolve() != ROOT:        # import the other tree's code in a process of its own
        code = (f"import sys; sys.path[:0] = [{str(args.tree.resolve())!r}, {str(ROOT / 'benchmarks')!r}]; "
                f"from step_gradients import gradients; from pathlib import Path; "
                f"gradients(Path({str(args.plan.resolve())!r}), Path({str(args.out.resolve())!r}))")
        return subprocess.run([sys.executable, "-c", code], cwd=args.tree).returncode
    sys.path.insert(0, str(ROOT))
    gradients(args.plan, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
