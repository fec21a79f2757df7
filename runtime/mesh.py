"""The device mesh (data, fsdp, tensor) and where each array lives on it.

The axes come resolved in the plan (plan.runtime.mesh); one device is the mesh (1, 1, 1): the same
code path, every sharding trivially replicated.
- batch arrays [accum, B, T]: B split over ("data", "fsdp");
- frozen weights: replicated, or split along "fsdp" on their largest divisible axis when fsdp > 1
  (the stacked-layer axis is never split: the layer scan would gather it whole every step);
- LoRA parameters and optimizer state: replicated (they are small).
The "tensor" axis is accepted in the mesh but no array is split over it yet: its devices repeat the
same work. Multi-host: jax.distributed.initialize() when the environment names a coordinator.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from compiler.errors import PlanError
from compiler.plan import MeshAxes

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_IP", "JAX_NUM_PROCESSES")


def maybe_initialize_distributed() -> bool:
    """Join a multi-process job when the environment says there is one. Returns True if it did."""
    if not any(os.environ.get(k) for k in _MULTI_PROCESS_ENV):
        return False
    if jax.distributed.is_initialized():
        return True
    jax.distributed.initialize()
    return True


def is_main_process() -> bool:
    """Process 0 writes the run directory's files; the others compute."""
    return jax.process_index() == 0


def make_mesh(axes: MeshAxes, devices=None) -> Mesh:
    """The plan's mesh (its axes are resolved by the compiler) over these devices (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = axes.shape
    if math.prod(shape) != len(devices):
        raise PlanError("runtime.mesh", f"the plan's mesh (data {axes.data} × fsdp {axes.fsdp} × "
                        f"tensor {axes.tensor}) needs {math.prod(shape)} devices, but jax sees "
                        f"{len(devices)} ({jax.default_backend()}).",
                        hint="the plan was compiled for other devices: recompile it here with "
                             "`tune plan ...`.")
    try:
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    except Exception:  # noqa: BLE001 — topology-aware placement is an optimisation only
        return Mesh(np.array(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def batch_parallelism(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[accum, B, T]: B over data × fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def frozen_spec(shape: tuple[int, ...], fsdp: int, *, stacked: bool) -> P:
    """Split the largest axis divisible by fsdp (not the stacked-layer axis); else replicate."""
    if fsdp <= 1:
        return P()
    first = 1 if stacked and len(shape) > 1 else 0
    best = None
    for ax in range(first, len(shape)):
        if shape[ax] % fsdp == 0 and (best is None or shape[ax] > shape[best]):
            best = ax
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def frozen_shardings(mesh: Mesh, frozen, *, stacked_prefixes=("layers",)):
    """A NamedSharding per leaf of the frozen state (a pytree of arrays / nnx Variables)."""
    fsdp = mesh.shape["fsdp"]

    def one(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        stacked = any(n in stacked_prefixes for n in names[:-1])
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, frozen_spec(shape, fsdp, stacked=stacked))

    return jax.tree_util.tree_map_with_path(one, frozen)


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (the same global numpy batch on every process) → global device arrays."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}
