"""Evaluation speed of the classification head against constrained decoding, on the same test rows.

Two finished runs of one plan's data — one trained with `adapter.head=classifier`, one without —
are each scored on their test rows in this process, as `tune eval` scores them: the head run by
one forward pass per row, the other by its plan's eval.mode (for a label set, decoding within it
and the free decoding beside it) — both through runtime/evaluate._predict, what `tune eval` calls. Each is run twice; the first pass compiles
every shape the rows need, the second is the figure (rows/s). Both print the prompt positions they
computed, so what the ratio is made of can be read.

    python benchmarks/quality.py --datasets legalbench_unfair_tos --max-rows 600 --limit 200 \\
        --skip-peft --no-write --work /tmp/tos-none
    python benchmarks/quality.py ... --tune-override adapter.head=classifier --work /tmp/tos-head
    python benchmarks/head_speed.py --head /tmp/tos-head/legalbench_unfair_tos/tune \\
        --decoding /tmp/tos-none/legalbench_unfair_tos/tune --limit 200

Prints a table; writes nothing unless --json PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _load(run: Path, limit: int):
    from core.plan import Plan
    from core.tokenizer import load_tokenizer
    from runtime import build
    from runtime.evaluate import TestSet

    plan = Plan.load(run / "plan.json")
    tokenizer = load_tokenizer(plan.model.dir)
    model = build.scoring_model(plan, build.trained_dir(plan, run))
    return plan, tokenizer, model, TestSet(plan, tokenizer, limit, split="test")


def _timed(fn, passes: int) -> list[float]:
    out = []
    for _ in range(passes):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head", type=Path, required=True, help="a run trained with adapter.head")
    ap.add_argument("--decoding", type=Path, required=True, help="the same plan without a head")
    ap.add_argument("--limit", type=int, default=200, help="test rows (default %(default)s)")
    ap.add_argument("--passes", type=int, default=2, help="the last is the figure")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-shared-prefix", action="store_true",
                    help="also time the head computing every prompt whole, a prompt a row (what "
                         "it does when the prompts share no start)")
    args = ap.parse_args(argv)

    from runtime.evaluate import _predict
    from core.prompting import packs_after, shared_prefix
    from runtime.decode import bucket

    rows = {}
    plan, tok, model, test = _load(args.head, args.limit)
    head_s = _timed(lambda: _predict(plan, model, tok, test, None, head=True), args.passes)
    shared = shared_prefix(test.prompts)
    rows["head"] = {"rows": len(test), "seconds": head_s,
                    "prompt_tokens": int(sum(len(p) for p in test.prompts)),
                    "shared_prefix": shared if packs_after(test.prompts, shared, bucket) else 0}
    if args.no_shared_prefix:
        import core.prompting

        kept, core.prompting.SHARED_MIN = core.prompting.SHARED_MIN, 1 << 30
        whole_s = _timed(lambda: _predict(plan, model, tok, test, None, head=True), args.passes)
        core.prompting.SHARED_MIN = kept
        rows["head, no shared prefix"] = {**rows["head"], "seconds": whole_s, "shared_prefix": 0}
    del model

    plan, tok, model, test = _load(args.decoding, args.limit)
    generated = []

    def decode():       # the plan's eval.mode, as `tune eval` scores it (with its free decoding)
        generated.append(_predict(plan, model, tok, test, None)[1])

    dec_s = _timed(decode, args.passes)
    rows["constrained"] = {"rows": len(test), "seconds": dec_s,
                           "prompt_tokens": int(sum(len(p) for p in test.prompts)),
                           "free_tokens": generated[-1],
                           "label_tokens_max": max(len(x.ids) for x in plan.data.labels)}

    print(f"{'scored by':<22}{'rows':>6}{'prompt tokens':>15}{'shared':>8}{'first pass s':>14}"
          f"{'timed pass s':>14}{'rows/s':>9}")
    for name, r in rows.items():
        r["rows_per_s"] = r["rows"] / r["seconds"][-1]
        print(f"{name:<22}{r['rows']:>6}{r['prompt_tokens']:>15,}{r.get('shared_prefix', 0):>8}"
              f"{r['seconds'][0]:>14.1f}{r['seconds'][-1]:>14.1f}{r['rows_per_s']:>9.2f}")
    ratio = rows["head"]["rows_per_s"] / rows["constrained"]["rows_per_s"]
    print(f"head / constrained decoding: {ratio:.2f}× rows/s "
          f"(free decoding beside it: {rows['constrained']['free_tokens']} tokens; "
          f"{platform.machine()}, {os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
