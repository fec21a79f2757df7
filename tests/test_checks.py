"""What compile refuses, and what it only warns about — each fed through the real command line.

Every refusal: exit code 2, one paragraph naming the key (or file:line), no traceback, no run dir.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import clf_rows, write_jsonl


def flat(text: str) -> str:
    """Terminal output as one line of words: panel borders and line breaks removed."""
    return " ".join(text.replace("│", " ").split())


def refused(result, *needles, tmp_path=None):
    rc, out, err = result
    assert rc == 2, (rc, out, err)
    text = " ".join(err.split())
    for needle in needles:
        assert needle in text, (needle, err)
    assert "Traceback" not in out + err
    if tmp_path is not None:
        assert not (tmp_path / "run").exists(), "a failed compile left its run directory"
        assert not any((tmp_path / "outputs").rglob("*"))
    return text


def plan(tune_cli, *overrides, data="data/train.jsonl"):
    args = ["plan", "hydra.run.dir=run"]
    if data:
        args.append(f"data.path={data}")
    return tune_cli(*args, *overrides)


# ------------------------------------------------------------------------------ keys and types

def test_unknown_key_did_you_mean(tune_cli, clf_data, tmp_path):
    clf_data()
    refused(plan(tune_cli, "schedule.learning_rate=1e-4"), "schedule.learning_rate",
            "Did you mean `schedule.lr`?", tmp_path=tmp_path)


def test_unknown_key_in_other_section(tune_cli, clf_data, tmp_path):
    clf_data()
    refused(plan(tune_cli, "adapter.rnk=8"), "adapter.rnk", "Did you mean `adapter.rank`?",
            tmp_path=tmp_path)


def test_wrong_type(tune_cli, clf_data, tmp_path):
    clf_data()
    refused(plan(tune_cli, "adapter.rank=abc"), "adapter.rank", "must be an integer, got 'abc'",
            tmp_path=tmp_path)


@pytest.mark.parametrize("rank", ["0", "-1"])
def test_rank_range(tune_cli, clf_data, tmp_path, rank):
    clf_data()
    refused(plan(tune_cli, f"adapter.rank={rank}"), "adapter.rank", "must be at least 1",
            tmp_path=tmp_path)


@pytest.mark.parametrize("override, needle", [
    ("adapter.alpha=0", "adapter.alpha: must be greater than 0"),
    ("adapter.dropout=1.0", "adapter.dropout: must be less than 1"),
    ("schedule.lr=-1e-4", "schedule.lr: must be greater than 0"),
    ("schedule.batch_size=0", "schedule.batch_size: must be at least 1"),
    ("data.overlength=cut", "data.overlength: must be one of truncate, drop"),
    ("template.chat=maybe", "template.chat: must be true or false"),
    ("schedule.warmup=2.5", "schedule.warmup: must be a fraction below 1 or a whole number"),
    ("runtime.row_length=64", "runtime.row_length: 64 tokens per row cannot hold an example of "
                              "data.max_length=512"),
    ("runtime.row_length=4", "runtime.row_length: must be at least 8"),
])
def test_ranges_and_choices(tune_cli, clf_data, tmp_path, override, needle):
    clf_data()
    refused(plan(tune_cli, override), needle, tmp_path=tmp_path)


def test_unknown_group_option(tune_cli, clf_data, tmp_path):
    clf_data()
    refused(plan(tune_cli, "adapter=all-linaer"), "unknown option `all-linaer`",
            "Did you mean `all-linear`?", tmp_path=tmp_path)


def test_adapter_targets_list_valid_modules(tune_cli, clf_data, tmp_path):
    clf_data()
    text = refused(plan(tune_cli, "adapter.targets=[q_prj]"), "adapter.targets", "`q_prj`",
                   "Did you mean `q_proj`?", tmp_path=tmp_path)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in text


def test_mesh_must_match_devices(tune_cli, clf_data, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")   # one CPU device, whatever the machine has
    clf_data()
    refused(plan(tune_cli, "runtime.mesh.data=2"), "runtime.mesh", "spans 2 devices",
            tmp_path=tmp_path)
    refused(plan(tune_cli, "runtime.mesh.fsdp=-1"), "runtime.mesh", "at most one axis may be -1",
            "data is -1 by default", "runtime.mesh.data=1 runtime.mesh.fsdp=-1", "runtime=fsdp",
            tmp_path=tmp_path)


def test_memory_that_clearly_does_not_fit(tune_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    long = [{"text": "word " * 3000 + str(i), "label": "Alpha"} for i in range(80)]
    write_jsonl(tmp_path / "data" / "train.jsonl", long)
    refused(plan(tune_cli, "data.max_length=4096", "schedule.batch_size=64",
                 "runtime.ce_chunk=262144"),
            "runtime", "clearly exceeds", "schedule.batch_size", tmp_path=tmp_path)


# ------------------------------------------------------------------------------ data

def test_missing_data_file(tune_cli, tmp_path):
    text = refused(plan(tune_cli, data="data/nope.jsonl"), "data.path", "`data/nope.jsonl` not found",
                   tmp_path=tmp_path)
    assert str(tmp_path / "data" / "nope.jsonl") in text     # says where it looked


def test_no_data_at_all(tune_cli, tmp_path):
    refused(plan(tune_cli, data=None), "data.path", "no training data", "+recipe=NAME",
            tmp_path=tmp_path)


def test_broken_jsonl_line_57(tune_cli, tmp_path):
    path = tmp_path / "data" / "train.jsonl"
    write_jsonl(path, clf_rows(300))
    lines = path.read_text().splitlines()
    lines[56] = '{"text": "broken, "label": "Alpha"}'
    path.write_text("\n".join(lines) + "\n")
    refused(plan(tune_cli), f"{path}:57", "data.path", "line 57", tmp_path=tmp_path)


def test_template_placeholder_not_a_field(tune_cli, clf_data, tmp_path):
    clf_data()
    text = refused(plan(tune_cli, "template.prompt='Q: {question}'"), "template.prompt",
                   "{question}", tmp_path=tmp_path)
    assert "`text`" in text and "`label`" in text    # the fields that do exist


def test_empty_data_file(tune_cli, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    refused(plan(tune_cli), "data.path", "empty", tmp_path=tmp_path)


def test_all_rows_unusable(tune_cli, tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "x", "label": " "}] * 20)
    refused(plan(tune_cli), "data.path", "no usable rows", tmp_path=tmp_path)


def test_fewer_rows_than_the_batch(tune_cli, clf_data, tmp_path):
    clf_data(20)
    refused(plan(tune_cli, "schedule.batch_size=16", "schedule.grad_accum=2"), "data.path",
            "fewer than one optimizer step's batch", "16 × 2 = 32", tmp_path=tmp_path)


def test_150_rows_warn_but_compile(tune_cli, clf_data, tmp_path):
    clf_data(158)   # 5% held out for validation: 150 training rows
    rc, out, err = plan(tune_cli)
    assert rc == 0, err
    assert "150 usable training rows" in flat(out)
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert any("fewer than 200" in w for w in doc["warnings"])
    assert doc["data"]["sizes"]["train"] == 150


def test_dropped_rows_counted(tune_cli, tmp_path):
    rows = clf_rows(300)
    rows += [rows[0], rows[1], {"text": "no label here"}, {"text": "   ", "label": "Beta"}]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    rc, out, err = plan(tune_cli)
    assert rc == 0, err
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert doc["data"]["train"]["dropped"] == {"missing_field": 1, "empty_field": 1,
                                                       "duplicate": 2}
    assert doc["data"]["train"]["kept"] == 300


def test_overlength_truncated_and_counted(tune_cli, tmp_path):
    rows = clf_rows(250) + [{"text": "long " * 400 + str(i), "label": "Beta"} for i in range(10)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    rc, out, err = plan(tune_cli, "data.max_length=128")
    assert rc == 0, err
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert doc["data"]["truncated"] >= 9        # one may sit in the validation split... all count
    assert any("truncated" in w for w in doc["warnings"])
    rc, out, err = plan(tune_cli, "data.max_length=128", "data.overlength=drop")
    assert rc == 0, err
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert doc["data"]["dropped_too_long"] == 10 and doc["data"]["truncated"] == 0


def test_lr_outside_usual_range_warns(tune_cli, clf_data, tmp_path):
    clf_data()
    rc, out, err = plan(tune_cli, "schedule.lr=0.2")
    assert rc == 0, err
    assert "for AdamW-based LoRA the usual range is about 1e-5 to 5e-4" in flat(out)
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert any("usual range is about 1e-5 to 5e-4" in w for w in doc["warnings"])
    assert doc["config"]["schedule"]["lr"] == 0.2


def test_eval_needs_a_test_file(tune_cli, clf_data, tmp_path):
    clf_data()
    refused(tune_cli("eval", "data.path=data/train.jsonl", "hydra.run.dir=run"), "data.test_path",
            "tune eval", tmp_path=tmp_path)


# ------------------------------------------------------------------------------ recipes

def write_recipe(tmp_path, name, text):
    path = tmp_path / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_recipe(tune_cli, tmp_path):
    text = refused(tune_cli("plan", "+recipe=legl", "hydra.run.dir=run"), "unknown recipe `legl`",
                   "Did you mean `legal`?", "Recipes found:", "Looked in:", tmp_path=tmp_path)
    for name in ("legal", "medical", "finance", "customer_support"):
        assert name in text
    assert str(tmp_path / "recipes") in text and "installed" in text


def test_invalid_yaml_recipe(tune_cli, tmp_path):
    path = write_recipe(tmp_path, "broken", "# @package _global_\n# broken\ndata:\n  path: [a, b\n"
                                            "schedule:\n  lr: 1\n")
    text = refused(tune_cli("plan", "+recipe=broken", "hydra.run.dir=run"), "not valid YAML",
                   tmp_path=tmp_path)
    assert f"{path}:5" in text or f"{path}:4" in text


def test_recipe_target_refused(tune_cli, tmp_path):
    path = write_recipe(tmp_path, "evil", "# @package _global_\n# evil\nmodel:\n"
                                          "  _target_: os.system\n  path: null\n")
    refused(tune_cli("plan", "+recipe=evil", "hydra.run.dir=run"), f"{path}:4", "model._target_",
            "a recipe is data, never code", tmp_path=tmp_path)


def test_recipe_resolver_refused(tune_cli, tmp_path):
    path = write_recipe(tmp_path, "env", "# @package _global_\n# env\ndata:\n"
                                         "  path: ${oc.env:HOME}/x.jsonl\n")
    refused(tune_cli("plan", "+recipe=env", "hydra.run.dir=run"), f"{path}:4", "data.path",
            "oc.env", "resolver calls are not allowed", tmp_path=tmp_path)


def test_recipe_hydra_callbacks_refused(tune_cli, tmp_path):
    write_recipe(tmp_path, "cb", "# @package _global_\n# cb\nhydra:\n  callbacks:\n    x:\n"
                                 "      foo: 1\n")
    refused(tune_cli("plan", "+recipe=cb", "hydra.run.dir=run"), "hydra.callbacks",
            "a recipe may set only", tmp_path=tmp_path)


def test_recipe_selecting_hydra_group_refused(tune_cli, tmp_path):
    write_recipe(tmp_path, "launch", "# @package _global_\n# l\ndefaults:\n"
                                     "  - override /hydra/launcher: basic\n  - _self_\n")
    refused(tune_cli("plan", "+recipe=launch", "hydra.run.dir=run"), "Hydra's own config groups",
            tmp_path=tmp_path)


def test_recipe_unknown_key_has_file_and_line(tune_cli, tmp_path):
    path = write_recipe(tmp_path, "typo", "# @package _global_\n# typo\nschedule:\n"
                                          "  lr: 2.0e-4\n  learning_rate: 1.0e-4\n")
    refused(tune_cli("plan", "+recipe=typo", "hydra.run.dir=run"), f"{path}:5",
            "Did you mean `schedule.lr`?", tmp_path=tmp_path)


def test_command_line_resolver_refused(tune_cli, clf_data, tmp_path):
    clf_data()
    refused(plan(tune_cli, "template.system=${oc.env:HOME}"), "template.system", "oc.env",
            tmp_path=tmp_path)


def test_plain_interpolation_allowed(tune_cli, clf_data, tmp_path):
    clf_data()
    rc, out, err = plan(tune_cli, "eval.max_new_tokens=${adapter.rank}")
    assert rc == 0, err
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert doc["config"]["eval"]["max_new_tokens"] == 16


def test_experimental_rerun_refused(tune_cli, tmp_path):
    refused(tune_cli("plan", "--experimental-rerun", "x.pickle"), "loads no pickles",
            tmp_path=tmp_path)


# ------------------------------------------------------------------------------ label sets

def _plan_json(tmp_path):
    return json.loads((tmp_path / "run" / "plan.json").read_text())


def test_classification_is_known_at_compile_time(tune_cli, tmp_path):
    rows = clf_rows(300, seed=1)
    rows += [{"text": f"rare clause {i}", "label": "Delta"} for i in range(3)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    test = clf_rows(30, seed=2) + [{"text": "a clause of a kind never trained", "label": "Omega"}]
    write_jsonl(tmp_path / "data" / "test.jsonl", test)
    rc, out, err = plan(tune_cli, "data.test_path=data/test.jsonl", "data.val_fraction=0")
    assert rc == 0, err
    doc = _plan_json(tmp_path)
    d = doc["data"]
    assert d["task"] == "classification" and doc["eval"]["mode"] == "constrained"
    assert [x["text"] for x in d["labels"]] == ["Alpha", "Beta", "Gamma", "Delta"]  # by frequency
    assert [x["count"] for x in d["labels"]] == [100, 100, 100, 3]
    from core.tokenizer import load_tokenizer

    tok = load_tokenizer(doc["model"]["dir"])
    assert all(tok.decode(x["ids"], skip_special_tokens=False) == x["text"] + "<|im_end|>"
               for x in d["labels"])
    # majority baseline: always "Alpha" on the 31 test rows (10 of them are Alpha)
    assert d["majority_baseline"] == pytest.approx(10 / 31)
    assert d["unseen_test_labels"] == ["omega"]
    text = flat(out)
    assert "1 test label(s) never occur in training" in text and "omega" in text
    assert "fewer than 5 training rows: Delta (3)" in text


def test_open_answers_are_generation(tune_cli, tmp_path):
    rows = [{"text": f"question {i}", "label": f"a free answer number {i}"} for i in range(250)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    rc, out, err = plan(tune_cli)
    assert rc == 0, err
    doc = _plan_json(tmp_path)
    assert doc["data"]["task"] == "generation" and doc["data"]["labels"] == []
    assert doc["eval"]["mode"] == "generate"
    refused(plan(tune_cli, "eval.mode=constrained", "hydra.run.dir=run2"), "eval.mode",
            "needs a closed label set")
    rc, out, err = plan(tune_cli, "data.task=classification", "hydra.run.dir=run3")
    assert rc == 0, err               # 250 labels: declared classification, more than auto allows
    assert json.loads((tmp_path / "run3" / "plan.json").read_text())["data"]["task"] == \
        "classification"


def test_declared_generation_keeps_free_decoding(tune_cli, clf_data, tmp_path):
    clf_data()
    rc, out, err = plan(tune_cli, "data.task=generation")
    assert rc == 0, err
    doc = _plan_json(tmp_path)
    assert doc["data"]["task"] == "generation" and doc["eval"]["mode"] == "generate"


# ------------------------------------------------------------------------------ bad model files

def _model_copy(tmp_path, **edits):
    """The embedded model's files in tmp_path/m, with edits: file name → new text (or a function of
    the parsed config.json for "config")."""
    import shutil

    from compiler.gguf import ensure_embedded_model

    out = tmp_path / "m"       # converted first, where nothing has converted it yet
    shutil.copytree(ensure_embedded_model(), out, dirs_exist_ok=True)
    for name, text in edits.items():
        if name == "config":
            cfg = json.loads((out / "config.json").read_text())
            (out / "config.json").write_text(json.dumps(text(cfg)))
        else:
            (out / name).write_text(text)
    return out


@pytest.mark.parametrize("edits, needles", [
    ({"config.json": "[1, 2]"}, ["config.json must hold a JSON object"]),
    ({"config": lambda c: {**c, "quantization_config": "awq"}}, ["quantized (awq)"]),
    ({"config": lambda c: {**c, "num_hidden_layers": "abc"}}, ["wrong type"]),
    ({"config": lambda c: {k: v for k, v in c.items() if k != "hidden_size"}}, ["lacks `hidden_size`"]),
    ({"tokenizer.json": "garbage{"}, ["tokenizer.json", "not a tokenizer"]),
    ({"tokenizer_config.json": "{not json"}, ["tokenizer_config.json", "not valid JSON"]),
    ({"config": lambda c: {**c, "num_hidden_layers": 0}}, ["num_hidden_layers=0"]),
    ({"config": lambda c: {**c, "num_attention_heads": 0}}, ["num_attention_heads=0"]),
    ({"config": lambda c: {**c, "vocab_size": -5}}, ["vocab_size=-5"]),
    ({"config": lambda c: {**c, "num_key_value_heads": 2}}, ["do not group evenly"]),
    ({"model.safetensors": "not a safetensors file at all"}, ["model.safetensors",
                                                             "is not a safetensors file"]),
    ({"config": lambda c: {**c, "intermediate_size": 1000}},
     ["wrong shape", "mlp.gate_proj.weight [1536, 576] (config.json implies [1000, 576])"]),
    ({"config": lambda c: {**c, "num_hidden_layers": 31}}, ["lacks model.layers.30."]),
])
def test_bad_model_files_are_exit_2(tune_cli, clf_data, tmp_path, edits, needles):
    clf_data()
    model = _model_copy(tmp_path, **edits)
    refused(plan(tune_cli, f"model.path={model}"), "model.path", *needles, tmp_path=tmp_path)


def test_a_group_given_a_value(tune_cli, clf_data, tmp_path):
    clf_data()
    refused(plan(tune_cli, "schedule=5"), "`schedule` is a config group", "schedule.KEY=VALUE",
            tmp_path=tmp_path)


# ------------------------------------------------------------------------------ bad data, odd schedules

@pytest.mark.parametrize("tail, needles", [
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + ', "label": "Alpha"}\n',
     ["train.jsonl:301", "nests JSON arrays or objects too deeply"]),
    ('{"text": "cut \\ud800 emoji", "label": "Alpha"}\n',
     ["train.jsonl:301", "lone surrogate escape"]),
])
def test_unreadable_rows_name_their_line(tune_cli, tmp_path, tail, needles):
    path = write_jsonl(tmp_path / "data" / "train.jsonl", clf_rows(300))
    with open(path, "a", encoding="utf-8") as f:
        f.write(tail)
    refused(plan(tune_cli), "data.path", *needles, tmp_path=tmp_path)


@pytest.mark.parametrize("override, needles", [
    ("schedule.seed=9223372036854775808", ["schedule.seed", "at most 4294967295"]),
    ("schedule.max_steps=100000000", ["schedule.max_steps", "at most 10000000"]),
])
def test_plans_that_could_not_train_are_refused(tune_cli, clf_data, tmp_path, override, needles):
    clf_data()
    refused(plan(tune_cli, override), *needles, tmp_path=tmp_path)


def test_warmup_longer_than_the_run_and_endless_runs_warn(tune_cli, clf_data, tmp_path):
    clf_data()
    rc, out, err = plan(tune_cli, "schedule.warmup=500")
    assert rc == 0 and "never reaches schedule.lr" in flat(out)
    rc, out, err = plan(tune_cli, "schedule.max_steps=2000000", "hydra.run.dir=run2")
    assert rc == 0 and "days by the plan's estimate" in flat(out)


def test_an_evaluation_batch_that_cannot_fit_is_refused(tune_cli, tmp_path):
    rc, out, err = tune_cli("plan", "+recipe=legal", "eval.batch_size=4096", "hydra.run.dir=run")
    text = refused((rc, out, err), "eval.batch_size", "scoring 4096 test rows at once",
                   "lower eval.batch_size")
    assert "KV cache" in text
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 0 and "evaluation (16 rows at once)" in out


# ------------------------------------------------------------------------------ adapter kinds

@pytest.mark.parametrize("override, needles", [
    ("adapter.train_modules=[lm_haed]", ["adapter.train_modules", "`lm_haed` is not a module",
                                         "Did you mean `lm_head`"]),
    ("adapter.train_modules=[q_norm]", ["adapter.train_modules", "`q_norm` is not a module"]),
    ("adapter.train_modules=[q_proj]", ["adapter.train_modules", "also a LoRA target",
                                        "drop q_proj from adapter.targets"]),
    ("adapter.train_modules=5", ["adapter.train_modules", "must be a list of module names"]),
    ("adapter.kind=vera", ["adapter.kind", "must be one of lora, dora"]),
    ("adapter.quantize=nf8", ["adapter.quantize", "must be one of none, int8, nf4"]),
])
def test_adapter_kind_quantisation_and_trained_modules_checked(tune_cli, clf_data, tmp_path,
                                                               override, needles):
    clf_data()
    refused(plan(tune_cli, override), *needles, tmp_path=tmp_path)


def test_plan_counts_trained_modules_and_quantised_weights(tune_cli, clf_data, tmp_path):
    """The embedded model ties its head to its embedding: naming either trains one matrix, counted
    once; nf4 stores the linear weights in 4.5 bits, and the memory figure shows it."""
    clf_data()
    rc, out, err = plan(tune_cli, "adapter.kind=dora", "adapter.train_modules=[lm_head,embed_tokens,norm]",
                        "adapter.quantize=nf4")
    assert rc == 0, err
    a = _plan_json(tmp_path)["adapter"]
    assert a["full_params"] == {"lm_head": 49152 * 576, "embed_tokens": 0, "norm": 576}
    lora = sum(30 * (16 * (576 + n) + n) for n in (576, 192, 192, 576))     # A, B, magnitude
    assert a["trainable_params"] == lora + 49152 * 576 + 576
    assert a["quantized_params"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    text = flat(out)
    assert "DoRA" in text and "one tied matrix" in text and "4-bit NormalFloat" in text
    quantised = _plan_json(tmp_path)["estimates"]["memory"]["weights"]
    rc, out, err = plan(tune_cli, "hydra.run.dir=run2")
    dense = json.loads((tmp_path / "run2" / "plan.json").read_text())["estimates"]["memory"]["weights"]
    saved = a["quantized_params"] * (4 - 0.5625)
    assert dense - quantised == pytest.approx(saved, rel=1e-6)


def test_the_mesh_counts_the_devices_of_every_process(tune_cli, clf_data, tmp_path, monkeypatch):
    """Process 1 of 2, four simulated devices each: the plan's mesh spans the job's 8 devices, and
    this process writes nothing (process 0 writes the run directory)."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    clf_data()
    rc, out, err = plan(tune_cli, "runtime.mesh.tensor=2", "runtime.mesh.fsdp=2")
    assert rc == 0, err
    assert not (tmp_path / "run").exists() and "plan written" not in out
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    rc, out, err = plan(tune_cli, "runtime.mesh.tensor=2", "runtime.mesh.fsdp=2")
    doc = _plan_json(tmp_path)
    assert doc["runtime"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert doc["runtime"]["devices"]["count"] == 8 and doc["runtime"]["devices"]["processes"] == 2
    refused(plan(tune_cli, "runtime.mesh.data=16", "hydra.run.dir=run2"), "runtime.mesh",
            "spans 16 devices", "8")
    rc, out, err = plan(tune_cli, "runtime.mesh.tensor=2", "hydra.run.dir=run3")
    assert rc == 0 and "runtime.mesh.tensor=2 does not divide the model's 9 attention heads " \
        "and 3 key/value heads" in flat(out)            # SmolLM2: a warning, the same numbers


# ---------------------------------------------------------------------------- attention kernels

def _gpus(monkeypatch, count: int):
    """The compiler sees `count` H100s (it finds devices without jax)."""
    from compiler import estimates

    monkeypatch.setattr(estimates, "detect_devices", lambda: {
        "platform": "gpu", "kind": "NVIDIA H100 80GB HBM3", "count": count, "local_count": count,
        "memory": 80 * 2**30, "peak_flops": 989e12})


def test_fused_attention_kernels_need_a_gpu(tune_cli, clf_data, tmp_path):
    clf_data()
    for kernel in ("cudnn", "pallas"):
        refused(plan(tune_cli, f"runtime.attention={kernel}"), "runtime.attention",
                f"{kernel} needs an NVIDIA GPU", "runtime.attention=auto or xla", tmp_path=tmp_path)


def test_pallas_attention_on_a_gpu_plan(tune_cli, clf_data, tmp_path, monkeypatch):
    """Rows a multiple of its 128-token blocks, one device; auto stays xla for packed rows and is
    cuDNN for unpacked bfloat16 ones."""
    clf_data()
    _gpus(monkeypatch, 1)
    refused(plan(tune_cli, "runtime.attention=pallas", "data.max_length=200"), "runtime.attention",
            "blocks of 128 tokens", "rows of 200", "e.g. 256", tmp_path=tmp_path)
    rc, out, err = plan(tune_cli, "runtime.attention=pallas", "data.max_length=256")
    assert rc == 0, err
    rt = _plan_json(tmp_path)["runtime"]
    assert (rt["attention"], rt["dtype"], rt["devices"]["platform"]) == ("pallas", "bfloat16", "gpu")
    assert _plan_json(tmp_path)["estimates"]["memory"]["attention"] == 0    # no score arrays
    for pack, kernel in (("true", "xla"), ("false", "cudnn")):
        rc, out, err = plan(tune_cli, f"runtime.pack={pack}", f"hydra.run.dir=run-{pack}")
        assert rc == 0, err
        doc = json.loads((tmp_path / f"run-{pack}" / "plan.json").read_text())
        assert doc["runtime"]["attention"] == kernel
    _gpus(monkeypatch, 2)
    refused(plan(tune_cli, "runtime.attention=pallas", "data.max_length=256", "schedule.batch_size=2",
                 "hydra.run.dir=run2"), "runtime.attention", "one device for now", "this mesh has 2")
