"""Does `tune lr-find`'s suggestion hold? For each recipe: the range test, then short runs at 0.1×,
1× and 10× the learning rate each of its rules gives, compared by their final validation loss.

For each recipe (on its own example data, as a user would run it):
  1. `tune lr-find +recipe=R` → lr_find.json: the suggested lr and the rule that chose it;
  2. `tune +recipe=R schedule.lr=X data.test_path=null schedule.epochs=E` for X in
     {lr/10, lr, 10 × lr}: train_summary.json's final validation loss.
The same for the other rule lr_find.json records (a tenth of the loss minimum's lr). The claim
checked: a rule's lr ends lower than both its neighbours. The recipe's own default lr is shown beside.

    python benchmarks/lr_check.py                       # the four recipes (about 70 min on 2 CPU cores)
    python benchmarks/lr_check.py --recipes legal --epochs 2

What finished (lr_find.json, a run's train_summary.json) is kept under --work and not run again.
Writes the table into benchmarks/RESULTS.md (between the lr-check markers, with the command) and
the raw figures into benchmarks/results/lr-check.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import run_logged, tune_command, write_results_section  # noqa: E402

from core.records import TrainSummary  # noqa: E402

RECIPES = ("legal", "finance", "medical", "customer_support")
BEGIN, END = "<!-- lr-check:begin -->", "<!-- lr-check:end -->"


def recipe_lr(recipe: str) -> float | None:
    import yaml

    doc = yaml.safe_load((HERE.parent / "recipes" / f"{recipe}.yaml").read_text()) or {}
    lr = (doc.get("schedule") or {}).get("lr")
    return float(lr) if lr is not None else None


RULES = (("steepest", "steepest_lr", "steepest descent of the smoothed loss", "lr-x"),
         ("min/10", "min_lr_tenth", "a tenth of the loss minimum's lr", "lr-tenth-x"))


def check(recipe: str, args, work: Path) -> dict:
    """The range test and the short runs of one recipe: 0.1×, 1× and 10× the lr of each rule
    lr_find.json records. A step whose output is already in `work` (lr_find.json, a run's
    train_summary.json) is not run again."""
    t0 = time.perf_counter()
    find_dir = work / recipe / "lr-find"
    extra = list(args.override or [])
    if not (find_dir / "lr_find.json").is_file():
        rc, _ = run_logged(tune_command() + ["lr-find", f"+recipe={recipe}",
                                             f"hydra.run.dir={find_dir}"] + extra,
                           work / recipe / "lr-find.log")
        if rc != 0:
            raise SystemExit(f"tune lr-find +recipe={recipe} exited with {rc}; see {work / recipe}")
    found = json.loads((find_dir / "lr_find.json").read_text())
    if "steepest_lr" not in found:         # written when the steepest descent was the suggestion
        found["steepest_lr"] = found.get("suggested_lr")
    result = {"recipe": recipe, "recipe_lr": recipe_lr(recipe), "suggested_rule": found.get("rule"),
              "lr_find_steps": len(found.get("lrs") or []), "stopped": found.get("stopped"),
              "rules": {}}
    for rule, key, _, prefix in RULES:
        lr = found.get(key)
        runs = []
        for factor in ((0.1, 1.0, 10.0) if lr else ()):
            run_dir, value = work / recipe / f"{prefix}{factor:g}", float(f"{lr * factor:.3g}")
            summary = run_dir / "train_summary.json"
            rc, wall = 0, None
            if not summary.is_file():
                cmd = tune_command() + [f"+recipe={recipe}", f"schedule.lr={value:g}",
                                        "data.test_path=null", f"schedule.epochs={args.epochs}",
                                        "runtime.checkpoint_every=0", f"hydra.run.dir={run_dir}"]
                rc, wall = run_logged(cmd + extra, work / recipe / f"{prefix}{factor:g}.log")
            s = TrainSummary.read(run_dir)
            runs.append({"factor": factor, "lr": value, "exit": rc,
                         "steps": s.steps if s else None, "final_loss": s.final_loss if s else None,
                         "val_loss": s.final_val_loss if s else None,
                         "wall_s": None if wall is None else round(wall, 1)})
        result["rules"][rule] = {"lr": lr, "runs": runs}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (work / recipe / "check.json").write_text(json.dumps(result, indent=1))
    return result


def verdict(rule: dict) -> str:
    if not rule["lr"]:
        return "no suggestion"
    val = {x["factor"]: x["val_loss"] for x in rule["runs"]}
    if val.get(1.0) is None:
        return "its run failed"
    lower = [f"{f:g}×" for f in (0.1, 10.0) if val.get(f) is not None and val[f] <= val[1.0]]
    return "yes" if not lower else f"no: {', '.join(lower)} lower"


def markdown(results: list[dict], command: str, started: str, wall: float, epochs) -> str:
    def loss(x):
        if x["exit"] == 3:
            return "diverged"
        return f"{x['val_loss']:.4f}" if x["val_loss"] is not None else f"exit {x['exit']}"

    lines = [f"Measured {started} on {platform.machine()} with 2 CPUs; whole run {wall / 60:.0f} min. "
             f"Each recipe on its own example data: `tune lr-find` (lr from 1e-7 rising "
             f"exponentially, stopped when the smoothed loss passes 4× its minimum), then "
             f"{epochs:g} epoch(s) at 0.1×, 1× and 10× the lr each rule gives; validation loss at "
             "the end (the recipe's held-out split). Best of each row in bold.", "", "```", command,
             "```", "",
             "| recipe (its lr) | rule | lr | val loss at 0.1× | at 1× | at 10× | 1× the lowest? |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for rule, _, label, _ in RULES:
            got = r["rules"].get(rule) or {"lr": None, "runs": []}
            cells = {x["factor"]: loss(x) for x in got["runs"]}
            vals = [x["val_loss"] for x in got["runs"] if x["val_loss"] is not None]
            best = min(vals) if vals else None
            for x in got["runs"]:
                if x["val_loss"] is not None and x["val_loss"] == best:
                    cells[x["factor"]] = f"**{cells[x['factor']]}**"
            lr = f"{got['lr']:.2g}" if got["lr"] else "none"
            lines.append(f"| {r['recipe']} ({r['recipe_lr']:g}) | {label} | {lr} | "
                         + " | ".join(cells.get(f, "not run") for f in (0.1, 1.0, 10.0))
                         + f" | {verdict(got)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--epochs", type=float, default=1, help="schedule.epochs of the three runs")
    ap.add_argument("--override", action="append", metavar="KEY=VALUE",
                    help="extra override for every tune command")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tune-lr-check"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    started, t0 = f"{dt.datetime.now():%Y-%m-%d %H:%M}", time.perf_counter()
    results = []
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        (args.work / recipe).mkdir(parents=True, exist_ok=True)
        results.append(check(recipe, args, args.work))
        print(f"[{recipe}] " + "; ".join(f"{rule}: {verdict(v)}" for rule, v in
                                         results[-1]["rules"].items()), file=sys.stderr, flush=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "python benchmarks/lr_check.py" + (" " + shlex.join(argv) if argv else "")
    text = markdown(results, command, started, time.perf_counter() - t0, args.epochs)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "lr-check.json").write_text(json.dumps(results, indent=1))
    if not args.no_write:
        write_results_section(f"{BEGIN}\n## Learning-rate range test against short runs\n\n{text}{END}",
                              BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
