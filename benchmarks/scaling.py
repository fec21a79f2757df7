"""Meshes against one device: the same recipe, the same steps, on 1 device and on meshes of N
(simulated CPU devices here; real GPUs or TPUs where there are), compared step by step.

    python benchmarks/scaling.py                      # legal, 3 steps, 8 devices, four meshes
    python benchmarks/scaling.py --steps 5 --mesh 8,1,1 --mesh 2,2,2

Each mesh trains in its own process with XLA_FLAGS=--xla_force_host_platform_device_count=N (on a
CPU; on accelerators the devices are real). The table gives the largest relative difference of the
per-step losses from the one-device run and of the adapter's tensors, and the step time. Writes it
into benchmarks/RESULTS.md (between the scaling markers) and the raw figures into
benchmarks/results/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import publish, tune_command  # noqa: E402

BEGIN, END = "<!-- scaling:begin -->", "<!-- scaling:end -->"
MESHES = ["8,1,1", "1,8,1", "2,2,2", "4,1,2"]


def train(recipe: str, mesh: str, devices: int, steps: int, work: Path) -> dict:
    d, f, t = mesh.split(",")
    run_dir = work / mesh.replace(",", "-")
    cmd = tune_command() + [f"+recipe={recipe}", f"hydra.run.dir={run_dir}",
                            f"schedule.max_steps={steps}", "data.test_path=null",
                            "runtime.checkpoint_every=0", f"runtime.mesh.data={d}",
                            f"runtime.mesh.fsdp={f}", f"runtime.mesh.tensor={t}"]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    from safetensors.numpy import load_file

    from core.records import TrainSummary

    summary = TrainSummary.read(run_dir)

    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return {"mesh": mesh, "devices": devices, "losses": [r["loss"] for r in rows if "loss" in r],
            "step_s": summary.step_time_s_mean, "adapter": adapter}


def compare(one: dict, other: dict) -> dict:
    a, b = np.array(one["losses"]), np.array(other["losses"])
    loss_rel = float(np.max(np.abs(a - b) / np.abs(a)))
    frob = [float(np.linalg.norm(one["adapter"][k] - other["adapter"][k]) /
                  max(float(np.linalg.norm(one["adapter"][k])), 1e-30)) for k in one["adapter"]]
    elem = [float(np.abs(one["adapter"][k] - other["adapter"][k]).max() /
                  max(float(np.abs(one["adapter"][k]).max()), 1e-30)) for k in one["adapter"]]
    return {"loss_rel": loss_rel, "adapter_rel_median": float(np.median(frob)),
            "adapter_rel_max": max(frob), "adapter_elem_max": max(elem)}


def markdown(rows: list[dict], recipe: str, steps: int, command: str) -> str:
    lines = [BEGIN, "## Meshes against one device", "",
             f"Recipe `{recipe}` (SmolLM2-135M, float32), {steps} steps on each mesh of simulated "
             "CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N` on this 2-core "
             "machine: the step times measure the partitioning's overhead, not a speed-up) against "
             "the same steps on one device: the largest relative difference of the per-step loss; "
             "for the adapter, each tensor's relative difference ‖a − b‖ / ‖a‖ (median and "
             "largest over the tensors) and the largest single-element difference relative to its "
             "tensor's largest element.", "",
             "```", command, "```", "",
             "| mesh (data, fsdp, tensor) | devices | loss, max rel. diff | adapter tensors, median / "
             "max rel. diff | adapter, max element diff | s / step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mesh']} | {r['devices']} | {r['loss_rel']:.1e} | "
                     f"{r['adapter_rel_median']:.1e} / {r['adapter_rel_max']:.1e} | "
                     f"{r['adapter_elem_max']:.1e} | {r['step_s']:.2f} |")
    lines += ["", "Losses agree to float32 rounding. The adapters agree as closely except for a few "
              "elements whose gradient is near zero after the first steps: Adam moves every element "
              "by about the learning rate whatever its gradient's size, so rounding that flips such "
              "a gradient's sign moves the element by a fraction of the learning rate (the largest "
              "element differences are of LoRA B factors, which start at zero). "
              "`tests/test_scaling.py` checks the same meshes to 1e-5 on every step and every "
              "adapter element on a tiny model.", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="legal")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", action="append", help="data,fsdp,tensor (repeatable)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        one = train(args.recipe, "1,1,1", 1, args.steps, Path(work))
        rows.append({"mesh": "1,1,1", "devices": 1, "loss_rel": 0.0, "adapter_rel_median": 0.0,
                     "adapter_rel_max": 0.0, "adapter_elem_max": 0.0, "step_s": one["step_s"],
                     "losses": one["losses"]})
        for mesh in args.mesh or MESHES:
            other = train(args.recipe, mesh, args.devices, args.steps, Path(work))
            rows.append({"mesh": mesh, "devices": args.devices, **compare(one, other),
                         "step_s": other["step_s"], "losses": other["losses"]})
            print(json.dumps(rows[-1]), flush=True)
    publish("scaling", argv, rows, lambda c: markdown(rows, args.recipe, args.steps, c), BEGIN, END,
            write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
