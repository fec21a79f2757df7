"""The packed peer of the throughput benchmark: TRL's SFTTrainer training the plan's LoRA with packing,
as TRL documents it for speed — best-fit-decreasing packing into rows of max_length tokens,
padding-free (each micro-batch one flat sequence whose position ids restart at every example, so
attention stays inside each example), the loss on the completion tokens only.

From a compiled tune plan (plan.json), as benchmarks/peft_reference.py: the same base model and LoRA
(r, alpha, dropout, targets), the same tokenised examples (the plan's token cache: each example's
ids, its prompt unsupervised), the same optimiser settings (AdamW betas, eps, weight decay, gradient
clipping, tune's warmup and cosine or linear decay), micro-batches of schedule.batch_size packed
rows of data.max_length tokens, grad_accum of them per step — what tune's packed step holds.
Activation checkpointing off (TRL's default is on): the peer at its fastest.

Precision: float32 on a CPU, or --cpu-bf16 (TRL's bf16=True: torch's bfloat16 autocast); on a GPU,
bfloat16.

    python benchmarks/trl_reference.py RUN_DIR/plan.json --steps 20 --out /tmp/trl --cpu-bf16

Writes result.json ({"records": one per optimizer step — step, loss, lr, step_time_s, tokens,
supervised_tokens, examples, padded_tokens — "load_s", "dtype", ...}) into --out, in the form
benchmarks/throughput.py reads from peft_reference.py.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peft_reference import (_section, load_plan, load_token_data, peer_arguments,  # noqa: E402
                            pick_device, schedule_steps)


def dataset(ids_list, prompt_lens):
    """The examples as TRL's tokenised prompt-completion rows: input_ids and a completion_mask that
    marks the answer (the tokens at or after the prompt's end), the examples with a target only."""
    from datasets import Dataset

    rows = {"input_ids": [], "completion_mask": []}
    for ids, p in zip(ids_list, prompt_lens):
        if len(ids) < 2:
            continue
        rows["input_ids"].append([int(t) for t in ids])
        rows["completion_mask"].append([int(i >= p) for i in range(len(ids))])
    return Dataset.from_dict(rows)


class _Counting:
    """The data collator, counting each micro-batch's tokens (real and supervised) and examples."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        out = self.collator(examples)
        ids = out["input_ids"]
        examples_n = sum(len(e.get("seq_lengths") or [1]) for e in examples)
        self.batches.append({"tokens": int(ids.numel()),
                             "supervised": int((out["labels"] != -100).sum()),
                             "examples": examples_n, "padded": int(ids.numel())})
        return out


def train(plan: dict, *, steps: int, device: str, out_dir: Path, cpu_bf16: bool) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    hf_logging.disable_progress_bar()
    sched, a = _section(plan, "schedule"), _section(plan, "adapter")
    data = load_token_data(plan)
    ids_list, plens = data.split("train")
    train_set = dataset(ids_list, plens)
    total, warmup = schedule_steps(plan, len(train_set), steps)
    seq_len = int(sched.get("seq_len") or _section(plan, "data")["max_length"])
    model_dir = _section(plan, "model")["dir"]
    bf16 = device != "cpu" or cpu_bf16
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if device != "cpu" else torch.float32)
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_s = time.perf_counter() - t0
    lora = LoraConfig(r=int(a["rank"]), lora_alpha=float(a["alpha"]),
                      lora_dropout=float(a.get("dropout") or 0.0), target_modules=list(a["targets"]),
                      bias="none", task_type="CAUSAL_LM", use_rslora=bool(a.get("rslora")),
                      use_dora=a.get("kind") == "dora")
    kind = sched.get("lr_schedule") or "cosine"
    config = SFTConfig(
        output_dir=str(out_dir / "trainer"), max_steps=total, warmup_steps=warmup,
        learning_rate=float(sched["lr"]), lr_scheduler_type=kind if kind != "constant" else "constant",
        per_device_train_batch_size=int(sched["batch_size"]),
        gradient_accumulation_steps=int(sched.get("grad_accum") or 1),
        weight_decay=float(sched.get("weight_decay") or 0.0),
        max_grad_norm=float(sched.get("max_grad_norm") or 0.0),
        adam_beta1=float(sched.get("beta1", 0.9)), adam_beta2=float(sched.get("beta2", 0.999)),
        adam_epsilon=float(sched.get("eps", 1e-8)), optim="adamw_torch",
        packing=True, packing_strategy="bfd", padding_free=True, max_length=seq_len,
        completion_only_loss=True, bf16=bf16, use_cpu=device == "cpu",
        # TRL turns activation checkpointing on by default; off, its step is faster (the peer at
        # its fastest: these models fit without it)
        gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none", seed=int(sched.get("seed") or 0),
        dataloader_num_workers=0, disable_tqdm=True)

    times, losses = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append((float(logs["loss"]), float(logs.get("learning_rate", 0.0))))

    trainer = SFTTrainer(model=model, args=config, train_dataset=train_set,
                         processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    counting = _Counting(trainer.data_collator)
    trainer.data_collator = counting
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    accum = int(sched.get("grad_accum") or 1)
    records = []
    for k, dt in enumerate(times):
        micro = counting.batches[k * accum:(k + 1) * accum]
        loss, lr = losses[k] if k < len(losses) else (float("nan"), 0.0)
        rec = {"step": k + 1, "loss": loss, "lr": lr, "step_time_s": dt,
               "tokens": sum(b["tokens"] for b in micro),
               "supervised_tokens": sum(b["supervised"] for b in micro),
               "examples": sum(b["examples"] for b in micro),
               "padded_tokens": sum(b["padded"] for b in micro)}
        rec["tokens_per_s"] = rec["tokens"] / dt if dt > 0 else None
        records.append(rec)
    return {"records": records, "load_s": load_s, "train_s": train_s, "total_steps": total,
            "warmup_steps": warmup, "device": device, "dtype": "bfloat16" if bf16 else "float32",
            "packed_rows": len(trainer.train_dataset)}


def main(argv=None) -> int:
    args = peer_arguments(__doc__).parse_args(argv)
    if args.out is None:
        raise SystemExit("--out: where to write result.json")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = train(load_plan(args.plan), steps=args.steps, device=pick_device(args.device),
                   out_dir=out, cpu_bf16=args.cpu_bf16)
    result.update(wall_s=time.perf_counter() - t0, torch_threads=torch.get_num_threads())
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
