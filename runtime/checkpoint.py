"""Checkpoints for resuming a run: <run dir>/checkpoints/step_<N>.npz.

One .npz per checkpoint (no pickle): every leaf of the LoRA parameters and of the optimizer state under
its tree path ("lora/…", "opt/…"), and "meta", a JSON string with the step, the data position (epoch,
index of the next batch), the rng key, the plan hash and the leaves' dtypes. Written to a temporary
file, fsynced, then renamed, so a kill leaves either the old checkpoint or the new one, never half of
one. The last two are kept.

A checkpoint damaged after it was written (a disk error, a truncated copy, a hand edit) is not trusted:
loading checks it whole (load_latest), and one that fails is skipped, with a message, for the one
before it.

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
    # the newest KEEP up to this step; any of a later step was skipped as invalid when this run
    # resumed (it is overwritten when the run gets there), and is no reason to drop a good one
    earlier = [p for p in list_checkpoints(run_dir) if _step_of(p) <= step]
    for old in earlier[:-KEEP]:
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


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


class _Invalid(Exception):
    """A checkpoint that cannot be read, or whose contents do not add up."""


def _unflatten(prefix: str, template, z, dtypes: dict):
    """The leaves named like `template`'s under `prefix`, read from the open .npz `z`, each checked
    against its template leaf: there, the same shape and dtype, finite where it is a float."""
    leaves = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        name = f"{prefix}/{_key(kp)}"
        if name not in z.files:
            raise _Invalid(f"it has no {name!r}")
        a = z[name]
        want = np.dtype(jax.numpy.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)))
        if dtypes.get(name) != str(want):
            raise _Invalid(f"{name!r} is {dtypes.get(name)}, the run keeps it as {want}")
        if a.dtype != want:
            if a.dtype.itemsize != want.itemsize:
                raise _Invalid(f"{name!r} is stored as {a.dtype}, not as the bits of {want}")
            a = a.view(want)
        if tuple(a.shape) != tuple(np.shape(leaf)):
            raise _Invalid(f"{name!r} has shape {tuple(a.shape)}, the run expects "
                           f"{tuple(np.shape(leaf))}")
        if want.kind in "fV" and not np.isfinite(a).all():
            raise _Invalid(f"{name!r} holds values that are not finite")
        leaves.append(a)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


_FRESH_HINT = ("Use a fresh run directory (hydra.run.dir=...), or delete its checkpoints/ folder to start "
               "this plan from step 0.")


def load_latest(run_dir, *, plan_hash: str, total_steps: int, steps_per_epoch: int, rng_template,
                lora_template, opt_template) -> Checkpoint | None:
    """The newest valid checkpoint of this run dir restored into the templates' structure, or None.

    Valid: it reads (a truncated or garbage file does not), its step lies in 0..total_steps and
    is the one its name says, its data position (epoch, index) is where that many steps of
    `steps_per_epoch` lead, its rng key has the template's size, and its leaves are the templates'
    (names, shapes, dtypes), finite, with the optimizer's step counts equal to its step. An invalid
    checkpoint is skipped with a message naming it and why, and the one before it is tried; when
    none is left, training starts from step 0. A checkpoint of a different plan is refused
    (PlanError): resuming it would silently mix two trainings."""
    from runtime.progress import log

    found = list_checkpoints(run_dir)
    for path in reversed(found):
        try:
            return _load(path, plan_hash=plan_hash, total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch, rng_size=int(np.size(rng_template)),
                         lora_template=lora_template, opt_template=opt_template)
        except _Invalid as e:
            log(f"skipping checkpoint {path}: {e}")
    if found:
        log(f"no valid checkpoint in {directory(run_dir)}: training starts from step 0")
    return None


def _load(path: Path, *, plan_hash: str, total_steps: int, steps_per_epoch: int, rng_size: int,
          lora_template, opt_template) -> Checkpoint:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise _Invalid("it is not a .npz archive (a truncated or overwritten file?)")
        with np.load(path, allow_pickle=False) as z:
            meta = _meta(z, path, plan_hash=plan_hash, total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch, rng_size=rng_size)
            lora = _unflatten("lora", lora_template, z, meta["dtypes"])
            opt_state = _unflatten("opt", opt_template, z, meta["dtypes"])
    except (_Invalid, PlanError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged zip raises, the file is unreadable
        raise _Invalid(f"it cannot be read ({type(e).__name__}: {e})") from None
    for name, count in _counts(opt_state):
        if count != meta["step"]:
            raise _Invalid(f"its optimizer has taken {count} steps ({name!r}), its metadata "
                           f"says {meta['step']}")
    return Checkpoint(step=meta["step"], epoch=meta["epoch"], index=meta["index"],
                      rng=np.asarray(meta["rng"], dtype=np.uint32), plan_hash=meta["plan_hash"],
                      extra=meta["extra"], lora=lora, opt_state=opt_state, path=path)


def _meta(z, path: Path, *, plan_hash: str, total_steps: int, steps_per_epoch: int,
          rng_size: int) -> dict:
    """The checkpoint's metadata, checked for consistency with its name and the plan."""
    if "meta" not in z.files:
        raise _Invalid("it has no metadata")
    meta = json.loads(str(z["meta"]))
    if not isinstance(meta, dict):
        raise _Invalid("its metadata is not a JSON object")
    if not isinstance(meta.get("plan_hash"), str):
        raise _Invalid("its metadata has no plan hash")
    if meta["plan_hash"] != plan_hash:
        raise PlanError(
            "checkpoint",
            f"{path.parent} holds checkpoints of another plan (hash {meta['plan_hash'][:12]}…, "
            f"this plan is {plan_hash[:12]}…); refusing to resume it with a different configuration.",
            hint=_FRESH_HINT)
    ints = {k: meta.get(k) for k in ("step", "epoch", "index")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
        raise _Invalid(f"its metadata's step, epoch and index are not all integers ({ints})")
    step = ints["step"]
    if not 0 <= step <= total_steps:
        raise _Invalid(f"its metadata says step {step}, outside this plan's 0..{total_steps}")
    if step != _step_of(path):
        raise _Invalid(f"its metadata says step {step}, its name step {_step_of(path)}")
    if (ints["epoch"], ints["index"]) != divmod(step, steps_per_epoch):
        raise _Invalid(f"its data position (epoch {ints['epoch']}, batch {ints['index']}) is not "
                       f"where {step} steps of {steps_per_epoch} per epoch lead")
    rng = meta.get("rng")
    if not (isinstance(rng, list) and len(rng) == rng_size
            and all(isinstance(v, int) and 0 <= v < 2**32 for v in rng)):
        raise _Invalid(f"its rng key is not {rng_size} unsigned 32-bit integers")
    extra, dtypes = meta.get("extra", {}), meta.get("dtypes")
    if not isinstance(extra, dict) or not isinstance(dtypes, dict):
        raise _Invalid("its metadata's extra or dtypes is not an object")
    seen = extra.get("tokens_seen", 0)
    if not (isinstance(seen, int) and seen >= 0):
        raise _Invalid(f"its metadata's tokens_seen ({seen!r}) is not a count")
    return {**meta, "extra": extra}


def _counts(opt_state):
    """(name, value) of each step count (`count`) in an optimizer state."""
    for kp, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if _key(kp).endswith("count") and np.ndim(leaf) == 0:
            yield _key(kp), int(leaf)
