"""Plan in, trained adapter out: `train(plan, run_dir)` = setup → loop → finish.

- setup: the plan's mesh, the model split into LoRA (trained) and frozen weights, the token batches,
  the optimizer and the jitted step, then the newest checkpoint of this plan if there is one;
- loop: the steps, with metrics.jsonl, validation, checkpoints and Ctrl-C;
- finish: a last checkpoint and validation, adapter/ and train_summary.json.
Every metrics.jsonl row also goes to the plan's experiment trackers (runtime/tracking.py), if any.
Every number comes from the plan (plan.schedule, plan.runtime, plan.eval); nothing here has a default
of its own. Evaluating the adapter and writing the report are the command's next steps
(tune/commands.py), not part of training.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.errors import Diverged
from core.files import write_atomic
from core.plan import Plan
from core.records import TrainSummary
from runtime import build, checkpoint
from runtime.batching import Batcher, Prefetcher
from runtime.mesh import (is_main_process, make_mesh, maybe_initialize_distributed, put_batch,
                          put_global, to_host)
from runtime.progress import Progress, log
from runtime.tracking import Tracker

INTERRUPTED_EXIT = 130


@dataclass
class Session:
    """What setup builds and the loop advances: the training state and where it is in the data."""
    plan: Plan
    run_dir: Path
    mesh: object
    graphdef: object
    lora: object                    # trained parameters (LoRA, ...); updated every step
    opt_state: object
    frozen: object                  # the frozen weights (never donated)
    fixed: object                   # what the step takes besides the trained state: the frozen
                                    # weights, or (frozen, reference) for a preference objective
    rng: jax.Array
    batcher: Batcher
    val_batcher: Batcher | None
    step_fn: object
    probe_fn: object                # adapter.head_probe's step (the head alone), or None
    eval_fn: object
    started: float                  # perf_counter at setup
    step: int = 0                   # steps done
    position: tuple = (0, 0)        # (epoch, index) of the next batch
    tokens_seen: int = 0
    resumed_from: int | None = None
    compile_s: float | None = None
    step_times: list = field(default_factory=list)
    shardings: tuple = ()           # (trained, optimizer state): where the step keeps them
    tracker: Tracker | None = None  # where metrics.jsonl's rows are reported besides

    def place(self, batch):
        return put_batch(batch, self.mesh)


def train(plan: Plan, run_dir, *, on_step=None, tracker: Tracker | None = None) -> TrainSummary:
    """Train the plan's LoRA adapter into run_dir; resume from run_dir/checkpoints/ when present.

    Writes metrics.jsonl, checkpoints/, adapter/ and train_summary.json; returns the summary. Ctrl-C
    finishes the current step, writes a checkpoint and exits with code 130. `on_step(step)` is called
    after every completed step (a hook for tests and tools). `tracker`: the run's Tracker, started
    here and left open for the caller to report the evaluation and close; without one, training
    opens the plan's trackers itself and closes them when it ends."""
    session = setup(plan, Path(run_dir))
    own = Tracker(plan, run_dir) if tracker is None else None
    session.tracker = tracker or own
    with own if own is not None else nullcontext():
        session.tracker.start(resumed_from=session.resumed_from)
        loop(session, on_step=on_step)
        return finish(session)


# ------------------------------------------------------------------------------ setup

def setup(plan: Plan, run_dir: Path) -> Session:
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    maybe_initialize_distributed()
    mesh = make_mesh(plan.runtime.mesh)
    graphdef, lora, frozen = build.training_model(plan, mesh)
    batcher, val_batcher = build.batches(plan)
    optimizer, lr_fn = build.optimizer(plan.schedule, head_lr=plan.adapter.head_lr,
                                       head_probe=plan.adapter.head_probe_steps)
    opt_state, shardings = build.place_optimizer(mesh, optimizer, lora)
    session = Session(
        plan=plan, run_dir=run_dir, mesh=mesh, graphdef=graphdef, lora=lora, opt_state=opt_state,
        frozen=frozen, fixed=build.fixed_inputs(plan, frozen, lora),    # before any resume
        rng=jax.random.PRNGKey(plan.schedule.seed), batcher=batcher,
        val_batcher=val_batcher,
        step_fn=build.train_step(plan, graphdef, optimizer, lr_fn, mesh, shardings),
        probe_fn=build.train_step(plan, graphdef, optimizer, lr_fn, mesh, shardings, probe=True)
        if plan.adapter.head_probe_steps else None,
        eval_fn=build.eval_loss(plan, graphdef, mesh), started=started, shardings=shardings)
    _resume(session)
    return session


def _resume(s: Session) -> None:
    ckpt = checkpoint.load_latest(s.run_dir, plan_hash=s.plan.hash,
                                  total_steps=s.plan.schedule.total_steps,
                                  steps_per_epoch=s.batcher.steps_per_epoch, rng_template=s.rng,
                                  lora_template=s.lora, opt_template=s.opt_state)
    if ckpt is None:
        return
    s.step, s.position, s.resumed_from = ckpt.step, (ckpt.epoch, ckpt.index), ckpt.step
    s.lora = put_global(ckpt.lora, s.shardings[0])
    s.opt_state = put_global(ckpt.opt_state, s.shardings[1])
    s.rng = jnp.asarray(ckpt.rng, dtype=jnp.uint32)
    s.tokens_seen = int(ckpt.extra.get("tokens_seen", 0))
    log(f"resuming from step {s.step} ({ckpt.path.name})")


# ------------------------------------------------------------------------------ loop

def loop(s: Session, *, on_step=None) -> None:
    """Run the steps from s.step to the plan's total. Ctrl-C: finish the step, checkpoint, exit 130."""
    sched, rt = s.plan.schedule, s.plan.runtime
    total, start = sched.total_steps, s.step
    metrics = Metrics(s.run_dir / "metrics.jsonl",
                      keep_through_step=s.step if s.resumed_from is not None else None,
                      tracker=s.tracker)
    shape = s.batcher.shape
    log(f"training {total} steps ({sched.steps_per_epoch} per epoch), batch {shape.grad_accum}×"
        f"{shape.batch_size}×{shape.seq_len}, mesh {dict(s.mesh.shape)}, {jax.device_count()} "
        f"{jax.default_backend()} device(s)")
    compiled, interrupted = {}, False       # by batch shape (unpacked batches are trimmed), probe
    try:
        with _Interrupt() as stop, Progress(total, start=s.step, every=rt.progress_every) as bar, \
                Prefetcher(s.batcher, s.position, total - s.step, s.place) as batches:
            t_prev = time.perf_counter()
            for e, i, batch in batches:
                # the head alone (adapter.head_probe): a step with no backward pass through the model
                probe = s.probe_fn is not None and s.step < s.plan.adapter.head_probe_steps
                key = (batch["tokens"].shape, probe)
                if key not in compiled:
                    step_fn = s.probe_fn if probe else s.step_fn
                    compiled[key] = _compile(s, step_fn, batch, metrics)
                    t_prev = time.perf_counter()
                m = _step(s, compiled[key], batch, (e, i))
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    metrics.write({"step": s.step, "epoch": e, "loss": None, "lr": m["lr"],
                                   "grad_norm": None, "diverged": True})
                    raise Diverged(s.step, m["loss"], m["grad_norm"], m["lr"])
                now = time.perf_counter()
                dt, t_prev = now - t_prev, now
                s.step_times.append(dt)
                tps = m["n_inputs"] / dt if dt > 0 else None
                if s.step % rt.log_every == 0 or s.step == total or s.step == start + 1:
                    metrics.write({"step": s.step, "epoch": e, "loss": m["loss"], "lr": m["lr"],
                                   "grad_norm": m["grad_norm"], "tokens": m["n_tokens"],
                                   "tokens_seen": s.tokens_seen, "input_tokens": m["n_inputs"],
                                   "tokens_per_s": tps, "step_time_s": dt,
                                   "elapsed_s": time.perf_counter() - s.started, **m["extra"]})
                bar.update(s.step, loss=m["loss"], tokens_per_s=tps)
                if s.plan.eval.every and s.step % s.plan.eval.every == 0 and s.step < total:
                    val = validate(s, metrics)
                    if val is not None:
                        bar.print(f"step {s.step}: val_loss {val:.4f}")
                if on_step is not None:
                    on_step(s.step)
                if stop.requested:
                    save(s)
                    interrupted = True
                    break
                if rt.checkpoint_every and s.step % rt.checkpoint_every == 0 and s.step < total:
                    save(s)
                t_prev = time.perf_counter()       # validation, hooks and checkpoints are not step time
    finally:
        metrics.close()
    if interrupted:
        print(f"tune: interrupted at step {s.step}; checkpoint written; run the same command to "
              "resume", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT)


def _compile(s: Session, step_fn, batch, metrics) -> object:
    """step_fn compiled ahead of time for this batch shape (so its time is known and logged)."""
    t0 = time.perf_counter()
    try:
        compiled = step_fn.lower(s.lora, s.opt_state, s.fixed, batch, s.rng,
                                 jnp.asarray(s.step, dtype=jnp.int32)).compile()
    except Exception:             # noqa: BLE001 — AOT is only for timing; jit works
        compiled = step_fn
    s.compile_s = time.perf_counter() - t0
    metrics.write({"step": s.step + 1, "compile_s": s.compile_s})
    return compiled


def _step(s: Session, compiled, batch, at: tuple[int, int]) -> dict:
    """One optimizer step; advances the session. Returns its metrics as Python numbers."""
    s.lora, s.opt_state, m = compiled(s.lora, s.opt_state, s.fixed, batch, s.rng,
                                      jnp.asarray(s.step, dtype=jnp.int32))
    m = jax.device_get(m)                  # waits for the step: its time is honest
    s.step += 1
    e, i = at
    s.position = (e, i + 1) if i + 1 < s.batcher.steps_per_epoch else (e + 1, 0)
    out = {"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
           "n_tokens": int(m["n_tokens"]), "n_inputs": int(m["n_inputs"])}
    # a preference objective's own metrics, under TRL's names (rewards/chosen, logps/rejected, ...)
    out["extra"] = {k: float(v) for k, v in m.items() if k not in out and k != "n_units"}
    s.tokens_seen += out["n_tokens"]
    return out


def validate(s: Session, metrics) -> float | None:
    """Validation loss (Σ token CE / Σ supervised tokens over the val split; for a preference
    objective the mean loss of its pairs); logged at s.step."""
    if s.val_batcher is None:
        return None
    loss_sum, n = 0.0, 0.0
    for batch in s.val_batcher.epoch_batches(0):
        l, c = s.eval_fn(s.lora, s.fixed, s.place(batch))
        loss_sum += float(np.asarray(jax.device_get(l)))
        n += float(np.asarray(jax.device_get(c)))
    val = loss_sum / n if n else None
    metrics.write({"step": s.step, "val_loss": val, "val_tokens": int(n)})
    return val


def save(s: Session) -> None:
    e, i = s.position
    checkpoint.save(s.run_dir, step=s.step, epoch=e, index=i, rng=s.rng, plan_hash=s.plan.hash,
                    lora=s.lora, opt_state=s.opt_state, extra={"tokens_seen": s.tokens_seen})


# ------------------------------------------------------------------------------ finish

def finish(s: Session) -> TrainSummary:
    """A last checkpoint (re-running is then a no-op), the final validation, adapter/ and
    train_summary.json. Returns the summary."""
    from runtime.peft import save_peft_adapter

    if s.resumed_from is None or s.step > s.resumed_from:
        save(s)
    metrics = Metrics(s.run_dir / "metrics.jsonl", keep_through_step=s.step, tracker=s.tracker)
    try:
        logged = [r for r in metrics.rows if "val_loss" in r and r.get("step") == s.step]
        final_val = logged[-1]["val_loss"] if logged else validate(s, metrics)
        rows = metrics.rows
    finally:
        metrics.close()
    trained = to_host(s.lora)           # every process: gathering split arrays is a collective
    if is_main_process():
        model = nnx.merge(s.graphdef, s.frozen, trained)
        if s.plan.adapter.kind == "full":   # every weight trained: a whole transformers checkpoint
            from runtime.export import save_merged

            save_merged(model, build.trained_dir(s.plan, s.run_dir), s.plan.model.dir)
        else:
            save_peft_adapter(model, build.trained_dir(s.plan, s.run_dir),
                              base_model_name_or_path=s.plan.model.dir,
                              lora=build.lora_config(s.plan),
                              labels=[x.text for x in s.plan.data.labels] if model.score is not None
                              else None, pad_token_id=s.plan.model.pad_token_id)
    summary = _summary(s, rows, final_val)
    if is_main_process():
        summary.write(s.run_dir)
    first, final = summary.first_loss, summary.final_loss
    losses = f"loss {first:.4f} → {final:.4f}" if first is not None and final is not None else "no loss"
    val_text = f", val_loss {final_val:.4f}" if final_val is not None else ""
    log(f"done: {s.step} steps, {losses}{val_text}; "
        f"{'model' if s.plan.adapter.kind == 'full' else 'adapter'} in "
        f"{build.trained_dir(s.plan, s.run_dir)}")
    return summary


def _summary(s: Session, rows: list[dict], final_val) -> TrainSummary:
    losses = [r["loss"] for r in rows if "loss" in r]
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    compiles = [r["compile_s"] for r in rows if "compile_s" in r]
    steady = s.step_times[1:] if len(s.step_times) > 1 else s.step_times
    return TrainSummary(
        steps=s.step, total_steps=s.plan.schedule.total_steps,
        steps_per_epoch=s.plan.schedule.steps_per_epoch,
        first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
        final_val_loss=final_val, tokens_seen=s.tokens_seen,
        tokens_per_s_mean=float(np.mean(tps[1:] if len(tps) > 1 else tps)) if tps else None,
        step_time_s_mean=float(np.mean(steady)) if steady else None,
        compile_s=sum(compiles) if compiles else s.compile_s,     # every batch length's
        wall_s=time.perf_counter() - s.started, resumed_from=s.resumed_from,
        devices=jax.device_count(), backend=jax.default_backend(), dtype=s.plan.runtime.dtype,
        plan_hash=s.plan.hash)


# ------------------------------------------------------------------------------ pieces

class Metrics:
    """metrics.jsonl, appended one flushed line at a time (a kill leaves whole lines). Opened with
    keep_through_step, the file is first cut back to the rows of steps up to it (a resumed run
    rewrites what came after its checkpoint). Each row written is also handed to `tracker`."""

    def __init__(self, path: Path, keep_through_step: int | None, tracker: Tracker | None = None):
        self.path, self.tracker = path, tracker
        self.enabled = is_main_process()
        self.rows: list[dict] = []
        if not self.enabled:
            return
        if keep_through_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue                      # the half line of a killed run
                if isinstance(row, dict) and row.get("step", 0) <= keep_through_step:
                    self.rows.append(row)
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._f = open(path, "a")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.tracker is not None:
            self.tracker.log(row)

    def close(self):
        if self.enabled:
            self._f.close()


class _Interrupt:
    """First Ctrl-C: finish the step, checkpoint, exit 130. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("interrupt: finishing the current step, then writing a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
