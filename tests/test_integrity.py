"""A run directory's integrity: a plan read from a file is checked as the compiler checks a config,
one command at a time writes a run directory, a directory of another plan's results is never given a
new plan, places that cannot be written are found before work starts, and decoding that cannot fit is
refused before any weight is loaded."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.plan import Plan, with_hash
from core.rundir import LOCK_NAME, RunDirLock, check_writable
from core.errors import PlanError

from test_cli import flat, runtime_calls  # noqa: F401 - the fixture: the runtime's entry points recorded

REPO = Path(__file__).resolve().parent.parent


def _edit(path: Path, edit, *, rehash: bool = True) -> None:
    """Edit a plan.json document in place, its hash recomputed (as a careful forger would)."""
    doc = json.loads(path.read_text())
    edit(doc)
    plan = Plan.from_dict(doc)
    path.write_text((with_hash(plan) if rehash else plan).to_json())


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ plan integrity

def test_a_plan_edited_with_its_hash_recomputed_is_refused(tune_cli, tmp_path, runtime_calls):
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err
    path = tmp_path / "run" / "plan.json"

    def negative_steps(doc):
        doc["schedule"]["total_steps"] = -5
    _edit(path, negative_steps)
    assert Plan.load(path).is_consistent()          # the hash alone cannot tell
    rc, out, err = tune_cli("run", str(path))
    assert rc == 2 and "schedule.total_steps" in flat(err) and "its own config" in flat(err)
    assert runtime_calls == []


def test_a_plan_whose_config_was_edited_is_checked_by_the_compiler(tune_cli, tmp_path,
                                                                    runtime_calls):
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err
    path = tmp_path / "run" / "plan.json"

    def zero_rank(doc):
        doc["config"]["adapter"]["rank"] = 0
        doc["adapter"]["rank"] = 0
    _edit(path, zero_rank)
    rc, out, err = tune_cli("run", str(path))
    assert rc == 2 and "adapter.rank" in flat(err)
    assert runtime_calls == []


def test_the_runtime_gets_model_and_cache_from_the_compiler_not_the_file(tune_cli, tmp_path,
                                                                          runtime_calls,
                                                                          tiny_chat_dir):
    """model.dir and data.cache depend only on where things are (the hash leaves them out); a plan
    edited to point them elsewhere trains on what its config names."""
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err
    path = tmp_path / "run" / "plan.json"
    honest = Plan.load(path)
    decoy = tmp_path / "decoy.npz"
    decoy.write_bytes(Path(honest.data.cache).read_bytes())

    def elsewhere(doc):
        doc["model"]["dir"] = str(tiny_chat_dir)
        doc["data"]["cache"] = str(decoy)
    _edit(path, elsewhere, rehash=False)
    assert Plan.load(path).is_consistent()
    rc, out, err = tune_cli("run", str(path))
    assert rc == 0, err
    (name, (plan, _), _), *_ = runtime_calls
    assert name == "train"
    assert plan.model.dir == honest.model.dir and plan.data.cache == honest.data.cache
    assert plan.hash == honest.hash


def test_a_run_whose_model_dir_was_swapped_is_refused(tune_cli, tmp_path, runtime_calls,
                                                      tiny_chat_dir):
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err
    (tmp_path / "run" / "adapter").mkdir()
    (tmp_path / "run" / "adapter" / "adapter_model.safetensors").write_bytes(b"")

    def other_model(doc):
        doc["model"]["dir"] = str(tiny_chat_dir)
    _edit(tmp_path / "run" / "plan.json", other_model, rehash=False)
    for argv in (("export", "run=run", "format=peft", "out=exported"),
                 ("generate", "run=run", "prompt=hello")):
        rc, out, err = tune_cli(*argv)
        assert rc == 2 and "no longer holds the model" in flat(err), argv
    assert not (tmp_path / "exported").exists() and runtime_calls == []


# ------------------------------------------------------------------------------ one writer

def test_a_directory_of_another_plans_results_is_refused_before_writing(tune_cli, tmp_path,
                                                                         runtime_calls):
    rc, out, err = tune_cli("+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err
    run = tmp_path / "run"
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "adapter").mkdir()
    before = _files(run)
    for argv in (("+recipe=legal", "adapter.rank=32", "hydra.run.dir=run"),
                 ("plan", "+recipe=legal", "schedule.lr=1e-4", "hydra.run.dir=run"),
                 ("lr-find", "+recipe=legal", "adapter.rank=4", "hydra.run.dir=run")):
        rc, out, err = tune_cli(*argv)
        assert rc == 2 and "holds the results of another plan" in flat(err), argv
        assert "metrics.jsonl" in flat(err)
        assert _files(run) == before, argv             # plan.json untouched, no lock file left
    # the same plan again is the same run: allowed (it resumes)
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err


_HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from core.rundir import RunDirLock
lock = RunDirLock({d!r}, "train").acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def held_lock(tmp_path):
    """held_lock(dir): another process holds dir's writer lock until the test ends."""
    procs = []

    def hold(d: Path):
        p = subprocess.Popen([sys.executable, "-c", _HOLD.format(repo=str(REPO), d=str(d))],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p
    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_directory_in_use_is_refused(tune_cli, tmp_path, runtime_calls, held_lock):
    holder = held_lock(tmp_path / "run")
    rc, out, err = tune_cli("+recipe=legal", "hydra.run.dir=run")
    assert rc == 2 and "is in use by `tune train`" in flat(err)
    assert f"process {holder.pid}" in flat(err)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]   # nothing written
    assert runtime_calls == []


def test_a_sweep_directory_in_use_is_refused(tune_cli, tmp_path, runtime_calls, held_lock):
    held_lock(tmp_path / "sweep")
    rc, out, err = tune_cli("plan", "-m", "+recipe=legal", "schedule.lr=1e-4,3e-4",
                            "hydra.sweep.dir=sweep")
    assert rc == 2 and "is in use by" in flat(err) and "hydra.sweep.dir" in flat(err)
    assert not list((tmp_path / "sweep").glob("*/plan.json"))


def test_a_sweep_leaves_only_its_own_files(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "-m", "+recipe=legal", "schedule.lr=1e-4,3e-4",
                            "hydra.sweep.dir=sweep")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0", "1"]   # no multirun.yaml


def test_a_lock_left_by_a_killed_process_is_taken_over(tune_cli, tmp_path, runtime_calls):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "h", "command": "train",
                                             "started": time.time() - 60}))
    rc, out, err = tune_cli("+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err
    assert "no longer running; taking it over" in flat(err) and f"process {dead.pid}" in flat(err)
    assert not (run / LOCK_NAME).exists()              # released when the command ends
    assert [name for name, _, _ in runtime_calls][0] == "train"


def test_the_lock_is_exclusive_and_released_on_crash(tmp_path, held_lock):
    holder = held_lock(tmp_path / "d")
    with pytest.raises(PlanError, match="in use"):
        RunDirLock(tmp_path / "d", "eval").acquire()
    holder.kill()                                       # kill -9: the kernel releases the lock
    holder.wait()
    with RunDirLock(tmp_path / "d", "eval") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "d" / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ unwritable places

def test_a_run_directory_under_a_file_is_refused(tune_cli, tmp_path):
    (tmp_path / "blocker").write_text("x")
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=blocker/run")
    assert rc == 2 and "hydra.run.dir" in flat(err) and "blocker" in flat(err)
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=blocker")
    assert rc == 2 and "hydra.run.dir" in flat(err)
    assert (tmp_path / "blocker").read_text() == "x"


def test_an_export_out_under_a_file_is_refused_before_exporting(tune_cli, tmp_path, monkeypatch):
    import runtime.export

    calls = []
    monkeypatch.setattr(runtime.export, "export_run", lambda *a, **k: calls.append(a))
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    (tmp_path / "run" / "adapter").mkdir()
    (tmp_path / "run" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "blocker").write_text("x")
    for fmt in ("peft", "gguf"):
        rc, out, err = tune_cli("export", "run=run", f"format={fmt}", "out=blocker/sub/out")
        assert rc == 2 and "out:" in flat(err) and "blocker is a file" in flat(err), fmt
    assert calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_directory_is_refused(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(PlanError, match="not writable"):
            check_writable(d / "run", "hydra.run.dir")
    finally:
        d.chmod(0o755)


# ------------------------------------------------------------------------------ decoding bounds

def test_generate_refuses_more_tokens_than_the_context_before_loading(tune_cli, tmp_path,
                                                                       runtime_calls):
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    t0 = time.perf_counter()
    rc, out, err = tune_cli("generate", "run=run", "prompt=hi", "max_new_tokens=1048576")
    assert rc == 2 and "max_new_tokens" in flat(err) and "context of 8192" in flat(err)
    assert time.perf_counter() - t0 < 20 and runtime_calls == []


def test_decoding_beyond_memory_is_refused(tune_cli, tmp_path, monkeypatch):
    import compiler.estimates

    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    monkeypatch.setattr(compiler.estimates, "detect_devices", lambda: {"memory": 1 << 30})
    rc, out, err = tune_cli("serve", "run=run", "serve.batch_size=256")
    assert rc == 2 and "serve.batch_size" in flat(err) and "more than this machine's" in flat(err)


def test_a_plan_json_nested_too_deeply_is_a_plan_error(tune_cli, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plan.json").write_text("[" * 100_000)
    with pytest.raises(PlanError, match="nested too deeply"):
        Plan.load(tmp_path / "run" / "plan.json")
    rc, out, err = tune_cli("run", "run/plan.json")
    assert rc == 2 and "plan.json" in flat(err) and "nested too deeply" in flat(err)
