"""Experiment tracking: what a run writes to metrics.jsonl, its resolved config and, at the end, its
evaluation and files, sent to the trackers the plan names (plan.tracking.backends) through their own
libraries — TensorBoard's event-file writer, MLflow's client, Weights & Biases' SDK.

metrics.jsonl stays the record: a tracker only mirrors it. Sending happens on a thread of its own, so a
slow or unreachable server never holds a training step up, and a tracker that fails mid-run is
reported once (naming it and the error) and switched off while the training goes on. A tracker that
cannot start (no login, a wrong URI) stops the run before its first step with a PlanError.

The names, the same in every tracker (x-axis: the optimizer step; W&B's charts plot against `step`):

    train/loss  train/lr  train/grad_norm  train/tokens_per_s  train/step_time_s  train/tokens_seen
    train/epoch  train/compile_s                                  every metrics.jsonl row, as it is written
    val/loss                                                       each validation
    eval/<m>, eval/base_<m>                                        the end (at the last step): the tuned
                                                                   and the base model on the test rows

where <m> is the task metric (accuracy, macro_f1, rouge_l, exact_match: eval.json's `metric`), and for
classification accuracy, macro_f1 and, beside constrained decoding, free_accuracy and
free_invalid_rate; for free generation exact_match and rouge_l; also eval/<metric>_delta (tuned −
base), eval/majority_baseline and eval/n (test rows). A retrieval plan adds eval/no_retrieval_<m> and eval/base_no_retrieval_<m>.

Resuming continues the same tracker run: `<run dir>/tracking.json` keeps each backend's run (MLflow's
run id and store, W&B's id, TensorBoard's logdir). A run resumed from its checkpoint at step c reopens
them; TensorBoard marks a restart at c + 1 (its readers drop what the interrupted attempt wrote after
c), MLflow and W&B, which cannot forget what they received, are not sent again the steps they already
hold (those the interrupted attempt wrote to metrics.jsonl), so each step is there once. A tracker new
to a resumed run gets the kept steps (≤ c) of metrics.jsonl first. Only the main process reports.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import PlanError
from core.files import write_json
from core.plan import Plan
from core.records import NO_RETRIEVAL, EvalFile
from runtime.mesh import is_main_process
from runtime.progress import log

TRACKING_FILE = "tracking.json"
# metrics.jsonl's keys → the trackers' names (anything else in a row is not sent)
NAMES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
         "tokens_per_s": "train/tokens_per_s", "step_time_s": "train/step_time_s",
         "tokens_seen": "train/tokens_seen", "epoch": "train/epoch", "compile_s": "train/compile_s",
         "val_loss": "val/loss", "router_aux": "train/router_aux"}
# eval.json's entries → the prefix of their names under eval/
EVAL_PREFIX = {"tuned": "", "base": "base_", "tuned" + NO_RETRIEVAL: "no_retrieval_",
               "base" + NO_RETRIEVAL: "base_no_retrieval_"}
CLOSE_WAIT_S = 300          # how long the end of a run waits for a tracker still sending


def metric_values(row: dict) -> dict[str, float]:
    """A metrics.jsonl row as the trackers' names → numbers (None, flags and unknown keys left out)."""
    return {NAMES[k]: float(v) for k, v in row.items()
            if k in NAMES and isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_values(ev: EvalFile) -> dict[str, float]:
    """eval.json's numbers under eval/ (see the module's docstring)."""
    out = {}
    for entry, prefix in EVAL_PREFIX.items():
        r = ev.entries.get(entry)
        if r is None:
            continue
        values = {r.metric: r.value}
        for k in ("accuracy", "macro_f1", "exact_match", "rouge_l"):   # beside the headline
            if isinstance(r.get(k), (int, float)):
                values[k] = r.get(k)
        for k, v in (r.free or {}).items():
            if k != "max_new_tokens" and isinstance(v, (int, float)) and not isinstance(v, bool):
                values[f"free_{k}"] = v
        out.update({f"eval/{prefix}{k}": float(v) for k, v in values.items()})
    h = ev.headline
    if ev.delta is not None:
        out[f"eval/{h.metric}_delta"] = float(ev.delta)
    if h.majority_baseline is not None:
        out["eval/majority_baseline"] = float(h.majority_baseline)
    out["eval/n"] = float(h.n)
    return out


def flat_config(config: dict, prefix: str = "") -> dict:
    """{"schedule.lr": 0.002, ...}: the nested config as dotted keys (lists stay values)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_tracking(run_dir) -> dict:
    """tracking.json: backend name → what reopens its run ({} when there is none)."""
    try:
        doc = json.loads((Path(run_dir) / TRACKING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


@dataclass(frozen=True)
class Context:
    """What a backend opens its run with."""
    plan: Plan
    run_dir: Path
    store_dir: Path                 # where a local store goes (MLflow: <store_dir>/mlflow.db)
    run_name: str
    resumed_from: int | None        # the checkpoint's step, when the run resumes
    previous: dict | None           # this backend's entry in tracking.json, when the run resumes


class Tracker:
    """The fan-out to the plan's trackers for one run directory. Nothing happens until start()
    (training calls it once it knows whether it resumes); used as a context manager it closes the
    trackers' runs on the way out: FINISHED, KILLED on Ctrl-C (SystemExit 130, KeyboardInterrupt),
    FAILED when what it wraps raises. A plan without tracking (or a process other than the main one)
    makes every call a no-op. `store_dir`: where a local MLflow store goes (a sweep's directory holds
    its jobs' runs together); default the run directory."""

    def __init__(self, plan: Plan, run_dir, *, store_dir=None):
        self.plan, self.run_dir = plan, Path(run_dir)
        self.store_dir = Path(store_dir) if store_dir is not None else self.run_dir
        self.enabled = plan.tracking is not None and is_main_process()
        self._live: dict[str, object] = {}      # name → opened backend still working
        self._sent: dict[str, int] = {}         # name → the step its run holds rows through
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    # -- the run's life ------------------------------------------------------------------------
    def start(self, *, resumed_from: int | None) -> None:
        """Open (or, resuming from a checkpoint, reopen) each backend's run; PlanError when one
        cannot start. Idempotent."""
        if not self.enabled or self._queue is not None:
            return
        t = self.plan.tracking
        previous = read_tracking(self.run_dir) if resumed_from is not None else {}
        old_rows = _read_rows(self.run_dir / "metrics.jsonl")
        sent_before = max((r["step"] for r in old_rows if isinstance(r.get("step"), int)),
                          default=0)
        name = t.run_name or self.run_dir.resolve().name
        refs, backfill = {}, {}
        for backend in t.backends:
            b = BACKENDS[backend]()
            ctx = Context(plan=self.plan, run_dir=self.run_dir, store_dir=self.store_dir,
                          run_name=name, resumed_from=resumed_from,
                          previous=previous.get(backend) if isinstance(previous.get(backend), dict)
                          else None)
            try:
                refs[backend], reopened = b.open(ctx)
            except Exception as e:  # noqa: BLE001 — any library error: the run has not started
                for opened in self._live.values():
                    _quietly(opened.close, "FAILED")
                self._live.clear()
                why = _first_line(e).rstrip(".")
                hint = f"pip install 'tune[{backend}]', or leave {backend} out of " \
                    "tracking.backends." if isinstance(e, ImportError) else b.hint
                raise PlanError(b.key(t), f"the {backend} tracker could not start: {why}.",
                                hint=hint) from None
            self._live[backend] = b
            if reopened:                        # its run holds what the interrupted attempt sent
                self._sent[backend] = resumed_from if b.forgets else max(sent_before, resumed_from)
            else:                               # a new run: the kept steps first, if resuming
                self._sent[backend] = resumed_from or 0
                backfill[backend] = [r for r in old_rows if resumed_from is not None
                                     and isinstance(r.get("step"), int) and r["step"] <= resumed_from]
            log(f"tracking: {backend} → {b.where()}")
        write_json(self.run_dir / TRACKING_FILE, {**read_tracking(self.run_dir), **refs})
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, args=(self._queue,),
                                        name="tune-tracking", daemon=True)
        self._thread.start()
        for backend, rows in backfill.items():
            for row in rows:
                values = metric_values(row)
                if values:
                    self._queue.put(("log", backend, row["step"], values))

    def log(self, row: dict) -> None:
        """One metrics.jsonl row (runtime.run.Metrics.write passes each one here)."""
        if self._queue is None or not isinstance(row.get("step"), int):
            return
        values = metric_values(row)
        if values:
            self._queue.put(("log", None, row["step"], values))

    def finish_run(self, ev: EvalFile | None, files: list) -> None:
        """The end of a run: the evaluation's numbers (at the last step, and as the run's summary)
        and the run's files (those that exist) as artifacts."""
        if self._queue is None:
            return
        step = self.plan.schedule.total_steps
        if ev is not None:
            self._queue.put(("summary", None, step, eval_values(ev)))
        existing = [Path(p) for p in files if Path(p).exists()]
        if existing:
            self._queue.put(("artifacts", None, step, existing))

    def close(self, status: str = "FINISHED") -> None:
        """End each backend's run with status (FINISHED | FAILED | KILLED), after what is queued."""
        if self._queue is None:
            return
        self._queue.put(("close", None, 0, status))
        self._thread.join(CLOSE_WAIT_S)
        if self._thread.is_alive():
            log(f"tracking: {', '.join(self._live) or 'a tracker'} still sending after "
                f"{CLOSE_WAIT_S} s; not waiting (metrics.jsonl has every row)")
        self._queue = self._thread = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None or (kind is SystemExit and exc.code in (0, None)):
            self.close("FINISHED")
        elif kind is KeyboardInterrupt or kind is SystemExit:
            self.close("KILLED")
        else:
            self.close("FAILED")

    # -- the sending thread --------------------------------------------------------------------
    def _work(self, work: queue.Queue) -> None:
        while True:
            op, only, step, payload = work.get()
            for name, b in list(self._live.items()):
                if only is not None and name != only:
                    continue
                if op == "log" and only is None and step <= self._sent[name]:
                    continue                    # its run holds this step already
                try:
                    if op == "log":
                        b.log(step, payload)
                    elif op == "summary":
                        b.summary(step, payload)
                    elif op == "artifacts":
                        b.artifacts(self.run_dir, payload)
                    else:
                        b.close(payload)
                except Exception as e:  # noqa: BLE001 — a tracker never stops the training
                    del self._live[name]
                    log(f"tracking: {name} failed ({type(e).__name__}: {_first_line(e)}); it is "
                        "switched off for the rest of this run (metrics.jsonl has every row)")
                    if op != "close":
                        _quietly(b.close, "FAILED")
            if op == "close":
                return


def _read_rows(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue                            # the half line of a killed run
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 — already reported, or failing anyway
        pass


# ------------------------------------------------------------------------------ TensorBoard

class TensorBoard:
    """Event files in <run dir>/tensorboard/, written by TensorBoard's own writer (as
    torch.utils.tensorboard does; no TensorFlow). Every (re)start writes SessionLog.START at its
    first step, so readers drop what an interrupted attempt wrote after the checkpoint."""
    forgets = True
    hint = "check that the run directory can be written, or leave tensorboard out of " \
        "tracking.backends."

    def key(self, t) -> str:
        return "tracking.backends"

    def open(self, ctx: Context) -> tuple[dict, bool]:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = ctx.run_dir / "tensorboard"
        reopened = ctx.resumed_from is not None and self.logdir.is_dir() and \
            any(self.logdir.glob("events.out.tfevents.*"))
        self._writer = EventFileWriter(str(self.logdir))
        self._writer.add_event(Event(wall_time=time.time(), step=(ctx.resumed_from or 0) + 1,
                                     session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()
        return {"logdir": str(self.logdir.resolve())}, reopened

    def where(self) -> str:
        return f"{self.logdir} (tensorboard --logdir {self.logdir})"

    def log(self, step: int, values: dict) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._writer.flush()                    # on the sending thread: a live view, nothing lost

    summary = log

    def artifacts(self, run_dir: Path, files: list[Path]) -> None:
        pass                                    # event files hold scalars; the files stay beside them

    def close(self, status: str) -> None:
        self._writer.close()


# ------------------------------------------------------------------------------ MLflow

class MLflow:
    """An MLflow run through MlflowClient: tracking.experiment is the experiment, the resolved
    config its params, the plan hash and recipe its tags, every row a log_batch, the adapter,
    eval.json and the report its artifacts at the end. The store: tracking.mlflow_uri, else
    $MLFLOW_TRACKING_URI, else sqlite:///<run dir, or a sweep's directory>/mlflow.db with artifacts
    in mlartifacts/ beside it (a sqlite store's artifacts otherwise land in ./mlruns of wherever tune
    was started)."""
    forgets = False
    hint = ("check tracking.mlflow_uri (or $MLFLOW_TRACKING_URI) and that its server is up; a local "
            "store is sqlite:///PATH/mlflow.db. Or leave mlflow out of tracking.backends.")

    def key(self, t) -> str:
        return "tracking.mlflow_uri" if t.mlflow_uri else "tracking.backends"

    def open(self, ctx: Context) -> tuple[dict, bool]:
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):      # the store's table creation is not news
            logging.getLogger(name).setLevel(logging.WARNING)
        t = ctx.plan.tracking
        prev = ctx.previous or {}
        self.uri = t.mlflow_uri or prev.get("tracking_uri") or \
            os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{(ctx.store_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self._experiment(t.experiment)
        run_id = prev.get("run_id") if prev.get("tracking_uri") == self.uri else None
        if run_id is not None and self._active(run_id):
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            reopened = True
        else:
            self.run_id = self.client.create_run(experiment, run_name=ctx.run_name,
                                                 tags=self._tags(ctx)).info.run_id
            self._params(ctx.plan.config)
            reopened = False
        if (ctx.run_dir / "plan.json").is_file():
            self.client.log_artifact(self.run_id, str(ctx.run_dir / "plan.json"))
        return {"tracking_uri": self.uri, "experiment_id": experiment, "run_id": self.run_id}, reopened

    def where(self) -> str:
        ui = f"; mlflow ui --backend-store-uri {self.uri}" if self.uri.startswith("sqlite:") else ""
        return f"run {self.run_id} in {self.uri}{ui}"

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage != "active":
                raise ValueError(f"the MLflow experiment {name!r} is deleted (mlflow experiments "
                                 "restore, or another tracking.experiment)")
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self._artifact_location())
        except MlflowException:                 # another job of the sweep made it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _artifact_location(self) -> str | None:
        """A sqlite store's artifacts go beside its database file (the server decides elsewhere)."""
        if not self.uri.startswith("sqlite:///"):
            return None
        db = Path(self.uri[len("sqlite:///"):])
        return (db.parent.resolve() / "mlartifacts").as_uri()

    def _active(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    @staticmethod
    def _tags(ctx: Context) -> dict:
        plan, t = ctx.plan, ctx.plan.tracking
        tags = {"tune.plan_hash": plan.hash, "tune.run_dir": str(ctx.run_dir.resolve()),
                "tune.model": plan.model.name}
        if plan.recipe is not None:
            tags["tune.recipe"] = plan.recipe.name
        if t.group:
            tags["tune.group"] = t.group
        return tags

    def _params(self, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:MAX_PARAM_VAL_LENGTH])
                  for k, v in sorted(flat_config(config).items())]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step)
                                                    for k, v in values.items()])

    summary = log                               # MLflow's run page shows each metric's latest value

    def artifacts(self, run_dir: Path, files: list[Path]) -> None:
        for f in files:
            if f.is_dir():
                self.client.log_artifacts(self.run_id, str(f), artifact_path=f.name)
            else:
                self.client.log_artifact(self.run_id, str(f))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


# ------------------------------------------------------------------------------ Weights & Biases

class WandB:
    """A W&B run: project tracking.wandb_project (else tracking.experiment), entity
    tracking.wandb_entity, group tracking.group; config = the resolved config plus tune's own facts
    (plan hash, recipe, run directory); every row logged against `step`; the evaluation in
    run.summary; the adapter a model artifact, eval.json and the report the run's files.
    WANDB_MODE=offline writes it under <run dir>/wandb/ ($WANDB_DIR if set) for `wandb sync`.
    W&B's capture of the console is off: tune's output stays as it is."""
    forgets = False
    hint = ("`wandb login` (or set WANDB_API_KEY), or WANDB_MODE=offline to write the run locally "
            "and `wandb sync` it later; check tracking.wandb_project / tracking.wandb_entity. Or "
            "leave wandb out of tracking.backends.")

    def key(self, t) -> str:
        return "tracking.backends"

    def open(self, ctx: Context) -> tuple[dict, bool]:
        import wandb

        plan, t = ctx.plan, ctx.plan.tracking
        project = t.wandb_project or t.experiment
        prev = ctx.previous or {}
        same = prev.get("id") and (prev.get("project"), prev.get("entity")) == (project,
                                                                                 t.wandb_entity)
        tune_facts = {"plan_hash": plan.hash, "run_dir": str(ctx.run_dir.resolve()),
                      "recipe": plan.recipe.name if plan.recipe else None,
                      "total_steps": plan.schedule.total_steps}
        kwargs = dict(project=project, entity=t.wandb_entity, name=ctx.run_name, group=t.group,
                      job_type="train", config={**plan.config, "tune": tune_facts},
                      tags=[x for x in (plan.recipe.name if plan.recipe else None,
                                        f"plan-{plan.hash[:12]}") if x],
                      settings=wandb.Settings(console="off", silent=True))
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(ctx.run_dir)
        if same:
            kwargs.update(id=prev["id"], resume="allow")
        self.run = wandb.init(**kwargs)
        self.run.define_metric("step")
        for pattern in ("train/*", "val/*", "eval/*"):
            self.run.define_metric(pattern, step_metric="step")
        self.offline = self.run.settings.mode in ("offline", "dryrun")
        self.plan_hash = plan.hash
        return {"id": self.run.id, "project": project, "entity": t.wandb_entity}, bool(same)

    def where(self) -> str:
        if self.offline:
            return f"offline run {self.run.id}; upload it with wandb sync {Path(self.run.dir).parent}"
        return self.run.url or f"run {self.run.id}"

    def log(self, step: int, values: dict) -> None:
        self.run.log({"step": step, **values})

    def summary(self, step: int, values: dict) -> None:
        self.log(step, values)
        self.run.summary.update(values)

    def artifacts(self, run_dir: Path, files: list[Path]) -> None:
        """The adapter as a model artifact; the other files copied into the run's own files (W&B
        symlinks, and warns about, files saved from elsewhere)."""
        import shutil

        import wandb

        for f in files:
            if f.is_dir() and f.name == "adapter":
                art = wandb.Artifact(f"adapter-{self.run.id}", type="model",
                                     metadata={"plan_hash": self.plan_hash})
                for p in sorted(f.iterdir()):
                    if p.is_file():
                        art.add_file(str(p), name=p.name)
                self.run.log_artifact(art)
                continue
            for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
                if p.is_file():
                    dest = Path(self.run.dir) / p.relative_to(run_dir)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, dest)
                    self.run.save(str(dest), base_path=self.run.dir, policy="now")

    def close(self, status: str) -> None:
        self.run.finish(exit_code={"FINISHED": 0, "KILLED": 130}.get(status, 1))


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
