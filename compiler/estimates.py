"""Steps, memory and time, estimated before anything runs. Arithmetic only: no JAX here.

Steps are exact (the runtime packs rows with the same rule, core/packing.py). Memory and time are
estimates with stated formulas, good to tell "fits" from "does not fit" and minutes from hours.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core import packing
from core.packing import scores
from core.processes import processes
from core.files import tune_home, write_atomic

UTILISATION = 0.4        # share of peak FLOP/s a well-fed LoRA step reaches on a GPU or TPU
# A jitted CPU training step against numpy's best float32 matmul rate (cpu_matmul_flops), fitted to
# measured SmolLM2-135M steps of the four recipes (rows of 128 to 768 tokens; RESULTS.md, "Step time"):
CPU_EFFICIENCY = 0.55    # share of that rate the weights' float32 matmuls reach
CPU_BF16_SPEEDUP = 1.8   # bfloat16 matmul operands (runtime.matmul_dtype) against float32 ones
CPU_ATTENTION_FLOPS_PER_SCORE = 7000   # one float32 attention score, forward and backward (products,
                                       # mask, softmax: memory-bound), in FLOPs at that rate

# Dense bf16 peak FLOP/s per device (no sparsity), matched against the device name.
GPU_PEAK_BF16 = (
    ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12),
    ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12), ("A10G", 70e12), ("A10", 125e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A6000", 155e12), ("RTX 4090", 165e12),
    ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)
TPU_PEAK_BF16 = (("v6e", 918e12), ("v5p", 459e12), ("v5litepod", 197e12), ("v5e", 197e12),
                 ("v4", 275e12), ("v3", 123e12), ("v2", 46e12))


# ------------------------------------------------------------------------------ schedule

def schedule_steps(lengths: Sequence[int], *, batch_size: int, grad_accum: int, epochs: float,
                   max_steps: int | None, warmup: float | int, pack: bool, seq_len: int) -> dict:
    """rows_per_epoch, steps_per_epoch, total_steps, warmup_steps for training examples of these
    token counts — exactly the runtime's, since both count with core/packing.py.

    A step consumes batch_size × grad_accum rows of seq_len slots. total_steps = ceil(epochs ×
    steps_per_epoch), or max_steps when set (> 0). warmup < 1 is a fraction of total_steps, else a
    step count; never more than total_steps."""
    rows = packing.count_rows(lengths, seq_len, pack=pack)
    per_epoch = packing.steps_per_epoch(rows, int(batch_size) * int(grad_accum))
    total = max(1, math.ceil(float(epochs or 1) * per_epoch))
    if max_steps is not None and int(max_steps) > 0:
        total = int(max_steps)
    warmup = warmup or 0
    warmup_steps = round(float(warmup) * total) if float(warmup) < 1 else int(warmup)
    return {"rows_per_epoch": rows, "steps_per_epoch": per_epoch, "total_steps": total,
            "warmup_steps": max(0, min(warmup_steps, total))}


# ------------------------------------------------------------------------------ memory

# Bytes per quantised weight, scales included (runtime/quant.py: int8 per output channel, nf4 in
# blocks of 64 with a float32 absmax each).
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64}


def memory_per_device(*, params: int, trainable: int, layers: int, hidden: int, intermediate: int,
                      heads: int, kv_heads: int, head_dim: int, vocab: int, batch: int, seq_len: int,
                      param_bytes: int, compute_bytes: int, remat: str, ce_chunk: int, devices: int,
                      fsdp: int, tensor: int, loss_tokens: int | None = None,
                      attention_scores: bool = True, trained_in_full: int = 0, quantized: int = 0,
                      quantize: str = "none", linear: int | None = None,
                      attention_block: int = 0) -> dict:
    """Bytes per device: weights, adapter + optimizer, activations, attention, logits, total.

    `batch` is the global micro-batch (rows per accumulation step); it is split over the data-parallel
    devices (devices / tensor). Weights are sharded over fsdp × tensor; LoRA state is replicated.
    The per-token figures are what XLA keeps for the backward pass of one decoder layer, checked
    against the compiled step's memory_analysis() (benchmarks/memory.py, RESULTS.md)."""
    fsdp, tensor, devices = max(1, int(fsdp)), max(1, int(tensor)), max(1, int(devices))
    # Base weights: one copy, sharded over the fsdp and tensor axes; `quantized` of them stored in
    # QUANT_BYTES (codes and scales) instead of param_bytes. Modules trained in full are counted
    # here (they are base weights) and in `trainable`.
    # The tensor axis splits only the blocks' `linear` weights (all of them when not given); the
    # embedding, head and norms are split by fsdp alone.
    linear = params if linear is None else linear
    dense = ((params - quantized) * param_bytes + quantized * QUANT_BYTES.get(quantize, 0))
    linear_bytes = (linear - quantized) * param_bytes + quantized * QUANT_BYTES.get(quantize, 0)
    weights = linear_bytes / (fsdp * tensor) + (dense - linear_bytes) / fsdp
    # LoRA parameters in fp32, their gradients, and AdamW's two moments: 4 fp32 copies. A module
    # trained in full keeps its weight above, and adds a float32 gradient and two moments in its
    # dtype. Frozen weights have no gradient and no optimizer state — the point of LoRA.
    adapter_optimizer = (trainable - trained_in_full) * 4 * 4 + \
        trained_in_full * (4 + 2 * param_bytes)
    # Activations saved for the backward pass, per token per layer, in compute dtype. Tensor
    # parallelism splits the head dimensions (when it divides both head counts; otherwise attention
    # runs on gathered heads) and the MLP's (when it divides the intermediate size); the residual
    # stream (hidden-wide arrays) is replicated over the tensor axis, Megatron-style. Each width
    # below is (head-wide, MLP-wide, hidden-wide) features.
    local_batch = math.ceil(batch / max(1, devices // tensor))
    tokens = local_batch * seq_len
    q, kv = heads * head_dim, kv_heads * head_dim
    head_split = tensor if heads % tensor == 0 and kv_heads % tensor == 0 else 1
    mlp_split = tensor if intermediate % tensor == 0 else 1
    # "dots": the matmul outputs (q, k, v, o_proj's output, gate, up, down's output) and the layer's
    # input and normed input.
    dots = (q + 2 * kv, 2 * intermediate, 4 * hidden)
    # "none": everything — also both norms' inputs and outputs, the attention output before o_proj,
    # RoPE'd q and k (and their float32 rotation). The MLP's silu(gate)·up is recomputed from gate
    # and up (runtime/model._swiglu), so it adds nothing, and the peak holds one [tokens,
    # intermediate] array less than "dots" keeps — a figure calibrated against XLA's
    # memory_analysis() (benchmarks/memory.py: within 2% at 8×256 and 2×1024 tokens).
    everything = (dots[0] + q + 2 * (q + kv), intermediate, dots[2] + 2 * hidden)
    per_layer = {"none": everything, "dots": dots, "full": (0, 0, hidden)}.get(remat, everything)

    def width(features: tuple[int, int, int]) -> float:
        return features[0] / head_split + features[1] / mlp_split + features[2]

    saved = layers * tokens * width(per_layer) * compute_bytes
    # Remat recomputes one layer at a time in the backward pass: that layer's activations are live
    # on top of what was saved.
    working = 0 if remat == "none" else tokens * width(everything) * compute_bytes
    # XLA attention materialises float32 scores, [B, H, T, T] or, in causal blocks, each block's
    # queries × the keys up to its end (attention_scores): without remat the backward pass keeps
    # one such array of every layer (the probabilities: runtime/attention.masked_softmax) and the
    # layer being differentiated needs four more (scores,
    # probabilities and their gradients); under remat only the recomputed layer's are live, and
    # XLA's peak holds three of them (calibrated against memory_analysis(): rows of 1,024 to 4,096
    # tokens, whole or in blocks of 128 and 512, within 8% — benchmarks/memory.py, RESULTS.md).
    attention = 0
    if attention_scores:
        attention = (layers + 4 if remat == "none" else 3) * local_batch * heads * \
            scores(seq_len, attention_block) * 4 / head_split
    # Chunked cross-entropy over the supervised positions (loss_tokens, else all): one chunk of
    # [chunk, vocab] logits in fp32, its softmax and gradient, and a compute-dtype copy.
    # loss_tokens counts the whole micro-batch: each data-parallel device scores its share.
    shards = max(1, devices // tensor)
    logit_rows = min(int(ce_chunk), tokens if loss_tokens is None else
                     math.ceil(int(loss_tokens) / shards), tokens)
    logits = logit_rows * vocab * (3 * 4 + compute_bytes)
    activations = saved + working
    total = weights + adapter_optimizer + activations + attention + logits
    return {k: int(v) for k, v in (("weights", weights), ("adapter_optimizer", adapter_optimizer),
                                   ("activations", activations), ("attention", attention),
                                   ("logits", logits), ("total", total))}


def eval_memory(*, params: int, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                intermediate: int, vocab: int, batch: int, prompt_len: int, new_tokens: int,
                param_bytes: int, compute_bytes: int) -> int:
    """Bytes one evaluation batch needs: the weights, the KV cache of every layer for the prompt and
    the answer, and the prefill's working set (one layer's activations and attention scores, the
    last position's logits)."""
    cache_len = prompt_len + new_tokens
    kv_cache = layers * 2 * batch * cache_len * kv_heads * head_dim * compute_bytes
    tokens = batch * prompt_len
    prefill = tokens * (3 * hidden + 2 * intermediate) * compute_bytes + \
        batch * heads * prompt_len * cache_len * 4 * 2
    logits = batch * vocab * 4 * 2
    return int(params * param_bytes + kv_cache + prefill + logits)


# ------------------------------------------------------------------------------ time

_CPU_FLOPS: float | None = None


def cpu_matmul_flops() -> float:
    """FLOP/s of a float32 numpy matmul on this machine: measured once a process (~50 ms), and the
    best this machine has measured before (tune_home()/cpu_flops.json, by CPU model and count). The
    best of a few large products: small ones measure BLAS thread hand-offs, which a busy machine
    makes slow, more than the arithmetic — and a machine busy at compile time (another training,
    say) measures several times slower than it trains once that has finished."""
    global _CPU_FLOPS
    if _CPU_FLOPS is None:
        _CPU_FLOPS = _remembered_best(_probe_matmul())
    return _CPU_FLOPS


def _probe_matmul() -> float:
    n = 1024
    a = np.full((n, n), 0.5, dtype=np.float32)   # values do not change a matmul's speed
    b = a.T.copy()
    best, reps, start = 0.0, 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - start < 0.05:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / max(time.perf_counter() - t, 1e-9))
        reps += 1
        if time.perf_counter() - start > 0.5:
            break
    return best


def _remembered_best(measured: float) -> float:
    """max(measured, the best remembered for this CPU); remembers measured when it is the best.
    The file is a cache: unreadable or unwritable, it is ignored."""
    path = tune_home() / "cpu_flops.json"
    key = f"{_cpuinfo('model name') or platform.machine()} × {os.cpu_count()}"
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    best = known.get(key)
    best = float(best) if isinstance(best, (int, float)) and best > 0 else 0.0
    if measured > best:
        try:
            write_atomic(path, json.dumps({**known, key: measured}, indent=1) + "\n")
        except OSError:
            pass
    return max(measured, best)


def step_time(*, params: int, tokens_per_step: int, device: dict, trainable: int = 0,
              remat: str = "none", head_params: int = 0, head_tokens: int | None = None,
              embedding_params: int = 0, bf16_matmul: bool = False, attention_scores: int = 0,
              head_dim: int = 0, forward_only: bool = False) -> float:
    """Seconds per optimizer step (forward_only: the forward pass alone over a batch of the same
    shape, as validation runs it — see below).

    FLOPs per token ≈ 2·params forward + 2·params for the activation gradients of the backward pass;
    frozen weights get no weight gradient (the third 2·params of full fine-tuning). LoRA adds the full
    6·trainable. Remat recomputes the forward (+2·params, for "full"; about half that for "dots").
    The output head (`head_params`, part of `params`) runs on `head_tokens` positions a step when
    the loss gathers the supervised ones (all tokens otherwise), forward, recomputed and backward
    (chunked cross-entropy is checkpointed); an untied input embedding (`embedding_params`) is a
    lookup, no matmul. Attention: `attention_scores` score elements a step (all layers, rows and
    heads), each 4·head_dim FLOPs forward (q·k and p·v) and twice that backward, + the forward again
    under remat. Divided by the devices' peak × UTILISATION; on a CPU, by numpy's measured float32
    rate × CPU_EFFICIENCY (× CPU_BF16_SPEEDUP for bfloat16 operands), where attention costs
    CPU_ATTENTION_FLOPS_PER_SCORE a score instead (XLA:CPU's softmax and masks, not its products,
    dominate).

    forward_only: the same terms without the backward pass and the recomputation: 2·params a token
    (2·trainable for LoRA's factors), the head's 2·head_params on its positions, 4·head_dim FLOPs a
    score — half a LoRA step's weight FLOPs without remat, a third of its head's and attention's —
    and on a CPU a third of CPU_ATTENTION_FLOPS_PER_SCORE (which prices a score's forward and
    backward)."""
    recompute = {"full": 2.0, "dots": 1.0}.get(remat, 0.0)
    body = max(0, params - head_params - embedding_params)
    head_rows = tokens_per_step if head_tokens is None else min(head_tokens, tokens_per_step)
    if forward_only:
        flops = (2.0 * body + 2.0 * trainable) * tokens_per_step + 2.0 * head_params * head_rows
        attention = 4.0 * head_dim * attention_scores
        attention_scores = attention_scores / 3.0       # the CPU's price below: forward only
    else:
        flops = ((4.0 + recompute) * body + 6.0 * trainable) * tokens_per_step + \
            6.0 * head_params * head_rows
        attention = (12.0 + (4.0 if remat != "none" else 0.0)) * head_dim * attention_scores
    count = max(1, int(device.get("count") or 1))
    if device.get("platform") == "cpu":
        probe = cpu_matmul_flops()
        return flops / (probe * CPU_EFFICIENCY * (CPU_BF16_SPEEDUP if bf16_matmul else 1.0)) + \
            attention_scores * CPU_ATTENTION_FLOPS_PER_SCORE / probe
    rate = float(device["peak_flops"]) * UTILISATION * count if device.get("peak_flops") else \
        100e12 * UTILISATION        # an unknown accelerator: assume a modest one
    return (flops + attention) / rate


# ------------------------------------------------------------------------------ validation, evaluation

# A decoding step of a batch of rows (one new token each) reads every weight for a handful of
# tokens: it costs at least a forward pass over this many tokens. On 2 CPUs SmolLM2-135M decoded
# 16 rows in 90–100 ms a step (benchmarks/RESULTS.md, "Serving"), the forward figure of ~90–120
# tokens; the legal recipe's base model scored 32 test rows (constrained) in 21.5 s on a busy
# 2-CPU machine, estimated 19.1 s, and a validation pass of its 15 rows took 4.5–5.5 s, estimated
# 4.2 s. On a GPU a step's fixed latency (a kernel launch per operation) is not counted: unmeasured.
DECODE_STEP_TOKENS = 128


def validation_passes(total_steps: int, every: int) -> int:
    """How often training computes the validation loss (runtime/run.py): after every `every`-th
    step before the last (every > 0), and once when training ends."""
    if total_steps <= 0:
        return 0
    return (total_steps - 1) // every + 1 if every > 0 else 1


def validation_batches(lengths: Sequence[int], *, seq_len: int, pack: bool, rows_per_step: int
                       ) -> int:
    """Batches in one validation pass: the val split's examples in rows as training fills its own,
    rows_per_step rows a batch (runtime/build.batches' validation Batcher); 0 without any."""
    if not len(lengths):
        return 0
    return packing.steps_per_epoch(packing.count_rows(lengths, seq_len, pack=pack), rows_per_step)


def prompt_bucket(n: int, minimum: int = 16) -> int:
    """The length a prompt batch is padded to for decoding: 16, 24, 32, 48, 64, 96, ... (2^k and
    1.5·2^k) — runtime/decode.bucket's sizes (the compiler does not import the runtime)."""
    size = minimum
    while size < n:
        size = size + size // 2 if size & (size - 1) == 0 else size + size // 3
    return size


def prefill_tokens(prompt_lengths: Sequence[int], rows: int, batch_size: int) -> int:
    """Prompt positions an evaluation's prefills compute for `rows` test rows (runtime/decode.py):
    sorted by length into batches of batch_size, each left-padded to its longest prompt's bucket
    and filled to a whole batch. With fewer rows than lengths (eval.limit's sample), the rows'
    lengths are taken as evenly spaced quantiles of all of them."""
    lengths = np.sort(np.asarray(prompt_lengths, dtype=np.float64))
    if rows <= 0 or not len(lengths):
        return 0
    if rows != len(lengths):
        lengths = np.quantile(lengths, np.linspace(0.0, 1.0, rows))
    return sum(batch_size * prompt_bucket(math.ceil(lengths[min(i + batch_size, rows) - 1]))
               for i in range(0, rows, batch_size))


def head_tokens(own_lengths: Sequence[int], rows: int, batch_size: int) -> int:
    """Positions the classification head computes for `rows` test rows (runtime/head.predict):
    each prompt's own tokens (after the start every prompt shares) packed into rows as long as
    the longest one's bucket, batch_size rows at a time. With fewer rows than lengths (eval.limit's
    sample), the rows' tokens are the mean's share."""
    lengths = np.asarray(own_lengths, dtype=np.float64)
    if rows <= 0 or not len(lengths):
        return 0
    width = prompt_bucket(math.ceil(lengths.max()))
    packed = math.ceil(float(lengths.mean()) * rows / width)
    return math.ceil(packed / batch_size) * batch_size * width


def evaluation_time(*, rows: int, models: int, mode: str, token_s: float, prefill: int,
                    new_tokens: int, batch_size: int, label_tokens: Sequence[int] = (),
                    unit_tokens: float = 0.0) -> float:
    """Seconds for `models` models each to score `rows` test rows (runtime/evaluate.py), from
    token_s, the forward pass's seconds per token (validation's figure, a training batch's), and
    prefill, the prompt positions of those rows' batches (prefill_tokens).

    generate: after the prefill, the rows decode batch_size at a time, one token a row a step, up
    to new_tokens steps (a batch stops when all its rows have ended: an upper bound); constrained:
    the longest label's steps within the label set, then free generation's new_tokens from the same
    prefill. A step reads every weight for a handful of tokens: it costs a forward over its rows,
    and at least over DECODE_STEP_TOKENS tokens. choices: no decoding; after the prefill every
    label's tokens (and one more) run for each row of a batch. head (adapter.head=classifier): the
    prefill alone. preference: one forward pass over each pair's tokens (unit_tokens on average),
    packed."""
    if rows <= 0 or models <= 0:
        return 0.0
    if mode == "head":
        return models * prefill * token_s
    if mode == "preference":
        return models * rows * unit_tokens * token_s
    batches = math.ceil(rows / max(1, batch_size))
    if mode == "choices":
        width = max(label_tokens, default=0) + 1
        return models * (prefill + batches * batch_size * len(label_tokens) * width) * token_s
    steps = new_tokens + (max(label_tokens, default=0) if mode == "constrained" else 0)
    decode = batches * steps * max(batch_size, DECODE_STEP_TOKENS)
    return models * (prefill + decode) * token_s


# ------------------------------------------------------------------------------ devices

def detect_devices() -> dict:
    """What jax would find, found without jax: {"platform", "kind", "count", "memory" (bytes per
    device or None), "peak_flops" (per device or None)}, count over every process of a multi-process
    job (each process's devices × processes()). JAX_PLATFORMS is honoured."""
    found = _local_devices()
    found["local_count"] = found["count"]
    found["count"] = found["count"] * processes()[0]
    return found


def _local_devices() -> dict:
    platforms = [p.strip().lower() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and platforms[0] == "cpu":
        return _cpu()
    if not platforms or platforms[0] in ("cuda", "gpu", "rocm"):
        gpus = _nvidia_gpus()
        if gpus:
            name, memory = gpus[0]
            return {"platform": "gpu", "kind": name, "count": len(gpus), "memory": memory,
                    "peak_flops": _match(name, GPU_PEAK_BF16)}
    if not platforms or platforms[0] == "tpu":
        tpu = _tpu()
        if tpu:
            return tpu
    return _cpu()


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (None where there is no such file or
    line)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


def _cpu() -> dict:
    kind = _cpuinfo("model name") or "cpu"
    # simulated host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) share the memory
    count = 1
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_force_host_platform_device_count="):
            count = max(1, _int_or(flag.split("=", 1)[1], 1))
    memory = _meminfo_total()
    return {"platform": "cpu", "kind": kind, "count": count, "cores": os.cpu_count(),
            "memory": memory // count if memory else memory, "peak_flops": None}


def cpu_has_bf16_dot() -> bool:
    """Whether this machine's CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, from
    /proc/cpuinfo's flags)."""
    return bool(set((_cpuinfo("flags") or "").split()) & {"avx512_bf16", "amx_bf16"})


def _int_or(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _nvidia_gpus() -> list[tuple[str, int | None]]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        index, uuid, name, mib = parts[0], parts[1], ",".join(parts[2:-1]), parts[-1]
        try:
            memory = int(float(mib)) * 2 ** 20
        except ValueError:
            memory = None
        gpus.append((index, uuid, name, memory))
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        chosen = []
        for w in wanted:
            hit = next((g for g in gpus if w == g[0] or g[1].startswith(w)), None)
            if hit is None:
                break      # CUDA stops at the first invalid entry
            chosen.append(hit)
        gpus = chosen
    return [(name, memory) for _, _, name, memory in gpus]


def _tpu() -> dict | None:
    accel = sorted(Path("/dev").glob("accel*"))
    vfio = [p for p in Path("/dev/vfio").glob("*") if p.name.isdigit()] if Path("/dev/vfio").is_dir() else []
    count = len(accel) or len(vfio)
    if not count:
        return None
    kind = os.environ.get("TPU_ACCELERATOR_TYPE") or "tpu"
    return {"platform": "tpu", "kind": kind, "count": count, "memory": None,
            "peak_flops": _match(kind, TPU_PEAK_BF16)}


def _match(name: str, table) -> float | None:
    for pattern, flops in table:
        if re.search(re.escape(pattern), name, re.IGNORECASE):
            return flops
    return None
