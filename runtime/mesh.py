"""The device mesh (data, fsdp, tensor) and where each array lives on it.

The axes come resolved in the plan (plan.runtime.mesh); one device is the mesh (1, 1, 1): the same
code path, every sharding trivially replicated.
- batch arrays [accum, B, T]: B split over ("data", "fsdp");
- frozen weights: replicated, or split along "fsdp" on their largest divisible axis when fsdp > 1
  (the stacked-layer axis is never split: the layer scan would gather it whole every step);
- LoRA parameters and optimizer state: replicated over data and fsdp (they are small);
- tensor: Megatron-style — the attention heads and the MLP's intermediate features split (the
  column-parallel q/k/v/gate/up by output features, the row-parallel o/down by input features), the
  LoRA factors split to match (param_spec); a mixture's experts split by expert. XLA's SPMD
  partitioner inserts the collectives.
Multi-host: jax.distributed.initialize() when the environment names a coordinator.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from core.processes import processes
from core.errors import PlanError
from core.plan import MeshAxes

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> bool:
    """Join a multi-process job when the environment says there is one (core.processes.
    processes: JAX_NUM_PROCESSES / JAX_PROCESS_ID with JAX_COORDINATOR_ADDRESS, SLURM's srun, Open
    MPI, a Cloud TPU pod slice). Returns True if this process is part of one."""
    count, index = processes()
    if count <= 1:
        return False
    if jax.distributed.is_initialized():
        return True
    # CPU devices of several processes talk through gloo (no effect on GPU or TPU)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if os.environ.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   num_processes=count, process_id=index)
    else:                   # SLURM, Open MPI, TPU pods: jax reads its launcher's environment
        jax.distributed.initialize()
    return True


def is_main_process() -> bool:
    """Process 0 writes the run directory's files; the others compute."""
    return jax.process_index() == 0


def to_host(tree):
    """Whole numpy copies of a pytree's arrays. An array split over several processes is gathered,
    which is a collective: every process must call this, with the same tree."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def put_global(tree, shardings):
    """Host values (the same on every process) → global arrays with these shardings; each process
    places only its own devices' slices, so nothing is copied whole to one device first."""
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


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


# Megatron-style tensor parallelism over the "tensor" axis: a column-parallel layer splits its output
# features (each device computes some heads / some of the MLP's intermediate features), a
# row-parallel layer splits its input features (each device holds the matching slice and XLA sums
# the partial outputs). The LoRA factors split to match: B's output rows for a column-parallel layer,
# A's input columns for a row-parallel one.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
# Which axis "tensor" splits, by (parallel style, variable name), for stacked [L, ...] variables.
_TENSOR_AXIS = {
    ("column", "weight"): 1, ("column", "bias"): 1, ("column", "weight_scale"): 1,
    ("column", "lora_B"): 1, ("column", "lora_magnitude_vector"): 1,
    ("row", "weight"): 2, ("row", "lora_A"): 2,
}


def param_spec(names: list[str], shape: tuple[int, ...], *, fsdp: int = 1, tensor: int = 1,
               dense: bool = True) -> P:
    """Where one model variable lives. names: its state path (e.g. layers/self_attn/q_proj/weight);
    dense: False for a weight stored as flat nf4 codes (and its scales), which only fsdp splits.
    tensor: the variable's tensor-parallel axis (above), when it divides evenly. fsdp: then the
    largest other axis that fsdp divides (never the stacked-layer axis: the layer scan would gather
    it whole every step)."""
    spec = [None] * len(shape)
    stacked = names[0] == "layers" and len(shape) > 1
    module = names[-2] if len(names) > 1 else ""
    style = "column" if module in COLUMN_PARALLEL else "row" if module in ROW_PARALLEL else None
    ax = _TENSOR_AXIS.get((style, names[-1])) if (stacked and dense and tensor > 1) else None
    if stacked and names[1:3] == ["mlp", "experts"] and tensor > 1:
        ax = 1          # a mixture's experts [L, E, ...] (weights and LoRA factors): by expert
    if ax is not None and ax < len(shape) and shape[ax] % tensor == 0:
        spec[ax] = "tensor"
    if fsdp > 1:
        best = None
        for i in range(1 if stacked else 0, len(shape)):
            if spec[i] is None and shape[i] % fsdp == 0 and (best is None or shape[i] > shape[best]):
                best = i
        if best is not None:
            spec[best] = "fsdp"
    while spec and spec[-1] is None:        # P(None, "tensor") == P(None, "tensor", None)
        spec.pop()
    return P(*spec)


def frozen_spec(shape: tuple[int, ...], fsdp: int, *, stacked: bool) -> P:
    """fsdp only: the largest axis fsdp divides (not the stacked-layer axis); else replicated."""
    return param_spec(["layers" if stacked else "", ""], shape, fsdp=fsdp)


def _names(path) -> list[str]:
    """A pytree path as names, without the trailing `value` of an nnx Variable."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return names[:-1] if len(names) > 1 and names[-1] == "value" else names


def state_shardings(mesh: Mesh, state, *, trained: bool = False):
    """A NamedSharding per leaf of a model state (pytree of arrays / nnx Variables / shapes): frozen
    weights split over fsdp and tensor; trained ones (trained=True: LoRA factors, DoRA magnitudes,
    modules trained in full) over tensor only — they are small, and the optimizer's elementwise
    update needs no gather then."""
    fsdp, tensor = (1 if trained else mesh.shape["fsdp"]), mesh.shape["tensor"]
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    shapes = {tuple(_names(p)): tuple(getattr(v, "shape", ())) for p, v in leaves}

    def one(path, leaf):
        names = _names(path)
        # a weight stored as flat nf4 codes is [L, n], not [L, out, in]: no tensor split
        weight = shapes.get(tuple(names[:-1]) + ("weight",))
        dense = not (names[-1] in ("weight", "weight_scale") and weight is not None
                     and len(weight) == 2 and names[0] == "layers")
        return NamedSharding(mesh, param_spec(names, tuple(getattr(leaf, "shape", ())), fsdp=fsdp,
                                              tensor=tensor, dense=dense))

    return jax.tree_util.tree_map_with_path(one, state)


def frozen_shardings(mesh: Mesh, frozen):
    return state_shardings(mesh, frozen)


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (the same global numpy batch on every process) → global device arrays."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}
