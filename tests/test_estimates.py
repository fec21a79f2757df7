"""compiler/estimates.py: steps (exact against the runtime's packing), memory, time, devices."""
from __future__ import annotations

import json
import os
import stat
import time

import numpy as np
import pytest

import compiler.estimates as est
from compiler.estimates import detect_devices, memory_per_device, schedule_steps, step_time

SCHED = dict(batch_size=8, grad_accum=2, epochs=1, max_steps=None, warmup=0.1, pack=False, seq_len=512)
LENGTHS = [61] * 1000             # 1,000 examples of 61 tokens: 60 row slots each


# ------------------------------------------------------------------------------ schedule

def test_schedule_unpacked():
    s = schedule_steps(LENGTHS, **SCHED)
    assert s["steps_per_epoch"] == 63 and s["total_steps"] == 63 and s["warmup_steps"] == 6
    s = schedule_steps(LENGTHS, **dict(SCHED, epochs=3, warmup=10))
    assert s["total_steps"] == 189 and s["warmup_steps"] == 10
    s = schedule_steps(LENGTHS, **dict(SCHED, epochs=0.5))
    assert s["total_steps"] == 32


def test_schedule_packed():
    s = schedule_steps(LENGTHS, **dict(SCHED, pack=True))     # 8 examples of 60 slots per 512-slot row
    assert s["rows_per_epoch"] == 125 and s["steps_per_epoch"] == 8
    s = schedule_steps([400] * 10, **dict(SCHED, pack=True))  # more than half a row: one each
    assert s["rows_per_epoch"] == 10


def test_schedule_max_steps_and_warmup_caps():
    s = schedule_steps(LENGTHS, **dict(SCHED, max_steps=500, warmup=0.1))
    assert s["total_steps"] == 500 and s["warmup_steps"] == 50
    assert schedule_steps(LENGTHS, **dict(SCHED, max_steps=5))["total_steps"] == 5
    assert schedule_steps(LENGTHS, **dict(SCHED, max_steps=0))["total_steps"] == 63
    assert schedule_steps(LENGTHS, **dict(SCHED, warmup=10_000))["warmup_steps"] == 63
    assert schedule_steps(LENGTHS, **dict(SCHED, warmup=0))["warmup_steps"] == 0
    assert schedule_steps([61] * 3, **SCHED)["steps_per_epoch"] == 1


@pytest.mark.parametrize("pack", [True, False])
def test_schedule_matches_the_runtime_batcher(pack):
    from runtime.batching import Batcher, BatchShape

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 200, size=700)
    ids = [np.arange(n, dtype=np.int32) for n in lengths]
    shape = BatchShape(grad_accum=2, batch_size=4, seq_len=256)
    batcher = Batcher(ids, [1] * len(ids), shape, pack=pack, seed=3)
    s = schedule_steps(lengths.tolist(), batch_size=4, grad_accum=2, epochs=1, max_steps=None,
                       warmup=0, pack=pack, seq_len=256)
    assert s["rows_per_epoch"] == batcher.rows_per_epoch
    assert s["steps_per_epoch"] == batcher.steps_per_epoch


def test_row_count_does_not_depend_on_the_epochs_randomness():
    from core.packing import count_rows, epoch_rows, example_slots

    rng = np.random.default_rng(1)
    for seq_len in (16, 64, 300):
        lengths = rng.integers(2, seq_len + 2, size=500)
        slots = [example_slots(n) for n in lengths]
        rows = {len(epoch_rows(slots, seq_len, pack=True, seed=seed, epoch=e))
                for seed in (0, 5) for e in range(3)}
        assert rows == {count_rows(lengths, seq_len, pack=True)}
    with pytest.raises(ValueError):
        count_rows([11], 8, pack=True)


# ------------------------------------------------------------------------------ memory

SMOLLM2 = dict(params=134_515_008, trainable=921_600, layers=30, hidden=576, intermediate=1536, heads=9,
               kv_heads=3, head_dim=64, vocab=49152, batch=8, seq_len=512, param_bytes=4,
               compute_bytes=4, remat="none", ce_chunk=2048, devices=1, fsdp=1, tensor=1)


def test_memory_parts_and_remat_order():
    m = {r: memory_per_device(**dict(SMOLLM2, remat=r)) for r in ("none", "dots", "full")}
    assert m["full"]["activations"] < m["dots"]["activations"] < m["none"]["activations"]
    for parts in m.values():
        assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=4)
    none = m["none"]
    assert none["weights"] == SMOLLM2["params"] * 4
    assert none["adapter_optimizer"] == SMOLLM2["trainable"] * 16
    assert none["logits"] == 2048 * 49152 * 16
    print("\nSmolLM2-135M, batch 8 × 512, fp32: " + ", ".join(
        f"{r}: {v['total'] / 2**30:.2f} GiB" for r, v in m.items()))


def test_memory_scales_with_batch_and_shards():
    one = memory_per_device(**SMOLLM2)
    two = memory_per_device(**dict(SMOLLM2, batch=16))
    assert two["activations"] == pytest.approx(2 * one["activations"], rel=0.01)
    assert two["weights"] == one["weights"]
    dp = memory_per_device(**dict(SMOLLM2, batch=16, devices=2))      # data parallel: batch split
    assert dp["activations"] == pytest.approx(one["activations"], rel=0.01)
    fsdp = memory_per_device(**dict(SMOLLM2, devices=2, fsdp=2))
    assert fsdp["weights"] == one["weights"] // 2
    bf16 = memory_per_device(**dict(SMOLLM2, param_bytes=2, compute_bytes=2))
    assert bf16["weights"] == one["weights"] // 2 and bf16["activations"] < one["activations"]
    fused = memory_per_device(**SMOLLM2, attention_scores=False)   # a fused attention kernel
    assert fused["attention"] == 0 and one["attention"] == (30 + 4) * 8 * 9 * 512 ** 2 * 4
    gathered = memory_per_device(**SMOLLM2, loss_tokens=144)          # the head on 144 positions
    assert gathered["logits"] == 144 * 49152 * 16 < one["logits"]



def test_memory_tensor_axis_splits_what_divides():
    """Megatron-style: the tensor axis splits heads and MLP features, not the residual stream; heads
    that the axis does not divide run gathered, so their attention scores are not split."""
    llama = dict(SMOLLM2, heads=8, kv_heads=4, batch=2, devices=2)     # divides 2
    for remat in ("none", "full"):
        one = memory_per_device(**dict(llama, remat=remat, devices=1, batch=2))
        split = memory_per_device(**dict(llama, remat=remat, tensor=2))
        assert split["attention"] == pytest.approx(one["attention"] / 2, rel=1e-6)
        # some of the activations are hidden-wide (replicated): more than half stays per device
        assert one["activations"] / 2 < split["activations"] < one["activations"]
    # remat=full: every layer's input is saved whole on each device; only the recomputed layer's
    # head- and MLP-wide arrays (q, k, v and their RoPE'd copies, attention output; the MLP) split
    full_one = memory_per_device(**dict(llama, remat="full", devices=1))
    full_two = memory_per_device(**dict(llama, remat="full", tensor=2))
    tokens, q, kv = 2 * 512, 8 * 64, 4 * 64
    split_features = (q + 2 * kv) + q + 2 * (q + kv) + 1536
    assert full_one["activations"] - full_two["activations"] == tokens * split_features * 4 // 2
    nine = memory_per_device(**dict(SMOLLM2, batch=2, devices=2, tensor=2))   # 9 heads, 3 kv heads
    assert nine["attention"] == memory_per_device(**dict(SMOLLM2, batch=2))["attention"]


# ------------------------------------------------------------------------------ time

def test_step_time_gpu():
    h100 = {"platform": "gpu", "kind": "NVIDIA H100 80GB HBM3", "count": 1, "peak_flops": 989e12}
    t = step_time(params=1_000_000_000, tokens_per_step=100_000, device=h100)
    assert t == pytest.approx(4e14 / (989e12 * 0.4))
    assert step_time(params=1_000_000_000, tokens_per_step=100_000, device=dict(h100, count=4)) == \
        pytest.approx(t / 4)
    assert step_time(params=10**9, tokens_per_step=10**5, device=h100, remat="full") > t



def test_step_time_counts_the_head_on_supervised_positions_only():
    """The head runs on the gathered supervised positions (forward, recompute, backward); an untied
    input embedding is a lookup; bfloat16 operands on a CPU with bf16 dot products go faster."""
    h100 = {"platform": "gpu", "kind": "NVIDIA H100 80GB HBM3", "count": 1, "peak_flops": 989e12}
    rate = 989e12 * 0.4
    P, H, T = 134_515_008, 49_152 * 576, 4096
    tied = step_time(params=P, tokens_per_step=T, device=h100, head_params=H, head_tokens=64)
    assert tied == pytest.approx((4 * (P - H) * T + 6 * H * 64) / rate)
    untied = step_time(params=P + H, tokens_per_step=T, device=h100, head_params=H,
                       head_tokens=64, embedding_params=H)
    assert untied == pytest.approx(tied)
    every = step_time(params=P, tokens_per_step=T, device=h100, head_params=H)
    assert every == pytest.approx((4 * (P - H) * T + 6 * H * T) / rate) and every > tied
    cpu = {"platform": "cpu", "kind": "x", "count": 1, "peak_flops": None}
    f32 = step_time(params=P, tokens_per_step=T, device=cpu)
    bf16 = step_time(params=P, tokens_per_step=T, device=cpu, bf16_matmul=True)
    assert bf16 == pytest.approx(f32 / est.CPU_BF16_SPEEDUP)
    # attention: q·k and p·v, forward and backward (+ the forward again under remat); on a CPU a
    # measured cost per score element instead
    att = dict(attention_scores=10**9, head_dim=64)
    assert step_time(params=P, tokens_per_step=T, device=h100, **att) - \
        step_time(params=P, tokens_per_step=T, device=h100) == pytest.approx(12 * 64 * 1e9 / rate)
    assert step_time(params=P, tokens_per_step=T, device=h100, remat="full", **att) - \
        step_time(params=P, tokens_per_step=T, device=h100, remat="full") == \
        pytest.approx(16 * 64 * 1e9 / rate)
    assert step_time(params=P, tokens_per_step=T, device=cpu, **att) - f32 == \
        pytest.approx(1e9 * est.CPU_ATTENTION_FLOPS_PER_SCORE / est.cpu_matmul_flops())

def test_step_time_cpu_probe_is_measured_once():
    est._CPU_FLOPS = None
    cpu = {"platform": "cpu", "kind": "x", "count": 1, "peak_flops": None}
    t0 = time.perf_counter()
    a = step_time(params=134_000_000, tokens_per_step=4096, device=cpu)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = step_time(params=134_000_000, tokens_per_step=8192, device=cpu)
    second = time.perf_counter() - t0
    assert b == pytest.approx(2 * a) and second < 0.01 and first < 1.0
    print(f"\nCPU matmul {est._CPU_FLOPS / 1e9:.1f} GFLOP/s; SmolLM2 step of 4096 tokens ≈ {a:.1f}s")



def test_cpu_probe_remembers_the_machines_best(tmp_path, monkeypatch):
    """A probe measured while the machine is busy does not lower the estimate below what this CPU
    has measured before; a faster probe raises it; a damaged cache file is ignored and replaced."""
    monkeypatch.setenv("TUNE_HOME", str(tmp_path))
    path = tmp_path / "cpu_flops.json"
    assert est._remembered_best(100e9) == 100e9 and path.is_file()
    assert est._remembered_best(20e9) == 100e9                  # busy now: the best stands
    assert est._remembered_best(150e9) == 150e9
    assert list(json.loads(path.read_text()).values()) == [150e9]
    path.write_text("{not json")
    assert est._remembered_best(30e9) == 30e9 and json.loads(path.read_text())
    path.unlink()
    path.mkdir()                                                # unwritable: measured, no error
    assert est._remembered_best(40e9) == 40e9

# ------------------------------------------------------------------------------ devices

@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      "echo '0, GPU-aaaa1111, NVIDIA H100 80GB HBM3, 81559'\n"
                      "echo '1, GPU-bbbb2222, NVIDIA H100 80GB HBM3, 81559'\n"
                      "echo '2, GPU-cccc3333, NVIDIA H100 80GB HBM3, 81559'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_detect_devices_gpus(fake_nvidia_smi, monkeypatch):
    d = detect_devices()
    assert d == {"platform": "gpu", "kind": "NVIDIA H100 80GB HBM3", "count": 3, "local_count": 3,
                 "memory": 81559 * 2**20, "peak_flops": 989e12}
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")       # a job of two such hosts
    assert (detect_devices()["count"], detect_devices()["local_count"]) == (6, 3)
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-aaaa")
    assert detect_devices()["count"] == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7,1")          # CUDA stops at the invalid entry
    assert detect_devices()["count"] == 1


def test_detect_devices_honours_jax_platforms_and_hidden_gpus(fake_nvidia_smi, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    d = detect_devices()
    assert d["platform"] == "cpu" and d["count"] == 1 and d["peak_flops"] is None
    assert d["memory"] is None or d["memory"] > 2**28
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_devices()["platform"] in ("cpu", "tpu")


def test_processes_from_their_launchers(monkeypatch):
    from core.processes import processes

    for var in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "SLURM_PROCID",
                "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID"):
        monkeypatch.delenv(var, raising=False)
    assert processes() == (1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert processes() == (4, 3)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")        # tune's own variables come first
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert processes() == (2, 1)
    for var in ("JAX_NUM_PROCESSES", "SLURM_NTASKS"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
    monkeypatch.setenv("TPU_WORKER_ID", "2")
    assert processes() == (4, 2)


def test_simulated_cpu_devices_are_counted(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    assert detect_devices()["count"] == 8


def test_detect_devices_here():
    d = detect_devices()
    assert d["platform"] in ("cpu", "gpu", "tpu") and d["count"] >= 1
    print(f"\n{d}")


def test_known_gpu_names():
    assert est._match("NVIDIA A100-SXM4-80GB", est.GPU_PEAK_BF16) == 312e12
    assert est._match("NVIDIA L4", est.GPU_PEAK_BF16) == 121e12
    assert est._match("NVIDIA H200", est.GPU_PEAK_BF16) == 989e12
    assert est._match("Some New GPU", est.GPU_PEAK_BF16) is None
