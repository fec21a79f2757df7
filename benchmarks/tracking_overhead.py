"""Experiment tracking's cost on a training step: the same short run without a tracker, then with
each backend (W&B offline, MLflow's local sqlite store in the run directory), then without again
(the machine's noise between two identical runs).

Each case runs `tune +recipe=legal schedule.max_steps=N eval.limit=8 runtime.checkpoint_every=0
tracking.backends=[X] hydra.run.dir=...` in its own process; the figure is the median step time
of steps 3..N from metrics.jsonl (the first compiles, the second warms up), as a ratio against the
first run without tracking. The whole process's wall time (start-up, training, evaluation, report,
the trackers' start and end) is beside it. One run at a time: two at once measure the contention.

    python benchmarks/tracking_overhead.py                 # none, tensorboard, mlflow, wandb, all, none
    python benchmarks/tracking_overhead.py --steps 12 --case none --case mlflow

Then, in this process, each backend alone: the first run's metrics rows sent through a Tracker
over and over, timing what the training thread spends (tracker.log) and what the library spends
per row on the sending thread.

Writes the table into benchmarks/RESULTS.md (between the tracking-overhead markers) and the raw
figures into benchmarks/results/tracking_overhead.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import publish, read_jsonl, run_logged, tune_command  # noqa: E402

BEGIN, END = "<!-- tracking-overhead:begin -->", "<!-- tracking-overhead:end -->"
CASES = ["none", "tensorboard", "mlflow", "wandb", "tensorboard,mlflow,wandb", "none"]
# W&B offline, MLflow's local store, both in the run directory (empty = unset for tune)
ENV = dict(WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_TRACKING_URI="", WANDB_DIR="")


def measure(case: str, index: int, args, work: Path) -> dict:
    run_dir = work / f"{index}-{case.replace(',', '+')}"
    backends = "[]" if case == "none" else f"[{case}]"
    cmd = tune_command() + [f"+recipe={args.recipe}", f"schedule.max_steps={args.steps}",
                            f"eval.limit={args.eval_limit}", "runtime.checkpoint_every=0",
                            "runtime.log_every=1", f"tracking.backends={backends}",
                            f"hydra.run.dir={run_dir}"]
    env = dict(ENV)
    load = os.getloadavg()[0]
    rc, wall = run_logged(cmd, run_dir.parent / f"{run_dir.name}.log", env=env)
    if rc:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-400:]
        return {"case": case, "error": tail.strip()}
    times = [m["step_time_s"] for m in read_jsonl(run_dir / "metrics.jsonl") if "step_time_s" in m]
    timed = times[2:] or times
    return {"case": case, "steps_timed": len(timed), "median_s": statistics.median(timed),
            "mean_s": statistics.fmean(timed), "wall_s": wall, "load_before": load}


def sending_cost(run_dir: Path, backends: list[str], repeat: int, work: Path) -> list[dict]:
    """Each backend's own cost, in this process, without a training beside it: the rows of a run's
    metrics.jsonl (`repeat` times over) through a Tracker, timing tracker.log on the calling thread
    (what a training step waits for) and each row's call into the library on the sending thread."""
    import dataclasses

    sys.path.insert(0, str(HERE.parent))
    os.environ.update(ENV)
    from core.plan import Plan, TrackingSection
    from runtime import tracking

    plan = Plan.load(run_dir / "plan.json")
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    out = []
    for backend in backends:
        cls, spent = tracking.BACKENDS[backend], []
        real = cls.log

        def timed(self, step, values, _real=real, _spent=spent):
            t0 = time.perf_counter()
            _real(self, step, values)
            _spent.append(time.perf_counter() - t0)

        cls.log = timed
        try:
            t = TrackingSection(backends=(backend,), experiment="overhead", run_name=None,
                                group=None, mlflow_uri=None, wandb_project=None, wandb_entity=None)
            tracker = tracking.Tracker(dataclasses.replace(plan, tracking=t), work / backend)
            (work / backend).mkdir(parents=True)
            tracker.start(resumed_from=None)
            calls = []
            for i in range(repeat):
                for r in rows:
                    t0 = time.perf_counter()
                    tracker.log({**r, "step": i * len(rows) + r["step"]})
                    calls.append(time.perf_counter() - t0)
            tracker.close()
        finally:
            cls.log = real
        out.append({"backend": backend, "rows": len(spent),
                    "log_call_us": 1e6 * statistics.median(calls),
                    "send_ms": 1e3 * statistics.median(spent)})
    return out


def markdown(rows: list[dict], args, command: str, when: str, load: str) -> str:
    base = next((r for r in rows if r.get("case") == "none" and "error" not in r), None)
    lines = [BEGIN, "## Experiment tracking's overhead", "",
             f"Measured {when} on {platform.machine()} with {os.cpu_count()} CPUs; 1-minute load "
             f"average before the runs {load}. Recipe {args.recipe}, {args.steps} steps, "
             f"eval.limit={args.eval_limit}, each case its own process, one after the other; step = "
             "median step time of steps 3.. in metrics.jsonl; ratios against the first run "
             "without tracking (the last row is the same run again: the noise).", "",
             "```", command, "```", "",
             "| tracking.backends | steps timed | median step s | step / none | mean step s "
             "| process wall s | wall / none |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if "case" in r):
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'][:120]} | | | | | |")
            continue
        step = f"{r['median_s'] / base['median_s']:.3f}" if base else "—"
        wall = f"{r['wall_s'] / base['wall_s']:.3f}" if base else "—"
        lines.append(f"| {r['case']} | {r['steps_timed']} | {r['median_s']:.3f} | {step} | "
                     f"{r['mean_s']:.3f} | {r['wall_s']:.1f} | {wall} |")
    costs = [r for r in rows if "backend" in r]
    if costs and base:
        lines += ["", "Each backend's own cost per metrics row, measured in the same process without a "
                  "training beside it (the rows of the first run, over and over): the training "
                  "thread's `tracker.log` (a queue put) and the library's call on the sending thread, "
                  "against that run's median step.", "",
                  "| backend | rows | tracker.log µs (training thread) | send ms (sending thread) "
                  "| send / step |", "|---|---|---|---|---|"]
        for c in costs:
            lines.append(f"| {c['backend']} | {c['rows']} | {c['log_call_us']:.1f} | "
                         f"{c['send_ms']:.2f} | {c['send_ms'] / 1e3 / base['median_s']:.2%} |")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append",
                    help="none, or backends separated by commas (repeatable; default: "
                         + " ".join(CASES) + ")")
    ap.add_argument("--recipe", default="legal")
    ap.add_argument("--steps", type=int, default=20, help="steps a case trains (default %(default)s)")
    ap.add_argument("--eval-limit", type=int, default=8)
    ap.add_argument("--send-repeat", type=int, default=10,
                    help="times the first run's rows go through each backend in-process (0: skip)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    when = time.strftime("%Y-%m-%d %H:%M")
    load = f"{os.getloadavg()[0]:.2f}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="tune-tracking-") as tmp:
        for i, case in enumerate(args.case or CASES):
            print(f"[{case}]", file=sys.stderr, flush=True)
            rows.append(measure(case, i, args, Path(tmp)))
        first = Path(tmp) / f"0-{(args.case or CASES)[0].replace(',', '+')}"
        if (first / "metrics.jsonl").is_file() and args.send_repeat:
            print("[sending cost]", file=sys.stderr, flush=True)
            rows += sending_cost(first, ["tensorboard", "mlflow", "wandb"], args.send_repeat,
                                 Path(tmp) / "sending")
    publish("tracking_overhead", argv, rows, lambda c: markdown(rows, args, c, when, load),
            BEGIN, END, write=not args.no_write)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
