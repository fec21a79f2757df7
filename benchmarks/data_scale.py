"""Data at scale: compile time and peak memory of `tune plan` at 10k, 100k and 1M rows, with a cold
token cache and with a warm one, and a 2-step training run's wall time and peak memory.

The rows are Banking77's training questions (../shared/data/customer_support/banking77), repeated
with a suffix per row (`(ref N)`) so that every row is distinct, written once to --out. Each
measurement is one `tune` process; its peak RSS is the kernel's ru_maxrss of that process
(os.wait4). A cold measurement starts from an empty token cache and data-stage cache (a private
$TUNE_HOME whose models/ links to the real one, so no model is converted again).

    python benchmarks/data_scale.py                       # 10k, 100k, 1M: plan cold + warm
    python benchmarks/data_scale.py --sizes 100000 --train   # + `tune train` of 2 steps (with the
                                                             # default validation, no test file)
    python benchmarks/data_scale.py --json results/data-scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT.parent / "shared" / "data" / "customer_support" / "banking77" / "train.jsonl"


def synthetic(n: int, out: Path) -> Path:
    path = out / f"banking77-{n}.jsonl"
    if path.is_file():
        return path
    rows = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            r = rows[i % len(rows)]
            f.write(json.dumps({"text": f"{r['text']} (ref {i})", "label": r["label"]}) + "\n")
    tmp.replace(path)
    return path


def measure(argv: list[str], env: dict) -> dict:
    """Wall seconds, peak RSS (MiB) and exit code of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(out.decode(errors="replace")[-3000:])
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "rc": proc.returncode, "output": out.decode(errors="replace")}


def fresh_home(base: Path) -> Path:
    """An empty $TUNE_HOME whose models/ is the real one's (converted models are reused)."""
    real = Path(os.environ.get("TUNE_HOME") or Path.home() / ".cache" / "tune").expanduser()
    home = Path(tempfile.mkdtemp(prefix="home-", dir=base))
    (real / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(real / "models")
    return home


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "tune-data-scale"))
    ap.add_argument("--train", action="store_true", help="also time `tune` with schedule.max_steps=2")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tune = [sys.executable, "-m", "tune.cli"] if not shutil.which("tune") else [shutil.which("tune")]
    # the tokenizer gets warm once, outside the figures (model conversion, imports in the page cache)
    results = []
    print("| rows | file MB | plan, cold cache | peak RSS | plan, warm cache | peak RSS |"
          + (" train 2 steps, cold | peak RSS | train 2 steps, warm | peak RSS |" if args.train else ""))
    print("| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: | ---: |" if args.train else ""))
    for n in [int(x) for x in args.sizes.split(",")]:
        path = synthetic(n, out)
        home = fresh_home(out)
        env = {**os.environ, "TUNE_HOME": str(home), "PYTHONPATH": str(ROOT)}
        common = ["+recipe=customer_support", f"data.path={path}"]
        row = {"rows": n, "file_mb": round(path.stat().st_size / 2**20, 1)}
        row["plan_cold"] = measure(tune + ["plan", *common, f"hydra.run.dir={home}/plan-cold"], env)
        row["plan_warm"] = measure(tune + ["plan", *common, f"hydra.run.dir={home}/plan-warm"], env)
        if args.train:
            shutil.rmtree(home / "cache", ignore_errors=True)
            # the test file's scoring (base and tuned, the same 72 example rows at every size) is
            # left out: it does not depend on the training file's size
            train = ["train", *common, "schedule.max_steps=2", "data.test_path=null"]
            row["train_cold"] = measure(tune + [*train, f"hydra.run.dir={home}/train-cold"], env)
            row["train_warm"] = measure(tune + [*train, f"hydra.run.dir={home}/train-warm"], env)
        cells = [f"{n:,}", f"{row['file_mb']}"]
        for k in ("plan_cold", "plan_warm") + (("train_cold", "train_warm") if args.train else ()):
            r = row[k]
            cells += [f"{r['wall_s']:.1f} s" if r["rc"] == 0 else f"exit {r['rc']}",
                      f"{r['peak_rss_mib']:,.0f} MiB"]
        print("| " + " | ".join(cells) + " |", flush=True)
        for k in list(row):
            if isinstance(row[k], dict):
                row[k].pop("output", None)
        results.append(row)
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "cpus": os.cpu_count()},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
