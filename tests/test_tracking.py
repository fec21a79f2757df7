"""Experiment tracking (runtime/tracking.py): what a run sends to TensorBoard, MLflow and W&B, read
back with each one's own reader (TensorBoard's EventAccumulator, MlflowClient on the local store, the
offline .wandb file) and compared with metrics.jsonl; a tracker that fails mid-run; resume continuing
the same tracker runs; a sweep's runs grouped in one store."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct

import numpy as np
import pytest

from conftest import tiny_plan
from core.errors import PlanError
from core.plan import TrackingSection
from core.records import EvalFile, EvalResult

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")   # MLflow's
ALL = ("tensorboard", "mlflow", "wandb")
SETUP = dict(seq_len=32, batch_size=2, grad_accum=1, epochs=1, n_train=16, n_val=4, eval_every=3,
             checkpoint_every=2)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """W&B offline (no login, no network), MLflow's store chosen by the plan or the run directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "TUNE_QUIET"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory):
    """An initialised, empty MLflow sqlite store: creating one runs MLflow's ~140 migrations (about
    2 s), so the tests after the first start from a copy (what tune does in it is the same)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(empty_store):
    """store(dir): dir/mlflow.db, an initialised empty store (a copy of empty_store)."""
    import shutil

    def make(directory):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(empty_store, directory / "mlflow.db")
        return directory

    return make


def tracked(model_dir, tmp_path, backends=ALL, epochs=1, **tracking):
    """The tiny plan, reporting to `backends` (tracking is not hashed: the same plan otherwise)."""
    plan = tiny_plan(model_dir, tmp_path, **dict(SETUP, epochs=epochs))
    t = dict(backends=tuple(backends), experiment="tiny", run_name=None, group=None,
             mlflow_uri=None, wandb_project=None, wandb_entity=None)
    t.update(tracking)
    out = dataclasses.replace(plan, tracking=TrackingSection(**t))
    assert out.is_consistent() and out.hash == plan.hash
    return out


def rows(run_dir, key):
    """[(step, value)] of `key` in metrics.jsonl."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get(key) is not None:
            out.append((r["step"], r[key]))
    return out


# ------------------------------------------------------------------------------ the readers

def tensorboard_scalars(run_dir) -> dict:
    """tag → [(step, value)], as TensorBoard shows them (purging what a restart superseded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def mlflow_runs(store, experiment="tiny"):
    client = mlflow_client(store)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def mlflow_series(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wandb_records(run_dir):
    """Every Record of the offline .wandb files under run_dir/wandb (LevelDB-log framing: a 7-byte
    header, then 32 KiB blocks of records: crc32c, little-endian length, type 1 full / 2 first /
    3 middle / 4 last), in the order of the attempts."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, block, pending = 7, 32768, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:                        # a block's tail too short for a header: padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if (length, kind) == (0, 0):
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending + chunk if kind == 4 else chunk)
                out.append((path.parent.name, record))
                pending = b""
            else:
                pending = (pending if kind == 3 else b"") + chunk
    return out


def wandb_history(run_dir) -> list[dict]:
    out = []
    for _, r in wandb_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            out.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in r.history.item})
    return out


def wandb_series(run_dir, key):
    return [(h["step"], h[key]) for h in wandb_history(run_dir) if key in h]


def wandb_run_record(run_dir):
    runs = [r.run for _, r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run"]
    assert runs
    return runs[0]


def assert_same(got, want, rtol):
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=rtol)


# ------------------------------------------------------------------------------ tests

def test_every_row_reaches_every_tracker(tiny_chat_dir, tmp_path, capsys):
    from runtime.run import train
    from runtime.tracking import Tracker

    plan = tracked(tiny_chat_dir, tmp_path)
    run = tmp_path / "run"
    plan.write(run / "plan.json")
    evaluation = EvalFile({
        "base": EvalResult(model="base", metric="accuracy", value=0.25, n=8, majority_baseline=0.5,
                           free={"accuracy": 0.125, "invalid_rate": 0.5, "max_new_tokens": 4},
                           detail={"accuracy": 0.25, "macro_f1": 0.2}),
        "tuned": EvalResult(model="tuned", metric="accuracy", value=0.75, n=8, majority_baseline=0.5,
                            free={"accuracy": 0.625, "invalid_rate": 0.0, "max_new_tokens": 4},
                            detail={"accuracy": 0.75, "macro_f1": 0.7})})
    with Tracker(plan, run) as tracker:
        summary = train(plan, run, tracker=tracker)
        evaluation.write(run)
        tracker.finish_run(evaluation, [run / "adapter", run / "eval.json", run / "report.html"])
    total = summary.steps
    err = capsys.readouterr().err
    assert "tracking: tensorboard → " in err and "tracking: mlflow → run " in err
    assert "tracking: wandb → offline run " in err and "failed" not in err
    expected_eval = {"eval/accuracy": 0.75, "eval/base_accuracy": 0.25, "eval/macro_f1": 0.7,
                     "eval/base_macro_f1": 0.2, "eval/free_accuracy": 0.625,
                     "eval/free_invalid_rate": 0.0, "eval/base_free_accuracy": 0.125,
                     "eval/base_free_invalid_rate": 0.5, "eval/accuracy_delta": 0.5,
                     "eval/majority_baseline": 0.5, "eval/n": 8.0}
    keys = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "tokens_per_s": "train/tokens_per_s", "step_time_s": "train/step_time_s",
            "tokens_seen": "train/tokens_seen", "compile_s": "train/compile_s",
            "val_loss": "val/loss"}
    assert [s for s, _ in rows(run, "loss")] == list(range(1, total + 1))
    assert [s for s, _ in rows(run, "val_loss")] == [*range(3, total, 3), total]

    # TensorBoard (float32 values)
    tb = tensorboard_scalars(run)
    for key, name in keys.items():
        assert_same(tb[name], rows(run, key), rtol=1e-6)
    assert {k: v for k, v in expected_eval.items()} == \
        {k: pytest.approx(tb[k][-1][1]) for k in expected_eval}
    assert all(tb[k] == [(total, pytest.approx(v))] for k, v in expected_eval.items())

    # MLflow: the run, its params and tags, every metric, the evaluation, the artifacts
    client, runs = mlflow_runs(run)
    (r,) = runs
    assert r.info.status == "FINISHED" and r.info.run_name == "run"
    assert r.data.tags["tune.plan_hash"] == plan.hash and "tune.group" not in r.data.tags
    assert r.data.params["schedule.lr"] == json.dumps(plan.config["schedule"]["lr"])
    assert r.data.params["adapter.targets"] == json.dumps(plan.config["adapter"]["targets"])
    assert r.data.params["template.prompt"] == "{text}"
    for key, name in keys.items():
        assert_same(mlflow_series(client, r.info.run_id, name), rows(run, key), rtol=1e-12)
    assert {k: r.data.metrics[k] for k in expected_eval} == pytest.approx(expected_eval)
    art = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"adapter", "eval.json", "plan.json"} <= art and "report.html" not in art
    assert {a.path for a in client.list_artifacts(r.info.run_id, "adapter")} == \
        {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert (run / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert not any(p.name == "mlruns" for p in tmp_path.parent.iterdir())

    # W&B (offline): the config, every metric against `step`, the summary
    for key, name in keys.items():
        assert_same(wandb_series(run, name), rows(run, key), rtol=1e-12)
    record = wandb_run_record(run)
    config = {u.key: json.loads(u.value_json) for u in record.config.update}
    assert config["tune"]["plan_hash"] == plan.hash and config["schedule"] == plan.config["schedule"]
    assert record.project == "tiny" and record.display_name == "run"
    summary_updates = {}
    for _, rec in wandb_records(run):
        if rec.WhichOneof("record_type") == "summary":
            summary_updates.update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                    for u in rec.summary.update})
    assert {k: summary_updates[k] for k in expected_eval} == pytest.approx(expected_eval)
    exit_record = [rec.exit for _, rec in wandb_records(run) if rec.WhichOneof("record_type") == "exit"]
    assert exit_record and exit_record[-1].exit_code == 0

    ref = json.loads((run / "tracking.json").read_text())
    assert ref["mlflow"]["run_id"] == r.info.run_id and ref["wandb"]["id"] == record.run_id
    assert ref["tensorboard"]["logdir"] == str((run / "tensorboard").resolve())


def test_a_failing_tracker_warns_once_and_training_goes_on(tiny_chat_dir, tmp_path, capsys,
                                                            monkeypatch, store):
    from runtime import tracking
    from runtime.run import train

    sent, real = [], tracking.MLflow.log

    def flaky(self, step, values):
        if len(sent) == 2:
            raise ConnectionError("the server went away")
        sent.append(step)
        real(self, step, values)

    monkeypatch.setattr(tracking.MLflow, "log", flaky)
    plan = tracked(tiny_chat_dir, tmp_path, backends=("tensorboard", "mlflow"))
    run = store(tmp_path / "run")
    summary = train(plan, run)
    assert summary.steps == plan.schedule.total_steps
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "tracking: mlflow failed" in line]
    assert warnings == ["tune: tracking: mlflow failed (ConnectionError: the server went away); it "
                        "is switched off for the rest of this run (metrics.jsonl has every row)"]
    assert "tensorboard failed" not in err
    assert [s for s, _ in rows(run, "loss")] == list(range(1, summary.steps + 1))
    assert_same(tensorboard_scalars(run)["train/loss"], rows(run, "loss"), rtol=1e-6)
    _, (r,) = mlflow_runs(run)
    assert r.info.status == "FAILED"        # switched off: its run says so


def test_resume_continues_the_same_tracker_runs(tiny_chat_dir, tmp_path, capsys, store):
    """Ctrl-C at step 3, a crash at step 5 (after the checkpoint at 4), then the end: one run in each
    tracker, each step once, the values of the final metrics.jsonl. W&B joins at the first resume
    and gets the steps kept from before."""
    from runtime import checkpoint
    from runtime.run import train

    first = tracked(tiny_chat_dir, tmp_path, backends=("tensorboard", "mlflow"), epochs=2)
    later = tracked(tiny_chat_dir, tmp_path, epochs=2)
    run = store(tmp_path / "run")
    total = first.schedule.total_steps
    assert total >= 7

    def ctrl_c(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(SystemExit):
        train(first, run, on_step=ctrl_c)
    ref = json.loads((run / "tracking.json").read_text())
    client, (r,) = mlflow_runs(run)
    assert r.info.status == "KILLED"

    def crash(step):
        if step == 5:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        train(later, run, on_step=crash)
    assert checkpoint.list_checkpoints(run)[-1].name == "step_00000004.npz"
    _, (r,) = mlflow_runs(run)
    assert r.info.status == "FAILED" and r.info.run_id == ref["mlflow"]["run_id"]
    wandb_id = json.loads((run / "tracking.json").read_text())["wandb"]["id"]

    train(later, run)
    err = capsys.readouterr().err
    assert err.count("resuming from step") == 2 and "failed" not in err
    again = json.loads((run / "tracking.json").read_text())
    assert again["mlflow"] == ref["mlflow"] and again["wandb"]["id"] == wandb_id

    loss = rows(run, "loss")
    assert [s for s, _ in loss] == list(range(1, total + 1))
    client, (r,) = mlflow_runs(run)
    assert r.info.status == "FINISHED"
    for key, name in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                      ("val_loss", "val/loss")):
        want = rows(run, key)
        assert_same(tensorboard_scalars(run)[name], want, rtol=1e-6)
        # MLflow and W&B keep what the interrupted attempt sent (the same numbers: training resumes
        # exactly), once per step
        assert_same(mlflow_series(client, r.info.run_id, name), want, rtol=1e-5)
        assert_same(wandb_series(run, name), want, rtol=1e-5)
    # TensorBoard after the restarts: the latest attempt's timings, exactly metrics.jsonl's
    assert_same(tensorboard_scalars(run)["train/tokens_per_s"], rows(run, "tokens_per_s"), rtol=1e-6)
    assert {rec.run.run_id for _, rec in wandb_records(run)
            if rec.WhichOneof("record_type") == "run"} == {wandb_id}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2


def test_a_tracker_that_cannot_start_stops_the_run_first(tiny_chat_dir, tmp_path):
    from runtime.run import train

    plan = tracked(tiny_chat_dir, tmp_path, backends=("tensorboard", "mlflow"),
                   mlflow_uri=f"file://{tmp_path / 'fs'}")
    with pytest.raises(PlanError) as e:
        train(plan, tmp_path / "run")
    assert e.value.key == "tracking.mlflow_uri" and "could not start" in str(e.value)
    assert "sqlite:///" in e.value.hint
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_tracker_whose_library_is_gone_names_the_package(tiny_chat_dir, tmp_path, monkeypatch):
    """A plan compiled where W&B was installed, run (`tune run`) where it is not."""
    import sys

    from runtime.tracking import Tracker

    monkeypatch.setitem(sys.modules, "wandb", None)          # `import wandb` raises ImportError
    with pytest.raises(PlanError) as e:
        Tracker(tracked(tiny_chat_dir, tmp_path, backends=("wandb",)), tmp_path / "run").start(
            resumed_from=None)
    assert e.value.key == "tracking.backends" and "pip install 'tune[wandb]'" in e.value.hint


def test_only_the_main_process_reports(tiny_chat_dir, tmp_path, monkeypatch):
    from runtime import tracking

    monkeypatch.setattr(tracking, "is_main_process", lambda: False)
    t = tracking.Tracker(tracked(tiny_chat_dir, tmp_path), tmp_path / "run")
    t.start(resumed_from=None)
    t.log({"step": 1, "loss": 1.0})
    t.close()
    assert not (tmp_path / "run").exists()


def test_names():
    from runtime.tracking import eval_values, flat_config, metric_values

    assert metric_values({"step": 4, "epoch": 0, "loss": 1.5, "lr": 1e-3, "grad_norm": None,
                          "diverged": True, "tokens": 10, "val_tokens": 3}) == \
        {"train/epoch": 0.0, "train/loss": 1.5, "train/lr": 1e-3}
    assert flat_config({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == \
        {"a.b": 1, "a.c.d": [1, 2], "e": None, "f": {}}
    rag = {name: EvalResult(model=name, metric="rouge_l", value=v, n=4)
           for name, v in (("base", 0.1), ("tuned", 0.4), ("base_no_retrieval", 0.05),
                           ("tuned_no_retrieval", 0.3))}
    assert eval_values(EvalFile(rag)) == pytest.approx(
        {"eval/rouge_l": 0.4, "eval/base_rouge_l": 0.1, "eval/no_retrieval_rouge_l": 0.3,
         "eval/base_no_retrieval_rouge_l": 0.05, "eval/rouge_l_delta": 0.3, "eval/n": 4.0})


def test_tracking_keys_are_checked():
    from compiler import schema

    key = schema.BY_PATH["tracking.backends"]
    assert schema.coerce(key, "mlflow, tensorboard") == ["mlflow", "tensorboard"]
    with pytest.raises(PlanError) as e:
        schema.coerce(key, ["mlfow"])
    assert e.value.key == "tracking.backends" and "mlflow" in str(e.value)


def test_the_command_reports_the_evaluation_and_the_files(tiny_chat_dir, tmp_path, monkeypatch,
                                                          store):
    """tune/commands.train: the runtime's steps, then eval.json's numbers and the run's files, then
    FINISHED; FAILED when the evaluation raises (the runtime stubbed: this is the command's part)."""
    import runtime.evaluate
    import runtime.report
    import runtime.run
    from tune.commands import train

    evaluation = EvalFile({"tuned": EvalResult(model="tuned", metric="rouge_l", value=0.5, n=3)})

    def fake_train(plan, run_dir, *, tracker):
        tracker.start(resumed_from=None)
        (run_dir / "adapter").mkdir()
        (run_dir / "adapter" / "adapter_config.json").write_text("{}")
        for step in (1, 2):
            tracker.log({"step": step, "loss": 3.0 - step})

    def fake_eval(plan, run_dir):
        if plan.tracking.run_name == "broken":
            raise RuntimeError("decoding failed")
        evaluation.write(run_dir)
        return evaluation

    def fake_report(run_dir):
        return (run_dir / "report.html").write_text("<html></html>") and run_dir / "report.html"

    monkeypatch.setattr(runtime.run, "train", fake_train)
    monkeypatch.setattr(runtime.evaluate, "evaluate_before_after", fake_eval)
    monkeypatch.setattr(runtime.report, "write_report", fake_report)
    plan = tracked(tiny_chat_dir, tmp_path, backends=("mlflow",))
    plan = dataclasses.replace(plan, data=dataclasses.replace(       # as if it had test rows
        plan.data, sizes={**plan.data.sizes, "test": 3}))
    train(plan, store(tmp_path / "run"))
    client, (r,) = mlflow_runs(tmp_path / "run")
    assert r.info.status == "FINISHED"
    assert mlflow_series(client, r.info.run_id, "train/loss") == [(1, 2.0), (2, 1.0)]
    assert r.data.metrics["eval/rouge_l"] == 0.5 and r.data.metrics["eval/n"] == 3
    assert {a.path for a in client.list_artifacts(r.info.run_id)} == {"adapter", "eval.json",
                                                                        "report.html"}

    broken = dataclasses.replace(plan, tracking=dataclasses.replace(plan.tracking,
                                                                    run_name="broken"))
    with pytest.raises(RuntimeError, match="decoding failed"):
        train(broken, store(tmp_path / "broken"))
    _, (r,) = mlflow_runs(tmp_path / "broken")
    assert r.info.status == "FAILED" and r.info.run_name == "broken"


@pytest.mark.slow
def test_a_sweep_reports_its_jobs_as_one_group(tiny_chat_dir, tmp_path, tune_cli):
    """`tune -m`: each job its own tracker run, grouped by the sweep directory's name, named by the
    values it sweeps, the MLflow runs together in the sweep's store; the command's evaluation and
    files reach them at the end."""
    tiny_plan(tiny_chat_dir, tmp_path, n_train=12, n_val=4)         # writes data.jsonl
    data = tmp_path / "data.jsonl"
    rc, out, err = tune_cli(
        "-m", f"model.path={tiny_chat_dir}", f"data.path={data}", f"data.test_path={data}",
        "data.task=generation", "data.max_length=32", "data.dedupe=false", "template.chat=false",
        "schedule.max_steps=2", "schedule.batch_size=2", "schedule.lr=1e-3,2e-3", "eval.limit=2",
        "eval.max_new_tokens=2", "eval.metric=rouge_l", "runtime.checkpoint_every=0",
        "runtime.dtype=float32", "tracking.backends=[mlflow,wandb]", "tracking.experiment=tiny",
        "hydra.sweep.dir=sweep")
    assert rc == 0, err
    sweep = tmp_path / "sweep"
    assert (sweep / "mlflow.db").is_file() and not (sweep / "0" / "mlflow.db").exists()
    client, runs = mlflow_runs(sweep)
    assert [r.info.run_name for r in runs] == ["0 schedule.lr=0.001", "1 schedule.lr=0.002"]
    for job, r in zip(("0", "1"), runs):
        assert r.info.status == "FINISHED" and r.data.tags["tune.group"] == "sweep"
        assert_same(mlflow_series(client, r.info.run_id, "train/loss"), rows(sweep / job, "loss"),
                    rtol=1e-12)
        ev = EvalFile.read(sweep / job)
        assert r.data.metrics["eval/rouge_l"] == pytest.approx(ev.entries["tuned"].value)
        assert r.data.metrics["eval/base_rouge_l"] == pytest.approx(ev.entries["base"].value)
        assert {"adapter", "eval.json", "report.html", "plan.json"} <= \
            {a.path for a in client.list_artifacts(r.info.run_id)}
        files = next((sweep / job / "wandb").glob("offline-run-*/files"))
        assert (files / "eval.json").read_text() == (sweep / job / "eval.json").read_text()
        record = wandb_run_record(sweep / job)
        assert (record.run_group, record.display_name) == ("sweep", r.info.run_name)
        assert_same(wandb_series(sweep / job, "train/loss"), rows(sweep / job, "loss"), rtol=1e-12)
    assert (sweep / "sweep.json").is_file()
