"""Serving: `tune serve` against transformers' `generate` (+ PEFT) on the same prompts, same run.

1. A run to serve: `tune +recipe=customer_support` on Bitext's customer-support replies (a
   generative task: instruction → reply), a few steps (the figures are about speed, not quality).
2. tune: the run behind tune's server (runtime.serve, in this process, on 127.0.0.1), asked through
   the official `openai` client by C concurrent clients (C = 1, 4, 16), each sending its share of
   the prompts one after the other, greedy, max_tokens M. The server batches what is waiting.
3. Reference: the same base + PEFT adapter in torch (transformers' `generate`, greedy, the same
   prompt token ids, the same end tokens and M), C prompts at a time as one left-padded batch: what a
   user serving with `generate` gets from batching C waiting requests.

Each level is run once untimed first on tune's side (it compiles its shapes there), and one batch
of each size first on the reference's (torch warms up), then timed.
Figures per level: requests/s, generated tokens/s (all answers' tokens / wall time), and p50 / p95
latency (a request's time from sent to answered; for the reference, its batch's time).

    python benchmarks/serve.py                      # 1, 4, 16 clients, 16 prompts, 64 tokens
    python benchmarks/serve.py --clients 1 4 --prompts 16 --ref-dtype bfloat16

Writes benchmarks/results/serve-<platform>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared/data/customer_support/bitext_customer_support"
RESULTS = Path(__file__).resolve().parent / "results"
SHORT = {"float32": "f32", "bfloat16": "bf16"}


def make_run(work: Path, steps: int) -> Path:
    run = work / "run"
    cmd = [str(Path(sys.executable).parent / "tune"), "+recipe=customer_support",
           f"data.path={DATA / 'train.jsonl'}", "data.test_path=null", "data.max_rows=400",
           "data.task=generation", "template.prompt='{instruction}'", "template.response='{response}'",
           "data.max_length=384", f"schedule.max_steps={steps}", "runtime.checkpoint_every=0",
           f"hydra.run.dir={run}"]
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, env={**os.environ, "TUNE_QUIET": "1"})
    return run


def prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()[:n]]
    return [r["instruction"] for r in rows]


def summary(latencies: list[float], tokens: int, wall: float) -> dict:
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else \
        latencies * 19
    return {"requests": len(latencies), "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p95_s": q[18]}


# ------------------------------------------------------------------------------ tune

def tune_level(url: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    queue = list(enumerate(texts))
    lock = threading.Lock()
    latencies, tokens, answers = [], [0], [None] * len(texts)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i, text = queue.pop(0)
            t0 = time.perf_counter()
            r = client.chat.completions.create(model="run", messages=[
                {"role": "user", "content": text}], max_tokens=max_tokens)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                tokens[0] += r.usage.completion_tokens
                answers[i] = r.choices[0].message.content

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = summary(latencies, tokens[0], time.perf_counter() - t0)
    out["answers"] = answers
    return out


# ------------------------------------------------------------------------------ reference

def reference(plan, run: Path, ids: list[list[int]], eos: list[int], pad: int, levels, max_tokens,
              dtype: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    base = AutoModelForCausalLM.from_pretrained(plan.model.dir, torch_dtype=tdtype)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()

    def batch(rows):
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            x[k, width - len(r):] = torch.tensor(r)
            mask[k, width - len(r):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad)
        n = 0
        for row in out[:, width:].tolist():
            n += next((j for j, t in enumerate(row) if t in eos), len(row))
        return n

    results = {}
    for c in levels:
        batch(ids[:c])                                   # warm-up: one batch of this size
        latencies, tokens = [], 0
        t0 = time.perf_counter()
        for start in range(0, len(ids), c):
            tb = time.perf_counter()
            tokens += batch(ids[start:start + c])
            latencies += [time.perf_counter() - tb] * len(ids[start:start + c])
        results[c] = summary(latencies, tokens, time.perf_counter() - t0)
    return results


# ------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompts", type=int, default=16, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="training steps of the served run")
    ap.add_argument("--run", type=Path, help="serve this run instead of training one")
    ap.add_argument("--ref-dtype", nargs="+", default=["float32", "bfloat16"],
                    choices=("float32", "bfloat16"), help="the reference's dtype(s), each measured")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args(argv)

    from core.plan import Plan
    from runtime.serve import Engine, Server, bind, chat_prompt, load_runs

    work = Path(tempfile.mkdtemp(prefix="tune-serve-bench-"))
    run = args.run or make_run(work, args.steps)
    link = work / "served" / "run"              # the model's name in the API: "run"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(run.resolve(), target_is_directory=True)
    served = load_runs([link])
    texts = prompts(args.prompts)
    engine = Engine(served, batch_size=max(args.clients), batch_wait_s=0.005,
                    max_tokens=args.max_tokens)
    server = Server(engine, bind("127.0.0.1", 0)).start()
    tune = {}
    try:
        for c in args.clients:
            tune_level(server.url, texts, c, args.max_tokens)           # compiles its shapes
            before = len(engine.batches)
            tune[c] = tune_level(server.url, texts, c, args.max_tokens)
            tune[c]["batches"] = engine.batches[before:]                 # rows of each batch
            print(f"tune, {c} clients: {tune[c]['requests_per_s']:.2f} req/s, "
                  f"{tune[c]['tokens_per_s']:.1f} tok/s, batches of {tune[c]['batches']} rows",
                  file=sys.stderr)
    finally:
        server.stop()
    s = served["run"]
    plan = Plan.load(run / "plan.json")
    refs = {}
    if not args.skip_reference:
        ids = [chat_prompt(s, [{"role": "user", "content": t}]) for t in texts]
        for dtype in args.ref_dtype:
            refs[dtype] = reference(plan, run, ids, list(s.eos_ids), s.pad_id, args.clients,
                                    args.max_tokens, dtype)

    compute = f"compute {plan.runtime.dtype}, matmuls {plan.runtime.matmul_dtype}"
    lines = [f"serving on {platform.machine()} ({os.cpu_count()} CPUs): {plan.model.name} + LoRA "
             f"r{plan.adapter.rank}, {len(texts)} Bitext prompts per level, greedy, max_tokens "
             f"{args.max_tokens}; tune {compute}; reference transformers generate + PEFT "
             f"({', '.join(refs) or 'not run'}), C prompts per batch",
             f"{'clients':>8} {'':>10} {'req/s':>8} {'tok/s':>8} {'p50 s':>8} {'p95 s':>8} "
             f"{'tokens':>7}"]
    for c in args.clients:
        rows = [("tune", tune[c])] + [(f"ref {SHORT[d]}", r[c]) for d, r in refs.items()]
        for side, r in rows:
            lines.append(f"{c:>8} {side:>10} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>8.1f} "
                         f"{r['p50_s']:>8.2f} {r['p95_s']:>8.2f} {r['tokens']:>7}")
        for d, ref in refs.items():
            lines.append(f"{c:>8} {'tune/' + SHORT[d]:>10} "
                         f"{tune[c]['requests_per_s'] / ref[c]['requests_per_s']:>8.2f} "
                         f"{tune[c]['tokens_per_s'] / ref[c]['tokens_per_s']:>8.2f} "
                         f"{tune[c]['p50_s'] / ref[c]['p50_s']:>8.2f} "
                         f"{tune[c]['p95_s'] / ref[c]['p95_s']:>8.2f}")
    lines.append("(req/s, tok/s: tune/ref > 1 means tune is faster; latency: < 1 means tune answers "
                 "sooner)")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"serve-{platform.machine()}-{os.cpu_count()}cpu.json"
    out.write_text(json.dumps({"tune": {str(k): {x: y for x, y in v.items() if x != "answers"}
                                        for k, v in tune.items()},
                               "reference": {d: {str(k): v for k, v in r.items()}
                                             for d, r in refs.items()},
                               "table": lines,
                               "sample_answers": tune[args.clients[0]]["answers"][:3]}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
