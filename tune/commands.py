"""What each `tune` command does with its composed config: compile it into a Plan, then hand the
Plan to the runtime — train, evaluate, generate — through ordinary imports. The runtime (and JAX) is
imported only by the commands that run something: `tune plan` never loads it.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from compiler import recipes as recipes_mod
from compiler.compile import compile_plan
from core.processes import is_main_process
from core.errors import PlanError, did_you_mean
from core.files import sha256_file
from core.plan import Plan
from core.records import trained_dir, trained_file
from core.rundir import RunDirLock, check_writable, claim
from compiler.summary import print_plan


def _console():
    from tune.console import console

    return console()


# ------------------------------------------------------------------------------ composed commands

def run_job(job) -> None:
    """One composed job (tune/compose.Job) of `tune [train|plan|eval|generate]`."""
    if job.command == "generate":
        return generate(job)
    if job.command == "lr-find":
        return lr_find(job)
    if job.command == "export":
        return export(job)
    if job.command == "serve":
        return serve(job)
    if job.command == "eval" and job.config.get("run"):
        return evaluate_run(job)
    plan = _in_sweep(compile_plan(job.config, recipe_info=recipes_mod.recipe_info(job.recipe),
                                  command=job.command), job)
    with writing(job.out_dir, job.command, plan.hash):
        if is_main_process():           # the other processes of a multi-process job only compute
            path = plan.write(job.out_dir / "plan.json")
            print_plan(plan, run_dir=job.out_dir, elapsed=time.perf_counter() - job.started)
            _console().print(f"[dim]plan written to[/dim] {path}")
        if job.command == "eval":
            from runtime.evaluate import evaluate

            if plan.retrieval is not None:      # the base model without the passages too
                evaluate(plan, job.out_dir, None, retrieval=False, verbose=False)
            evaluate(plan, job.out_dir, None)
        elif job.command != "plan":
            train(plan, job.out_dir, sweep_dir=job.sweep_dir)


@contextmanager
def writing(run_dir, command: str, plan_hash: str | None = None, *, key: str = "hydra.run.dir"):
    """Hold run_dir's writer lock (the main process; the others only compute) for the block, after
    refusing a plan that is not the one the directory's results were made from (core/rundir.py)."""
    if not is_main_process():
        yield
        return
    with RunDirLock(run_dir, command, key=key):
        if plan_hash is not None:
            claim(run_dir, plan_hash, key=key)
        yield


def export(job) -> None:
    """`tune export run=DIR format=peft|merged|gguf [out=PATH]`: a finished run's adapter in the
    formats the ecosystem reads."""
    if not job.config.get("run"):
        raise PlanError("run", "`tune export` needs the run directory to export.",
                        hint="tune export run=DIR format=peft|merged|gguf [out=PATH]")
    rd, plan = _existing_run(job.config["run"], need_adapter=True)
    fmt, kind = job.config["format"], job.config["gguf_type"]
    if fmt == "peft" and plan.adapter.kind == "full":
        raise PlanError("format", f"{rd} trained every weight (adapter.kind=full): there is no "
                        "PEFT adapter to export.",
                        hint="use format=merged (a transformers checkpoint) or format=gguf.")
    if fmt != "peft" and plan.adapter.head != "none":
        raise PlanError("format", f"{fmt} writes a causal language model, which has no place for "
                        f"the classification head {rd} trained (adapter.head={plan.adapter.head}): "
                        "its answers come from the head, not from decoding.",
                        hint="use format=peft, and load it with AutoModelForSequenceClassification"
                             ".from_pretrained(base, **labels) (labels: the adapter's labels.json), "
                             "then PeftModel.from_pretrained(that model, the adapter).")
    from runtime.export import export_run
    from runtime.gguf import check_gguf_export, check_gguf_tokenizer
    from runtime.progress import log

    if fmt == "gguf":       # a model llama.cpp would not run as configured: refused before loading
        check_gguf_export(plan.model.config)
        check_gguf_tokenizer(Path(plan.model.dir), plan.model.config)
    default = rd / "export" / (f"{rd.name}-{kind}.gguf" if fmt == "gguf" else fmt)
    out = Path(job.config["out"]).expanduser() if job.config.get("out") else default
    if out.exists():
        raise PlanError("out", f"{out} exists; not overwriting it.",
                        hint="give another out=PATH, or remove it first.")
    check_writable(out, "out", directory=fmt != "gguf")
    with writing(rd, "export", key="run"):
        out = export_run(plan, rd, out, fmt=fmt, gguf_type=kind)
    use = {"peft": f"PeftModel.from_pretrained(base_model, '{out}')" if plan.adapter.head == "none"
           else f"PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("
                f"base, **json.load(open('{out}/labels.json'))), '{out}')",
           "merged": f"AutoModelForCausalLM.from_pretrained('{out}')",
           "gguf": f"llama-cli -m {out}   (Ollama: FROM {out})"}[fmt]
    log(f"exported ({fmt}" + (f", {kind}" if fmt == "gguf" else "") + f"): {out}\n  use it: {use}")


def lr_find(job) -> None:
    """`tune lr-find`: the learning-rate range test for this plan (nothing trained is kept)."""
    from runtime.lr_find import lr_find as range_test

    plan = compile_plan(job.config, recipe_info=recipes_mod.recipe_info(job.recipe), command="plan")
    f = job.config["lr_find"]
    with writing(job.out_dir, "lr-find", plan.hash):
        if is_main_process():
            plan.write(job.out_dir / "plan.json")
        range_test(plan, job.out_dir, start_lr=f["start_lr"], end_lr=f["end_lr"], steps=f["steps"],
                   stop_factor=f["stop_factor"])


def _in_sweep(plan: Plan, job) -> Plan:
    """A sweep's job reports to its trackers as one of the sweep: grouped by the sweep directory's
    name (unless tracking.group says), named by its directory and the values it sweeps (unless
    tracking.run_name says). Tracking is not hashed: the plan stays the same plan."""
    t = plan.tracking
    if t is None or job.sweep_dir is None:
        return plan
    name = f"{job.out_dir.name} {job.sweep_point}".strip()
    return dataclasses.replace(plan, tracking=dataclasses.replace(
        t, group=t.group or job.sweep_dir.name, run_name=t.run_name or name))


def train(plan: Plan, run_dir: Path, *, sweep_dir: Path | None = None) -> None:
    """`tune` and `tune run`: train, then (on the main process) score base and tuned on the test
    rows, then write the report; the plan's trackers get every step, then the evaluation and the
    run's files, and are closed FINISHED (FAILED or KILLED when this stops on the way). A sweep's
    jobs keep a local MLflow store in `sweep_dir`, together."""
    from runtime.evaluate import evaluate_before_after
    from runtime.mesh import is_main_process
    from runtime.progress import log
    from runtime.report import write_report
    from runtime.run import train as train_adapter
    from runtime.tracking import Tracker

    if _finished(plan, run_dir):
        log(f"{run_dir} already holds this plan's trained adapter and its report: nothing to do "
            "(remove train_summary.json to train again)")
        return
    with Tracker(plan, run_dir, store_dir=sweep_dir) as tracker:
        train_adapter(plan, run_dir, tracker=tracker)
        if is_main_process():
            ev = evaluate_before_after(plan, run_dir) if plan.data.sizes.get("test") else None
            report = write_report(run_dir)
            rd = Path(run_dir)
            tracker.finish_run(ev, [trained_dir(rd, plan.adapter.kind), rd / "eval.json",
                                    rd / "report.html", rd / "plots"])
            log(f"report: {report}")


def _finished(plan: Plan, run_dir: Path) -> bool:
    """Whether run_dir already holds this plan's finished training, evaluation and report (a sweep
    run again resumes: finished runs are skipped, interrupted ones resume from their checkpoint)."""
    from core.records import EvalFile, TrainSummary

    summary = TrainSummary.read(run_dir)
    if summary is None:
        return False
    return (summary.plan_hash == plan.hash and summary.steps == plan.schedule.total_steps
            and (Path(run_dir) / "report.html").is_file()
            and (EvalFile.read(run_dir) is not None or not plan.data.sizes.get("test")))


def evaluate_run(job) -> None:
    """`tune eval run=DIR`: score the run's adapter, with the run's own config unless a recipe is
    named, this command line's overrides applied; update the run's report."""
    from runtime.evaluate import evaluate
    from runtime.report import write_report

    rd, trained = _existing_run(job.config["run"], need_adapter=True)
    config = job.config if job.recipe else job.apply_overrides(trained.config)
    recipe = recipes_mod.recipe_info(job.recipe) if job.recipe else trained.recipe
    plan = compile_plan(config, recipe_info=recipe, command="eval")
    _check_same_model(plan, trained, rd)
    print_plan(plan, run_dir=rd)
    weights = trained_dir(rd, trained.adapter.kind)
    with writing(rd, "eval", key="run"):
        if plan.retrieval is not None:      # the same rows without the passages too
            evaluate(plan, rd, weights, retrieval=False, verbose=False)
        evaluate(plan, rd, weights)
        write_report(rd)


def generate(job) -> None:
    """`tune generate [run=DIR] [prompt=TEXT]`: answer with a run's tuned model, or the base."""
    from runtime.decode import Sampling
    from runtime.generate import generate as answer

    prompt, max_new = job.config.get("prompt"), job.config["max_new_tokens"]
    sampling = Sampling(temperature=job.config["temperature"], top_p=job.config["top_p"],
                        seed=job.config["seed"])
    # how to answer is the run's plan's decision (its eval.mode), unless this command line says
    given = [o for o in job.overrides if o.key_or_group == "eval.mode" and not o.is_delete()]
    free = (job.config["eval"]["mode"] == "generate") if given else None
    given_max = any(o.key_or_group == "max_new_tokens" for o in job.overrides)

    def fitted(plan: Plan) -> int:      # the default leaves half the model's context to the prompt
        n = max_new if given_max else min(max_new, plan.model.config.max_position_embeddings // 2)
        check_decoding(plan, "max_new_tokens", n)
        return n

    if job.config.get("run"):
        rd, trained = _existing_run(job.config["run"], need_adapter=False)
        answer(rd, prompt, max_new_tokens=fitted(trained), free=free,
               sampling=sampling)
        return
    plan = compile_plan(job.config, recipe_info=recipes_mod.recipe_info(job.recipe),
                        command="generate")
    answer(plan, prompt, max_new_tokens=fitted(plan), free=None, sampling=sampling)


def check_decoding(plan: Plan, key: str, new_tokens: int, rows: int = 1, *,
                   per_request: bool = False) -> None:
    """Refuse, before any weight is loaded, a decoding that cannot fit: more new tokens than the
    model's context holds (unless `per_request`: a server checks each request's prompt and
    max_tokens against the context itself), or a KV cache (`rows` answers at once, the longest
    prompt the context leaves, rounded up as the decoder's length buckets are) with the weights
    beyond this machine's memory."""
    from compiler.compile import DTYPE_BYTES, MEMORY_ERROR, _gib
    from compiler.estimates import detect_devices

    c = plan.model.config
    limit = c.max_position_embeddings
    if new_tokens >= limit and not per_request:
        raise PlanError(key, f"{new_tokens} new tokens do not fit {plan.model.name}'s context of "
                        f"{limit} tokens (max_position_embeddings), which holds the prompt too.",
                        hint=f"give {key}={min(limit // 2, 512)} or less (at most {limit - 1}).")
    cache_len = 1 << max(0, (limit - 1).bit_length())       # the decoder's bucket of the longest
    rows_bucket = 1 << max(0, (rows - 1).bit_length())
    rt = plan.runtime
    need = (plan.model.params * DTYPE_BYTES[rt.param_dtype]
            + c.num_layers * 2 * rows_bucket * cache_len * c.num_kv_heads * c.head_dim
            * DTYPE_BYTES[rt.dtype] + rows_bucket * c.vocab_size * 4 * 2)
    available = detect_devices().get("memory")
    if available and need > MEMORY_ERROR * available:
        raise PlanError(key, f"decoding {rows} answer(s) at once with {plan.model.name}'s context "
                        f"of {limit} tokens needs about {_gib(need)} (weights and KV cache), more "
                        f"than this machine's {_gib(available)}.",
                        hint="serve fewer answers at once (serve.batch_size), or use a machine "
                             "with more memory.")


def serve(job) -> None:
    """`tune serve run=DIR | runs=[DIR,...] [host=127.0.0.1] [port=8000]`: the runs' models behind
    an OpenAI-compatible HTTP API."""
    from runtime.serve import serve as run_server

    given = ([job.config["run"]] if job.config.get("run") else []) + list(job.config["runs"])
    if not given:
        raise PlanError("run", "`tune serve` needs the run directory (or directories) to serve.",
                        hint="tune serve run=DIR, or runs=[DIR1,DIR2] for several adapters over "
                             "one base.")
    runs = dict(_existing_run(d, need_adapter=False) for d in given)    # run dir → its plan
    heads = [str(d) for d, plan in runs.items() if plan.adapter.head != "none"]
    if heads:
        raise PlanError("run", f"{heads[0]} trained a classification head (adapter.head="
                        "classifier): it answers with a label from one forward pass, not with "
                        "generated text, so it is not served as a chat model.",
                        hint=f"tune generate run={heads[0]} prompt=... prints its label and the "
                             "probabilities; or serve a run trained with adapter.head=none.")
    dirs = list(runs)
    bases = {plan.model.config_hash for plan in runs.values()}
    if len(bases) > 1:
        from runtime.progress import log

        log(f"the runs are over {len(bases)} different base models: each is loaded on its own")
    s = job.config["serve"]
    for plan in runs.values():
        check_decoding(plan, "serve.batch_size", s["max_tokens"], rows=s["batch_size"],
                       per_request=True)
    run_server(dirs, host=job.config["host"], port=job.config["port"], batch_size=s["batch_size"],
               batch_wait_ms=s["batch_wait_ms"], max_tokens=s["max_tokens"])


def _existing_run(run_dir, *, need_adapter: bool) -> tuple[Path, Plan]:
    """The run directory `run_dir` names, resolved, and its plan, checked (run_plan)."""
    rd = Path(str(run_dir)).expanduser().resolve()
    if not (rd / "plan.json").is_file():
        raise PlanError("run", f"{rd} is not a run directory (it has no plan.json).",
                        hint="give the hydra.run.dir of a `tune` or `tune plan` run.")
    if need_adapter and not any(trained_file(rd, kind).is_file() for kind in ("lora", "full")):
        raise PlanError("run", f"{rd} has no trained adapter (adapter/adapter_model.safetensors), "
                        "nor a fully trained model (model/model.safetensors).",
                        hint="train it first (`tune ... hydra.run.dir=DIR`), or leave out run= to "
                             "score the base model.")
    return rd, run_plan(rd)


def run_plan(rd: Path) -> Plan:
    """A run directory's plan, checked before it is used: its hash matches its content, and its
    model directory (which the hash leaves out: it depends on where things are) still holds the
    model the plan names — the same config.json and tokenizer, weights that pass the compiler's
    checks."""
    from compiler.models import resolve_model

    path = rd / "plan.json"
    plan = Plan.load(path)
    if not plan.is_consistent():
        raise PlanError("plan", "the plan's hash does not match its content (was it edited?).",
                        file=str(path), hint="recompile it with `tune plan`, or train the run again.")
    if not Path(plan.model.dir).is_dir():
        raise PlanError("model.path", f"the model directory {plan.model.dir} of the run in {rd} is "
                        "gone.", file=str(path), hint="restore it, or train the run again.")
    found = resolve_model({"path": plan.model.dir})
    if (found.config_hash, found.tokenizer_hash) != (plan.model.config_hash, plan.model.tokenizer_hash):
        raise PlanError("model.dir", f"{plan.model.dir} no longer holds the model the run in {rd} "
                        "was trained on (its config.json or tokenizer differs).", file=str(path),
                        hint="point the run at its own model: restore that directory, or train "
                             "the run again.")
    return plan


def _check_same_model(plan: Plan, trained: Plan, rd: Path) -> None:
    if trained.model.config_hash != plan.model.config_hash:
        raise PlanError("model", f"the adapter in {rd} was trained on {trained.model.name} "
                        f"({trained.model.dir}), not on {plan.model.name} ({plan.model.dir}).",
                        hint="evaluate with the model the run was trained on.")
    a, b = trained.adapter, plan.adapter
    if (a.kind == "full") != (b.kind == "full"):
        raise PlanError("adapter.kind", f"the run in {rd} trained with adapter.kind={a.kind}; "
                        f"this config says {b.kind}.", hint="leave adapter.kind as the run had it.")
    if (a.targets, a.rank) != (b.targets, b.rank) and a.kind != "full":
        raise PlanError("adapter", f"the adapter in {rd} has rank {a.rank} on {', '.join(a.targets)}; "
                        f"this config says rank {b.rank} on {', '.join(b.targets)}.",
                        hint="leave the adapter settings as the run had them.")


# ------------------------------------------------------------------------------ tune run

RUN_USAGE = ("usage: tune run PATH/plan.json [RUN_DIR]\n\nTrain a compiled plan exactly as compiled "
             "(no Hydra, no recompilation). RUN_DIR defaults to the plan's directory; checkpoints "
             "there with the same plan hash are resumed.")


def run_plan_file(args: list[str]) -> int:
    """tune run PATH/plan.json [RUN_DIR]: train a compiled plan exactly as it was compiled."""
    if not args or args[0] in ("-h", "--help") or len(args) > 2:
        _console().print(RUN_USAGE)
        return 0 if args and args[0] in ("-h", "--help") else 2
    path = Path(args[0]).expanduser()
    if path.is_dir():
        path = path / "plan.json"
    if not path.is_file():
        raise PlanError("plan", f"{path} not found.", hint="give the plan.json that `tune plan` wrote.")
    plan = _checked_plan(Plan.load(path), path)
    run_dir = Path(args[1]) if len(args) == 2 else path.parent
    with writing(run_dir, "run", plan.hash, key="RUN_DIR"):
        if run_dir.resolve() != path.parent.resolve() and is_main_process():
            plan.write(run_dir / "plan.json")
        if is_main_process():
            print_plan(plan, run_dir=run_dir)
        train(plan, run_dir)
    return 0


def _checked_plan(plan: Plan, path: Path) -> Plan:
    """The plan as its own config compiles today, if that is the plan the file holds: the compiler's
    checks (types, ranges, cross-field rules, files, model) run again on a plan read from a file, and
    every value that changes what runs — the model directory and the token cache included, which the
    hash leaves out because they depend only on where things are — comes from the compiler, not from
    the file. A plan whose values were edited (its hash recomputed or not) is refused; a missing
    token cache (derived data: deleted, or another machine) is rebuilt."""
    if not plan.is_consistent():
        raise PlanError("plan", "the plan's hash does not match its content (was it edited?).",
                        file=str(path), hint="change the config and recompile with `tune plan`.")
    for key, stats in (("data.path", plan.data.train), ("data.test_path", plan.data.test)):
        if stats is None or stats.hub is not None:   # a Hub split: recompiling reads it again,
            continue                                 # and its sha256 is in the hash
        if not Path(stats.file).is_file():
            raise PlanError(key, f"{stats.file} is gone since the plan was compiled.",
                            hint="restore it, or recompile with `tune plan`.")
        if sha256_file(stats.file) != stats.sha256:
            raise PlanError(key, f"{stats.file} changed since the plan was compiled.",
                            hint="recompile with `tune plan` to train on the new data.")
    if not Path(plan.model.dir).is_dir():
        raise PlanError("model.path", f"the model directory {plan.model.dir} is gone.",
                        hint="recompile with `tune plan`.")
    rebuilt = compile_plan(plan.config, recipe_info=plan.recipe, command="plan")
    if rebuilt.hash == plan.hash:
        return dataclasses.replace(rebuilt, tracking=plan.tracking)
    if plan.data.cache and not Path(plan.data.cache).is_file() and rebuilt.data.key != plan.data.key:
        raise PlanError("plan", "the token cache is missing and rebuilding it gave different "
                        "tokens (another tokenizer or tune version?).", file=str(path),
                        hint="recompile with `tune plan`.")
    for key, was, now in (("data.path", plan.data.train, rebuilt.data.train),
                          ("data.test_path", plan.data.test, rebuilt.data.test)):
        if was is not None and was.hub is not None and now is not None and now.sha256 != was.sha256:
            part = f"split {was.hub.split}" if was.hub.split else f"file {was.hub.files[0]}"
            raise PlanError(key, f"the Hub dataset {was.file} ({part}) changed "
                            f"since the plan was compiled (commit {was.hub.commit} then, "
                            f"{now.hub.commit if now.hub else '?'} now).",
                            hint="recompile with `tune plan` to train on the new data, or pin the "
                                 "plan's data with data.revision=COMMIT (data.test_revision).")
    changed = _differences(plan, rebuilt)
    raise PlanError("plan", "its values are not what its own config compiles to"
                    + (f" ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''})"
                       if changed else "")
                    + ": it was edited, or the model or tune changed since it was compiled. A "
                    "plan's hash shows a change, it does not prove who made it.", file=str(path),
                    hint="change the config (or the command line) and recompile with `tune plan`.")


def _differences(plan: Plan, rebuilt: Plan) -> list[str]:
    """The dotted paths where two plans' hashed sections differ (for the message)."""
    out: list[str] = []

    def walk(a, b, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        elif a != b:
            out.append(where)

    skip = {"hash", "estimates", "warnings", "recipe", "tracking"}
    a, b = plan.to_dict(), rebuilt.to_dict()
    walk({k: v for k, v in a.items() if k not in skip}, {k: v for k, v in b.items() if k not in skip},
         "")
    return out


# ------------------------------------------------------------------------------ tune recipes

def recipes(args: list[str]) -> int:
    """tune recipes [list | show NAME | cp NAME DEST]."""
    from rich.markup import escape
    from rich.syntax import Syntax

    console = _console()
    sub = args[0] if args else "list"
    if sub in ("-h", "--help", "help"):
        console.print("usage: tune recipes [list | show NAME | cp NAME DEST]\n\n"
                      "Recipes are found in ./recipes, then each directory of $TUNE_RECIPE_PATH, then "
                      f"the installed ones ({recipes_mod.INSTALLED_DIR}).")
        return 0
    if sub == "list":
        if len(args) > 1:
            raise PlanError("recipes", "`tune recipes list` takes no arguments.")
        rows = recipes_mod.list_recipes()
        width = max((len(n) for n, _, _ in rows), default=0)
        console.print("[bold]recipes[/bold] [dim](use with +recipe=NAME)[/dim]")
        for name, path, desc in rows:
            console.print(f"  [bold cyan]{escape(name.ljust(width))}[/bold cyan]  {escape(desc)}  "
                          f"[dim]{escape(str(path))}  sha256 {sha256_file(path)[:16]}[/dim]")
        console.print(f"[dim]looked in: {recipes_mod.looked_in()}[/dim]")
        return 0
    if sub == "show":
        if len(args) != 2:
            raise PlanError("recipes", "usage: tune recipes show NAME.")
        path, text = recipes_mod.show(args[1])
        console.print(f"[dim]# {path}  sha256 {sha256_file(path)}[/dim]")
        if sys.stdout.isatty():
            console.print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0
    if sub == "cp":
        if len(args) != 3:
            raise PlanError("recipes", "usage: tune recipes cp NAME DEST (a directory or a .yaml file).")
        written = recipes_mod.copy(args[1], args[2])
        for p in written:
            console.print(f"wrote {p}")
        return 0
    raise PlanError("recipes", f"unknown subcommand `{sub}`.{did_you_mean(sub, ('list', 'show', 'cp'))}",
                    hint="tune recipes [list | show NAME | cp NAME DEST].")

