"""Plan in, trained adapter out: `train(plan, run_dir)`.

Reads top to bottom: devices and mesh → model with LoRA → token examples → batches → resume? → the step
loop (metrics.jsonl, validation, checkpoints, Ctrl-C) → adapter/ and train_summary.json.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from runtime import checkpoint
from runtime.batching import Batcher, BatchShape, Prefetcher
from runtime.mesh import (batch_parallelism, frozen_shardings, make_mesh, maybe_initialize_distributed,
                          put_batch, replicated)
from runtime.progress import Progress, log
from runtime.train import make_eval_loss, make_optimizer, make_train_step, resolve_dtype, split_model

INTERRUPTED_EXIT = 130


def lora_config(plan):
    from runtime.model import LoraConfig

    a = plan.adapter
    return LoraConfig(rank=int(a["rank"]), alpha=float(a["alpha"]), dropout=float(a.get("dropout") or 0.0),
                      targets=tuple(a["targets"]))


def load_examples(plan):
    """The plan's token examples (compiler.examples: pure numpy + tokenizers, cached on disk)."""
    from compiler.examples import load_examples as load

    return load(plan.data)


def schedule_steps(plan, steps_per_epoch: int) -> tuple[int, int]:
    """(total_steps, warmup_steps). The plan's, when its steps per epoch is the batcher's; otherwise
    recomputed with the compiler's rule: ceil(epochs × steps_per_epoch), or max_steps when set; warmup
    below 1 is a fraction of the total, else a step count."""
    s = plan.schedule
    if s.get("total_steps") and s.get("steps_per_epoch") == steps_per_epoch:
        total = int(s["total_steps"])
        return total, min(int(s.get("warmup_steps") or 0), total)
    total = max(1, math.ceil(float(s.get("epochs") or 1) * steps_per_epoch))
    max_steps = s.get("max_steps")
    if max_steps is not None and int(max_steps) > 0:
        total = int(max_steps)
    warmup = s.get("warmup")
    if warmup is None:
        warmup_steps = int(s.get("warmup_steps") or 0)
    else:
        warmup_steps = round(float(warmup) * total) if float(warmup) < 1 else int(warmup)
    return total, max(0, min(warmup_steps, total))


class _Metrics:
    """metrics.jsonl, appended one flushed line at a time (a kill leaves whole lines)."""

    def __init__(self, path: Path, keep_through_step: int | None):
        self.path = path
        self.enabled = jax.process_index() == 0
        self.rows: list[dict] = []
        if not self.enabled:
            return
        rows = []
        if keep_through_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue                      # the half line of a killed run
                if isinstance(row, dict) and row.get("step", 0) <= keep_through_step:
                    rows.append(row)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
        self.rows = rows
        self._f = open(path, "a")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

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


def _f(x) -> float:
    return float(np.asarray(jax.device_get(x)))


def _validation(eval_fn, lora, frozen, val_batches) -> tuple[float, int]:
    loss_sum, n = 0.0, 0.0
    for batch in val_batches:
        l, c = eval_fn(lora, frozen, batch)
        loss_sum += _f(l)
        n += _f(c)
    return (loss_sum / n if n else None), int(n)


def train(plan, run_dir, *, on_step=None) -> dict:
    """Train the plan's LoRA adapter into run_dir; resume from run_dir/checkpoints/ when present.

    Writes metrics.jsonl, checkpoints/, adapter/ and train_summary.json; returns the summary. Ctrl-C
    finishes the current step, writes a checkpoint and exits with code 130. `on_step(step)` is called
    after every completed step (a hook for tests and tools)."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    maybe_initialize_distributed()
    rt = plan.config.get("runtime") or {}
    s = plan.schedule
    seed = int(s.get("seed") or 0)

    # devices
    mesh = make_mesh(rt.get("mesh"))
    shape = BatchShape(int(s.get("grad_accum") or 1), int(s["batch_size"]), int(s["seq_len"]))
    if shape.batch_size % batch_parallelism(mesh):
        raise ValueError(f"schedule.batch_size={shape.batch_size} does not divide over the mesh's "
                         f"data×fsdp={batch_parallelism(mesh)} devices")

    # model: LoRA trainable, the rest frozen
    from runtime.weights import load_pretrained

    lora_cfg = lora_config(plan)
    dtype = resolve_dtype(rt.get("dtype", "auto"))
    param_dtype = dtype if rt.get("param_dtype") in (None, "auto") else resolve_dtype(rt["param_dtype"])
    model = load_pretrained(plan.model["dir"], lora=lora_cfg, dtype=dtype, param_dtype=param_dtype,
                            remat=rt.get("remat") or "none", rngs=nnx.Rngs(seed))
    graphdef, lora, frozen = split_model(model)
    del model
    frozen = jax.device_put(frozen, frozen_shardings(mesh, frozen))
    lora = jax.device_put(lora, replicated(mesh))

    # data
    examples = load_examples(plan)
    batcher = Batcher(*examples.split("train"), shape, pack=bool(rt.get("pack", True)), seed=seed)
    if batcher.rows_per_epoch == 0:
        raise ValueError("the plan's train split has no example with a supervised token; nothing to train")
    val_ids, val_prompt_lens = examples.split("val")
    spe = batcher.steps_per_epoch
    total, warmup_steps = schedule_steps(plan, spe)
    if s.get("steps_per_epoch") is not None and int(s["steps_per_epoch"]) != spe:
        log(f"packing gives {spe} steps per epoch ({batcher.rows_per_epoch} rows of {shape.seq_len}); "
            f"the plan estimated {s['steps_per_epoch']}: training {total} steps")

    # optimiser, step functions
    optimizer, lr_fn = make_optimizer(dict(s, warmup_steps=warmup_steps), total)
    opt_state = jax.device_put(optimizer.init(lora), replicated(mesh))
    rng = jax.random.PRNGKey(seed)
    ce_chunk = int(rt.get("ce_chunk") or 1024)
    step_fn = make_train_step(graphdef, optimizer, lr_fn, ce_chunk=ce_chunk, dropout=lora_cfg.dropout > 0,
                              state_sharding=replicated(mesh))
    eval_fn = make_eval_loss(graphdef, ce_chunk=ce_chunk, state_sharding=replicated(mesh))

    # resume
    step, epoch, index = 0, 0, 0
    ckpt = checkpoint.load_latest(run_dir, plan_hash=plan.hash, lora_template=lora, opt_template=opt_state)
    if ckpt is not None:
        step, epoch, index = ckpt.step, ckpt.epoch, ckpt.index
        lora = jax.device_put(ckpt.lora, replicated(mesh))
        opt_state = jax.device_put(ckpt.opt_state, replicated(mesh))
        rng = jnp.asarray(ckpt.rng, dtype=jnp.uint32)
        log(f"resuming from step {step} ({ckpt.path.name})")
    start_step = step
    metrics = _Metrics(run_dir / "metrics.jsonl", keep_through_step=step if ckpt else None)

    val_batcher = None
    if len(val_ids):
        val_batcher = Batcher(val_ids, val_prompt_lens, shape, pack=bool(rt.get("pack", True)), seed=seed)
    eval_every = int((plan.config.get("eval") or {}).get("every") or 0)
    ckpt_every = int(rt.get("checkpoint_every") or 0)
    log_every = max(1, int(rt.get("log_every") or 1))

    def place(batch):
        return put_batch(batch, mesh)

    def validate(at_step):
        if val_batcher is None:
            return None
        vl, vn = _validation(eval_fn, lora, frozen, (place(b) for b in val_batcher.epoch_batches(0)))
        metrics.write({"step": at_step, "val_loss": vl, "val_tokens": vn})
        return vl

    def save(at_step, pos):
        checkpoint.save(run_dir, step=at_step, epoch=pos[0], index=pos[1], rng=rng, plan_hash=plan.hash,
                        lora=lora, opt_state=opt_state, extra={"tokens_seen": tokens_seen})

    def after(e, i):                             # data position of the batch after (e, i)
        return (e, i + 1) if i + 1 < spe else (e + 1, 0)

    compile_s = None
    first_loss = last_loss = None
    last_val = None
    tokens_seen = int(ckpt.extra.get("tokens_seen", 0)) if ckpt else 0
    step_times: list[float] = []
    interrupted = False
    pos = (epoch, index)
    log(f"training {total} steps ({spe} per epoch), batch {shape.grad_accum}×{shape.batch_size}×"
        f"{shape.seq_len}, mesh {dict(mesh.shape)}, {jax.device_count()} {jax.default_backend()} device(s)")
    try:
        with _Interrupt() as stop, Progress(total, start=step) as bar, \
                Prefetcher(batcher, (epoch, index), total - step, place) as batches:
            t_prev = time.perf_counter()
            compiled = None
            for e, i, batch in batches:
                step_arg = jnp.asarray(step, dtype=jnp.int32)
                if compiled is None:
                    t0 = time.perf_counter()
                    try:
                        compiled = step_fn.lower(lora, opt_state, frozen, batch, rng, step_arg).compile()
                    except Exception:             # noqa: BLE001 — AOT is only for timing; jit works
                        compiled = step_fn
                    compile_s = time.perf_counter() - t0
                    metrics.write({"step": step + 1, "compile_s": compile_s})
                    t_prev = time.perf_counter()
                lora, opt_state, m = compiled(lora, opt_state, frozen, batch, rng, step_arg)
                m = jax.device_get(m)             # waits for the step: its time is honest
                now = time.perf_counter()
                dt, t_prev = now - t_prev, now
                step += 1
                pos = after(e, i)
                loss, n_tok, n_in = float(m["loss"]), int(m["n_tokens"]), int(m["n_inputs"])
                tokens_seen += n_tok
                step_times.append(dt)
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                if step % log_every == 0 or step == total or step == start_step + 1:
                    metrics.write({"step": step, "epoch": e, "loss": loss, "lr": float(m["lr"]),
                                   "grad_norm": float(m["grad_norm"]), "tokens": n_tok,
                                   "tokens_seen": tokens_seen, "input_tokens": n_in,
                                   "tokens_per_s": n_in / dt if dt > 0 else None, "step_time_s": dt,
                                   "elapsed_s": time.perf_counter() - t_start})
                bar.update(step, loss=loss, tokens_per_s=n_in / dt if dt > 0 else None)
                if eval_every and step % eval_every == 0 and step < total:
                    last_val = validate(step)
                    if last_val is not None:
                        bar.print(f"step {step}: val_loss {last_val:.4f}")
                    t_prev = time.perf_counter()   # validation time is not step time
                if on_step is not None:
                    on_step(step)
                    t_prev = time.perf_counter()
                if stop.requested:
                    save(step, pos)
                    interrupted = True
                    break
                if ckpt_every and step % ckpt_every == 0 and step < total:
                    save(step, pos)
                    t_prev = time.perf_counter()
    finally:
        metrics.close()
    if interrupted:
        msg = f"interrupted at step {step}; checkpoint written; run the same command to resume"
        print(f"tune: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT)

    # the end: a last checkpoint (re-running is then a no-op), validation, adapter, summary
    if step > start_step:
        save(step, pos)
    metrics = _Metrics(run_dir / "metrics.jsonl", keep_through_step=step)
    try:
        if not any("val_loss" in r and r.get("step") == step for r in metrics.rows):
            last_val = validate(step)
        else:
            last_val = next(r["val_loss"] for r in metrics.rows if "val_loss" in r and r["step"] == step)
        rows = metrics.rows
    finally:
        metrics.close()

    from runtime.export import save_peft_adapter

    if jax.process_index() == 0:
        model = nnx.merge(graphdef, frozen, lora)
        save_peft_adapter(model, run_dir / "adapter", base_model_name_or_path=plan.model["dir"],
                          lora=lora_cfg)

    losses = [r["loss"] for r in rows if "loss" in r]
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    compiles = [r["compile_s"] for r in rows if "compile_s" in r]
    summary = {
        "steps": step,
        "total_steps": total,
        "steps_per_epoch": spe,
        "plan_steps_per_epoch": s.get("steps_per_epoch"),
        "first_loss": losses[0] if losses else first_loss,
        "final_loss": losses[-1] if losses else last_loss,
        "final_val_loss": last_val,
        "tokens_seen": tokens_seen,
        "tokens_per_s_mean": float(np.mean(tps[1:] if len(tps) > 1 else tps)) if tps else None,
        "step_time_s_mean": float(np.mean(step_times[1:] if len(step_times) > 1 else step_times))
        if step_times else None,
        "compile_s": compiles[0] if compiles else compile_s,
        "wall_s": time.perf_counter() - t_start,
        "resumed_from": start_step if ckpt is not None else None,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "dtype": str(jnp.dtype(dtype)),
        "plan_hash": plan.hash,
    }
    if jax.process_index() == 0:
        tmp = run_dir / "train_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, run_dir / "train_summary.json")
    first, final = summary["first_loss"], summary["final_loss"]
    losses_text = f"loss {first:.4f} → {final:.4f}" if first is not None and final is not None else "no loss"
    val_text = f", val_loss {last_val:.4f}" if last_val is not None else ""
    log(f"done: {step} steps, {losses_text}{val_text}; adapter in {run_dir / 'adapter'}")
    if jax.process_index() == 0:
        # The proof that tuning worked: the task metric before and after on data.test_path (a no-op
        # without test rows), then the report a person reads.
        from runtime.evaluate import evaluate_before_after
        from runtime.report import write_report

        if (plan.data.get("sizes") or {}).get("test"):
            evaluate_before_after(plan, run_dir)
        log(f"report: {write_report(run_dir)}")
    return summary
