"""GPU throughput: tune's jitted LoRA step against torch + PEFT on the same GPU, in the same run.

Model shapes of Llama-3.2-1B and Llama-3-8B with random weights (config alone, no download), bf16
compute and weights, LoRA r16 (alpha 32) on every linear layer of every block, rows of --seq tokens,
AdamW on the LoRA factors only, loss on every token. Both sides get the same token batch.

tune: runtime.model.Llama built with random weights on the device, the train step of
runtime/train.py (make_train_step). By default one sequence per row (runtime.pack=false), so
attention is plain causal — cuDNN's fused kernel (--attention cudnn, the default on a GPU) or
XLA's. --pack N puts N examples of seq/N tokens in each row, kept apart by segment ids as tune's
packed rows are — Pallas's fused kernel (--attention pallas, the default then) or XLA's; PEFT then
trains the same examples one per row (batch × N rows of seq/N tokens), the same tokens a step.
PEFT: transformers' LlamaForCausalLM (sdpa attention) wrapped by peft.get_peft_model, torch.optim
.AdamW over the trainable parameters, bf16 weights, LoRA factors in float32 as PEFT keeps them.

MFU = model FLOPs per second / the GPU's dense bf16 peak (989 TFLOP/s for H100/H200). Model FLOPs
per token (what a LoRA step must do, recomputation not counted):
  2·N forward + 2·N backward (activation gradients only: frozen weights get no weight gradient)
  + 6·N_lora (LoRA factors: forward, input and weight gradients)
  + 3 · 2·L·d·T attention (QKᵀ and AV over the causal half of T, forward and twice backward)
where N counts the matmul weights of all blocks and the output head, d = heads × head_dim.

    python benchmarks/gpu.py                              # both shapes, both sides
    python benchmarks/gpu.py --models 1b --side tune --steps 20 --batch 8
    python benchmarks/gpu.py --models 1b --pack 4         # 4 examples of 512 tokens a row
    python benchmarks/gpu.py --tiny --device cpu          # a tiny shape: checks the script runs

Writes the table into benchmarks/RESULTS.md (between the gpu markers) and the raw figures into
benchmarks/results/gpu.json (unless --no-write).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from throughput import publish  # noqa: E402

BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}

CONFIGS = {
    "1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048,
               intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, rms_norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
               intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False),
}
DEFAULTS = {"1b": {"batch": 8, "remat": "dots"}, "8b": {"batch": 4, "remat": "full"},
            "tiny": {"batch": 2, "remat": "none"}}
RANK, ALPHA = 16, 32.0


def model_flops_per_token(hf: dict, seq: int) -> tuple[float, int]:
    """(model FLOPs per token of one LoRA step, LoRA parameter count) — see the module docstring."""
    sys.path.insert(0, str(ROOT))
    from core.architecture import ModelConfig

    c = ModelConfig.from_hf(hf)
    shapes = c.linear_shapes()
    n_blocks = c.num_layers * sum(a * b for a, b in shapes.values())
    n = n_blocks + c.vocab_size * c.hidden_size                   # + the output head
    n_lora = c.num_layers * RANK * sum(a + b for a, b in shapes.values())
    attention = 3 * 2 * c.num_layers * c.num_heads * c.head_dim * seq   # causal half of 4·L·d·T
    return 4.0 * n + 6.0 * n_lora + attention, n_lora


def batch_ids(batch: int, seq: int, vocab: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, size=(batch, seq + 1), dtype=np.int32)


# ------------------------------------------------------------------------------------------ tune

def run_tune(name: str, args) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from core.architecture import MODULE_NAMES, ModelConfig
    from core.plan import ScheduleSection
    from runtime.model import EXACT, Llama, LoraConfig
    from runtime.build import optimizer as make_optimizer
    from runtime.train import make_train_step, split_model

    hf = CONFIGS[name]
    batch, seq = args.batch or DEFAULTS[name]["batch"], args.seq
    remat = args.remat or DEFAULTS[name]["remat"]
    dtype = jnp.float32 if args.device == "cpu" else jnp.bfloat16
    on_gpu = jax.default_backend() == "gpu"
    attention = args.attention or ("xla" if not on_gpu else "pallas" if args.pack > 1 else "cudnn")
    if seq % args.pack:
        raise SystemExit(f"--seq {seq} does not divide into --pack {args.pack} examples")
    t0 = time.perf_counter()
    model = Llama(ModelConfig.from_hf(hf), lora=LoraConfig(RANK, ALPHA, 0.0, MODULE_NAMES),
                  rngs=nnx.Rngs(0), compute=EXACT.but(dtype=dtype, param_dtype=dtype, remat=remat,
                                                         attention=attention))
    graphdef, lora, frozen = split_model(model)
    del model
    schedule = ScheduleSection(
        lr=1e-4, epochs=1, max_steps=None, batch_size=batch, grad_accum=1, warmup=0, seed=0,
        lr_schedule="constant", weight_decay=0.0, max_grad_norm=1.0, beta1=0.9, beta2=0.999,
        eps=1e-8, seq_len=seq, global_batch=batch, rows_per_epoch=batch, steps_per_epoch=1,
        total_steps=args.steps + args.warmup, warmup_steps=0, tokens_per_step=batch * seq)
    opt, lr_fn = make_optimizer(schedule)
    opt_state = opt.init(lora)
    step = make_train_step(graphdef, opt, lr_fn, ce_chunk=args.ce_chunk, dropout=False,
                           loss_tokens=None, packed=args.pack > 1)
    ids = batch_ids(batch, seq, hf["vocab_size"])
    example = seq // args.pack                  # each example's tokens; segments 1..pack per row
    segments = np.repeat(np.arange(1, args.pack + 1, dtype=np.int32), example)
    positions = np.arange(seq, dtype=np.int32) % example
    b = {"tokens": ids[None, :, :-1], "targets": ids[None, :, 1:],
         "loss_mask": np.ones((1, batch, seq), np.int32),
         "segment_ids": np.broadcast_to(segments, (1, batch, seq)).copy(),
         "positions": np.broadcast_to(positions, (1, batch, seq)).copy()}
    b = jax.device_put({k: jnp.asarray(v) for k, v in b.items()})
    rng = jax.random.PRNGKey(0)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = step.lower(lora, opt_state, frozen, b, rng, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        lora, opt_state, m = compiled(lora, opt_state, frozen, b, rng, jnp.int32(i))
        losses.append(float(jax.device_get(m["loss"])))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = None
    try:
        peak = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 — CPUs have no memory stats
        pass
    return {"side": "tune", "model": name, "batch": batch, "seq": seq, "pack": args.pack,
            "remat": remat,
            "attention": attention, "dtype": str(jnp.dtype(dtype)), "setup_s": setup_s,
            "compile_s": compile_s, "step_s": sorted(times)[len(times) // 2], "losses": losses,
            "peak_bytes": peak, "device": str(jax.devices()[0].device_kind)}


# ------------------------------------------------------------------------------------------ PEFT

def run_peft(name: str, args) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = dict(CONFIGS[name])
    batch, seq = args.batch or DEFAULTS[name]["batch"], args.seq
    remat = args.remat or DEFAULTS[name]["remat"]
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    if remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = batch_ids(batch, seq, hf["vocab_size"])           # the tokens tune gets
    if args.pack > 1:       # the same examples, one per row: rows of seq/pack tokens (+1 target)
        example = seq // args.pack
        rows = [ids[:, i * example:(i + 1) * example + 1] for i in range(args.pack)]
        ids = np.stack(rows, axis=1).reshape(batch * args.pack, example + 1)
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    inp, labels = ids[:, :-1], ids[:, 1:]
    setup_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        logits = model(input_ids=inp).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        losses.append(float(loss.detach()))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"side": "peft", "model": name, "batch": batch, "seq": seq, "pack": args.pack,
            "remat": remat,
            "attention": "sdpa", "dtype": str(dtype), "setup_s": setup_s, "compile_s": 0.0,
            "step_s": sorted(times)[len(times) // 2], "losses": losses, "peak_bytes": peak,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


# -------------------------------------------------------------------------------------------- run

def child(side: str, name: str, args) -> dict:
    """One side of one model in its own process (a fresh device: no memory left by the other)."""
    cmd = [sys.executable, __file__, "--child", side, "--models", name, "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--ce-chunk", str(args.ce_chunk), "--pack", str(args.pack)]
    for flag, value in (("--batch", args.batch), ("--remat", args.remat),
                        ("--attention", args.attention)):
        if value:
            cmd += [flag, str(value)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        return {"side": side, "model": name, "error": (p.stderr or p.stdout).strip()[-1500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def with_rates(r: dict) -> dict:
    if "error" in r:
        return r
    # attention spans one example: seq / pack tokens
    flops, n_lora = model_flops_per_token(CONFIGS[r["model"]], r["seq"] // r.get("pack", 1))
    tokens = r["batch"] * r["seq"]
    r["tokens_per_s"] = tokens / r["step_s"]
    r["model_tflops"] = flops * r["tokens_per_s"] / 1e12
    peak = next((v for k, v in PEAK_BF16.items() if k in str(r.get("device"))), None)
    r["mfu"] = flops * r["tokens_per_s"] / peak if peak else None
    r["lora_params"] = n_lora
    return r


def markdown(rows: list[dict], command: str) -> str:
    lines = [BEGIN, "## GPU throughput (tune vs torch + PEFT, same GPU, same run)", "",
             "```", command, "```", "",
             "| model | side | rows × tokens | remat | attention | tokens/s | model TFLOP/s | MFU | "
             "peak GiB | step s | tune / PEFT |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["side"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['side']} | failed: {r['error'][-200:]!r} |||||||||")
            continue
        other = by.get((r["model"], "peft"))
        ratio = (f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}"
                 if r["side"] == "tune" and other and "tokens_per_s" in other else "")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "—"
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "—"
        pack = r.get("pack", 1)
        shape = (f"{r['batch']} × {r['seq']}" if pack == 1 else
                 f"{r['batch']} × {r['seq']} ({pack} examples a row)" if r["side"] == "tune" else
                 f"{r['batch'] * pack} × {r['seq'] // pack}")
        lines.append(f"| {r['model']} | {r['side']} | {shape} | {r['remat']} | "
                     f"{r['attention']} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.1f} | {mfu} | "
                     f"{peak} | {r['step_s']:.3f} | {ratio} |")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--side", default="both", choices=("both", "tune", "peft"))
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default per model)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--remat", default=None, choices=("none", "dots", "full"))
    ap.add_argument("--attention", default=None, choices=("xla", "cudnn", "pallas"))
    ap.add_argument("--pack", type=int, default=1,
                    help="examples per row, kept apart by segment ids (tune); PEFT gets them one per row")
    ap.add_argument("--ce-chunk", type=int, default=4096)
    ap.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="a tiny shape instead (checks the script)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.models, args.seq = "tiny", min(args.seq, 128)
    if args.child:
        run = run_tune if args.child == "tune" else run_peft
        print(json.dumps(run(args.models, args)))
        return 0
    sides = ("tune", "peft") if args.side == "both" else (args.side,)
    rows = [with_rates(child(side, name, args)) for name in args.models.split(",") for side in sides]
    publish("gpu", argv, rows, lambda command: markdown(rows, command), BEGIN, END,
            write=not args.no_write and not args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
