"""Scale-out: the same training on one device and on meshes of 8 (simulated CPU devices, as
XLA_FLAGS=--xla_force_host_platform_device_count=8 makes them), on one process and on two, gives
the same losses at every step and the same adapter; only process 0 writes; a checkpoint of the
two-process run resumes on one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Trains the tiny plan on each mesh given ("data,fsdp,tensor" each) into RUN_ROOT/<mesh>/ and prints
# one JSON line per mesh: the losses of every step and the adapter's tensors' sums.
_TRAIN = r"""
import json, sys
from pathlib import Path
import numpy as np
from conftest import tiny_plan
import runtime.run
from core.plan import MeshAxes, Plan
from runtime.mesh import maybe_initialize_distributed
maybe_initialize_distributed()
import jax
model_dir, run_root, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for spec in sys.argv[4:]:
    d, f, t = map(int, spec.split(","))
    plan = tiny_plan(model_dir, run_root, batch_size=8, grad_accum=2, epochs=1, max_steps=steps,
                     checkpoint_every=2, targets=("q_proj", "v_proj", "o_proj", "gate_proj",
                                                  "down_proj"), mesh=MeshAxes(d, f, t))
    if f > 1 or t > 1:      # the weights arrive split: each device holds its slice, nothing whole
        from runtime.mesh import make_mesh
        _, trained, frozen = runtime.build.training_model(plan, make_mesh(plan.runtime.mesh))
        mlp = frozen["layers"]["mlp"]
        name = "up_proj" if "up_proj" in mlp else "gate_up_proj"     # Phi-3 fuses gate and up
        if "experts" in mlp:            # a mixture's [L, E, 2F, D] experts: split by expert
            name, mlp = "experts", mlp["experts"]["gate_up_proj"]
        w = mlp["weight"] if name == "experts" else mlp[name]["weight"]
        want = {("up_proj", "1,8,1"): (2, 8, 32), ("up_proj", "2,2,2"): (2, 32, 16),
                ("up_proj", "4,1,2"): (2, 32, 32), ("gate_up_proj", "1,8,1"): (2, 16, 32),
                ("gate_up_proj", "2,2,2"): (2, 64, 16), ("experts", "1,8,1"): (2, 4, 16, 32),
                ("experts", "2,2,2"): (2, 2, 64, 32)}[name, spec]
        assert {s.data.shape for s in w.addressable_shards} == {want}, \
            (spec, {s.data.shape for s in w.addressable_shards})
    run_dir = run_root / spec.replace(",", "-")
    # as `tune run DIR/plan.json`: a run directory's own plan is re-run as compiled (a plan
    # compiled by two processes resumes on one)
    if (run_dir / "plan.json").is_file():
        plan = Plan.load(run_dir / "plan.json")
    elif jax.process_index() == 0:
        plan.write(run_dir / "plan.json")
    runtime.run.train(plan, run_dir)
    if jax.process_index() == 0:
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        print(json.dumps({"mesh": spec, "losses": losses, "devices": jax.device_count(),
                          "processes": jax.process_count(), "rows": len(rows)}), flush=True)
"""


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_NUM", "JAX_PROCESS", "JAX_COORD", "SLURM_", "OMPI_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _train(model_dir, run_root, steps, *meshes, devices=8, env=None, timeout=600):
    r = subprocess.run([sys.executable, "-c", _TRAIN, str(model_dir), str(run_root), str(steps),
                        *meshes], env=env or _env(devices), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return {d["mesh"]: d for d in map(json.loads, [x for x in r.stdout.splitlines()
                                                     if x.startswith("{")])}


def _adapter(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def _same_adapter(a_dir, b_dir, tol=1e-5):
    a, b = _adapter(a_dir), _adapter(b_dir)
    assert set(a) == set(b)
    for k in a:
        scale = max(1.0, float(np.abs(a[k]).max()))
        assert np.abs(a[k] - b[k]).max() <= tol * scale, k


MESHES = ("8,1,1", "1,8,1", "2,2,2", "4,1,2")


@pytest.fixture(scope="module")
def one_device(tiny_chat_dir, tmp_path_factory):
    """(result, run dir) of the 4 steps on one device: what every mesh must reproduce."""
    root = tmp_path_factory.mktemp("one-device")
    return _train(tiny_chat_dir, root, 4, "1,1,1", devices=1)["1,1,1"], root / "1-1-1"


def test_every_mesh_trains_as_one_device(tiny_chat_dir, tmp_path, one_device):
    """data 8, fsdp 8, data 2 × fsdp 2 × tensor 2, data 4 × tensor 2: the one-device losses to 1e-5
    at every step, and the same adapter."""
    one, one_dir = one_device
    many = _train(tiny_chat_dir, tmp_path, 4, *MESHES)
    assert len(one["losses"]) == 4
    for mesh in MESHES:
        assert many[mesh]["devices"] == 8
        np.testing.assert_allclose(many[mesh]["losses"], one["losses"], rtol=1e-5, atol=0)
        _same_adapter(one_dir, tmp_path / mesh.replace(",", "-"))


def test_tensor_axis_splits_heads_mlp_and_lora(tiny_chat_dir):
    """Megatron layout: column-parallel q/k/v/gate/up split their output features (and LoRA B),
    row-parallel o/down their input features (and LoRA A); fsdp takes another axis."""
    from jax.sharding import PartitionSpec as P

    from runtime.mesh import param_spec

    L = ["layers"]
    assert param_spec(L + ["self_attn", "q_proj", "weight"], (2, 64, 32), tensor=2) == \
        P(None, "tensor")
    assert param_spec(L + ["self_attn", "q_proj", "weight"], (2, 64, 32), tensor=2, fsdp=2) == \
        P(None, "tensor", "fsdp")
    assert param_spec(L + ["mlp", "down_proj", "weight"], (2, 32, 64), tensor=2, fsdp=4) == \
        P(None, "fsdp", "tensor")
    assert param_spec(L + ["mlp", "gate_proj", "lora_B"], (2, 64, 4), tensor=2) == \
        P(None, "tensor")
    assert param_spec(L + ["mlp", "gate_proj", "lora_A"], (2, 4, 32), tensor=2) == P()
    assert param_spec(L + ["self_attn", "o_proj", "lora_A"], (2, 4, 64), tensor=2) == \
        P(None, None, "tensor")
    assert param_spec(L + ["self_attn", "o_proj", "bias"], (2, 32), tensor=2) == P()
    assert param_spec(L + ["self_attn", "q_proj", "weight"], (2, 1024), tensor=2, dense=False) == P()
    assert param_spec(L + ["self_attn", "q_proj", "weight"], (2, 63, 32), tensor=2) == P()  # uneven
    assert param_spec(["embed_tokens", "weight"], (96, 32), tensor=2, fsdp=2) == P("fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_on_one(tiny_chat_dir, tmp_path, one_device):
    """Two processes × 4 devices (jax.distributed on localhost, the coordinator and the process
    count and id from the environment): the one-device losses; only process 0 writes; its
    checkpoint at step 2 resumes on one process of 8 devices and ends with the same adapter."""
    mesh = "2,2,2"
    one, one_dir = one_device
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-c", _TRAIN, str(tiny_chat_dir), str(tmp_path / "two"), "4", mesh],
        env=_env(4, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                 JAX_COORDINATOR_ADDRESS=f"localhost:{port}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    reports = [[x for x in o[0].splitlines() if x.startswith("{")] for o in outs]
    assert reports[1] == []                             # process 1 reports nothing ...
    two = json.loads(reports[0][-1])
    assert two["processes"] == 2 and two["devices"] == 8
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, atol=0)
    run = tmp_path / "two" / "2-2-2"
    assert two["rows"] == one["rows"]                   # ... and wrote no second copy of a row
    _same_adapter(one_dir, run)

    # resume the two-process run's step-2 checkpoint on one process
    from runtime.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts][-2:] == ["step_00000002.npz", "step_00000004.npz"]
    final = _adapter(run)
    ckpts[-1].unlink()
    (run / "train_summary.json").unlink()
    resumed = _train(tiny_chat_dir, tmp_path / "two", 4, mesh)[mesh]
    np.testing.assert_allclose(resumed["losses"], one["losses"], rtol=1e-5, atol=0)
    for k, v in _adapter(run).items():
        assert np.abs(v - final[k]).max() <= 1e-5 * max(1.0, float(np.abs(v).max())), k
