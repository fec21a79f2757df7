"""The reference the benchmarks compare tune against: a plain Hugging Face transformers + PEFT LoRA
training loop and greedy-decoding evaluation, in torch, doing what a tune plan says.

Everything is read from a compiled tune plan (plan.json), so both sides train on the same thing:
- the same base model directory (plan.model.dir) and the same LoRA (r, alpha, dropout, target modules);
- the same token data: the examples the compiler tokenised (plan.data.cache: `{split}_ids`,
  `{split}_offsets`, `{split}_prompt_lens`), fed to torch as they are — no re-rendering, no
  re-tokenising;
- the same objective: an example of L tokens gives L-1 (input, target) pairs, inputs ids[:-1], targets
  ids[1:]; a target is supervised when it lies in the response (end token included); the loss is the sum
  of the supervised token cross-entropies over the whole global batch divided by their number;
- the same optimiser: gradient clipping by global norm, then AdamW (betas, eps, decoupled weight decay)
  with tune's schedule — linear warmup lr·(s+1)/warmup, then cosine (or linear) decay to 0 at
  total_steps;
- the same batch size, gradient accumulation, sequence length and number of steps.

One difference, on purpose: this loop does what a plain HF script does — one example per row, rows
right-padded to the longest row of the batch (no packing). tune packs several examples per row by
default (runtime.pack); its unpacked mode (runtime.pack=false) is the like-for-like comparison. Example
order is tune's unpacked order (a permutation of the examples drawn from numpy's default_rng([seed,
epoch])), so with runtime.pack=false both sides see the same examples at the same step; weight
initialisation and dropout masks come from different random generators.

Compute: fp32 on CPU (bf16 autocast with --cpu-bf16); on a GPU the base model in bf16 and the LoRA
weights in fp32 under bf16 autocast.

Usable as a module (`train`, `evaluate`, `load_plan`, ...) or from the command line:

    python benchmarks/peft_reference.py RUN_DIR/plan.json --steps 20 --out /tmp/peft --eval
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------- plan

def load_plan(path) -> dict:
    """A plan as a dict: plan.json, or a run directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    with open(path) as f:
        return json.load(f)


def _section(plan: dict, name: str) -> dict:
    return plan.get(name) or {}


def eval_config(plan: dict) -> dict:
    """The plan's resolved evaluation settings (metric, mode, max_new_tokens, limit, batch_size)."""
    return _section(plan, "eval")


def runtime_config(plan: dict) -> dict:
    return _section(plan, "runtime")


# ------------------------------------------------------------------------------------- token data

@dataclass
class TokenData:
    splits: dict            # split -> (list of int32 arrays, list of prompt lengths)
    references: list        # test references (response text), or None
    labels: list            # distinct normalised train responses (for macro F1), or []

    def split(self, name: str):
        return self.splits.get(name, ([], []))


def _from_npz(path) -> dict:
    z = np.load(path)
    out = {}
    for s in SPLITS:
        if f"{s}_ids" not in z.files:
            continue
        ids, offsets, plens = z[f"{s}_ids"], z[f"{s}_offsets"], z[f"{s}_prompt_lens"]
        out[s] = ([np.asarray(ids[offsets[i]:offsets[i + 1]], dtype=np.int64)
                   for i in range(len(offsets) - 1)], [int(p) for p in plens])
    return out


def load_token_data(plan: dict) -> TokenData:
    """The examples the compiler tokenised for this plan. Reads the plan's cache file (.npz + .json)
    directly when it is there; otherwise asks core.token_cache.load_examples (which says how to
    rebuild it)."""
    data = _section(plan, "data")
    cache = data.get("cache")
    splits = None
    if cache and Path(cache).is_file():
        splits = _from_npz(cache)
    else:
        from core.token_cache import load_examples

        ex = load_examples(data.get("cache"))
        splits = {}
        for s in SPLITS:
            try:
                ids, plens = ex.split(s)
            except (KeyError, ValueError):
                continue
            splits[s] = ([np.asarray(x, dtype=np.int64) for x in ids], [int(p) for p in plens])
        cache = getattr(ex, "path", None) or data.get("cache")
    meta = {}
    if cache:
        side = Path(cache).with_suffix(".json")
        if side.is_file():
            with open(side) as f:
                meta = json.load(f)
    refs = (meta.get("test") or {}).get("references")
    return TokenData(splits=splits, references=refs, labels=list(meta.get("labels") or []))


def response_texts(tokenizer, ids_list, prompt_lens, eos_ids) -> list[str]:
    """Reference texts decoded from the token data (used when the cache has no references)."""
    out = []
    for ids, p in zip(ids_list, prompt_lens):
        resp = [int(t) for t in ids[p:] if int(t) not in eos_ids]
        out.append(tokenizer.decode(resp, skip_special_tokens=True))
    return out


# ------------------------------------------------------------------------------------------ model

def pick_device(device: str | None = None) -> str:
    import torch

    if device and device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(plan: dict, *, device: str = "cpu", adapter_dir=None, seed: int | None = None):
    """Base model of the plan with a fresh PEFT LoRA of the plan's config (or the adapter in
    `adapter_dir`). Returns the PeftModel, on `device`, fp32 on CPU / bf16 base on GPU."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir = _section(plan, "model")["dir"]
    base_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=base_dtype)
    base.config.use_cache = False
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    else:
        a = _section(plan, "adapter")
        if seed is not None:
            torch.manual_seed(int(seed))
        full = [("model.norm" if m == "norm" else m) for m in a.get("train_modules") or ()]
        cfg = LoraConfig(r=int(a["rank"]), lora_alpha=float(a["alpha"]),
                         lora_dropout=float(a.get("dropout") or 0.0),
                         target_modules=list(a["targets"]), bias="none", task_type="CAUSAL_LM",
                         use_rslora=bool(a.get("rslora")), use_dora=a.get("kind") == "dora",
                         modules_to_save=full or None)
        model = get_peft_model(base, cfg)          # LoRA weights in fp32 (autocast_adapter_dtype)
    return model.to(device)


def load_tokenizer(plan: dict):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(_section(plan, "model")["dir"]) / "tokenizer.json"))


def eos_ids(plan: dict) -> list[int]:
    m = _section(plan, "model")
    ids = list(m.get("eos_token_ids") or [])
    if m.get("eos_token_id") is not None and m["eos_token_id"] not in ids:
        ids.insert(0, m["eos_token_id"])
    return [int(i) for i in ids]


# -------------------------------------------------------------------------------------- schedule

def lr_factor(step: int, warmup: int, total: int, kind: str = "cosine") -> float:
    """tune's schedule, as a multiple of the peak lr, at 0-based step `step`."""
    total = max(int(total), 1)
    if warmup > 0 and step < warmup:
        return min(1.0, (step + 1.0) / warmup)
    p = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "linear":
        return 1.0 - p
    return 1.0


def schedule_steps(plan: dict, n_examples: int, steps: int | None = None) -> tuple[int, int]:
    """(total steps, warmup steps) of this loop. One example per row, so an epoch is
    ceil(examples / (batch_size × grad_accum)) steps — more than tune's packed epoch; the total is
    epochs × that, capped by schedule.max_steps (or exactly `steps` when given). Warmup is the
    plan's warmup_steps when the totals agree, else schedule.warmup re-applied to this total
    (a fraction when below 1, else a number of steps); never more than the total, as in tune."""
    sched = _section(plan, "schedule")
    cfg_sched = _section(plan, "config").get("schedule") or {}
    rows = int(sched["batch_size"]) * int(sched.get("grad_accum") or 1)
    if steps:
        total = int(steps)
    else:
        epochs = float(sched.get("epochs") or cfg_sched.get("epochs") or 1)
        total = max(1, math.ceil(epochs * math.ceil(n_examples / rows)))
        max_steps = sched.get("max_steps") or cfg_sched.get("max_steps")
        if max_steps and int(max_steps) > 0:
            total = min(total, int(max_steps))
    warmup = sched.get("warmup_steps")
    if warmup is None or int(sched.get("total_steps") or -1) != total:
        w = float(cfg_sched.get("warmup", sched.get("warmup", 0)) or 0)
        warmup = round(w * total) if w < 1 else int(w)
    return total, min(int(warmup), total)


# --------------------------------------------------------------------------------------- batches

def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """tune's unpacked example order for an epoch."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def make_rows(ids_list, prompt_lens, order, pad_id: int):
    """Right-padded rows for the examples in `order`, padded to the longest of them:
    input_ids, attention_mask, targets (-100 where not supervised), and counts."""
    n = len(order)
    width = max(len(ids_list[i]) - 1 for i in order)
    inp = np.full((n, width), pad_id, dtype=np.int64)
    att = np.zeros((n, width), dtype=np.int64)
    tgt = np.full((n, width), -100, dtype=np.int64)
    sup = 0
    for r, i in enumerate(order):
        ids, p = ids_list[i], prompt_lens[i]
        L = len(ids) - 1
        inp[r, :L] = ids[:-1]
        att[r, :L] = 1
        mask = np.arange(1, L + 1) >= p          # target j = ids[j+1] is supervised when j+1 >= p
        tgt[r, :L] = np.where(mask, ids[1:], -100)
        sup += int(mask.sum())
    return {"input_ids": inp, "attention_mask": att, "targets": tgt,
            "tokens": int(att.sum()), "supervised": sup, "examples": n, "padded": int(n * width)}


def step_batches(ids_list, prompt_lens, *, batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 n_steps: int):
    """Yield n_steps global batches, each a list of grad_accum micro-batches (dicts from make_rows),
    epochs after epochs; the last step of an epoch takes the rows that are left."""
    if not any(len(x) > 1 for x in ids_list):
        raise ValueError("no training example has a token to predict")
    rows_per_step = batch_size * grad_accum
    done, epoch = 0, 0
    while done < n_steps:
        order = [int(i) for i in epoch_order(len(ids_list), seed, epoch) if len(ids_list[i]) > 1]
        for s in range(0, len(order), rows_per_step):
            chunk = order[s:s + rows_per_step]
            micro = [make_rows(ids_list, prompt_lens, chunk[m:m + batch_size], pad_id)
                     for m in range(0, len(chunk), batch_size)]
            yield micro
            done += 1
            if done >= n_steps:
                return
        epoch += 1


# ------------------------------------------------------------------------------------------ train

def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train(plan: dict, *, steps: int | None = None, device: str | None = None, out_dir=None,
          log=None, data: TokenData | None = None, cpu_bf16: bool = False,
          batch_size: int | None = None) -> dict:
    """Train a PEFT LoRA as the plan says, for `steps` steps (default: see schedule_steps).

    Returns {"model", "records" (one per step: step, loss, lr, grad_norm, tokens, supervised_tokens,
    examples, padded_tokens, step_time_s), "load_s", "train_s", "device", "dtype"}; saves the adapter
    (PEFT save_pretrained) and metrics.jsonl into out_dir when given."""
    import torch

    device = pick_device(device)
    sched = _section(plan, "schedule")
    seed = int(sched.get("seed") or 0)
    data = data or load_token_data(plan)
    ids_list, plens = data.split("train")
    pad_id = int(_section(plan, "model").get("pad_token_id") or 0)
    total, warmup = schedule_steps(plan, len([x for x in ids_list if len(x) > 1]), steps)
    steps = total

    t0 = time.perf_counter()
    model = load_model(plan, device=device, seed=seed)
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(sched["lr"]),
                            betas=(float(sched.get("beta1", 0.9)), float(sched.get("beta2", 0.999))),
                            eps=float(sched.get("eps", 1e-8)),
                            weight_decay=float(sched.get("weight_decay") or 0.0))
    kind = sched.get("lr_schedule") or "cosine"
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, kind))
    max_norm = sched.get("max_grad_norm")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16))
    torch.manual_seed(seed)
    model.train()

    batches = list(step_batches(ids_list, plens, batch_size=int(batch_size or sched["batch_size"]),
                                grad_accum=int(sched.get("grad_accum") or 1), seed=seed,
                                pad_id=pad_id, n_steps=steps))
    records = []
    train_t0 = time.perf_counter()
    for step, micro in enumerate(batches):
        _sync(device)
        t = time.perf_counter()
        n_sup = sum(mb["supervised"] for mb in micro)
        denom = max(n_sup, 1)
        loss_sum = 0.0
        for mb in micro:
            inp = torch.from_numpy(mb["input_ids"]).to(device, non_blocking=True)
            att = torch.from_numpy(mb["attention_mask"]).to(device, non_blocking=True)
            tgt = torch.from_numpy(mb["targets"]).to(device, non_blocking=True)
            with autocast:
                logits = model(input_ids=inp, attention_mask=att).logits
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(),
                                                   ignore_index=-100, reduction="sum")
            (ce / denom).backward()
            loss_sum += float(ce.detach())
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, float(max_norm)) if max_norm
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t
        rec = {"step": step + 1, "loss": loss_sum / denom, "lr": lr, "grad_norm": float(grad_norm),
               "tokens": sum(mb["tokens"] for mb in micro), "supervised_tokens": n_sup,
               "examples": sum(mb["examples"] for mb in micro),
               "padded_tokens": sum(mb["padded"] for mb in micro), "step_time_s": dt}
        rec["tokens_per_s"] = rec["tokens"] / dt
        records.append(rec)
        if log:
            log(f"peft step {step + 1}/{steps} loss {rec['loss']:.4f} lr {lr:.3g} "
                f"{rec['tokens_per_s']:,.0f} tok/s")
    train_s = time.perf_counter() - train_t0
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir / "adapter"))
        with open(out_dir / "metrics.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return {"model": model, "records": records, "load_s": load_s, "train_s": train_s,
            "total_steps": total, "warmup_steps": warmup, "device": device,
            "dtype": "float32" if device == "cpu" and not cpu_bf16 else "bfloat16"}


# ------------------------------------------------------------------------------------------- eval

def test_set(plan: dict, data: TokenData, limit: int | None = None):
    """(prompts as token id lists, references) of the test split: with `limit`, the rows tune's
    eval.limit scores (drawn with the plan's seed, in file order)."""
    ids_list, plens = data.split("test")
    n = len(ids_list)
    rows = list(range(n))
    if limit not in (None, 0) and int(limit) < n:
        seed = plan["schedule"]["seed"]
        rows = sorted(np.random.default_rng(seed).permutation(n)[:int(limit)].tolist())
    prompts = [[int(t) for t in ids_list[i][:plens[i]]] for i in rows]
    if data.references is not None:
        refs = [data.references[i] for i in rows]
    else:
        refs = response_texts(load_tokenizer(plan), [ids_list[i] for i in rows],
                              [plens[i] for i in rows], set(eos_ids(plan)))
    return prompts, refs


def label_prefix_fn(labels: list[list[int]], width: int):
    """transformers' prefix_allowed_tokens_fn for greedy decoding within a label set (the plan's
    data.labels token ids): after a prefix of some labels, only their next tokens; after a whole
    label, its last token again (generation has stopped at the end token by then)."""
    def allowed(batch_id, input_ids):
        answer = [int(t) for t in input_ids[width:].tolist()]
        nxt = {lab[len(answer)] for lab in labels
               if len(lab) > len(answer) and lab[:len(answer)] == answer}
        return sorted(nxt) or [answer[-1] if answer else labels[0][0]]
    return allowed


def generate(model, prompts, *, max_new_tokens: int, eos: list[int], pad_id: int, device: str,
             batch_size: int = 16, labels: list[list[int]] | None = None,
             autocast: bool = True) -> list[list[int]]:
    """Greedy continuations (token ids, cut before the first end token) of each prompt. Batches of
    prompts of similar length, left-padded. With `labels` (token id lists), decoding stays within
    that label set, as tune's eval.mode=constrained does. autocast=False leaves the caller's
    autocast (or none) in force; True: bfloat16 on a GPU, float32 on the CPU."""
    import contextlib

    import torch

    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    autocast = (contextlib.nullcontext() if not autocast
                else torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else torch.autocast("cpu", enabled=False))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        inp = torch.full((len(idx), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            inp[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            att[r, width - len(p):] = 1
        extra = {}
        if labels:
            extra = {"prefix_allowed_tokens_fn": label_prefix_fn(labels, width),
                     "max_new_tokens": max(len(x) for x in labels)}
        with torch.no_grad(), autocast:
            gen = model.generate(input_ids=inp.to(device), attention_mask=att.to(device),
                                 **{"max_new_tokens": int(max_new_tokens), **extra},
                                 do_sample=False, num_beams=1, eos_token_id=eos,
                                 pad_token_id=pad_id, use_cache=True, temperature=None, top_p=None,
                                 top_k=None)
        for r, i in enumerate(idx):
            new = [int(t) for t in gen[r, width:].tolist()]
            cut = next((k for k, t in enumerate(new) if t in eos), len(new))
            out[i] = new[:cut]
    return out


def score(metric: str, predictions, references, labels=()) -> dict:
    """runtime.metrics.score when it is there; otherwise accuracy on normalised first lines."""
    try:
        from runtime.metrics import score as tune_score
    except ImportError:
        tune_score = None
    if tune_score is not None:
        out = tune_score(metric, predictions, references, labels)
        return {k: out[k] for k in ("metric", "value", "n") if k in out}

    def norm(x):
        lines = [ln for ln in str(x).strip().splitlines() if ln.strip()]
        return (lines[0] if lines else "").strip().casefold()

    ok = [norm(p) == norm(r) for p, r in zip(predictions, references)]
    return {"metric": "accuracy", "value": sum(ok) / len(ok) if ok else 0.0, "n": len(ok)}


def evaluate(plan: dict, model, *, limit: int | None = None, device: str | None = None,
             data: TokenData | None = None, batch_size: int = 16, base: bool = False) -> dict:
    """Greedy-decode the test prompts (tokens [0, prompt_len) of each test example) and score them
    with the plan's metric. base=True scores the base model (adapter disabled)."""
    import contextlib

    device = pick_device(device)
    data = data or load_token_data(plan)
    ev = eval_config(plan)
    if limit is None:
        limit = ev.get("limit")
    prompts, refs = test_set(plan, data, limit)
    if not prompts:
        raise ValueError("the plan has no test examples (set data.test_path)")
    tok = load_tokenizer(plan)
    t0 = time.perf_counter()
    ctx = model.disable_adapter() if base else contextlib.nullcontext()
    labels = [list(x["ids"]) for x in _section(plan, "data").get("labels") or []]
    with ctx:
        gen = generate(model, prompts, max_new_tokens=int(ev.get("max_new_tokens") or 16),
                       eos=eos_ids(plan), pad_id=int(_section(plan, "model").get("pad_token_id") or 0),
                       device=device, batch_size=batch_size,
                       labels=labels if ev.get("mode") == "constrained" else None)
    preds = [tok.decode(g, skip_special_tokens=True) for g in gen]
    result = score(ev.get("metric") or "accuracy", preds, refs,
                   [x["text"] for x in _section(plan, "data").get("labels") or []] or data.labels)
    result["mode"] = ev.get("mode")
    result["eval_s"] = time.perf_counter() - t0
    result["generated_tokens"] = sum(len(g) for g in gen)     # end tokens not counted
    result["predictions"] = preds
    result["references"] = refs
    return result


# -------------------------------------------------------------------------------------------- CLI

def peer_arguments(doc: str) -> argparse.ArgumentParser:
    """The command line a peer of the benchmarks shares: the plan, steps, where to write, device,
    threads and CPU bfloat16 autocast."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", help="a tune plan.json (or the run directory holding it)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the plan's)")
    ap.add_argument("--out", default=None, help="write result.json (and what else it writes) here")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="on a CPU, train under torch.autocast(bfloat16) (default: float32)")
    return ap


def main(argv=None) -> int:
    ap = peer_arguments(__doc__)
    ap.add_argument("--eval", action="store_true", help="evaluate the trained adapter on the test split")
    ap.add_argument("--eval-base", action="store_true", help="also evaluate the base model")
    ap.add_argument("--adapter", default=None,
                    help="evaluate this PEFT adapter directory (e.g. a tune run's adapter/) instead "
                         "of training one")
    ap.add_argument("--limit", type=int, default=None, help="test examples scored (default: plan eval.limit)")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="examples per micro-batch (default: the plan's schedule.batch_size)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = load_plan(args.plan)
    device = pick_device(args.device)
    data = load_token_data(plan)
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    result: dict = {"device": device, "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if args.adapter:
        model = load_model(plan, device=device, adapter_dir=args.adapter)
        result["load_s"] = time.perf_counter() - t0
    else:
        tr = train(plan, steps=args.steps, device=device, out_dir=args.out, log=log, data=data,
                   cpu_bf16=args.cpu_bf16, batch_size=args.batch_size)
        model = tr.pop("model")
        result.update({k: v for k, v in tr.items()})
    if args.eval_base:
        ev = evaluate(plan, model, limit=args.limit, device=device, data=data,
                      batch_size=args.eval_batch_size, base=True)
        result["base"] = {k: ev[k] for k in ("metric", "value", "n", "eval_s", "generated_tokens", "mode")}
        result["base_predictions"] = ev["predictions"]
    if args.eval or args.adapter:
        ev = evaluate(plan, model, limit=args.limit, device=device, data=data,
                      batch_size=args.eval_batch_size)
        result["tuned"] = {k: ev[k] for k in ("metric", "value", "n", "eval_s", "generated_tokens", "mode")}
        result["predictions"] = ev["predictions"]
        result["references"] = ev["references"]
    result["wall_s"] = time.perf_counter() - t0
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "result.json", "w") as f:
            json.dump(result, f, indent=1)
    summary = {k: v for k, v in result.items()
               if k not in ("records", "predictions", "references", "base_predictions")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
