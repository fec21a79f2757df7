"""Training throughput: tune against a plain Hugging Face transformers + PEFT loop, same work.

Both sides train the same LoRA (the recipe's rank, alpha, dropout, targets) on the same base model,
from the same token data (the examples tune's compiler tokenised), with the same batch size, sequence
length, optimiser and number of steps, one after the other in this process tree:

  1. tune:  `tune +recipe=finance data.path=DATA data.max_rows=R schedule.max_steps=N
             schedule.batch_size=B data.max_length=T hydra.run.dir=WORK/tune ...` (a subprocess);
            its metrics.jsonl gives every step's time and token counts.
  2. PEFT:  benchmarks/peft_reference.py on WORK/tune/plan.json for N steps (a subprocess).

The first step of each is left out of the figures (tune compiles before it; torch warms up). Steady
state = Σ counts / Σ step times over steps 2..N. End to end = the whole process, start-up, model load
and compilation included.

tune packs several examples into each row of T tokens; the PEFT loop, like a plain HF script, puts one
example per row padded to the longest row of its batch. A step therefore carries more real tokens on
tune's side: compare tokens/s (non-padding input tokens per second) and examples/s, not steps/s.
`--no-pack` runs tune with runtime.pack=false (one example per row, the same examples in the same
order as the PEFT loop) for a like-for-like padded comparison.

    python benchmarks/throughput.py                  # 20 steps, batch 8, max_length 128 (CPU: minutes)
    python benchmarks/throughput.py --no-pack
    python benchmarks/throughput.py --steps 100 --batch-size 16 --max-length 512   # on a GPU

Writes the raw figures to benchmarks/results/throughput-<platform>[-nopack][-peft-bf16].json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared/data/financial/twitter_financial_news_sentiment/train.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"


# -------------------------------------------------------------------------------------- processes

def tune_command() -> list[str]:
    """The tune console script of this interpreter's environment, else the module."""
    exe = Path(sys.executable).parent / "tune"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tune")
    if found:
        return [found]
    return [sys.executable, "-m", "tune"]


def run_logged(cmd: list[str], log_path: Path, *, env=None, echo=False) -> tuple[int, float]:
    """Run cmd with stdout+stderr into log_path; (exit code, wall seconds)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if echo or proc.returncode:
        tail = log_path.read_text().splitlines()[-25:]
        print("\n".join("    " + ln for ln in tail), file=sys.stderr)
    return proc.returncode, wall


def write_results_section(text: str, begin: str, end: str) -> None:
    """Put `text` (which starts with `begin` and ends with `end`) into benchmarks/RESULTS.md in
    place of the section between those markers, or at its end."""
    path = Path(__file__).resolve().parent / "RESULTS.md"
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + text + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + text + "\n"
    path.write_text(doc)


def publish(name: str, argv, rows: list[dict], markdown, begin: str, end: str,
            write: bool = True) -> str:
    """The end of a benchmark: its command line and markdown(command) printed; with `write`, the rows
    in benchmarks/results/<name>.json and the text in RESULTS.md between begin and end (the two stay
    from the same run)."""
    command = f"python benchmarks/{name}.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = markdown(command.strip())
    print(text)
    if write:
        out = Path(__file__).resolve().parent / "results" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
        write_results_section(text, begin, end)
    return text


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


# ----------------------------------------------------------------------------------------- tune

def tune_overrides(args, run_dir: Path) -> list[str]:
    o = [f"+recipe={args.recipe}", f"data.path={Path(args.data).resolve()}",
         f"data.max_rows={args.max_rows}", f"data.max_length={args.max_length}",
         f"schedule.batch_size={tune_batch(args)}", f"schedule.max_steps={args.steps}",
         f"schedule.epochs={args.epochs}", "data.test_path=null", "eval.every=0",
         "runtime.log_every=1", "runtime.checkpoint_every=0", f"hydra.run.dir={run_dir}"]
    if args.no_pack:
        o.append("runtime.pack=false")
    if args.row_length:
        o.append(f"runtime.row_length={args.row_length}")
    if args.dtype:
        o.append(f"runtime.dtype={args.dtype}")
    return o + list(args.tune_override or [])


def tune_batch(args) -> int:
    """tune's rows per step: --batch-size rows of --max-length tokens, or as many tokens in rows of
    --row-length."""
    if not args.row_length:
        return args.batch_size
    return max(1, args.batch_size * args.max_length // args.row_length)


def tune_step_counts(run_dir: Path, steps: int) -> list[dict] | None:
    """Examples, input and supervised tokens of each of tune's first `steps` steps, rebuilt with
    tune's own batches from the run's plan (runtime/build.py): examples/s, which metrics.jsonl does
    not log, and a check of the logged token counts."""
    from core.plan import Plan
    from runtime.build import batches

    batcher, _ = batches(Plan.load(run_dir / "plan.json"))
    out = []
    positions = batcher.positions_from(0, 0)
    for _ in range(steps):
        e, i = next(positions)
        b = batcher.batch(e, i)
        seg = b["segment_ids"].reshape(-1, b["segment_ids"].shape[-1])   # unpacked: trimmed rows
        out.append({"examples": int(seg.max(axis=1).sum()), "input_tokens": int((seg > 0).sum()),
                    "supervised_tokens": int(b["loss_mask"].sum()), "rows": int((seg > 0).any(1).sum()),
                    "slots": int(seg.size)})
    return out


def run_tune(args, work: Path) -> dict:
    run_dir = work / "tune"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = tune_command() + tune_overrides(args, run_dir)
    print(f"[tune] {' '.join(cmd)}", file=sys.stderr, flush=True)
    rc, wall = run_logged(cmd, work / "tune.log", env={"TUNE_QUIET": "0"})
    if rc != 0:
        raise SystemExit(f"tune exited with code {rc}; log: {work / 'tune.log'}")
    plan = json.loads((run_dir / "plan.json").read_text())
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r and "step_time_s" in r]
    compile_s = next((r["compile_s"] for r in rows if "compile_s" in r), None)
    from core.records import TrainSummary

    summary = TrainSummary.read(run_dir)
    counts = tune_step_counts(run_dir, len(steps))
    records = []
    for k, r in enumerate(steps):
        rec = {"step": r["step"], "loss": r["loss"], "lr": r.get("lr"), "step_time_s": r["step_time_s"],
               "tokens": r.get("input_tokens"), "supervised_tokens": r.get("tokens")}
        if counts is not None:
            c = counts[k]
            rec["examples"] = c["examples"]
            rec["padded_tokens"] = c["slots"]
            rec["rebuilt_tokens"] = c["input_tokens"]
            rec["rebuilt_supervised_tokens"] = c["supervised_tokens"]
        records.append(rec)
    mismatch = [r["step"] for r in records
                if "rebuilt_tokens" in r and (r["rebuilt_tokens"] != r["tokens"]
                                              or r["rebuilt_supervised_tokens"] != r["supervised_tokens"])]
    return {"command": cmd, "wall_s": wall, "compile_s": compile_s, "records": records, "plan": plan,
            "summary": summary.to_dict() if summary else {}, "count_mismatch_steps": mismatch, "run_dir": str(run_dir)}


# ----------------------------------------------------------------------------------------- PEFT

def run_peft(args, work: Path, plan_path: Path) -> dict:
    extra = ["--batch-size", str(args.batch_size)] if args.row_length else []  # one example per row
    return run_peer(args, work, plan_path, "peft", "peft_reference.py", extra)


def run_trl(args, work: Path, plan_path: Path) -> dict:
    """The packed peer: TRL's SFTTrainer (benchmarks/trl_reference.py) on the same plan."""
    return run_peer(args, work, plan_path, "trl", "trl_reference.py")


def run_peer(args, work: Path, plan_path: Path, name: str, script: str, extra=()) -> dict:
    """A peer's script on the plan for --steps steps, in its own process: its result.json."""
    out = work / name
    cmd = [sys.executable, str(Path(__file__).resolve().parent / script), str(plan_path),
           "--steps", str(args.steps), "--out", str(out), "--device", args.device, *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.peft_cpu_bf16:
        cmd.append("--cpu-bf16")
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    rc, wall = run_logged(cmd, work / f"{name}.log")
    if rc != 0:
        raise SystemExit(f"the {name} reference exited with code {rc}; log: {work / f'{name}.log'}")
    result = json.loads((out / "result.json").read_text())
    result["command"] = cmd
    result["process_wall_s"] = wall
    return result


# -------------------------------------------------------------------------------------- figures

def steady(records: list[dict], skip: int = 1) -> dict:
    """Throughput over the steps after the first `skip`."""
    rs = records[skip:] if len(records) > skip else records
    t = sum(r["step_time_s"] for r in rs)
    out = {"steps_measured": len(rs), "time_s": t,
           "step_time_s_mean": t / len(rs), "step_time_s_median": statistics.median(r["step_time_s"] for r in rs)}
    for key in ("tokens", "supervised_tokens", "examples", "padded_tokens"):
        if all(r.get(key) is not None for r in rs):
            total = sum(r[key] for r in rs)
            out[key] = total
            out[f"{key}_per_s"] = total / t if t > 0 else None
    if out.get("tokens") and out.get("padded_tokens"):
        out["fill"] = out["tokens"] / out["padded_tokens"]      # real tokens / tokens computed
    out["first_loss"], out["last_loss"] = records[0]["loss"], records[-1]["loss"]
    return out


def table(tune: dict, peft: dict, tune_wall: float, peft_wall: float, peer: str = "PEFT") -> str:
    rows = [
        ("tokens/s (non-padding inputs)", "tokens_per_s", True),
        ("supervised tokens/s", "supervised_tokens_per_s", True),
        ("examples/s", "examples_per_s", True),
        ("step time, mean (s)", "step_time_s_mean", False),
        ("step time, median (s)", "step_time_s_median", False),
        ("row fill (real / computed tokens)", "fill", True),
    ]
    lines = [f"{'':36} {'tune':>12} {peer:>12} {'tune/' + peer:>10}", "-" * 73]
    for label, key, _ in rows:
        a, b = tune.get(key), peft.get(key)
        fa = f"{a:12,.3f}" if isinstance(a, float) and a < 100 else (f"{a:12,.0f}" if a is not None else f"{'n/a':>12}")
        fb = f"{b:12,.3f}" if isinstance(b, float) and b < 100 else (f"{b:12,.0f}" if b is not None else f"{'n/a':>12}")
        ratio = f"{a / b:10.2f}" if a and b else f"{'n/a':>10}"
        lines.append(f"{label:36} {fa} {fb} {ratio}")
    lines.append(f"{'end to end, whole process (s)':36} {tune_wall:12,.1f} {peft_wall:12,.1f} "
                 f"{tune_wall / peft_wall:10.2f}")
    lines.append(f"(throughput rows: tune/{peer} > 1 means tune is faster; time rows: < 1 means tune "
                 "is faster)")
    return "\n".join(lines)


def platform_name(tune: dict | None, peft: dict | None) -> str:
    backend = ((tune or {}).get("summary") or {}).get("backend") or (peft or {}).get("device") or "cpu"
    return {"cuda": "gpu"}.get(backend, backend)


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="training file (default: %(default)s)")
    ap.add_argument("--recipe", default="finance")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-rows", type=int, default=2000,
                    help="rows read (enough that N steps fit in the epochs; default %(default)s)")
    ap.add_argument("--epochs", type=int, default=10,
                    help="schedule.epochs for tune (max_steps caps it; default %(default)s)")
    ap.add_argument("--no-pack", action="store_true", help="tune with runtime.pack=false (padded, like PEFT)")
    ap.add_argument("--row-length", type=int, default=None,
                    help="tune's runtime.row_length: packed rows of this many tokens, batch-size × "
                         "max-length / row-length of them a step (the same tokens per step); PEFT "
                         "keeps batch-size examples")
    ap.add_argument("--device", default="auto", help="PEFT device: cpu, cuda or auto")
    ap.add_argument("--dtype", default=None, help="tune runtime.dtype (default: the recipe's, auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--work", default=None, help="keep the runs in this directory (default: a temp dir)")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/throughput-<platform>.json)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--trl", action="store_true",
                    help="also run the packed peer, TRL's SFTTrainer with padding-free packing "
                         "(benchmarks/trl_reference.py; bfloat16 autocast with --peft-cpu-bf16)")
    ap.add_argument("--peft-cpu-bf16", action="store_true",
                    help="PEFT under torch.autocast(cpu, bfloat16), tune's CPU matmuls' peer")
    ap.add_argument("--record", action="store_true",
                    help="also write the table into benchmarks/RESULTS.md (its throughput section)")
    ap.add_argument("--skip", type=int, default=1, help="first steps left out of the figures (default 1)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate tune and PEFT runs this many times; report each side's best")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each run wait up to SECONDS for the load average to drop below 0.7")
    ap.add_argument("--tune-override", action="append", metavar="KEY=VALUE",
                    help="extra override for tune (repeatable)")
    return ap.parse_args(argv)


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def wait_quiet(limit_s: float, threshold: float = 0.7) -> float | None:
    """Wait (at most limit_s) until the 1-minute load average drops below threshold: other processes
    on the machine would be measured too. Returns the load average at the start of the run."""
    t0 = time.perf_counter()
    while limit_s > 0 and (loadavg() or 0) >= threshold and time.perf_counter() - t0 < limit_s:
        time.sleep(5)
    return loadavg()


def best(runs: list[dict]) -> dict:
    """The run of one side with the highest steady tokens/s (the least disturbed one)."""
    return max(runs, key=lambda r: r["steady"].get("tokens_per_s") or 0)


def record(args, argv, header: str, text: str, loads) -> None:
    """Replace this configuration's section of benchmarks/RESULTS.md with the table."""
    import datetime as dt
    import shlex

    argv = sys.argv[1:] if argv is None else list(argv)
    keep, skip = [], False
    for a in argv:                      # options that do not change the figures
        if skip:
            skip = False
        elif a in ("--work", "--out"):
            skip = True
        elif a != "--record" and not a.startswith(("--work=", "--out=")):
            keep.append(a)
    name = ("throughput-nopack" if args.no_pack else "throughput") + \
        ("-peft-bf16" if args.peft_cpu_bf16 else "") + ("-rows" if args.row_length else "") + \
        ("-trl" if args.trl else "")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    loads = [x for x in loads if x is not None]
    section = "\n".join([
        begin,
        f"## Throughput{' — tune unpacked (runtime.pack=false)' if args.no_pack else ''}"
        + (" — PEFT under bfloat16 autocast" if args.peft_cpu_bf16 else "")
        + (" — and TRL's SFTTrainer, packed" if args.trl else "")
        + (f" — tune's packed rows {args.row_length} tokens long (runtime.row_length)"
           if args.row_length else ""),
        "",
        f"Measured {dt.datetime.now():%Y-%m-%d %H:%M}"
        + (f"; 1-minute load average before the runs {min(loads)}–{max(loads)}" if loads else "") + ".",
        "",
        "```",
        "python benchmarks/throughput.py" + (" " + shlex.join(keep) if keep else ""),
        "```",
        "",
        "```",
        header,
        text,
        "```",
        end])
    path = Path(__file__).resolve().parent / "RESULTS.md"
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + section + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(doc)
    print(f"recorded in {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.data).is_file():
        raise SystemExit(f"no training file at {args.data} (use --data)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tune-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    tune_runs, peft_runs, trl_runs, plan = [], [], [], None
    for rep in range(args.repeat):
        sub = work / f"round{rep}" if args.repeat > 1 else work
        load = wait_quiet(args.wait_quiet)
        tune = run_tune(args, sub)
        tune.update(steady=steady(tune["records"], args.skip), load_before=load, load_after=loadavg())
        tune_runs.append(tune)
        plan = plan or tune["plan"]
        if len(tune["records"]) < args.steps:
            print(f"warning: tune ran {len(tune['records'])} steps, fewer than --steps {args.steps} "
                  "(raise --max-rows or --epochs)", file=sys.stderr)
        if tune["count_mismatch_steps"]:
            print("warning: metrics.jsonl token counts differ from the batches rebuilt from the plan "
                  f"at steps {tune['count_mismatch_steps'][:10]}", file=sys.stderr)
        if not args.skip_peft:
            load = wait_quiet(args.wait_quiet)
            peft = run_peft(args, sub, Path(tune_runs[0]["run_dir"]) / "plan.json")
            peft.update(steady=steady(peft["records"], args.skip), load_before=load, load_after=loadavg())
            peft_runs.append(peft)
        if args.trl:
            load = wait_quiet(args.wait_quiet)
            trl = run_trl(args, sub, Path(tune_runs[0]["run_dir"]) / "plan.json")
            trl.update(steady=steady(trl["records"], args.skip), load_before=load, load_after=loadavg())
            trl_runs.append(trl)
        print(f"[round {rep + 1}/{args.repeat}] tune {tune['steady'].get('tokens_per_s', 0):,.0f} tok/s"
              + (f", PEFT {peft_runs[-1]['steady'].get('tokens_per_s', 0):,.0f} tok/s" if peft_runs else "")
              + (f", TRL {trl_runs[-1]['steady'].get('tokens_per_s', 0):,.0f} tok/s" if trl_runs else "")
              + f" (load average {loadavg()})", file=sys.stderr, flush=True)

    tune = best(tune_runs)
    peft = best(peft_runs) if peft_runs else None
    trl = best(trl_runs) if trl_runs else None
    tune_fig, peft_fig = tune["steady"], (peft or {}).get("steady")
    plat = platform_name(tune, peft)
    s = plan["schedule"]
    header = (f"throughput on {plat} ({platform.machine()}, {os.cpu_count()} CPUs): "
              f"recipe {args.recipe}, {len(tune['records'])} steps ({args.skip} left out), batch "
              f"{args.batch_size}×{s.get('grad_accum', 1)}, max_length {args.max_length}, "
              f"tune {'unpacked' if args.no_pack else 'packed'}"
              + (f" in {s['batch_size']} rows of {s['seq_len']}" if args.row_length else "")
              + f" (compute {plan['runtime']['dtype']}, "
              f"matmuls {plan['runtime'].get('matmul_dtype', plan['runtime']['dtype'])}), PEFT padded "
              f"per batch ({(peft or {}).get('dtype', 'not run')})"
              + (f", TRL SFTTrainer packed padding-free ({trl['dtype']})" if trl else "")
              + (f"; best of {args.repeat} alternating runs" if args.repeat > 1 else ""))
    print("\n" + header)
    if peft_fig:
        text = table(tune_fig, peft_fig, tune["wall_s"], peft["process_wall_s"])
        l1, l2 = tune["records"][0]["loss"], peft["records"][0]["loss"]
        exact = plan["runtime"].get("matmul_dtype", "float32") == plan["runtime"]["dtype"]
        text += (f"\nstep-1 loss: tune {l1:.5f}, PEFT {l2:.5f}"
                 + ((" (same batch, LoRA B = 0: must agree)" if exact else
                     " (same batch, LoRA B = 0; tune's matmuls in bfloat16: agree to ~1% — "
                     "to ~1e-5 with runtime.matmul_dtype=float32)") if args.no_pack else
                    " (different batches: tune packs)"))
        if trl:
            text += "\n\n" + table(tune_fig, trl["steady"], tune["wall_s"], trl["process_wall_s"],
                                    peer="TRL") + f"\nstep-1 loss: TRL {trl['records'][0]['loss']:.5f}"
            fastest = max((("PEFT", peft_fig), ("TRL", trl["steady"])),
                          key=lambda p: p[1].get("tokens_per_s") or 0)
            text += (f"\n\ntune against the fastest peer ({fastest[0]}): "
                     f"{tune_fig['tokens_per_s'] / fastest[1]['tokens_per_s']:.2f}× tokens/s")
        print(text)
        if args.record:
            record(args, argv, header, text, [r["load_before"] for r in tune_runs + peft_runs])
        loads = [r["load_before"] for r in tune_runs + peft_runs if r.get("load_before") is not None]
        if loads and max(loads) >= 1.0:
            print(f"note: other processes were running (1-min load average up to {max(loads)} before a "
                  "run): the figures measure them too", file=sys.stderr)
    else:
        print(json.dumps(tune_fig, indent=1))

    def tune_entry(r):
        return {"command": r["command"], "process_wall_s": r["wall_s"], "compile_s": r["compile_s"],
                "steady": r["steady"], "summary": r["summary"], "records": r["records"],
                "count_mismatch_steps": r["count_mismatch_steps"], "load_before": r["load_before"],
                "load_after": r["load_after"]}

    def peft_entry(r):
        return {"command": r["command"], "process_wall_s": r["process_wall_s"], "load_s": r.get("load_s"),
                "device": r.get("device"), "dtype": r.get("dtype"), "torch_threads": r.get("torch_threads"),
                "steady": r["steady"], "records": r["records"], "load_before": r["load_before"],
                "load_after": r["load_after"]}

    result = {
        "settings": {k: v for k, v in vars(args).items()},
        "platform": plat, "machine": platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "pack": not args.no_pack, "plan_hash": plan.get("hash"),
        "tune": tune_entry(tune),
        "wall_s": time.perf_counter() - t0,
    }
    if args.repeat > 1:
        result["tune_runs"] = [r["steady"] | {"load_before": r["load_before"]} for r in tune_runs]
    if trl:
        result["trl"] = peft_entry(trl)
        result["ratios_tune_over_trl"] = {
            k: tune_fig[k] / trl["steady"][k] for k in
            ("tokens_per_s", "supervised_tokens_per_s", "examples_per_s", "step_time_s_mean")
            if tune_fig.get(k) and trl["steady"].get(k)}
    if peft:
        result["peft"] = peft_entry(peft)
        if args.repeat > 1:
            result["peft_runs"] = [r["steady"] | {"load_before": r["load_before"]} for r in peft_runs]
        result["ratios_tune_over_peft"] = {
            k: tune_fig[k] / peft_fig[k] for k in
            ("tokens_per_s", "supervised_tokens_per_s", "examples_per_s", "step_time_s_mean")
            if tune_fig.get(k) and peft_fig.get(k)}
    suffix = (("-nopack" if args.no_pack else "") + ("-peft-bf16" if args.peft_cpu_bf16 else "")
              + ("-trl" if args.trl else "")
              + (f"-rows{args.row_length}" if args.row_length else ""))
    out = Path(args.out) if args.out else RESULTS / f"throughput-{plat}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nraw figures: {out}")
    if args.work:
        print(f"runs and logs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
