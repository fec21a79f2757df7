"""Decoding speed: tune's greedy decoding against transformers' `generate` + PEFT, on a finished
run's adapter and the same test prompts.

tune decodes the rows as `tune eval` does for eval.mode=generate (runtime/evaluate._predict:
batches of eval.batch_size prompts, left-padded to a length bucket, a KV cache, stopping at the end
token); transformers decodes the same token ids greedily with the run's adapter loaded by PEFT
(benchmarks/peft_reference.generate: batches of the same size, left-padded, its KV cache, the same
end tokens), in float32 and under bfloat16 autocast. Each is run twice; the first pass compiles (or
warms up), the second is the figure. Tokens are the generated ones up to the end token, so both
count the same work when they agree; the share of rows whose tokens agree is printed.

    python benchmarks/quality.py --datasets bitext_replies --max-rows 300 --epochs 1 \\
        --skip-peft --no-write --work /tmp/bitext
    python benchmarks/decode_speed.py --run /tmp/bitext/bitext_replies/tune --limit 32

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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run (eval.mode=generate)")
    ap.add_argument("--limit", type=int, default=32, help="test rows (default %(default)s)")
    ap.add_argument("--passes", type=int, default=2, help="the last is the figure")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the plan's")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import dataclasses

    from core.plan import Plan
    from core.tokenizer import load_tokenizer
    from runtime import build
    from runtime.evaluate import TestSet, _predict

    plan = Plan.load(args.run / "plan.json")
    if plan.eval.mode != "generate":
        ap.error(f"{args.run}: eval.mode is {plan.eval.mode}; this compares free decoding")
    if args.max_new_tokens:
        plan = dataclasses.replace(plan, eval=dataclasses.replace(
            plan.eval, max_new_tokens=args.max_new_tokens))
    tok = load_tokenizer(plan.model.dir)
    test = TestSet(plan, tok, args.limit, split="test")
    adapter = build.trained_dir(plan, args.run)
    model = build.scoring_model(plan, adapter)
    from runtime.decode import greedy_generate

    dec = build.decoding(plan, tok)
    rows, outputs = {}, {}

    def timed(name, fn):
        seconds = []
        for _ in range(args.passes):
            t = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - t)
        outputs[name] = out
        n = sum(len(o) for o in out)
        rows[name] = {"seconds": seconds, "tokens": n, "tokens_per_s": n / seconds[-1]}

    timed("tune", lambda: greedy_generate(model, test.prompts,
                                          max_new_tokens=plan.eval.max_new_tokens, **dec))
    del model

    import torch
    from peft_reference import eos_ids, generate, load_model

    torch.set_num_threads(os.cpu_count() or 1)
    doc = json.loads((args.run / "plan.json").read_text())
    hf = load_model(doc, adapter_dir=adapter)
    hf.config.use_cache = True
    ends = sorted(set(eos_ids(doc)) | set(dec["eos_ids"]))

    def hf_generate():
        return generate(hf, test.prompts, max_new_tokens=plan.eval.max_new_tokens, eos=ends,
                        pad_id=dec["pad_id"], device="cpu", batch_size=dec["batch_size"])

    timed("transformers float32", hf_generate)

    def hf_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return generate(hf, test.prompts, max_new_tokens=plan.eval.max_new_tokens, eos=ends,
                            pad_id=dec["pad_id"], device="cpu", batch_size=dec["batch_size"],
                            autocast=False)

    timed("transformers bfloat16 autocast", hf_bf16)

    base = outputs["tune"]
    print(f"{len(test)} rows, batches of {dec['batch_size']}, up to {plan.eval.max_new_tokens} new "
          f"tokens; tune's matmuls {plan.runtime.matmul_dtype}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'decoded by':<32}{'tokens':>8}{'first pass s':>14}{'timed pass s':>14}"
          f"{'tokens/s':>10}{'rows as tune':>14}")
    for name, r in rows.items():
        r["rows_as_tune"] = sum(list(a) == list(b) for a, b in zip(outputs[name], base)) / len(base)
        print(f"{name:<32}{r['tokens']:>8,}{r['seconds'][0]:>14.1f}{r['seconds'][-1]:>14.1f}"
              f"{r['tokens_per_s']:>10.1f}{r['rows_as_tune']:>14.0%}")
    for name in list(rows)[1:]:
        print(f"tune / {name}: {rows['tune']['tokens_per_s'] / rows[name]['tokens_per_s']:.2f}× "
              "tokens/s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "limit": len(test),
                                         "max_new_tokens": plan.eval.max_new_tokens}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
