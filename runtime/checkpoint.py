"""Checkpoints for resuming a run: <run dir>/checkpoints/step_<N>.npz.

One .npz per checkpoint (no pickle): every leaf of the LoRA parameters and of the optimizer state under
its tree path ("lora/…", "opt/…"), and "meta", a JSON string with the step, the data position (epoch,
index of the next batch), the rng key, the plan hash and the leaves' dtypes. Written to a temporary
file, fsynced, then renamed, so a kill leaves either the old checkpoint or the new one, never half of
one. The last two are kept.

A resumed run restores all of it exactly, so it ends with the same adapter as one never interrupted.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from core.errors import PlanError
from core.files import write_atomic

KEEP = 2
_NAME = re.compile(r"^step_(\d+)\.npz$")


@dataclass(frozen=True)
class Checkpoint:
    step: int           # steps done
    epoch: int          # data position of the next batch
    index: int
    rng: np.ndarray     # uint32 key data
    plan_hash: str
    extra: dict         # small run counters (tokens seen, ...)
    lora: object        # trees shaped like the templates given to load(), numpy leaves
    opt_state: object
    path: Path


def directory(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def _key(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _host(x) -> np.ndarray:
    """A host copy of a (replicated) array, also when other processes hold the other replicas."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def _flatten(prefix: str, tree, arrays: dict, dtypes: dict) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = f"{prefix}/{_key(path)}"
        if name in arrays:
            raise ValueError(f"two leaves share the checkpoint name {name!r}")
        a = _host(leaf)
        dtypes[name] = str(a.dtype)
        if a.dtype.kind == "V" or a.dtype.name == "bfloat16":   # not a numpy-native dtype: store bits
            a = a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint8)
        arrays[name] = a


def save(run_dir, *, step: int, epoch: int, index: int, rng, plan_hash: str, lora, opt_state,
         extra: dict | None = None) -> Path:
    """Write checkpoint `step` atomically and drop all but the newest KEEP. Only process 0 writes."""
    from runtime.mesh import to_host

    out = directory(run_dir)
    lora, opt_state = to_host(lora), to_host(opt_state)     # a collective: every process
    if jax.process_index() != 0:
        return out / f"step_{step:08d}.npz"
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    _flatten("lora", lora, arrays, dtypes)
    _flatten("opt", opt_state, arrays, dtypes)
    meta = {"step": int(step), "epoch": int(epoch), "index": int(index),
            "rng": [int(v) for v in np.asarray(jax.device_get(rng)).reshape(-1)],
            "plan_hash": plan_hash, "dtypes": dtypes, "extra": dict(extra or {}), "format": 1}
    arrays["meta"] = np.array(json.dumps(meta))
    final = write_atomic(out / f"step_{step:08d}.npz", lambda f: np.savez(f, **arrays))
    _fsync_dir(out)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    for stale in out.glob(".step_*.npz.*.tmp"):       # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = directory(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _unflatten(prefix: str, template, data, dtypes: dict, path: Path):
    leaves = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        name = f"{prefix}/{_key(kp)}"
        if name not in data:
            raise PlanError("checkpoint", f"{path} has no {name!r}: it was written for another model "
                            "or adapter layout.", hint=_FRESH_HINT)
        a = data[name]
        want = dtypes.get(name, str(a.dtype))
        if str(a.dtype) != want:
            a = a.view(np.dtype(jax.numpy.dtype(want)))
        if tuple(a.shape) != tuple(np.shape(leaf)):
            raise PlanError("checkpoint", f"{path}: {name!r} has shape {tuple(a.shape)}, the run expects "
                            f"{tuple(np.shape(leaf))}.", hint=_FRESH_HINT)
        leaves.append(a)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


_FRESH_HINT = ("Use a fresh run directory (hydra.run.dir=...), or delete its checkpoints/ folder to start "
               "this plan from step 0.")


def load_latest(run_dir, *, plan_hash: str, lora_template, opt_template) -> Checkpoint | None:
    """The newest checkpoint of this run dir restored into the templates' structure, or None.

    A checkpoint of a different plan is refused: resuming it would silently mix two trainings."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    path = found[-1]
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data.pop("meta")))
    if meta["plan_hash"] != plan_hash:
        raise PlanError(
            "checkpoint",
            f"{directory(run_dir)} holds checkpoints of another plan (hash {meta['plan_hash'][:12]}…, "
            f"this plan is {plan_hash[:12]}…); refusing to resume it with a different configuration.",
            hint=_FRESH_HINT)
    dtypes = meta.get("dtypes", {})
    return Checkpoint(step=int(meta["step"]), epoch=int(meta["epoch"]), index=int(meta["index"]),
                      rng=np.asarray(meta["rng"], dtype=np.uint32), plan_hash=meta["plan_hash"],
                      extra=meta.get("extra", {}),
                      lora=_unflatten("lora", lora_template, data, dtypes, path),
                      opt_state=_unflatten("opt", opt_template, data, dtypes, path), path=path)
