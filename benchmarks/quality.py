"""Quality: what a tune recipe gets on real held-out data, against the base model and against the same
training done by a plain Hugging Face transformers + PEFT loop.

For each dataset (under ../shared/data, each with its recipe):
  1. tune trains the recipe on a fixed-seed sample of the training file (data.max_rows), then scores
     the base model and the tuned adapter on eval.limit rows of the test file (drawn with the seed)
     (`tune +recipe=R data.path=... data.test_path=... data.max_rows=M eval.limit=L`; the end-of-training
     eval.json, or `tune eval` where that is missing);
  2. benchmarks/peft_reference.py trains a PEFT LoRA from the same plan — same token data, LoRA,
     optimiser, schedule, batch, epochs — and scores it the same way (greedy decoding, the recipe's
     metric, the same test prompts and references).
The PEFT loop puts one example per row, tune packs them: for the same epochs tune makes fewer,
fuller optimizer steps (both step counts are in the table); `--no-pack` makes tune do the same as PEFT.

    python benchmarks/quality.py                                    # all five datasets (long on a CPU)
    python benchmarks/quality.py --datasets twitter_financial_news_sentiment,legalbench_overruling \
        --max-rows 300 --limit 100

Writes the table into benchmarks/RESULTS.md (between the quality markers, with the command that
reproduces it) and the raw figures into benchmarks/results/quality-<platform>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from throughput import read_jsonl, run_logged, tune_command, write_results_section  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DATASETS = {                                         # folder under DATA → recipe
    "customer_support/banking77": "customer_support",
    "legal/legalbench_overruling": "legal",
    "legal/legalbench_cuad_license_grant": "legal",
    "financial/twitter_financial_news_sentiment": "finance",
    "medical/pubmedqa_pqal": "medical",
}
# Tasks outside the default table, run by name (--datasets NAME): a dataset with another recipe,
# or another field as the answer. name → (folder under DATA, recipe, overrides).
GENERATE = ["data.task=generation", "eval.mode=generate", "eval.metric=rouge_l"]
TASKS = {
    # a customer's request → the agent's reply (ROUGE-L against the written reply)
    "bitext_replies": ("customer_support/bitext_customer_support", "customer_support_replies",
                       ["template.prompt='{instruction}'", "template.response='{response}'",
                        "template.system='You are a customer support agent. Answer the "
                        "customer helpfully and concretely.'", "data.max_length=512",
                        "eval.max_new_tokens=256", "eval.limit=50", *GENERATE]),
    # question + abstract → the abstract's conclusion sentence(s)
    "pubmedqa_long_answer": ("medical/pubmedqa_pqal", "medical",
                             ["template.prompt='Question: {question}\\nAbstract: {context}'",
                              "template.response='{long_answer}'",
                              "template.system='You are a biomedical research assistant. State "
                              "the conclusion the abstract supports.'",
                              "eval.max_new_tokens=128", "eval.limit=50", *GENERATE]),
    # 9 clause categories, 90% of them Other
    "legalbench_unfair_tos": ("legal/legalbench_unfair_tos", "legal", []),
}
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def folder_of(ds: str) -> str:
    return TASKS[ds][0] if ds in TASKS else ds


def recipe_of(ds: str) -> str:
    return TASKS[ds][1] if ds in TASKS else DATASETS[ds]


def pick_datasets(spec: str | None) -> list[str]:
    if not spec:
        return list(DATASETS)
    out = []
    for name in spec.split(","):
        name = name.strip().strip("/")
        hits = [d for d in (*DATASETS, *TASKS) if d == name or d.split("/")[-1] == name]
        if not hits:
            raise SystemExit(f"unknown dataset {name!r}; known: "
                             + ", ".join(d.split("/")[-1] for d in (*DATASETS, *TASKS)))
        out += hits[:1]
    return out


# ------------------------------------------------------------------------------------------ tune

# Datasets whose rows are much longer than the others: fewer of them, so each takes similar time.
SIZES = {"medical/pubmedqa_pqal": {"data.max_rows": 150, "eval.limit": 100}}


def common_overrides(args, ds: str) -> list[str]:
    folder = args.data_root / folder_of(ds)
    sizes = {"data.max_rows": args.max_rows, "eval.limit": args.limit}
    if not args.same_sizes:
        sizes.update(SIZES.get(folder_of(ds), {}))
    o = [f"+recipe={recipe_of(ds)}", f"data.path={folder / 'train.jsonl'}",
         f"data.test_path={folder / 'test.jsonl'}", *(f"{k}={v}" for k, v in sizes.items()),
         *(TASKS[ds][2] if ds in TASKS else [])]
    if args.steps:
        o.append(f"schedule.max_steps={args.steps}")
    if args.epochs:
        o.append(f"schedule.epochs={args.epochs}")
    if args.no_pack:
        o.append("runtime.pack=false")
    return o + list(args.tune_override or [])


def read_eval(run_dir: Path) -> dict:
    """{"base": value, "tuned": value, "value" (the headline), "metric", "n"} of a run directory's
    eval.json (core.records.EvalFile); {} when there is none."""
    from core.records import EvalFile

    ev = EvalFile.read(run_dir)
    if ev is None:
        return {}
    out = {name: ev.entries[name].value for name in ("base", "tuned") if name in ev.entries}
    t = ev.entries.get("tuned")
    if t is not None and t.seconds:          # the tuned model's evaluation speed
        out["eval_rows_s"] = t.n / t.seconds
        if t.generated_tokens and t.mode == "generate":
            out["decode_tok_s"] = t.generated_tokens / t.seconds
    if t is not None and t.get("macro_f1") is not None:
        out["macro_f1"] = t.get("macro_f1")
    return {**out, "value": ev.headline.value, "metric": ev.headline.metric, "n": ev.headline.n}


def tune_eval(args, ds: str, work: Path, run: Path | None, name: str) -> tuple[dict, float]:
    """`tune eval` of the base model (run None) or of the adapter in `run`."""
    out_dir = work / name
    cmd = tune_command() + ["eval"] + common_overrides(args, ds) + [f"hydra.run.dir={out_dir}"]
    if run is not None:
        cmd.append(f"run={run}")
    rc, wall = run_logged(cmd, work / f"{name}.log")
    if rc != 0:
        return {"error": f"tune eval exited {rc} (log {work / f'{name}.log'})"}, wall
    found = read_eval(out_dir)
    if not found and run is not None:
        found = read_eval(run)
    return found, wall


def run_tune(args, ds: str, work: Path) -> dict:
    from core.records import TrainSummary

    run_dir = work / "tune"
    cmd = tune_command() + common_overrides(args, ds) + [f"hydra.run.dir={run_dir}",
                                                        "runtime.checkpoint_every=0"]
    print(f"  [tune] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    rc, wall = run_logged(cmd, work / "tune.log")
    res = {"command": cmd, "wall_s": wall}
    if rc != 0:
        res["error"] = f"tune exited {rc} (log {work / 'tune.log'})"
        return res
    s = TrainSummary.read(run_dir)
    if s is not None:
        res.update(steps=s.steps, train_wall_s=s.wall_s, final_loss=s.final_loss,
                   compile_s=s.compile_s)
    elif (run_dir / "metrics.jsonl").is_file():
        rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
        res.update(steps=len(rows), final_loss=rows[-1]["loss"] if rows else None)
    ev = read_eval(run_dir)
    res["base"], res["tuned"] = ev.get("base"), ev.get("tuned")
    for k in ("eval_rows_s", "decode_tok_s", "macro_f1"):
        res[k] = ev.get(k)
    res["metric"], res["n"] = ev.get("metric"), ev.get("n")
    res["eval_source"] = "end of training" if ev else None
    if res["tuned"] is None and res["base"] is None and "value" in ev:
        res["tuned"] = ev["value"]
    if res["base"] is None:
        b, w = tune_eval(args, ds, work, None, "tune-eval-base")
        res["base"], res["base_eval_s"] = b.get("value", b.get("base")), w
        res["metric"] = res.get("metric") or b.get("metric")
        res["n"] = res.get("n") or b.get("n")
        if "error" in b:
            res["base_error"] = b["error"]
    if res["tuned"] is None:
        t, w = tune_eval(args, ds, work, run_dir, "tune-eval-tuned")
        res["tuned"], res["tuned_eval_s"] = t.get("value", t.get("tuned")), w
        res["n"] = res.get("n") or t.get("n")
        res["metric"] = res.get("metric") or t.get("metric")
        if "error" in t:
            res["tuned_error"] = t["error"]
    res["total_s"] = wall + (res.get("base_eval_s") or 0.0) + (res.get("tuned_eval_s") or 0.0)
    res["run_dir"] = str(run_dir)
    return res


# ------------------------------------------------------------------------------------------ PEFT

def run_peft(args, work: Path, plan_path: Path, *, adapter: Path | None = None, name: str = "peft",
             base: bool = False) -> dict:
    out = work / name
    cmd = [sys.executable, str(HERE / "peft_reference.py"), str(plan_path), "--out", str(out),
           "--device", args.device, "--quiet"]      # the plan's eval.limit: the same rows as tune
    cmd += ["--adapter", str(adapter)] if adapter else ["--eval"]
    if base:
        cmd.append("--eval-base")
    print(f"  [{name}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    rc, wall = run_logged(cmd, work / f"{name}.log")
    if rc != 0:
        return {"error": f"exited {rc} (log {work / f'{name}.log'})", "wall_s": wall}
    r = json.loads((out / "result.json").read_text())
    res = {"command": cmd, "wall_s": wall, "tuned": (r.get("tuned") or {}).get("value"),
           "n": (r.get("tuned") or {}).get("n"), "metric": (r.get("tuned") or {}).get("metric"),
           "train_s": r.get("train_s"), "load_s": r.get("load_s"), "device": r.get("device"), "steps": len(r.get("records") or []) or None,
           "base": (r.get("base") or {}).get("value")}
    res["predictions"], res["base_predictions"] = r.get("predictions"), r.get("base_predictions")
    res["eval_s"] = (r.get("tuned") or {}).get("eval_s")
    gen = (r.get("tuned") or {}).get("generated_tokens")
    if gen and res["eval_s"] and (r.get("tuned") or {}).get("mode") == "generate":
        res["decode_tok_s"] = gen / res["eval_s"]
    recs = r.get("records") or []
    if recs:
        res["final_loss"] = recs[-1]["loss"]
    return res


def tune_predictions(run_dir: Path, model: str) -> list[str] | None:
    """tune's decoded answers for `model` ("base" or "tuned") from run_dir/eval_predictions.jsonl."""
    path = run_dir / "eval_predictions.jsonl"
    if not path.is_file():
        return None
    rows = [r for r in read_jsonl(path) if r.get("model") == model]
    return [r["prediction"] for r in sorted(rows, key=lambda r: r["index"])] or None


def prediction_agreement(a: list[str] | None, b: list[str] | None) -> float | None:
    """Share of test rows where two decodes give the same answer (classification-normalised)."""
    if not a or not b:
        return None
    from runtime.metrics import normalise

    n = min(len(a), len(b))
    return sum(normalise(x, classification=True) == normalise(y, classification=True)
               for x, y in zip(a[:n], b[:n])) / n


# --------------------------------------------------------------------------------------- report

def fmt(x, digits=3):
    return "—" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def train_s(peft: dict):
    if peft.get("train_s") is None:
        return None
    return peft["train_s"] + (peft.get("load_s") or 0.0)


def markdown(results: list[dict], args, command: str, started: str, wall: float) -> str:
    cross = any(r.get("tune_adapter_hf") is not None for r in results)
    devices = {(r.get("peft") or {}).get("device") for r in results} - {None}
    hfbase = any(r.get("peft", {}).get("base") is not None for r in results)
    head = ["dataset", "recipe", "metric", "n", "base", "tune", "PEFT"]
    if hfbase:
        head.append("base (HF)")
    if cross:
        head.append("tune adapter, HF decode")
    head += ["steps tune / PEFT", "train s tune / PEFT", "total s tune / PEFT", "final loss tune / PEFT"]
    decode = any(r.get("tune", {}).get("decode_tok_s") for r in results)
    if decode:
        head.append("decode tokens/s tune / HF generate")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        t, p = r.get("tune", {}), r.get("peft", {})
        row = [r["dataset"].split("/")[-1], r["recipe"], t.get("metric") or p.get("metric") or "—",
               fmt(t.get("n") or p.get("n")), fmt(t.get("base")), fmt(t.get("tuned")), fmt(p.get("tuned"))]
        if hfbase:
            agree = r.get("base_hf_agreement")
            row.append(fmt(p.get("base"))
                       + ("" if agree is None else f" (same answer as tune on {agree:.0%} of rows)"))
        if cross:
            agree = r.get("tune_adapter_hf_agreement")
            row.append(fmt(r.get("tune_adapter_hf"))
                       + ("" if agree is None else f" (same answer as tune on {agree:.0%} of rows)"))
        row += [f"{fmt(t.get('steps'))} / {fmt(p.get('steps'))}",
                f"{fmt(t.get('train_wall_s'), 0)} / {fmt(train_s(p), 0)}",
                f"{fmt(t.get('total_s'), 0)} / {fmt(p.get('wall_s'), 0)}",
                f"{fmt(t.get('final_loss'))} / {fmt(p.get('final_loss'))}"]
        if decode:
            row.append(f"{fmt(t.get('decode_tok_s'), 1)} / {fmt(p.get('decode_tok_s'), 1)}")
        lines.append("| " + " | ".join(row) + " |")
    errors = [f"- {r['dataset']}: {k}: {v}" for r in results for part in ("tune", "peft")
              for k, v in (r.get(part) or {}).items() if k.endswith("error")]
    notes = [
        f"Measured {started} on {platform.machine()} with {os.cpu_count()} CPUs (PEFT on "
        f"{', '.join(sorted(devices)) or args.device}); whole run {wall / 60:.1f} min.",
        f"Settings: data.max_rows={args.max_rows} (fixed-seed sample of train.jsonl), "
        f"eval.limit={args.limit} (rows of test.jsonl drawn with the seed)"
        + ("" if args.same_sizes else ", except " + "; ".join(
            f"{ds.split('/')[-1]}: " + ", ".join(f"{k}={v}" for k, v in kv.items())
            for ds, kv in SIZES.items())) + ", "
        f"schedule.max_steps={args.steps or 'recipe (epochs)'}, "
        f"tune {'unpacked (runtime.pack=false)' if args.no_pack else 'packed (default)'}; "
        "everything else is the recipe's.",
        "base and tune: tune's own evaluation (the plan's eval.mode: for these label sets greedy "
        "decoding within the labels; the recipe's metric); PEFT: the same plan trained and decoded "
        "by transformers + PEFT (benchmarks/peft_reference.py), within the same labels."
        + (" base (HF): the base model decoded by transformers." if hfbase else "")
        + (" tune adapter, HF decode: tune's exported adapter loaded with PeftModel and decoded by "
           "transformers — should equal the tune column." if cross else ""),
        "steps: optimizer steps; tune packs several examples per row, so one epoch is fewer steps. "
        "train s: model loading + training (tune: + compilation); total s: whole processes, "
        "evaluations included (tune: training process + any `tune eval`; PEFT: train + decode).",
    ]
    begin, end, _ = markers(args.section)
    out = [begin, f"## Quality{' — ' + args.section if args.section else ''}", "", *[n + "\n" for n in notes], "```", command, "```", "", *lines]
    if errors:
        out += ["", "Failures:", *errors]
    out.append(end)
    return "\n".join(out)


def markers(section: str | None) -> tuple[str, str, str]:
    """RESULTS.md's markers of the table (the default one, or --section NAME's own) and the raw
    figures' file stem."""
    if not section:
        return BEGIN, END, "quality"
    return f"<!-- quality-{section}:begin -->", f"<!-- quality-{section}:end -->", f"quality-{section}"


# ----------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=None,
                    help="comma-separated (folder or last part): " + ", ".join(DATASETS))
    ap.add_argument("--max-rows", type=int, default=1000, help="data.max_rows (default %(default)s)")
    ap.add_argument("--limit", type=int, default=300, help="eval.limit: test rows scored (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="schedule.max_steps for both (default: the recipe's epochs)")
    ap.add_argument("--epochs", type=float, default=None, help="schedule.epochs (default: the recipe's)")
    ap.add_argument("--no-pack", action="store_true", help="tune with runtime.pack=false")
    ap.add_argument("--same-sizes", action="store_true",
                    help="--max-rows and --limit for every dataset (default: fewer of the long "
                         "PubMedQA abstracts, see SIZES)")
    ap.add_argument("--device", default="auto", help="PEFT device: cpu, cuda or auto")
    ap.add_argument("--data-root", type=Path, default=DATA, help="default: %(default)s")
    ap.add_argument("--cross-check", action="store_true",
                    help="also decode tune's exported adapter with transformers + PEFT")
    ap.add_argument("--hf-base", action="store_true", help="also decode the base model with transformers")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="keep runs here (default: a temp dir, removed)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--section", default=None, metavar="NAME",
                    help="write the table to its own RESULTS.md section (quality-NAME) and "
                         "results/quality-NAME-<platform>.json, leaving the main table alone")
    ap.add_argument("--tune-override", action="append", metavar="KEY=VALUE", help="extra tune override")
    return ap.parse_args(argv)


def reproducing(argv: list[str]) -> list[str]:
    """argv without the options that do not change the figures (where runs are kept, writing)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--work",):
            skip = True
            continue
        if a.startswith("--work=") or a == "--no-write":
            continue
        out.append(a)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "python benchmarks/quality.py" + ("" if not argv else " " + shlex.join(reproducing(argv)))
    datasets = pick_datasets(args.datasets)
    work = args.work or Path(tempfile.mkdtemp(prefix="tune-quality-"))
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    results = []
    for ds in datasets:
        print(f"[{ds}] recipe {recipe_of(ds)}", file=sys.stderr, flush=True)
        w = work / ds.replace("/", "__")
        if w.exists():
            shutil.rmtree(w)
        w.mkdir(parents=True)
        r = {"dataset": ds, "recipe": recipe_of(ds)}
        r["tune"] = run_tune(args, ds, w)
        plan = w / "tune" / "plan.json"
        if not args.skip_peft and plan.is_file():
            r["peft"] = run_peft(args, w, plan, base=args.hf_base)
            if args.cross_check and (w / "tune" / "adapter").is_dir():
                x = run_peft(args, w, plan, adapter=w / "tune" / "adapter", name="tune-adapter-hf")
                r["tune_adapter_hf"] = x.get("tuned")
                r["tune_adapter_hf_agreement"] = prediction_agreement(
                    tune_predictions(w / "tune", "tuned"), x.get("predictions"))
            if args.hf_base:
                r["base_hf_agreement"] = prediction_agreement(
                    tune_predictions(w / "tune", "base"), r["peft"].get("base_predictions"))
        results.append(r)
        t, p = r["tune"], r.get("peft", {})
        print(f"[{ds}] base {fmt(t.get('base'))}  tune {fmt(t.get('tuned'))}  PEFT {fmt(p.get('tuned'))}"
              + (f"  (tune adapter via HF {fmt(r.get('tune_adapter_hf'))})" if args.cross_check else ""),
              file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    section = markdown(results, args, command, started, wall)
    print(section)
    devices = {(r.get("peft") or {}).get("device") for r in results} - {None}
    plat = "gpu" if any(str(d).startswith("cuda") for d in devices) or args.device == "cuda" else "cpu"
    # --no-write leaves RESULTS.md and results/quality-<platform>.json (the table's raw figures)
    # alone: its figures go into the work directory when that is kept (--work)
    begin, end, stem = markers(args.section)
    raw = HERE / "results" / f"{stem}-{plat}.json" if not args.no_write else \
        (args.work / "quality.json" if args.work is not None else None)
    if raw is not None:
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps({"command": command, "started": started, "wall_s": wall,
                                   "settings": {k: str(v) for k, v in vars(args).items()},
                                   "results": results}, indent=1) + "\n")
        print(f"wrote {raw}", file=sys.stderr)
    if not args.no_write:
        write_results_section(section, begin, end)
        print(f"wrote {HERE / 'RESULTS.md'}", file=sys.stderr)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all("error" not in r["tune"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
