"""Memory: the plan's estimate per device against what XLA allocates for the compiled train step.

For each case, `tune plan` compiles the recipe with the case's overrides; the step is then lowered
and compiled exactly as training does (runtime.run.setup), and its memory_analysis() gives XLA's
figure: arguments (weights, LoRA and optimizer state) + temporaries + outputs − donated buffers.
Nothing runs, so a case larger than this machine's memory is still measured.

    python benchmarks/memory.py                       # the demo and a long-sequence plan, each remat
    python benchmarks/memory.py --case "data.max_length=4096 schedule.batch_size=1 runtime.remat=full"

Writes the table into benchmarks/RESULTS.md (between the memory markers) and the raw figures into
benchmarks/results/memory-<platform>.json. On a GPU, XLA's figure is the compiled step's too (peak
device memory of a real run can be higher by the allocator's slack).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import tune_command, write_results_section  # noqa: E402

BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"
CASES = [
    "runtime.remat=none",
    "runtime.remat=dots",
    "runtime.remat=full",
    "data.max_length=1024 schedule.batch_size=2 runtime.remat=none",
    "data.max_length=4096 schedule.batch_size=1 runtime.remat=full",
    "data.max_length=4096 schedule.batch_size=1 runtime.remat=full runtime.attention_block=0",
    "data.max_length=4096 schedule.batch_size=1 runtime.remat=dots",
    # adapters: base weights quantised, DoRA, modules trained in full (remat full: weights and
    # optimizer state are most of the step)
    "runtime.remat=full adapter.quantize=int8",
    "runtime.remat=full adapter.quantize=nf4",
    "runtime.remat=full adapter.kind=dora",
    "runtime.remat=full adapter.train_modules=[norm,lm_head]",
]
# on 8 simulated devices: the figures are per device
MESH_CASES = [
    "runtime.remat=full runtime.mesh.fsdp=8",
    "runtime.remat=full runtime.mesh.data=4 runtime.mesh.tensor=2",
    "runtime.remat=full runtime.mesh.data=2 runtime.mesh.fsdp=2 runtime.mesh.tensor=2",
    "runtime.remat=none runtime.mesh.data=4 runtime.mesh.tensor=2",
]
_MEASURE = r"""
import json, sys, tempfile
from pathlib import Path
import jax, jax.numpy as jnp
from core.plan import Plan
from runtime import run
plan = Plan.load(sys.argv[1])
s = run.setup(plan, Path(tempfile.mkdtemp()))
batch = s.place(s.batcher.batch(0, 0))
m = s.step_fn.lower(s.lora, s.opt_state, s.frozen, batch, s.rng, jnp.int32(0)).compile().memory_analysis()
print(json.dumps({"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
                  "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
                  "platform": jax.default_backend()}))
"""


def measure(recipe: str, case: str, work: Path, devices: int = 1) -> dict:
    run_dir = work / re.sub(r"[^A-Za-z0-9_.-]+", "-", case)
    # 8 rows a step unless the case says otherwise: every mesh case divides it, and the table's
    # figures stay comparable when a recipe's batch size changes
    batch = [] if "schedule.batch_size=" in case else ["schedule.batch_size=8"]
    cmd = tune_command() + ["plan", f"+recipe={recipe}", f"hydra.run.dir={run_dir}",
                            "data.overlength=truncate", *batch, *case.split()]
    env = dict(os.environ)
    if devices > 1:     # simulated host devices; memory_analysis() is then per device
        env.update(JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    plan = json.loads((run_dir / "plan.json").read_text())
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(run_dir / "plan.json")], check=True,
                         capture_output=True, text=True, cwd=HERE.parent, env=env)
    xla = json.loads(out.stdout.strip().splitlines()[-1])
    xla["total"] = xla["temp"] + xla["arguments"] + xla["outputs"] - xla["aliased"]
    est = plan["estimates"]["memory"]
    return {"case": case, "command": cmd, "seq_len": plan["schedule"]["seq_len"], "devices": devices,
            "batch": plan["schedule"]["batch_size"], "remat": plan["runtime"]["remat"],
            "estimate": est, "xla": xla, "ratio": est["total"] / xla["total"]}


def markdown(rows: list[dict], command: str, recipe: str) -> str:
    gib = 2 ** 30
    lines = [BEGIN, "## Memory estimate against XLA", "",
             f"Recipe `{recipe}` (SmolLM2-135M, float32, on {rows[0]['xla']['platform']}); XLA = the "
             "compiled train step's memory_analysis() (arguments + temporaries + outputs − donated); "
             "estimate = the plan's figure (`tune plan`, resources panel).", "",
             "```", command, "```", "",
             "The weights + state columns: the estimate's base weights and adapter + optimizer "
             "state against XLA's arguments (which are those, plus one batch).", "",
             "| case | rows × tokens | remat | estimate GiB (activations / attention / logits) | "
             "XLA GiB | estimate / XLA | weights + state: estimate / XLA GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["estimate"]
        devices = f" ({r['devices']} devices, per device)" if r.get("devices", 1) > 1 else ""
        lines.append(f"| `{r['case']}`{devices} | {r['batch']} × {r['seq_len']} | {r['remat']} | "
                     f"{e['total'] / gib:.2f} ({e['activations'] / gib:.2f} / "
                     f"{e['attention'] / gib:.2f} / {e['logits'] / gib:.2f}) | "
                     f"{r['xla']['total'] / gib:.2f} | {r['ratio']:.2f} | "
                     f"{(e['weights'] + e['adapter_optimizer']) / gib:.3f} / "
                     f"{r['xla']['arguments'] / gib:.3f} |")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="legal")
    ap.add_argument("--case", action="append", help="overrides of one case (repeatable)")
    ap.add_argument("--mesh-case", action="append",
                    help="overrides of one case measured on --devices simulated devices (repeatable)")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(args.recipe, case, Path(work)) for case in (args.case or CASES)]
        rows += [measure(args.recipe, case, Path(work), args.devices)
                 for case in (args.mesh_case if args.mesh_case is not None else
                              ([] if args.case else MESH_CASES))]
    command = "python benchmarks/memory.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, command.strip(), args.recipe)
    print(text)
    if not args.no_write:       # the raw figures and the table, from the same run
        plat = rows[0]["xla"]["platform"]
        out = HERE / "results" / f"memory-{plat}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": command, "machine": platform.machine(), "rows": rows},
                                  indent=1) + "\n")
        write_results_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
