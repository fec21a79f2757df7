"""Adapter kinds side by side: LoRA, DoRA, int8 and nf4 base weights (QLoRA), modules trained in full.

Each variant trains the same recipe (same data, schedule, seed) with its overrides, one after the
other, and is scored on the recipe's test rows:

    python benchmarks/adapters.py                       # legal, one epoch (13 steps), every variant
    python benchmarks/adapters.py --steps 26 --variant "adapter.kind=dora"

Prints one row per variant — final train and validation loss, test accuracy, seconds per step, the
plan's weights figure — and writes the table into benchmarks/RESULTS.md (between the adapters
markers) and the raw figures into benchmarks/results/adapters.json.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import publish, tune_command  # noqa: E402

BEGIN, END = "<!-- adapters:begin -->", "<!-- adapters:end -->"
VARIANTS = [
    "adapter.kind=lora",
    "adapter.kind=dora",
    "adapter.quantize=int8",
    "adapter.quantize=nf4",
    "adapter.train_modules=[norm]",
]


def run(recipe: str, variant: str, steps: int, work: Path) -> dict:
    run_dir = work / re.sub(r"[^A-Za-z0-9_.-]+", "-", variant)
    cmd = tune_command() + [f"+recipe={recipe}", f"hydra.run.dir={run_dir}",
                            f"schedule.max_steps={steps}", *variant.split()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    from core.plan import Plan
    from core.records import EvalFile, TrainSummary

    summary, ev = TrainSummary.read(run_dir), EvalFile.read(run_dir)
    plan = Plan.load(run_dir / "plan.json")
    return {"variant": variant, "command": shlex.join(cmd[len(tune_command()):]),
            "final_loss": summary.final_loss, "final_val_loss": summary.final_val_loss,
            "step_s": summary.step_time_s_mean, "metric": ev.headline.metric,
            "base": ev.entries["base"].value, "tuned": ev.entries["tuned"].value,
            "rows": ev.headline.n, "weights_mib": plan.estimates.memory["weights"] / 2**20,
            "trainable": plan.adapter.trainable_params}


def markdown(rows: list[dict], recipe: str, steps: int, command: str) -> str:
    lines = [BEGIN, "## Adapter kinds", "",
             f"Recipe `{recipe}` (SmolLM2-135M, float32, CPU), {steps} steps each, the same data, "
             "schedule and seed; accuracy on the recipe's test rows (constrained decoding). Base "
             "weights = the plan's figure for the frozen model as stored.", "",
             "```", command, "```", "",
             "| variant | trainable | base weights MiB | train loss | val loss | accuracy base → "
             "tuned | s / step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['variant']}` | {r['trainable']:,} | {r['weights_mib']:.0f} | "
                     f"{r['final_loss']:.4f} | {r['final_val_loss']:.4f} | "
                     f"{r['base']:.3f} → {r['tuned']:.3f} | {r['step_s']:.2f} |")
    lines += ["", "The quantised variants score their base quantised too: it is the model their "
              "adapter was trained on. Quantisation stores the seven linear layers of every block; "
              "the embedding (tied to the head) stays in float32. DoRA with dropout computes each "
              "adapted layer's base output again on the dropped input, as PEFT does: one more "
              "matmul per adapted layer.", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="legal")
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--variant", action="append", help="overrides of one variant (repeatable)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for variant in args.variant or VARIANTS:
            rows.append(run(args.recipe, variant, args.steps, Path(work)))
            print(json.dumps(rows[-1]), flush=True)
    publish("adapters", argv, rows, lambda c: markdown(rows, args.recipe, args.steps, c), BEGIN, END,
            write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
