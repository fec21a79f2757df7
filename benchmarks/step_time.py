"""Step time: the plan's estimate (resources panel, `time`) against the measured steps of a short run.

For each case, `tune +recipe=R schedule.max_steps=N data.test_path=null ...` trains N steps on the
recipe's own example data (no evaluation); the figure is the median step time of steps 3..N from
metrics.jsonl (the first compiles, the second warms up), against the plan's `step_time_s`, which
the compiler computed in the same process from its FLOP count and, on a CPU, a ~50 ms numpy matmul
probe (compiler/estimates.step_time). One run at a time: two at once measure the contention.

    python benchmarks/step_time.py                      # the four recipes, bf16 and f32 matmuls
    python benchmarks/step_time.py --case "legal runtime.remat=full" --steps 6

Writes the table into benchmarks/RESULTS.md (between the step-time markers) and the raw figures into
benchmarks/results/step_time.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import publish, read_jsonl, tune_command  # noqa: E402

BEGIN, END = "<!-- step-time:begin -->", "<!-- step-time:end -->"
CASES = [
    "legal",
    "legal runtime.matmul_dtype=float32",
    "customer_support",
    "customer_support runtime.matmul_dtype=float32",
    "finance",
    "medical",
    "legal runtime.remat=full",
]


def measure(case: str, steps: int, work: Path) -> dict:
    recipe, *overrides = case.split()
    run_dir = work / case.replace(" ", "_").replace("=", "-")
    cmd = tune_command() + [f"+recipe={recipe}", f"schedule.max_steps={steps}", "data.test_path=null",
                            "runtime.checkpoint_every=0", "runtime.log_every=1",
                            f"hydra.run.dir={run_dir}", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"case": case, "error": (done.stderr or done.stdout).strip()[-400:]}
    plan = json.loads((run_dir / "plan.json").read_text())
    times = [m["step_time_s"] for m in read_jsonl(run_dir / "metrics.jsonl") if "step_time_s" in m]
    timed = times[2:] or times          # after compilation and warm-up, where there are enough
    measured = statistics.median(timed)
    s, rt = plan["schedule"], plan["runtime"]
    return {"case": case, "rows": s["global_batch"], "tokens": s["seq_len"],
            "matmul": rt["matmul_dtype"], "remat": rt["remat"],
            "estimate_s": plan["estimates"]["step_time_s"], "measured_s": measured,
            "steps_timed": len(timed)}


def markdown(rows: list[dict], command: str) -> str:
    lines = [BEGIN, "## Step time: the plan's estimate against measured steps", "",
             "Each case trains its recipe's example data for a few steps without evaluation; "
             "measured = median step time after the first two (compilation, warm-up); estimate = "
             "the plan's `step_time_s` from the same process.", "", "```", command, "```", "",
             "| case | rows × tokens | matmuls | remat | estimate s | measured s | estimate / measured |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['case']}` | failed: {r['error'][:120]} | | | | | |")
            continue
        lines.append(f"| `{r['case']}` | {r['rows']} × {r['tokens']} | {r['matmul']} | {r['remat']} | "
                     f"{r['estimate_s']:.2f} | {r['measured_s']:.2f} | "
                     f"{r['estimate_s'] / r['measured_s']:.2f} |")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="RECIPE [OVERRIDES...] (repeatable)")
    ap.add_argument("--steps", type=int, default=8, help="steps a case trains (default %(default)s)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tune-step-time-") as tmp:
        for case in args.case or CASES:
            print(f"[{case}]", file=sys.stderr, flush=True)
            rows.append(measure(case, args.steps, Path(tmp)))
    publish("step_time", argv, rows, lambda command: markdown(rows, command), BEGIN, END,
            write=not args.no_write)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
