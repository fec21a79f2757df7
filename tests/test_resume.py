"""Resume: an interrupted (Ctrl-C, or killed) run resumed in its run dir ends with the same adapter as a run
never interrupted; a different plan refuses the checkpoints."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from safetensors.numpy import load_file

from core.errors import PlanError
from conftest import diverge_at, tiny_plan
from core.records import TrainSummary
from runtime import checkpoint
from runtime.run import train

# dropout on, so the resumed run must also redraw the same dropout masks
SETUP = dict(seq_len=32, batch_size=2, grad_accum=2, epochs=2, checkpoint_every=2, dropout=0.1,
             eval_every=3, n_train=40, n_val=6)


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_and_resumed_equals_uninterrupted(tiny_chat_dir, tmp_path, capsys):
    plan = tiny_plan(tiny_chat_dir, tmp_path, **SETUP)

    whole = train(plan, tmp_path / "whole")
    total = whole.steps
    assert total == whole.total_steps >= 7
    err = capsys.readouterr().err          # no terminal here: plain progress lines, first and last
    assert f"tune: train 1/{total}, loss " in err and f"tune: train {total}/{total}, loss " in err
    assert np.isfinite(whole.final_loss) and np.isfinite(whole.final_val_loss)
    rows = _rows(tmp_path / "whole")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    for key in ("epoch", "lr", "grad_norm", "tokens", "tokens_seen", "tokens_per_s", "step_time_s",
                "elapsed_s"):
        assert key in steps[0], key
    assert any("compile_s" in r for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [s for s in range(3, total, 3)] + [total]
    summary = json.loads((tmp_path / "whole" / "train_summary.json").read_text())
    assert summary["steps"] == total and summary["compile_s"] > 0
    assert TrainSummary.read(tmp_path / "whole") == whole

    # Ctrl-C after step 3: the step completes, a checkpoint is written, exit code 130
    run_dir = tmp_path / "resumed"

    def ctrl_c(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(SystemExit) as exit_info:
        train(plan, run_dir, on_step=ctrl_c)
    assert exit_info.value.code == 130
    message = "interrupted at step 3; checkpoint written; run the same command to resume"
    assert message in capsys.readouterr().err
    assert checkpoint.list_checkpoints(run_dir)[-1].name == "step_00000003.npz"

    # resumed, then killed hard after step 6: only the steps after the last checkpoint (4) are lost
    def crash(step):
        if step == 6:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(plan, run_dir, on_step=crash)
    assert "resuming from step 3" in capsys.readouterr().err
    kept = [p.name for p in checkpoint.list_checkpoints(run_dir)]
    assert kept == ["step_00000003.npz", "step_00000004.npz"]

    resumed = train(plan, run_dir)
    assert "resuming from step 4" in capsys.readouterr().err
    assert resumed.steps == total and resumed.resumed_from == 4
    a, b = _adapter(tmp_path / "whole"), _adapter(run_dir)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    assert np.abs(np.concatenate([v.ravel() for k, v in a.items() if "lora_B" in k])).max() > 0

    # metrics.jsonl: each step once, losses as in the uninterrupted run
    again = [r for r in _rows(run_dir) if "loss" in r]
    assert [r["step"] for r in again] == list(range(1, total + 1))
    np.testing.assert_allclose([r["loss"] for r in again], [r["loss"] for r in steps], rtol=1e-6)
    assert again[-1]["tokens_seen"] == steps[-1]["tokens_seen"]

    # running the finished plan again is a no-op that rewrites the same adapter
    done = train(plan, run_dir)
    assert done.steps == total
    assert all(np.array_equal(_adapter(run_dir)[k], b[k]) for k in b)


def test_other_plan_refuses_the_checkpoints(tiny_chat_dir, tmp_path):
    plan = tiny_plan(tiny_chat_dir, tmp_path, **dict(SETUP, epochs=1, checkpoint_every=1))

    def stop(step):
        if step == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        train(plan, tmp_path / "run", on_step=stop)
    other = tiny_plan(tiny_chat_dir, tmp_path, **dict(SETUP, epochs=1, lr=2e-3))
    assert other.hash != plan.hash
    with pytest.raises(PlanError, match="another plan") as err:
        train(other, tmp_path / "run")
    assert "fresh run directory" in str(err.value) and "checkpoints/" in str(err.value)


def test_divergence_is_a_clean_stop(tiny_chat_dir, tmp_path, monkeypatch):
    """A step with a non-finite loss (here: made so at step 5) stops the run there, keeps the
    metrics up to it and the last good checkpoint, writes no adapter, and says what to do."""
    from core.errors import Diverged

    plan = tiny_plan(tiny_chat_dir, tmp_path / "data", **dict(SETUP, checkpoint_every=2))
    diverge_at(monkeypatch, 5)
    with pytest.raises(Diverged) as err:
        train(plan, tmp_path)
    e = err.value
    assert e.exit_code == 3 and e.step == 5 and "lower schedule.lr" in str(e)
    assert "diverged at step 5" in str(e)
    rows = _rows(tmp_path)
    assert rows[-1]["step"] == 5 and rows[-1]["diverged"] and rows[-1]["loss"] is None
    assert [r["step"] for r in rows if r.get("loss") is not None] == [1, 2, 3, 4]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002.npz",
                                                                       "step_00000004.npz"]
    assert not (tmp_path / "adapter").exists()
