"""Preference tuning and full fine-tuning, measured: tune against TRL on real preference data, what a
preference step costs against a supervised one, and full fine-tuning against LoRA.

1. dpo  — DPO on Anthropic HH-RLHF harmless-base pairs (../shared/data/preference/hh_rlhf_harmless):
   tune trains the plan (`tune objective=dpo ...`); TRL's DPOTrainer trains the same plan — the same
   token ids (the plan's token cache: its train split, prompt cut as tune cut it), LoRA, β,
   optimizer, schedule, pairs a step and epochs, its reference the adapter switched off as tune's.
   Both adapters are scored by `tune eval` on the same held-out pairs (preference accuracy, the
   implicit reward's accuracy); wall times are the training's own. dpo-all: tune alone on every
   training pair.
2. steps — the same pairs trained 8 steps each as SFT (each pair's chosen and rejected as two
   supervised examples, rows of the same length), DPO and SimPO (no reference model): the median
   step time and tokens/s, so DPO / SFT is the cost of a preference step on the same tokens and
   DPO − SimPO the reference model's forward pass.
3. full — a quality-table dataset (finance: twitter financial news sentiment) trained by its recipe
   with LoRA and with adapter.kind=full: accuracy base → tuned, median step time, the plan's memory
   estimate and the process's peak RSS.

    python benchmarks/preference.py                         # all three (about an hour on 2 CPU cores)
    python benchmarks/preference.py --only steps,full --work runs/pref   # keeps runs/pref's dpo part

Writes its table into benchmarks/RESULTS.md (between the preference markers, with the command) and
the raw figures into benchmarks/results/preference.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from throughput import publish, read_jsonl, tune_command  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
HH = DATA / "preference" / "hh_rlhf_harmless"
FINANCE = DATA / "financial" / "twitter_financial_news_sentiment"
BEGIN, END = "<!-- preference:begin -->", "<!-- preference:end -->"
PARTS = ("dpo", "dpo-all", "steps", "full")


def run(cmd: list[str], log: Path, *, env=None) -> dict:
    """Run cmd (stdout+stderr into log) as its own process; its exit code, wall seconds and peak
    resident memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(map(str, cmd)) + "\n")
        out.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code:
        print("\n".join("    " + x for x in log.read_text().splitlines()[-30:]), file=sys.stderr)
        raise SystemExit(f"failed ({code}): {' '.join(map(str, cmd))}; log {log}")
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20}


def tune(args, work: Path, name: str, *overrides: str, command: str | None = None) -> dict:
    run_dir = work / name
    cmd = tune_command() + ([command] if command else []) + list(overrides) + \
        [f"hydra.run.dir={run_dir}"]
    out = run(cmd, work / f"{name}.log")
    return {**out, "run": run_dir}


def steps_of(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def median_step(run_dir: Path) -> tuple[float, float]:
    """(median step seconds, median tokens/s) over the steps after the first (compilation)."""
    rows = steps_of(run_dir)[1:]
    return (statistics.median(r["step_time_s"] for r in rows),
            statistics.median(r["tokens_per_s"] for r in rows))


def step_figures(run_dir: Path) -> dict:
    """Median step time, tokens/s, input tokens and supervised tokens a step (after the first)."""
    step_s, tps = median_step(run_dir)
    rows = steps_of(run_dir)[1:]
    return {"step_s": step_s, "tokens_per_s": tps,
            "tokens_per_step": statistics.median(x["input_tokens"] for x in rows),
            "supervised_per_step": statistics.median(x["tokens"] for x in rows)}


def evaluation(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval.json").read_text())


def hh_overrides(args, *, all_pairs: bool = False) -> list[str]:
    """DPO on HH-RLHF as parts dpo and dpo-all train it: the data (the first args.pairs pairs, or
    every pair), the objective, the schedule and the adapter."""
    return [f"data.path={HH / 'train.jsonl'}", f"data.test_path={HH / 'test.jsonl'}",
            *([] if all_pairs else [f"data.max_rows={args.pairs}"]),
            f"data.max_length={args.max_length}", f"eval.limit={args.limit}",
            "data.val_fraction=0.05", "schedule.seed=0", "objective=dpo", f"schedule.lr={args.lr}",
            "schedule.epochs=1", f"schedule.batch_size={args.batch}", "adapter.rank=16",
            "adapter.alpha=32", "adapter.dropout=0.05"]


# ------------------------------------------------------------------------------ 1. DPO vs TRL

def dpo(args, work: Path) -> dict:
    ours = tune(args, work, "tune-dpo", *hh_overrides(args))
    summary = json.loads((ours["run"] / "train_summary.json").read_text())
    ev = evaluation(ours["run"])
    plan = json.loads((ours["run"] / "plan.json").read_text())
    pairs_per_step = plan["schedule"]["examples_per_step"]
    trl_dir = work / "trl-dpo"
    trl = run([sys.executable, str(Path(__file__)), "--trl", str(ours["run"]), str(trl_dir),
               str(max(1, round(pairs_per_step)))], work / "trl-dpo.log")
    trl_info = json.loads((trl_dir / "trl.json").read_text())
    # the TRL adapter scored by tune on the same pairs: a run directory of the same plan
    shutil.copy(ours["run"] / "plan.json", trl_dir / "plan.json")
    run(tune_command() + ["eval", f"run={trl_dir}"], work / "trl-eval.log")
    trl_ev = evaluation(trl_dir)
    return {"pairs": plan["data"]["sizes"]["train"], "test_pairs": ev["n"],
            "pairs_per_step": pairs_per_step, "tune_steps": summary["steps"],
            "trl_steps": trl_info["steps"], "trl_batch": trl_info["batch"],
            "base": ev["base"]["value"], "tune": ev["tuned"]["value"],
            "trl": trl_ev["tuned"]["value"],
            "tune_reward_accuracy": ev["tuned"].get("reward_accuracy"),
            "trl_reward_accuracy": trl_ev["tuned"].get("reward_accuracy"),
            "tune_train_s": summary["wall_s"], "trl_train_s": trl_info["train_s"],
            "tune_final_loss": summary["final_loss"], "trl_final_loss": trl_info["final_loss"],
            "tune_peak_rss_gib": ours["peak_rss_gib"], "trl_peak_rss_gib": trl["peak_rss_gib"]}


def dpo_all(args, work: Path) -> dict:
    """tune alone on every training pair (TRL on all of them takes hours on a CPU)."""
    ours = tune(args, work, "tune-dpo-all", *hh_overrides(args, all_pairs=True))
    summary = json.loads((ours["run"] / "train_summary.json").read_text())
    ev = evaluation(ours["run"])
    plan = json.loads((ours["run"] / "plan.json").read_text())
    return {"pairs": plan["data"]["sizes"]["train"], "test_pairs": ev["n"],
            "steps": summary["steps"], "base": ev["base"]["value"], "tune": ev["tuned"]["value"],
            "reward_accuracy": ev["tuned"].get("reward_accuracy"),
            "margin_base": ev["base"].get("mean_margin"),
            "margin_tuned": ev["tuned"].get("mean_margin"), "train_s": summary["wall_s"],
            "final_loss": summary["final_loss"], "val_loss": summary.get("final_val_loss"),
            "peak_rss_gib": ours["peak_rss_gib"]}


def trl_train(run_dir: Path, out: Path, batch: int) -> None:
    """TRL's DPOTrainer on the plan of tune's run_dir: the same token ids, LoRA, β and schedule."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from core.plan import Plan
    from core.token_cache import load_examples

    torch.manual_seed(0)
    plan = Plan.load(run_dir / "plan.json")
    ex = load_examples(plan.data.cache)
    ids, plens = ex.split("train")
    rows = [{"prompt_ids": ids[i][:plens[i]].tolist(), "chosen_ids": ids[i][plens[i]:].tolist(),
             "rejected_ids": ids[i + 1][plens[i + 1]:].tolist()} for i in range(0, len(ids), 2)]
    s, a = plan.schedule, plan.adapter
    tokenizer = AutoTokenizer.from_pretrained(plan.model.dir)
    model = AutoModelForCausalLM.from_pretrained(plan.model.dir, dtype=torch.float32)
    steps = -(-len(rows) // batch)
    config = DPOConfig(
        output_dir=str(out / "trainer"), beta=plan.objective.beta, learning_rate=s.lr,
        per_device_train_batch_size=batch, num_train_epochs=1, lr_scheduler_type=s.lr_schedule,
        warmup_steps=s.warmup_steps, max_grad_norm=s.max_grad_norm or 0.0, adam_beta1=s.beta1,
        adam_beta2=s.beta2, adam_epsilon=s.eps, weight_decay=s.weight_decay, seed=s.seed,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, max_length=None,
        bf16=False, fp16=False, dataloader_num_workers=0)
    peft = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout,
                      target_modules=list(a.targets), task_type="CAUSAL_LM")
    text = Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}] * 2)
    trainer = DPOTrainer(model=model, args=config, train_dataset=text, processing_class=tokenizer,
                         peft_config=peft)
    trainer.train_dataset = Dataset.from_list(rows)          # the plan's own tokens
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapter = out / "adapter"
    trainer.model.save_pretrained(adapter)
    (out / "trl.json").write_text(json.dumps({
        "steps": result.global_step, "expected_steps": steps, "batch": batch, "train_s": train_s,
        "final_loss": losses[-1] if losses else None}))


# ------------------------------------------------------------------------------ 2. step cost

def step_cost(args, work: Path) -> dict:
    """SFT, DPO and SimPO, 8 steps each on the same pairs and rows."""
    rows = [json.loads(x) for x in (HH / "train.jsonl").read_text().splitlines()[:args.step_pairs]]
    sft_rows = [{"messages": r["prompt"] + [{"role": "assistant", "content": side}]}
                for r in rows for side in (r["chosen"], r["rejected"])]
    sft_file = work / "sft_pairs.jsonl"
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    pair_file = work / "pairs.jsonl"
    pair_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"data.max_length={args.max_length}", "schedule.max_steps=8",
              f"schedule.batch_size={args.batch}", "data.val_fraction=0",
              f"runtime.row_length={2 * args.max_length}", "schedule.epochs=10"]
    out = {}
    for name, extra in (("sft", ["template=conversation", "template.messages=messages",
                                 f"data.path={sft_file}"]),
                        ("dpo", ["objective=dpo", f"data.path={pair_file}"]),
                        ("simpo", ["objective=simpo", f"data.path={pair_file}"])):
        r = tune(args, work, f"steps-{name}", *common, *extra)
        out[name] = step_figures(r["run"])
    return out


# ------------------------------------------------------------------------------ 3. full vs LoRA

def full_vs_lora(args, work: Path) -> dict:
    common = ["+recipe=finance", f"data.path={FINANCE / 'train.jsonl'}",
              f"data.test_path={FINANCE / 'test.jsonl'}", f"data.max_rows={args.finance_rows}",
              f"eval.limit={args.limit}"]
    out = {}
    for name, extra in (("lora", []), ("full", ["adapter.kind=full",
                                                f"schedule.lr={args.full_lr}"])):
        r = tune(args, work, f"finance-{name}", *common, *extra)
        ev = evaluation(r["run"])
        plan = json.loads((r["run"] / "plan.json").read_text())
        step_s, tps = median_step(r["run"])
        out[name] = {"base": ev["base"]["value"], "tuned": ev["tuned"]["value"], "n": ev["n"],
                     "steps": len(steps_of(r["run"])), "step_s": step_s, "tokens_per_s": tps,
                     "lr": plan["schedule"]["lr"],
                     "trainable": plan["adapter"]["trainable_params"],
                     "memory_estimate_gib": plan["estimates"]["memory"]["total"] / 2**30,
                     "peak_rss_gib": r["peak_rss_gib"], "wall_s": r["wall_s"]}
    return out


# ------------------------------------------------------------------------------ report

def f(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(results: dict, args, started: str, wall: float):
    def text(command: str) -> str:
        lines = [BEGIN, "## Preference tuning and full fine-tuning", "",
                 f"SmolLM2-135M-Instruct, float32, {os.cpu_count()} CPU cores (an AVX2-only EPYC: "
                 "no bfloat16 products); each part names the command that measured it (published "
                 f"by `{command}`, {started}).", ""]
        d = results.get("dpo")
        if d:
            lines += [
                "### DPO on HH-RLHF harmless-base: tune against TRL's DPOTrainer", "",
                f"`{d['command']}`", "",
                f"{d['pairs']} training pairs (data.max_rows={args.pairs}, 5% held out for "
                f"validation), data.max_length={args.max_length}, β 0.1, lr {args.lr}, one epoch, "
                f"LoRA r 16 on q/k/v/o; TRL trained the plan's own token ids, {d['trl_batch']} "
                f"pairs a step (tune packs about {d['pairs_per_step']:.1f} pairs in its "
                f"{args.batch} rows a step). Both adapters scored by `tune eval` on the same "
                f"{d['test_pairs']} held-out pairs.", "",
                "| | preference accuracy | reward accuracy | steps | train s | final loss | peak RSS GiB |",
                "|---|---|---|---|---|---|---|",
                f"| base (SmolLM2) | {f(d['base'])} | | | | | |",
                f"| tune | {f(d['tune'])} | {f(d['tune_reward_accuracy'])} | {d['tune_steps']} | "
                f"{d['tune_train_s']:.0f} | {f(d['tune_final_loss'])} | "
                f"{d['tune_peak_rss_gib']:.2f} |",
                f"| TRL | {f(d['trl'])} | {f(d['trl_reward_accuracy'])} | {d['trl_steps']} | "
                f"{d['trl_train_s']:.0f} | {f(d['trl_final_loss'])} | {d['trl_peak_rss_gib']:.2f} |",
                "", "tune's train s is the whole `tune` process up to the end of training (model "
                "load, compilation, validation); TRL's the `trainer.train()` call alone.", ""]
        a = results.get("dpo-all")
        if a:
            lines += [
                "#### tune on every training pair", "", f"`{a['command']}`", "",
                f"{a['pairs']} pairs, the same settings otherwise, {a['steps']} steps: "
                f"preference accuracy {f(a['base'])} → {f(a['tune'])} on "
                f"{a['test_pairs']} held-out pairs (mean margin {a['margin_base']:+.2f} → "
                f"{a['margin_tuned']:+.2f} nats), reward accuracy {f(a['reward_accuracy'])}; "
                f"training {a['train_s']:.0f} s, last step's loss {f(a['final_loss'])}"
                + (f", validation loss {f(a['val_loss'])} (ln 2 = 0.693 at zero margin)"
                   if a.get("val_loss") is not None else "") + ".", ""]
        s = results.get("steps")
        if s:
            lines += [
                "### A preference step against a supervised one, on the same tokens", "",
                f"`{s['command']}`", "",
                f"{args.step_pairs} pairs; rows of {2 * args.max_length} tokens, {args.batch} a "
                "step; median of steps 2–8. SFT trains each pair's chosen and rejected reply as two "
                "conversations (the same tokens; it also supervises the earlier assistant turns of "
                "HH-RLHF's multi-turn prompts, hence more supervised tokens); SimPO has no "
                "reference model.", "",
                "| objective | step s | tokens/s | tokens a step | supervised a step | step / SFT |",
                "|---|---|---|---|---|---|"]
            for name in ("sft", "dpo", "simpo"):
                x = s[name]
                sup = x.get("supervised_per_step")
                lines.append(f"| {name} | {x['step_s']:.2f} | {x['tokens_per_s']:.0f} | "
                             f"{x['tokens_per_step']:.0f} | {'—' if sup is None else f'{sup:.0f}'} | "
                             f"{x['step_s'] / s['sft']['step_s']:.2f} |")
            ref = s["dpo"]["step_s"] - s["simpo"]["step_s"]
            lines += ["", f"The reference model's forward pass: DPO − SimPO = {ref:.2f} s a step "
                      f"({100 * ref / s['dpo']['step_s']:.0f}% of a DPO step).", ""]
        fl = results.get("full")
        if fl:
            lines += [
                "### Full fine-tuning against LoRA (finance: twitter financial news sentiment)", "",
                f"`{fl['command']}`", "",
                f"The finance recipe on {args.finance_rows} training rows, accuracy on "
                f"{fl['lora']['n']} test rows; LoRA at the recipe's lr, full at "
                f"{args.full_lr}.", "",
                "| | trained parameters | lr | accuracy base → tuned | steps | step s | memory "
                "estimate GiB | peak RSS GiB | wall s |", "|---|---|---|---|---|---|---|---|---|"]
            for name in ("lora", "full"):
                x = fl[name]
                lines.append(f"| {name} | {x['trainable']:,} | {x['lr']:g} | {f(x['base'])} → "
                             f"{f(x['tuned'])} | {x['steps']} | {x['step_s']:.2f} | "
                             f"{x['memory_estimate_gib']:.2f} | {x['peak_rss_gib']:.2f} | "
                             f"{x['wall_s']:.0f} |")
            lines.append("")
        lines.append(END)
        return "\n".join(lines)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PARTS), help="any of " + ",".join(PARTS))
    ap.add_argument("--pairs", type=int, default=256, help="HH-RLHF training pairs (data.max_rows)")
    ap.add_argument("--limit", type=int, default=200, help="test pairs / rows scored (eval.limit)")
    ap.add_argument("--max-length", type=int, default=256, help="data.max_length")
    ap.add_argument("--batch", type=int, default=2, help="tune's rows a step")
    ap.add_argument("--lr", type=float, default=5e-5, help="DPO learning rate")
    ap.add_argument("--step-pairs", type=int, default=64, help="pairs for the step-cost runs")
    ap.add_argument("--finance-rows", type=int, default=300)
    ap.add_argument("--full-lr", type=float, default=2e-5, help="full fine-tuning's learning rate")
    ap.add_argument("--work", type=Path, default=None, help="keep runs here (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--trl", nargs=3, metavar=("RUN_DIR", "OUT", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trl:
        trl_train(Path(args.trl[0]), Path(args.trl[1]), int(args.trl[2]))
        return 0
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="tune-preference-"))
    work.mkdir(parents=True, exist_ok=True)
    started, t0 = dt.datetime.now().strftime("%Y-%m-%d %H:%M"), time.perf_counter()
    # with --work, parts measured by an earlier run there are kept (and reported) unless run again
    saved = work / "results.json"
    results = json.loads(saved.read_text()) if args.work is not None and saved.is_file() else {}
    try:
        for part, fn in (("dpo", dpo), ("dpo-all", dpo_all), ("steps", step_cost),
                         ("full", full_vs_lora)):
            if part in parts:
                print(f"== {part}", flush=True)
                (work / part).mkdir(parents=True, exist_ok=True)
                results[part] = {**fn(args, work / part), "command": "python benchmarks/preference.py "
                                 + " ".join(sys.argv[1:] if argv is None else argv)}
                print(json.dumps(results[part], default=str), flush=True)
                saved.write_text(json.dumps(results, default=str))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    publish("preference", argv, [results], markdown(results, args, started,
                                                    time.perf_counter() - t0),
            BEGIN, END, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
