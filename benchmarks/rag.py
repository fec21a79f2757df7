"""Fine-tuning versus retrieval, and both, on real data: the `medical_rag` recipe on PubMedQA.

The PubMedQA (PQA-L) rows are written without their abstracts; the corpus holds every abstract of
the train and test files (id = pubid), and each row names its own (`pubid`, for recall@k). tune
trains the recipe on a fixed-seed sample of the training questions and scores a fixed-seed sample of
the test rows
four ways on the same rows: base, base + retrieval, tuned, tuned + retrieval (eval.json `four_way`).

    python benchmarks/rag.py                                   # about 40 min on 2 CPU cores
    python benchmarks/rag.py --max-rows 300 --limit 200        # slower, less noisy
    python benchmarks/rag.py --evaluate-only --limit 100       # score the trained run again

Writes the table into benchmarks/RESULTS.md (between the rag markers, with the command) and the
raw figures into benchmarks/results/rag.json. The data stays where it is; the derived files are
written under --work.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import read_jsonl, run_logged, tune_command, write_results_section  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data" / "medical" / "pubmedqa_pqal"
BEGIN, END = "<!-- rag:begin -->", "<!-- rag:end -->"


def write_inputs(data: Path, work: Path) -> dict[str, Path]:
    """corpus.jsonl (every abstract), train.jsonl and test.jsonl (questions without them)."""
    work.mkdir(parents=True, exist_ok=True)
    corpus, out = [], {}
    for split in ("train", "test"):
        rows = read_jsonl(data / f"{split}.jsonl")
        corpus += [{"id": str(r["pubid"]), "text": r["context"]} for r in rows]
        out[split] = work / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"],
                                                  "pubid": str(r["pubid"])}) + "\n" for r in rows))
    out["corpus"] = work / "corpus.jsonl"
    out["corpus"].write_text("".join(json.dumps(c) + "\n" for c in corpus))
    return out


def markdown(doc: dict) -> str:
    four, ev, plan = doc["four_way"], doc["eval"], doc["retrieval"]
    recall = ", ".join(f"{k} {v['recall']:.3f}" for k, v in plan["per_split"].items()
                       if v.get("recall") is not None)
    lines = [BEGIN, "## Fine-tuning and retrieval (medical_rag on PubMedQA)", "",
             f"Measured {doc['started']} on {platform.machine()} with {os.cpu_count()} CPUs; whole "
             f"run {doc['wall_s'] / 60:.0f} min. PubMedQA (PQA-L) questions without their abstracts; "
             f"the corpus is all {plan['passages']} train and test abstracts, BM25 top "
             f"{plan['k']} by the question (each cut to {plan['passage_tokens']} tokens). "
             f"recall@{plan['k']} of the row's own abstract: {recall}. "
             f"{doc['steps']} training steps on {doc['train_rows']} questions; "
             f"{ev['n']} test rows scored four ways (constrained to yes/no/maybe); majority class "
             f"{ev.get('majority_baseline') or float('nan'):.3f}.", "",
             "```", doc["command"], "```", "",
             f"| {ev['metric']} | without retrieval | with retrieval |", "|---|---|---|",
             f"| base | {four['base']:.3f} | {four['base + retrieval']:.3f} |",
             f"| tuned | {four['tuned']:.3f} | {four['tuned + retrieval']:.3f} |", ""]
    macro = {k: doc["macro_f1"].get(k) for k in ("base_no_retrieval", "base", "tuned_no_retrieval",
                                                   "tuned")}
    if all(v is not None for v in macro.values()):
        lines += [f"macro-F1: base {macro['base_no_retrieval']:.3f}, base + retrieval "
                  f"{macro['base']:.3f}, tuned {macro['tuned_no_retrieval']:.3f}, tuned + retrieval "
                  f"{macro['tuned']:.3f}. The adapter was trained with retrieved abstracts in its "
                  "prompts; \"tuned\" without retrieval is that adapter given none.", ""]
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--max-rows", type=int, default=96, help="training questions (data.max_rows)")
    ap.add_argument("--limit", type=int, default=60, help="test rows scored (eval.limit)")
    ap.add_argument("--override", action="append", help="KEY=VALUE for the run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/tune-rag"))
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="do not train: score the run already trained under --work four ways again")
    args = ap.parse_args(argv)
    if not (args.data / "train.jsonl").is_file():
        print(f"{args.data} has no train.jsonl", file=sys.stderr)
        return 2
    files = write_inputs(args.data, args.work)
    run_dir = args.work / "run"
    cmd = tune_command() + [
        "+recipe=medical_rag", f"data.path={files['train']}", f"data.test_path={files['test']}",
        f"retrieval.corpus={files['corpus']}", "retrieval.gold=pubid",
        f"data.max_rows={args.max_rows}", f"eval.limit={args.limit}", "runtime.checkpoint_every=0",
        f"hydra.run.dir={run_dir}", *(args.override or [])]
    started, t0 = dt.datetime.now().strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    if args.evaluate_only:
        cmd = [sys.executable, "-c", "import sys; from core.plan import Plan; "
               "from runtime.evaluate import evaluate_before_after; "
               "evaluate_before_after(Plan.load(sys.argv[1] + '/plan.json'), sys.argv[1], "
               "limit=int(sys.argv[2]))", str(run_dir), str(args.limit)]
    print(shlex.join(cmd), file=sys.stderr, flush=True)
    rc, wall = run_logged(cmd, args.work / ("eval.log" if args.evaluate_only else "run.log"))
    if rc:
        print(f"tune exited {rc}: see {args.work / 'run.log'}", file=sys.stderr)
        return rc
    from core.plan import Plan
    from core.records import EvalFile, TrainSummary

    ev, summary = EvalFile.read(run_dir), TrainSummary.read(run_dir)
    plan = Plan.load(run_dir / "plan.json")
    command = "python benchmarks/rag.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    doc = {"command": command.strip(), "started": started, "wall_s": time.perf_counter() - t0,
           "tune": cmd, "four_way": ev.four_way, "retrieval": plan.to_dict()["retrieval"],
           "eval": {k: ev.headline.get(k) for k in ("metric", "n", "majority_baseline")},
           "macro_f1": {k: ev.entries[k].get("macro_f1") if k in ev.entries else None for k in
                        ("base", "tuned", "base_no_retrieval", "tuned_no_retrieval")},
           "steps": summary.steps, "train_rows": plan.data.sizes["train"],
           "val_loss": summary.final_val_loss}
    text = markdown(doc)
    print(text)
    out = HERE / "results" / "rag.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    if not args.no_write:
        write_results_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
