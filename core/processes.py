"""Which process of a job this is: the place each of a multi-process job's processes (several hosts,
or several processes on one) learns from its launcher's environment, before jax is imported (the
compiler counts devices over processes; process 0 writes the run directory)."""
from __future__ import annotations

import os

# A multi-process job (several hosts, or several processes on one) runs the same `tune` command in
# every process; each learns its place from its launcher's environment: tune's own JAX_NUM_PROCESSES
# / JAX_PROCESS_ID (with JAX_COORDINATOR_ADDRESS), SLURM's srun, Open MPI's mpirun, or a Cloud TPU
# pod slice's workers. jax.distributed reads the same launchers (runtime/mesh.py).
_PROCESS_ENV = (("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"), ("SLURM_NTASKS", "SLURM_PROCID"),
                ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def processes() -> tuple[int, int]:
    """(process count, this process's index) of the job this process belongs to; (1, 0) alone."""
    for count_var, index_var in _PROCESS_ENV:
        count = _env_int(count_var)
        if count and count > 1:
            return count, _env_int(index_var) or 0
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return len(hosts), _env_int("TPU_WORKER_ID") or 0
    return 1, 0


def is_main_process() -> bool:
    """Process 0 writes the run directory; the others compute."""
    return processes()[1] == 0


def note(message: str) -> None:
    """A line for a person on stderr (process 0 only, unless TUNE_QUIET=1): what the compiler does
    that takes a while (converting a model, tokenising a large file), with no JAX imported."""
    import sys

    if os.environ.get("TUNE_QUIET", "") not in ("", "0", "false", "False") or not is_main_process():
        return
    print(f"tune: {message}", file=sys.stderr, flush=True)
