"""Recipe defaults by measurement: a small grid per recipe on its matching real dataset.

For each recipe, tune trains every point of a grid (learning rate × adapter targets by default) on a
fixed-seed sample of the dataset's training file (data.max_rows) and scores base and tuned on
eval.limit rows of its test file (drawn with the seed), the recipe's own way (constrained decoding
for its labels).
The point with the lowest validation loss (held out from the training sample, not the test rows)
is marked; its test score is shown beside the others, so the choice can be checked.

    python benchmarks/recipe_sweep.py                        # the four recipes (about 80 min on 2 CPU cores)
    python benchmarks/recipe_sweep.py --recipes finance --lr 1e-3,2e-3 --targets q_proj,k_proj,v_proj,o_proj

A point that finished is recorded beside its run directory (<work>/<recipe>/<point>.json) and not
trained again when the sweep is re-run with the same --work; delete that file to re-run it.

Writes the table into benchmarks/RESULTS.md (between the sweep markers, with the command) and the raw
figures into benchmarks/results/recipe-sweep.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import run_logged, tune_command, write_results_section  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data"
# recipe → (dataset folder under DATA, settings for it that replace the command line's)
RECIPES = {
    "legal": ("legal/legalbench_cuad_license_grant", {}),
    "finance": ("financial/twitter_financial_news_sentiment", {}),
    # 77 intents: more rows, so that each is seen several times
    "customer_support": ("customer_support/banking77", {"data.max_rows": 600, "schedule.epochs": 2}),
    # abstracts of ~400 tokens: fewer rows, each cut inside its context to 384 tokens
    "medical": ("medical/pubmedqa_pqal", {"data.max_rows": 120, "eval.limit": 100,
                                          "data.max_length": 384}),
}
BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"
ATTENTION = "q_proj,k_proj,v_proj,o_proj"


def run_point(args, recipe: str, point: dict, work: Path) -> dict:
    folder, extra = RECIPES[recipe]
    # (a run directory's name is a Hydra override's value: no "=" or ",")
    name = "_".join(f"{k.split('.')[-1]}-{v}".replace(",", "+") for k, v in point.items())
    run_dir = work / recipe / name
    settings = {"data.max_rows": args.max_rows, "eval.limit": args.limit, **extra}
    cmd = tune_command() + [
        f"+recipe={recipe}", f"data.path={args.data_root / folder / 'train.jsonl'}",
        f"data.test_path={args.data_root / folder / 'test.jsonl'}", "runtime.checkpoint_every=0",
        f"hydra.run.dir={run_dir}", *(f"{k}={v}" for k, v in settings.items()),
        *(args.override or []),
        *(f"{k}=[{v}]" if k == "adapter.targets" and v != "all-linear" else f"{k}={v}"
          for k, v in point.items())]
    done = work / recipe / f"{name}.json"
    if done.exists():  # finished before (the sweep was interrupted): not trained again
        print(f"[{recipe}] {name}: finished before, kept", file=sys.stderr, flush=True)
        return json.loads(done.read_text())
    if args.finished_only:
        return {"recipe": recipe, "point": point, "not_run": True}
    print(f"[{recipe}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    rc, wall = run_logged(cmd, work / recipe / f"{name}.log")
    out = {"recipe": recipe, "point": point, "command": cmd, "wall_s": wall, "rc": rc}
    from core.records import EvalFile, TrainSummary

    ev, summary = EvalFile.read(run_dir), TrainSummary.read(run_dir)
    if ev is None or summary is None:
        return out
    top = ev.headline
    out.update(metric=top.metric, tuned=top.value,
               base=ev.entries["base"].value if "base" in ev.entries else None,
               n=top.n, macro_f1=top.get("macro_f1"), free=(top.free or {}).get("accuracy"),
               majority=top.majority_baseline, steps=summary.steps,
               final_loss=summary.final_loss, val_loss=summary.final_val_loss)
    done.write_text(json.dumps(out) + "\n")
    return out


def markdown(results: list[dict], command: str, started: str, wall: float) -> str:
    lines = [BEGIN, "## Recipe defaults by measurement", "",
             f"Tabulated {started} on {platform.machine()} with {os.cpu_count()} CPUs; the points "
             f"took {sum(r.get('wall_s', 0) for r in results) / 60:.0f} min in all (wall s: each "
             "point's training and its base and tuned evaluations, several run while another job shared the CPUs). Each point trains the recipe on a fixed-seed sample of the "
             "dataset's training file and scores eval.limit test rows (constrained decoding within "
             "the label set; `free` = free generation on the same rows). ★ = lowest validation "
             "loss (held out from the training sample), the criterion the defaults follow.", "",
             "```", command, "```", ""]
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        rows = [r for r in results if r["recipe"] == recipe]
        ok = [r for r in rows if r.get("val_loss") is not None]
        best = min(ok, key=lambda r: r["val_loss"]) if ok else None
        folder = RECIPES[recipe][0]
        settings = ", ".join(f"{k}={v}" for k, v in RECIPES[recipe][1].items())
        lines += [f"**{recipe}** on `{folder}`" + (f" ({settings})" if settings else ""), "",
                  "| point | steps | val loss | " + (rows[0].get("metric") or "metric") +
                  " base → tuned | macro-F1 | free | majority | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            point = ", ".join(f"{k}={v}" for k, v in r["point"].items())
            if r.get("not_run"):
                lines.append(f"| {point} | not run | | | | | | |")
                continue
            if r.get("val_loss") is None:
                lines.append(f"| {point} | failed (exit {r['rc']}) | | | | | | {r['wall_s']:.0f} |")
                continue
            star = " ★" if r is best else ""
            lines.append(f"| {point}{star} | {r['steps']} | {r['val_loss']:.4f} | "
                         f"{r['base']:.3f} → {r['tuned']:.3f} | {r['macro_f1']:.3f} | "
                         f"{r['free']:.3f} | {r['majority']:.3f} | {r['wall_s']:.0f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--lr", default="1e-3,2e-3", help="schedule.lr values")
    ap.add_argument("--targets", default=f"{ATTENTION};all-linear",
                    help="adapter.targets values, separated by ';'")
    ap.add_argument("--max-rows", type=int, default=300)
    ap.add_argument("--limit", type=int, default=150)
    ap.add_argument("--override", action="append", help="KEY=VALUE for every run")
    ap.add_argument("--data-root", type=Path, default=DATA)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tune-recipe-sweep"))
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--finished-only", action="store_true",
                    help="train nothing: tabulate the points already finished under --work")
    args = ap.parse_args(argv)
    grid = [{"schedule.lr": lr, "adapter.targets": t}
            for lr, t in itertools.product(args.lr.split(","), args.targets.split(";"))]
    started, t0 = dt.datetime.now().strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    results = [run_point(args, recipe, point, args.work)
               for recipe in args.recipes.split(",") for point in grid]
    wall = time.perf_counter() - t0
    command = "python benchmarks/recipe_sweep.py " + shlex.join(argv if argv is not None
                                                                 else sys.argv[1:])
    text = markdown(results, command.strip(), started, wall)
    print(text)
    if not any(r.get("val_loss") is not None for r in results):
        print("no point finished: RESULTS.md left as it was", file=sys.stderr)
        return 1
    out = HERE / "results" / "recipe-sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "started": started, "wall_s": wall,
                               "results": results}, indent=1) + "\n")
    if not args.no_write:
        write_results_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
