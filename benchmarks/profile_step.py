"""Where one training step's time goes: jax.profiler on the compiled step, summed by kind of operation.

Compiles a plan (`tune plan`, the same settings as benchmarks/throughput.py: the finance recipe on
the Twitter financial news file, batch 8 × 128 tokens), builds the training session in this process,
runs a few warm steps, times `--steps` more, then traces two steps with `jax.profiler` and sums the
XLA operations' CPU time (both cores' threads) into kinds: matrix products (XLA:CPU runs them as
`ynn_fusion` / `xnn_fusion` / `onednn` library calls or as `dot` thunks), the layer scan's saving and
reading back of activations (`dynamic-update-slice` / `dynamic-slice` fusions), copies and
transposes, dtype conversions, the other fused element-wise work, and the rest.

    python benchmarks/profile_step.py                          # each runtime.matmul_dtype in turn
    python benchmarks/profile_step.py --variant runtime.matmul_dtype=float32 --top 30

Reading the trace needs the profiler's converter: `pip install xprof` (not a dependency of tune:
without it the step times are still printed). The raw traces stay in --work for TensorBoard/XProf.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import DEFAULT_DATA, tune_command  # noqa: E402

KINDS = (   # (kind, pattern on the operation's name), first match wins
    ("matrix products", r"^(ynn_fusion|xnn_fusion|onednn|dot|.*_dot_|custom-call)"),
    ("scan: save / read activations", r"dynamic-update-slice|dynamic-slice"),
    ("dtype conversions", r"^convert"),
    ("copies, transposes, broadcasts", r"^(copy|transpose|wrapped_broadcast|broadcast$)"),
    ("fused element-wise", r"fusion"),
)


def plan_for(args, run_dir: Path, variant: list[str]) -> Path:
    cmd = tune_command() + [
        "plan", f"+recipe={args.recipe}", f"data.path={Path(args.data).resolve()}",
        f"data.max_rows={args.max_rows}", f"data.max_length={args.max_length}",
        f"schedule.batch_size={args.batch_size}", "schedule.max_steps=100", "data.test_path=null",
        "eval.every=0", "runtime.checkpoint_every=0", f"hydra.run.dir={run_dir}"] + variant
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return run_dir / "plan.json"


def profile(plan_path: Path, trace_dir: Path, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from core.plan import Plan
    from runtime import run as R

    plan = Plan.load(plan_path)
    s = R.setup(plan, plan_path.parent / "session")
    batch = s.place(s.batcher.batch(0, 0))
    step_no = jnp.asarray(0, jnp.int32)
    compiled = s.step_fn.lower(s.lora, s.opt_state, s.frozen, batch, s.rng, step_no).compile()

    def one():
        s.lora, s.opt_state, m = compiled(s.lora, s.opt_state, s.frozen, batch, s.rng, step_no)
        jax.block_until_ready(m)

    one(), one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    jax.profiler.start_trace(str(trace_dir))
    one(), one()
    jax.profiler.stop_trace()
    rt = plan.runtime
    return {"step_s": sorted(times)[len(times) // 2], "step_s_min": min(times),
            "dtype": rt.dtype, "matmul_dtype": rt.matmul_dtype, "remat": rt.remat}


def op_times(trace_dir: Path) -> dict[str, float] | None:
    """Seconds per step of CPU time by XLA operation name (numbered suffixes merged), or None
    without xprof."""
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError:
        return None
    paths = glob.glob(str(trace_dir / "**" / "*.xplane.pb"), recursive=True)
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    doc = json.loads(data)
    threads = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    out: dict[str, float] = collections.defaultdict(float)
    for e in doc["traceEvents"]:
        if e.get("ph") != "X" or threads.get(e.get("tid")) == "python":
            continue
        if e["name"].startswith(("ThunkExecutor", "ThreadpoolListener", "end:", "SlinkyThreadPool")):
            continue                         # wrappers and waits around the operations
        out[re.sub(r"[.\d]+$", "", e["name"])] += e["dur"] / 1e6 / 2      # µs over two steps
    return dict(out)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="finance")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--max-rows", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    ap.add_argument("--variant", action="append", metavar="OVERRIDES",
                    help="space-separated overrides of one variant (repeatable; default: "
                         "runtime.matmul_dtype=float32, then =bfloat16)")
    ap.add_argument("--top", type=int, default=12, help="operations listed per variant")
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        raise SystemExit(f"no training file at {args.data} (use --data)")
    variants = args.variant or ["runtime.matmul_dtype=float32", "runtime.matmul_dtype=bfloat16"]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tune-profile-"))
    results = []
    for i, variant in enumerate(variants):
        run_dir = work / f"v{i}"
        plan = plan_for(args, run_dir, variant.split())
        # each variant in its own process: one jax runtime, one set of compiled kernels
        code = (f"import json, sys; sys.path[:0] = {[str(ROOT), str(Path(__file__).parent)]!r}; "
                "from profile_step import profile; "
                f"print(json.dumps(profile(__import__('pathlib').Path({str(plan)!r}), "
                f"__import__('pathlib').Path({str(run_dir / 'trace')!r}), {args.steps})))")
        line = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        r["variant"], r["ops"] = variant, op_times(run_dir / "trace")
        results.append(r)

    print(f"\nrecipe {args.recipe}, batch {args.batch_size} × {args.max_length} tokens, median of "
          f"{args.steps} steps; CPU time summed over XLA's threads (traces in {work})")
    for r in results:
        print(f"\n{r['variant']}: step {r['step_s']:.2f} s (compute {r['dtype']}, matmuls "
              f"{r['matmul_dtype']}, remat {r['remat']})")
        if r["ops"] is None:
            print("  (pip install xprof for the breakdown)")
            continue
        total = sum(r["ops"].values())
        kinds = collections.defaultdict(float)
        for name, sec in r["ops"].items():
            kinds[kind_of(name)] += sec
        print(f"  {'kind':34} {'s/step':>8} {'share':>6}")
        for kind, sec in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:34} {sec:8.3f} {100 * sec / total:5.1f}%")
        print(f"  {'all operations (CPU time)':34} {total:8.3f}")
        print("  largest operations:")
        for name, sec in sorted(r["ops"].items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"    {name[:48]:48} {sec:8.3f}")
    (work / "profile.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
