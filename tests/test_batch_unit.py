"""schedule.batch_unit: with packed rows, schedule.batch_size counts rows (several examples each) or
examples (the rows that hold about that many), so that packed and unpacked runs of one plan can
see the same examples per optimizer step."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_examples


def compile_with(model_dir, workdir, *, unit, pack=True, batch_size=8, grad_accum=1, n=80,
                 seq_len=48):
    from compiler import schema
    from compiler.compile import compile_plan

    ids, prompt_lens = synthetic_examples(n, seed=1, low=11)
    rows = [{"text": " ".join(f"w{t}" for t in x[:p]), "label": " ".join(f"w{t}" for t in x[p:-1])}
            for x, p in zip(ids, prompt_lens)]
    data = Path(workdir) / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = schema.defaults()
    cfg["model"]["path"] = str(model_dir)
    cfg["data"].update(path=str(data), val_fraction=0.0, max_length=seq_len, dedupe=False,
                       task="generation")
    cfg["template"].update(prompt="{text}", response="{label}", chat=False)
    cfg["schedule"].update(batch_size=batch_size, grad_accum=grad_accum, epochs=1,
                           batch_unit=unit)
    cfg["runtime"].update(pack=pack, dtype="float32", matmul_dtype="float32")
    return compile_plan(cfg, recipe_info=None, command="train")


def test_examples_unit_gives_the_unpacked_examples_per_step(tiny_chat_dir, tmp_path):
    from runtime import build

    rows = compile_with(tiny_chat_dir, tmp_path, unit="rows")
    ex = compile_with(tiny_chat_dir, tmp_path, unit="examples")
    unpacked = compile_with(tiny_chat_dir, tmp_path, unit="rows", pack=False)
    n = unpacked.data.sizes["train"]
    per_row = n / rows.schedule.rows_per_epoch
    assert per_row > 1.5                    # several examples a row: the case that matters
    # rows: 8 packed rows a micro-batch, so more examples a step and fewer steps than unpacked
    assert rows.schedule.batch_size == 8 and rows.schedule.batch_examples == 0
    assert rows.schedule.steps_per_epoch < unpacked.schedule.steps_per_epoch / 2
    # examples: the rows that hold about 8 examples, and about the unpacked run's step count
    assert ex.schedule.batch_unit == "examples" and ex.schedule.batch_examples == 8
    assert ex.schedule.batch_size == round(8 / per_row) > 1
    assert ex.schedule.rows_per_epoch == rows.schedule.rows_per_epoch       # the same packing
    assert abs(ex.schedule.examples_per_step - 8) <= per_row / 2 + 1e-9
    assert ex.schedule.unpacked_total_steps == unpacked.schedule.total_steps
    # the runtime's batcher follows the plan: it refuses a step count that is not the plan's
    train, _ = build.batches(ex)
    assert train.steps_per_epoch == ex.schedule.steps_per_epoch
    # examples a step: each row's segments (ids restart at 1 in every row)
    seen = [int(b["segment_ids"].max(axis=-1).sum()) for b in train.epoch_batches(0)]
    assert sum(seen) == n and min(seen) >= 1
    assert abs(np.mean(seen) - 8) <= per_row / 2 + 1e-9


def test_examples_unit_never_goes_below_one_row(tiny_chat_dir, tmp_path):
    plan = compile_with(tiny_chat_dir, tmp_path, unit="examples", batch_size=1)
    assert plan.schedule.batch_size == 1 and plan.schedule.batch_examples == 1


@pytest.mark.parametrize("pack", [False])
def test_examples_unit_unpacked_is_plain(tiny_chat_dir, tmp_path, pack):
    plan = compile_with(tiny_chat_dir, tmp_path, unit="examples", pack=pack)
    assert plan.schedule.batch_size == 8 and plan.schedule.batch_examples == 0


def test_plan_text_says_what_the_batch_holds(tune_cli, tmp_path, tiny_chat_dir):
    ids, prompt_lens = synthetic_examples(60, seed=2, low=11)
    rows = [{"text": " ".join(f"w{t}" for t in x[:p]), "label": " ".join(f"w{t}" for t in x[p:-1])}
            for x, p in zip(ids, prompt_lens)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = tune_cli("plan", f"model.path={tiny_chat_dir}", f"data.path={data}",
                              "template.chat=false", "data.max_length=48", "data.task=generation",
                              "schedule.batch_size=8", "schedule.batch_unit=examples")
    assert code == 0, err
    text = " ".join((out + err).split())
    assert "about 8 examples (schedule.batch_unit=examples)" in text
    code, out, err = tune_cli("plan", f"model.path={tiny_chat_dir}", f"data.path={data}",
                              "schedule.batch_unit=tokens")
    assert code == 2 and "schedule.batch_unit" in out + err
