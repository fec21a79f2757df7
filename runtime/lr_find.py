"""`tune lr-find`: the learning-rate range test, on a throw-away adapter.

The plan's model, LoRA and batches, trained with a learning rate that rises exponentially from
lr_find.start_lr to lr_find.end_lr over lr_find.steps optimizer steps (AdamW as the plan sets it,
no warmup, no decay). The loss is smoothed (an exponential moving average, bias-corrected); the
test stops early once the smoothed loss exceeds lr_find.stop_factor × its minimum, or is not
finite. Nothing is saved but lr_find.json and lr_find.png.

The suggestion is a tenth of the learning rate at the smoothed loss's minimum. The other common
rule, where the smoothed loss falls fastest against log(lr) before its minimum (the steepest
descent), is reported beside it: on the recipes' example data it lands about 10× below the best
learning rate of a short run, a tenth of the minimum within about 2× of it (benchmarks/lr_check.py,
benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from core.files import write_atomic, write_json
from core.plan import Plan
from runtime import build
from runtime.mesh import make_mesh, put_batch
from runtime.progress import Progress, log

SMOOTHING = 0.9
LR_FIND_FILE, LR_FIND_PLOT = "lr_find.json", "lr_find.png"


def lr_find(plan: Plan, run_dir, *, start_lr: float, end_lr: float, steps: int,
            stop_factor: float) -> dict:
    """Run the range test; write run_dir/lr_find.json and lr_find.png; return the result."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(plan.runtime.mesh)
    graphdef, lora, frozen = build.training_model(plan, mesh)
    batcher, _ = build.batches(plan)

    def lr_fn(step):
        return start_lr * (end_lr / start_lr) ** (jnp.asarray(step, jnp.float32) / max(steps - 1, 1))

    optimizer, _ = build.optimizer(plan.schedule, lr_fn, head_lr=plan.adapter.head_lr)
    opt_state, shardings = build.place_optimizer(mesh, optimizer, lora)
    step_fn = build.train_step(plan, graphdef, optimizer, lr_fn, mesh, shardings)
    fixed = build.fixed_inputs(plan, frozen, lora)
    rng, positions = jax.random.PRNGKey(plan.schedule.seed), batcher.positions_from(0, 0)
    lrs, losses, smoothed, avg, stopped = [], [], [], 0.0, "reached lr_find.end_lr"
    t0 = time.perf_counter()
    log(f"lr-find: up to {steps} steps, learning rate {start_lr:g} → {end_lr:g}")
    with Progress(steps, description="lr-find", every=plan.runtime.progress_every) as bar:
        for k in range(steps):
            e, i = next(positions)
            lora, opt_state, m = step_fn(lora, opt_state, fixed, put_batch(batcher.batch(e, i), mesh),
                                         rng, jnp.int32(k))
            loss, lr = float(m["loss"]), float(m["lr"])
            bar.update(k + 1, loss=loss)
            if not math.isfinite(loss):
                stopped = f"the loss was not finite at learning rate {lr:.3g}"
                break
            avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(avg / (1 - SMOOTHING ** (k + 1)))
            if k > 5 and smoothed[-1] > stop_factor * min(smoothed):
                stopped = f"the smoothed loss passed {stop_factor:g}× its minimum at {lr:.3g}"
                break
    result = {"lrs": lrs, "losses": losses, "smoothed": smoothed, "stopped": stopped,
              "seconds": time.perf_counter() - t0, "start_lr": start_lr, "end_lr": end_lr,
              "plan_hash": plan.hash, **suggest(lrs, smoothed)}
    write_json(run_dir / LR_FIND_FILE, result)
    png = plot(result)
    if png is not None:
        write_atomic(run_dir / LR_FIND_PLOT, png)
    if result["suggested_lr"] is not None:
        log(f"lr-find: suggested schedule.lr={result['suggested_lr']:.2g} ({result['rule']}); "
            f"steepest descent at {result['steepest_lr']:.2g}; stopped: {stopped}")
    else:
        log(f"lr-find: too few steps to suggest a learning rate ({stopped})")
    return result


def suggest(lrs: list[float], smoothed: list[float]) -> dict:
    """{"suggested_lr", "rule", "min_lr_tenth", "steepest_lr"}: the suggestion is a tenth of the
    minimum's learning rate; the steepest descent of the smoothed loss against log(lr) before its
    minimum is given beside it."""
    if len(lrs) < 5:
        return {"suggested_lr": None, "rule": None, "min_lr_tenth": None, "steepest_lr": None}
    low = int(np.argmin(smoothed))
    x, y = np.log(np.asarray(lrs[:low + 1])), np.asarray(smoothed[:low + 1])
    if len(x) >= 3:
        slope = np.gradient(y, x)
        best = int(np.argmin(slope))
    else:
        best = low
    return {"suggested_lr": float(lrs[low] / 10),
            "rule": "a tenth of the learning rate at the smoothed loss's minimum",
            "min_lr_tenth": float(lrs[low] / 10), "steepest_lr": float(lrs[best])}


def plot(result: dict) -> bytes | None:
    if not result["lrs"]:
        return None
    from runtime.report import _figure, _png

    fig, ax = _figure(7.0, 3.8)
    ax.plot(result["lrs"], result["losses"], color="#9a9a9a", lw=0.8, label="loss")
    ax.plot(result["lrs"], result["smoothed"], color="#1f77b4", lw=1.6, label="smoothed")
    if result.get("suggested_lr"):
        ax.axvline(result["suggested_lr"], color="#2ca02c", ls="--",
                   label=f"suggested {result['suggested_lr']:.2g}")
    if result.get("steepest_lr"):
        ax.axvline(result["steepest_lr"], color="#9a9a9a", ls=":",
                   label=f"steepest descent {result['steepest_lr']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate range test")
    ax.legend(frameon=False)
    return _png(fig)
