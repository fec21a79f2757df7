"""The `tune` command line: dispatch, Hydra pass-through (--help, --cfg, -m, hydra.run.dir, shell
completion), exit codes, run directories, and the hand-off to the runtime."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.records import SweepFile
from core.plan import Plan
from tune import compose

REPO = Path(__file__).resolve().parents[1]


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def no_run_dirs(root: Path) -> bool:
    """Nothing under root/outputs (the folder itself may stay, empty)."""
    return not any((root / "outputs").rglob("*"))


def run_tune(args, cwd, env=None, timeout=300):
    """`python -m tune ARGS` in a subprocess: (exit code, stdout, stderr)."""
    e = dict(os.environ)
    e.pop("TUNE_RECIPE_PATH", None)
    e.pop("TUNE_DEBUG", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "tune", *args], cwd=cwd, env=e,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


# ------------------------------------------------------------------------------ plan

def test_plan_recipe_writes_plan_json(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "+recipe=legal", f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 0, err
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert plan.is_consistent()
    assert plan.recipe.name == "legal"
    text = flat(out)
    for title in ("model", "data", "template", "adapter", "schedule", "resources"):
        assert f"─ {title} " in out, title
    assert plan.hash[:12] in text
    assert "example 1" in text and "Category:" in text
    assert not (tmp_path / "outputs").exists()


def test_overrides_reach_the_plan(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "+recipe=legal", "adapter.rank=32", "schedule.lr=1e-4",
                            "hydra.run.dir=run")
    assert rc == 0, err
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert doc["config"]["adapter"]["rank"] == 32 and doc["adapter"]["rank"] == 32
    assert doc["config"]["schedule"]["lr"] == 1e-4 and doc["schedule"]["lr"] == 1e-4
    # trainable = Σ layers × r × (in + out) over q, k, v, o of SmolLM2-135M (576 hidden, 192 kv)
    assert doc["adapter"]["trainable_params"] == 30 * 32 * (1152 + 768 + 768 + 1152)


def test_all_linear(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "+recipe=legal", "adapter.targets=all-linear", "hydra.run.dir=run")
    assert rc == 0, err
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert doc["adapter"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"]


def test_default_run_dir_under_outputs(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "+recipe=legal")
    assert rc == 0, err
    found = list((tmp_path / "outputs").glob("*/*/plan.json"))
    assert len(found) == 1
    assert not any(p.name == ".hydra" for p in found[0].parent.iterdir())


def test_failed_compile_leaves_no_run_dir(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "+recipe=legal", "adapter.targets=[q_prj]")
    assert rc == 2
    assert no_run_dirs(tmp_path)
    rc, out, err = tune_cli("plan", "+recipe=legal", "adapter.targets=[q_prj]",
                            "hydra.run.dir=a/b/run")
    assert rc == 2 and not (tmp_path / "a" / "b" / "run").exists()


def test_failed_compile_keeps_a_run_dir_with_files(tune_cli, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    rc, out, err = tune_cli("plan", "+recipe=legal", "adapter.rank=0", "hydra.run.dir=run")
    assert rc == 2
    rc, out, err = tune_cli("plan", "+recipe=legal", "adapter.targets=[x]", "hydra.run.dir=run")
    assert rc == 2
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_remove_if_empty_stops_at_outputs(tmp_path):
    deep = tmp_path / "outputs" / "2024-01-01" / "12-00-00"
    deep.mkdir(parents=True)
    compose.remove_if_empty(deep, cwd=tmp_path)
    assert not (tmp_path / "outputs" / "2024-01-01").exists()
    assert (tmp_path / "outputs").is_dir()


# ------------------------------------------------------------------------------ Hydra pass-through

def test_help_lists_commands_groups_and_recipes(tune_cli):
    rc, out, err = tune_cli("--help")
    assert rc == 0, err
    for needle in ("== Commands ==", "tune plan", "tune eval", "tune generate", "tune run",
                   "tune recipes", "== Config groups ==", "adapter: all-linear, dora, lora, qlora",
                   "model: gemma3-270m, smollm2-135m", "objective: dpo, ipo, kto, orpo, sft, simpo",
                   "recipe: customer_support, customer_support_dpo, customer_support_replies, "
                   "finance, legal, medical",
                   "Legal: classify a contract clause", "--multirun", "schedule:"):
        assert needle in out, needle


def test_help_after_a_command(tune_cli):
    rc, out, err = tune_cli("plan", "--help")
    assert rc == 0 and "== Commands ==" in out


def test_cfg_job_shows_the_composed_recipe(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "--cfg", "job", "+recipe=finance")
    assert rc == 0, err
    assert "Sentiment:" in out and "path: data/finance_train.jsonl" in out
    assert not (tmp_path / "outputs").exists()


def test_multirun_sweep(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "-m", "+recipe=legal", "schedule.lr=1e-4,3e-4",
                            "hydra.sweep.dir=sweep")
    assert rc == 0, err
    lrs = sorted(json.loads((tmp_path / "sweep" / str(i) / "plan.json").read_text())
                 ["config"]["schedule"]["lr"] for i in (0, 1))
    assert lrs == [1e-4, 3e-4]


def test_multirun_with_a_failing_job(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "-m", "+recipe=legal", "schedule.batch_size=8,500",
                            "hydra.sweep.dir=sweep")
    assert rc == 2
    assert (tmp_path / "sweep" / "0" / "plan.json").is_file()
    assert not (tmp_path / "sweep" / "1").exists()
    assert "fewer than one optimizer step's batch" in flat(err) and "Traceback" not in err


def test_shell_completion_after_a_command(tune_cli, monkeypatch):
    monkeypatch.setenv("COMP_LINE", "tune plan +recipe=")
    monkeypatch.setenv("COMP_POINT", str(len("tune plan +recipe=")))
    rc, out, err = tune_cli("plan", "-sc", "query=bash")
    assert rc == 0, err
    assert "+recipe=legal" in out and "+recipe=finance" in out


def test_unknown_command(tune_cli):
    rc, out, err = tune_cli("plna", "+recipe=legal")
    assert rc == 2 and "unknown command `plna`" in err and "Did you mean `plan`?" in flat(err)


def test_override_syntax_error(tune_cli):
    rc, out, err = tune_cli("plan", "adapter.rank=[1,")
    assert rc == 2 and "override" in err and "Traceback" not in err


def test_missing_group_from_hydra_is_exit_2(tune_cli, tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tpl.yaml").write_text("# @package _global_\n# t\ndefaults:\n"
                                                   "  - override /template: nope\n  - _self_\n")
    rc, out, err = tune_cli("plan", "+recipe=tpl", "hydra.run.dir=run")
    assert rc == 2 and "nope" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ exit codes

def test_unexpected_error_is_exit_1_without_traceback(tune_cli, monkeypatch):
    import tune.commands

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tune.commands, "compile_plan", boom)
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 1 and "disk on fire" in err and "Traceback" not in err
    monkeypatch.setenv("TUNE_DEBUG", "1")
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 1 and "Traceback" in err


@pytest.fixture
def runtime_calls(monkeypatch):
    """Replace the runtime's entry points with recorders: [(name, args)] of the calls made."""
    import runtime.evaluate
    import runtime.generate
    import runtime.report
    import runtime.run

    calls = []
    for mod, name in ((runtime.run, "train"), (runtime.evaluate, "evaluate"),
                      (runtime.evaluate, "evaluate_before_after"), (runtime.report, "write_report"),
                      (runtime.generate, "generate")):
        monkeypatch.setattr(mod, name, lambda *a, _name=name, **k: calls.append((_name, a, k)))
    return calls


def test_train_hands_the_plan_to_the_runtime(tune_cli, tmp_path, runtime_calls):
    rc, out, err = tune_cli("+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err
    # training, then (there are test rows) base vs tuned, then the report: three steps, in order
    (train, (plan, run_dir), _), (ev, (ev_plan, ev_dir), _), (report, (report_dir,), _) = runtime_calls
    assert (train, ev, report) == ("train", "evaluate_before_after", "write_report")
    assert isinstance(plan, Plan) and ev_plan is plan
    assert Path(run_dir) == Path(ev_dir) == Path(report_dir) == tmp_path / "run"
    assert Plan.load(tmp_path / "run" / "plan.json") == plan


def test_train_without_test_rows_skips_the_evaluation(tune_cli, tmp_path, runtime_calls):
    rc, out, err = tune_cli("+recipe=legal", "data.test_path=null", "hydra.run.dir=run")
    assert rc == 0, err
    assert [name for name, _, _ in runtime_calls] == ["train", "write_report"]


def test_eval_hands_base_model_to_the_runtime(tune_cli, tmp_path, runtime_calls):
    rc, out, err = tune_cli("eval", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err
    (name, (plan, run_dir, adapter), _), = runtime_calls
    assert name == "evaluate" and adapter is None and Path(run_dir) == tmp_path / "run"


def test_eval_of_a_run_uses_its_config(tune_cli, tmp_path, runtime_calls):
    rc, out, err = tune_cli("plan", "+recipe=finance", "adapter.rank=8", "hydra.run.dir=trained")
    assert rc == 0, err
    (tmp_path / "trained" / "adapter").mkdir()
    (tmp_path / "trained" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    rc, out, err = tune_cli("eval", "run=trained", "eval.limit=5")
    assert rc == 0, err
    (name, (plan, run_dir, adapter), _), (report, (report_dir,), _) = runtime_calls
    assert (name, report) == ("evaluate", "write_report") and report_dir == run_dir
    assert plan.adapter.rank == 8 and plan.recipe.name == "finance"
    assert plan.eval.limit == 5
    assert Path(adapter) == (tmp_path / "trained" / "adapter").resolve()
    assert no_run_dirs(tmp_path)     # Hydra's unused run dir is removed


def test_eval_of_a_run_without_adapter(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "+recipe=finance", "hydra.run.dir=planned")
    assert rc == 0
    rc, out, err = tune_cli("eval", "run=planned")
    assert rc == 2 and "no trained adapter" in flat(err)


def test_generate_with_run_dir(tune_cli, tmp_path, runtime_calls):
    rc, out, err = tune_cli("plan", "+recipe=finance", "hydra.run.dir=trained")
    rc, out, err = tune_cli("generate", "run=trained", "prompt=Shares fall 12%", "max_new_tokens=9")
    assert rc == 0, err
    from runtime.decode import Sampling

    assert runtime_calls == [("generate", ((tmp_path / "trained").resolve(), "Shares fall 12%"),
                              {"max_new_tokens": 9, "free": None,      # the run's plan decides
                               "sampling": Sampling()})]               # greedy
    runtime_calls.clear()
    rc, out, err = tune_cli("generate", "run=trained", "prompt=x", "temperature=0.8", "top_p=0.9",
                            "seed=4")
    assert rc == 0 and runtime_calls[0][2]["sampling"] == Sampling(0.8, 0.9, 4)
    rc, out, err = tune_cli("generate", "run=trained", "prompt=x", "temperature=-1")
    assert rc == 2 and "temperature" in err
    runtime_calls.clear()
    rc, out, err = tune_cli("generate", "run=trained", "prompt=x", "eval.mode=generate")
    assert rc == 0 and runtime_calls[0][2]["free"] is True
    runtime_calls.clear()
    rc, out, err = tune_cli("generate", "run=trained", "prompt=x", "eval.mode=constrained")
    assert rc == 0 and runtime_calls[0][2]["free"] is False
    assert no_run_dirs(tmp_path)


# ------------------------------------------------------------------------------ tune run

def test_run_checks_the_plan(tune_cli, tmp_path, runtime_calls, clf_data):
    clf_data()
    rc, out, err = tune_cli("plan", "data.path=data/train.jsonl", "hydra.run.dir=run")
    assert rc == 0, err
    rc, out, err = tune_cli("run", "run/plan.json")
    assert rc == 0, err
    (name, (plan, run_dir), _), (report, _, _) = runtime_calls
    assert (name, report) == ("train", "write_report")
    assert plan == Plan.load(tmp_path / "run" / "plan.json") and Path(run_dir) == Path("run")

    # an edited plan
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    doc["config"]["schedule"]["lr"] = 0.5
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    rc, out, err = tune_cli("run", "edited.json")
    assert rc == 2 and "hash does not match" in err

    # changed data
    with open(tmp_path / "data" / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more", "label": "Alpha"}) + "\n")
    rc, out, err = tune_cli("run", "run/plan.json")
    assert rc == 2 and "changed since the plan was compiled" in flat(err)

    rc, out, err = tune_cli("run", "nowhere/plan.json")
    assert rc == 2 and "not found" in err


def test_run_rebuilds_a_missing_token_cache(tune_cli, tmp_path, runtime_calls, clf_data):
    clf_data(250, seed=77)
    rc, out, err = tune_cli("plan", "data.path=data/train.jsonl", "hydra.run.dir=run")
    plan = Plan.load(tmp_path / "run" / "plan.json")
    Path(plan.data.cache).unlink()
    rc, out, err = tune_cli("run", "run")
    assert rc == 0, err
    assert Path(plan.data.cache).is_file()


def test_run_refuses_a_plan_of_an_older_tune(tune_cli, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "plan.json").write_text(json.dumps({"version": 1, "hash": "x", "config": {}}))
    rc, out, err = tune_cli("run", "old")
    assert rc == 2 and "older tune" in flat(err) and "recompile" in flat(err)


# ------------------------------------------------------------------------------ the real console

def test_console_plan_and_refusals(tmp_path, smollm2_dir):
    rc, out, err = run_tune(["plan", "+recipe=legal", "hydra.run.dir=run"], tmp_path)
    assert rc == 0, err
    assert (tmp_path / "run" / "plan.json").is_file()

    rc, out, err = run_tune(["plan", "+recipe=legal", "adapter.rank=abc", "hydra.run.dir=bad"], tmp_path)
    assert rc == 2 and "adapter.rank: must be an integer, got 'abc'" in err
    assert "Traceback" not in out + err and not (tmp_path / "bad").exists()

    rc, out, err = run_tune(["plan", "+recipe=legl"], tmp_path)
    assert rc == 2 and "Did you mean `legal`?" in err and "Traceback" not in out + err


def test_console_compile_error_inside_hydra(tmp_path, smollm2_dir):
    rc, out, err = run_tune(["plan", "+recipe=legal", "adapter.targets=[q_prj]"], tmp_path)
    assert rc == 2 and "Valid modules: q_proj" in err
    assert "Traceback" not in out + err and "Error executing job" not in err
    assert no_run_dirs(tmp_path)


def test_console_script_help(tmp_path):
    tune = Path(sys.executable).parent / "tune"
    if not tune.exists():
        pytest.skip("the `tune` console script is not installed (pip install -e .)")
    p = subprocess.run([str(tune), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "== Commands ==" in p.stdout and "recipe:" in p.stdout


def test_diverged_training_exits_3(tune_cli, tmp_path, monkeypatch):
    import runtime.run
    from core.errors import Diverged

    def diverge(plan, run_dir, **kw):
        raise Diverged(7, float("nan"), float("inf"), 0.02)

    monkeypatch.setattr(runtime.run, "train", diverge)
    rc, out, err = tune_cli("+recipe=legal", "hydra.run.dir=run")
    assert rc == 3 and "diverged at step 7" in flat(err) and "learning rate 0.02" in flat(err)
    assert "Traceback" not in err and (tmp_path / "run" / "plan.json").is_file()
    rc, out, err = tune_cli("-m", "+recipe=legal", "schedule.lr=0.02,0.05", "hydra.sweep.dir=sweep")
    assert rc == 3 and flat(err).count("diverged: job") == 2


@pytest.mark.slow
def test_a_training_sweep_compares_its_runs_and_resumes(tune_cli, tmp_path):
    args = ("-m", "+recipe=legal", "schedule.lr=1e-4,3e-3", "schedule.max_steps=2",
            "schedule.batch_size=2", "data.test_path=null", "runtime.checkpoint_every=0",
            "hydra.sweep.dir=sweep")
    rc, out, err = tune_cli(*args)
    assert rc == 0, err
    doc = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert SweepFile.from_dict(doc).to_dict() == doc == SweepFile.read(tmp_path / "sweep").to_dict()
    assert doc["criterion"] == "val_loss" and len(doc["runs"]) == 2
    assert [r["differs"] for r in doc["runs"]] == [{"schedule.lr": "0.0001"}, {"schedule.lr": "0.003"}]
    assert all(r["status"] == "ok" and r["val_loss"] > 0 and len(r["curve"]) == 2
               for r in doc["runs"])
    best = min(doc["runs"], key=lambda r: r["val_loss"])
    assert doc["best"] == best["run"]
    html = (tmp_path / "sweep" / "sweep.html").read_text()
    assert "★" in html and "schedule.lr" in html and "data:image/png;base64," in html
    assert 'href="../sweep.html"' in (tmp_path / "sweep" / "0" / "report.html").read_text()
    # the same sweep again: both runs are finished, nothing is trained twice
    rc, out, err = tune_cli(*args)
    assert rc == 0 and flat(err).count("nothing to do") == 2


@pytest.mark.slow
def test_an_optuna_search_optimises_the_sweep_metric(tune_cli, tmp_path):
    """Hydra's Optuna sweeper (hydra-optuna-sweeper) drives tune like any Hydra application: each
    trial is a run, its objective the run's sweep.metric, and the sweep report covers the trials."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    rc, out, err = tune_cli("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                            "hydra.sweeper.sampler.seed=0", "+recipe=legal",
                            "schedule.lr=tag(log, interval(1e-4, 1e-2))", "schedule.max_steps=1",
                            "schedule.batch_size=2", "data.max_length=128", "data.test_path=null",
                            "runtime.checkpoint_every=0", "hydra.sweep.dir=sweep")
    assert rc == 0, err
    doc = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(doc["runs"]) == 2 and all(r["status"] == "ok" for r in doc["runs"])
    lrs = [float(r["overrides"]["schedule.lr"]) for r in doc["runs"]]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    best = yaml_load(tmp_path / "sweep" / "optimization_results.yaml")
    assert best["best_value"] == pytest.approx(min(r["val_loss"] for r in doc["runs"]))
    assert doc["best"] == min(doc["runs"], key=lambda r: r["val_loss"])["run"]


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())
