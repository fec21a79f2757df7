"""The Plan: JSON round trip, content hash (stable, data-sensitive, blind to run dirs), atomic writes,
the token cache on a second compile, the schema against conf/, and the printed summary."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import yaml

from compiler import compile as compile_mod
from compiler import safety, schema
from compiler.compile import compile_plan
from core.errors import PlanError
from core.files import write_atomic
from core.plan import Plan
from tests.conftest import clf_rows, write_jsonl

CONF = Path(__file__).resolve().parents[1] / "conf"


def base_config(data_path, **sections) -> dict:
    """The composed default config (the schema's defaults) with data.path set, as compile_plan
    takes it."""
    cfg = schema.defaults()
    cfg["data"]["path"] = str(data_path)
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", clf_rows(300, seed=3))


def test_round_trip_and_stable_json(data_file, smollm2_dir):
    plan = compile_plan(base_config(data_file), recipe_info=None)
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    doc = json.loads(text)
    assert list(doc) == sorted(doc)
    assert plan.is_consistent()
    assert isinstance(plan.warnings, tuple)
    # what the runtime reads is resolved: no "auto", no -1, exact step counts
    assert (plan.runtime.dtype, plan.runtime.param_dtype) == ("float32", "float32")   # CPU
    assert plan.runtime.matmul_dtype in ("float32", "bfloat16")  # bfloat16 on CPUs with bf16 dots
    assert plan.runtime.mesh.shape == (1, 1, 1) and plan.runtime.devices.platform == "cpu"
    assert plan.model.config.num_layers == 30 and plan.model.config.head_dim == 64
    assert plan.model.eos_token == "<|im_end|>" and plan.model.eos_token_ids == (2,)
    s = plan.schedule
    assert s.steps_per_epoch > 0 and s.total_steps == s.steps_per_epoch and s.seq_len == 512
    assert (s.beta1, s.beta2, s.eps) == (0.9, 0.999, 1e-8) and s.warmup_steps == round(0.05 * s.total_steps)
    assert Path(plan.data.cache).is_file() and plan.data.key
    assert plan.adapter.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (plan.eval.metric, plan.eval.batch_size, plan.runtime.ce_chunk) == ("accuracy", 16, 2048)
    assert plan.template.chat and plan.template.chat_template == plan.model.chat_template


def test_old_and_malformed_plans_are_refused_not_misread(data_file, smollm2_dir, tmp_path):
    doc = compile_plan(base_config(data_file), recipe_info=None).to_dict()
    old = {"version": 1, "hash": "x", "config": doc["config"], "recipe": None, "model": {},
           "data": {}, "template": {}, "adapter": {}, "schedule": {}, "resources": {}, "warnings": []}
    (tmp_path / "plan.json").write_text(json.dumps(old))
    with pytest.raises(PlanError, match="older tune .*plan format 1.*recompile") as e:
        Plan.load(tmp_path / "plan.json")
    assert e.value.file == str(tmp_path / "plan.json")
    bad = json.loads(json.dumps(doc))
    bad["schedule"]["total_steps"] = "many"
    with pytest.raises(PlanError, match=r"plan\.schedule\.total_steps: expected int"):
        Plan.from_dict(bad)
    bad = json.loads(json.dumps(doc))
    bad["runtime"]["mesh"]["pipeline"] = 2
    with pytest.raises(PlanError, match="unknown field.*pipeline"):
        Plan.from_dict(bad)
    del bad["runtime"]["mesh"]
    with pytest.raises(PlanError, match="missing field.*mesh"):
        Plan.from_dict(bad)
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")


def test_hash_stable_and_sensitive(tmp_path, data_file, smollm2_dir):
    a = compile_plan(base_config(data_file), recipe_info=None)
    b = compile_plan(base_config(data_file), recipe_info=None)
    assert a.hash == b.hash
    # the run dir and the prompt are not part of it
    c = compile_plan({**base_config(data_file), "run": "/somewhere", "prompt": "hi"}, recipe_info=None)
    assert c.hash == a.hash
    # the same bytes under another name: same plan
    copy = write_jsonl(tmp_path / "elsewhere" / "copy.jsonl", clf_rows(300, seed=3))
    assert compile_plan(base_config(copy), recipe_info=None).hash == a.hash
    # a data change, or a config change, changes it
    write_jsonl(data_file, clf_rows(301, seed=3))
    assert compile_plan(base_config(data_file), recipe_info=None).hash != a.hash
    write_jsonl(data_file, clf_rows(300, seed=3))
    assert compile_plan(base_config(data_file), recipe_info=None).hash == a.hash
    d = compile_plan(base_config(data_file, adapter={"rank": 8}), recipe_info=None)
    assert d.hash != a.hash


def test_edited_plan_is_inconsistent(data_file, smollm2_dir):
    plan = compile_plan(base_config(data_file), recipe_info=None)
    for section, key, value in (("config", None, None), ("schedule", "total_steps", 999),
                                ("runtime", "dtype", "bfloat16"), ("adapter", "alpha", 1.0)):
        doc = plan.to_dict()
        if section == "config":
            doc["config"]["schedule"]["lr"] = 0.1
        else:
            doc[section][key] = value
        assert not Plan.from_dict(doc).is_consistent(), section
    doc = plan.to_dict()
    doc["estimates"]["step_time_s"] = 1.0        # an opinion, not part of what is trained
    assert Plan.from_dict(doc).is_consistent()


def test_newer_plan_version_refused(data_file, smollm2_dir):
    doc = compile_plan(base_config(data_file), recipe_info=None).to_dict()
    doc["version"] = 99
    with pytest.raises(PlanError, match="newer"):
        Plan.from_dict(doc)


def test_write_atomic(tmp_path, monkeypatch):
    target = tmp_path / "run" / "plan.json"
    write_atomic(target, "first\n")
    assert target.read_text() == "first\n"

    import os
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_atomic(target, "second\n")
    monkeypatch.setattr(os, "replace", real_replace)
    assert target.read_text() == "first\n"              # never half-written
    assert [p.name for p in target.parent.iterdir()] == ["plan.json"]   # no temporary left


def test_second_compile_uses_the_token_cache(tmp_path, smollm2_dir, monkeypatch):
    rows = [{"text": f"{time.time_ns()} unique row {i} " + "with a few more words " * 8,
             "label": ("Alpha", "Beta", "Gamma")[i % 3]} for i in range(3000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    cfg = base_config(path)
    t0 = time.perf_counter()
    first = compile_plan(cfg, recipe_info=None)
    cold = time.perf_counter() - t0

    import compiler.examples as ex
    calls = []
    real = ex._encode_unique
    monkeypatch.setattr(ex, "_encode_unique", lambda *a, **k: calls.append(1) or real(*a, **k))
    t0 = time.perf_counter()
    second = compile_plan(base_config(path), recipe_info=None)
    warm = time.perf_counter() - t0
    assert calls == []                       # nothing tokenised the second time
    assert second.hash == first.hash and second.data.cache == first.data.cache
    print(f"compile: cold {cold:.3f}s, warm {warm:.3f}s")  # speed is reported, not asserted


def test_eval_and_generate_compile_without_training_data(tmp_path, smollm2_dir):
    test = write_jsonl(tmp_path / "test.jsonl", clf_rows(40, seed=5))
    cfg = base_config(None)
    cfg["data"]["path"] = None
    cfg["data"]["test_path"] = str(test)
    plan = compile_plan(cfg, recipe_info=None, command="eval")
    assert plan.data.sizes == {"train": 0, "val": 0, "test": 40}
    assert plan.schedule.total_steps == 0
    cfg["data"]["test_path"] = None
    plan = compile_plan(cfg, recipe_info=None, command="generate")
    assert plan.data.cache is None
    with pytest.raises(PlanError, match="no training data"):
        compile_plan(cfg, recipe_info=None, command="plan")


def test_test_rows_seen_in_training_warn(tmp_path, smollm2_dir):
    rows = clf_rows(300, seed=4)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows[:10] + clf_rows(30, seed=8))
    cfg = base_config(train)
    cfg["data"]["test_path"] = str(test)
    plan = compile_plan(cfg, recipe_info=None)
    assert any("10 of 40 test rows also appear" in w for w in plan.warnings)


# ------------------------------------------------------------------------------ schema

def test_conf_declares_no_default_twice():
    """The schema is the one source of defaults: the primary config picks the groups' default
    options (the schema's, registered with Hydra), and every option file in conf/ carries only keys
    whose value differs from that default, each a key of the schema; each one validates."""
    primary = yaml.safe_load((CONF / "config.yaml").read_text())
    picks = {k: v for e in primary["defaults"] if isinstance(e, dict) for k, v in e.items()
             if "/" not in k and not k.startswith("override")}
    assert picks == schema.DEFAULT_OPTIONS
    assert "command_keys" in primary["defaults"]
    assert set(primary) == {"defaults", "hydra"}          # no key of tune's own restated
    files = [f for group in schema.GROUPS for f in sorted((CONF / group).glob("*.yaml"))]
    assert len(files) >= 9
    for f in files:
        group, body = f.parent.name, yaml.safe_load(f.read_text())
        assert body.pop("defaults") == [schema.DEFAULT_OPTIONS[group], "_self_"], f
        assert f.stem != schema.DEFAULT_OPTIONS[group], f
        default = schema.defaults(group)
        for key, value in body.items():
            path = f"{group}.{key}"
            assert path in schema.BY_PATH or isinstance(value, dict), (f, key)
            if isinstance(value, dict):
                for k, v in value.items():
                    assert v != default[key][k], (f, f"{key}.{k} restates its default")
            else:
                assert schema.coerce(schema.BY_PATH[path], value) != default[key], \
                    (f, f"{key} restates its default")
        merged = {**default, **{k: ({**default[k], **v} if isinstance(v, dict) else v)
                                for k, v in body.items()}}
        schema.validate({group: merged})


def test_allowed_values_in_conf_comments_are_the_schemas():
    """A comment in conf/ that lists a key's values (`xla | cudnn | ...`) lists the schema's."""
    import re

    for f in CONF.rglob("*.yaml"):
        group = f.parent.name
        for line in f.read_text().splitlines():
            m = re.match(r"\s*(\w+):[^#]*#\s*([\w\-]+(?:\s*\|\s*[\w\-]+)+)", line)
            if not m:
                continue
            key = schema.BY_PATH[f"{group}.{m.group(1)}"]
            listed = [w.strip() for w in m.group(2).split("|")]
            assert set(listed) == set(key.choices), (f, line)


def test_help_lists_every_key_with_its_default_and_values(tune_cli):
    rc, out, err = tune_cli("--help")
    assert rc == 0, err
    text = " ".join(out.split())
    for path, allowed, doc in schema.describe_keys():
        assert f"{path} " in text and f"{allowed}: " in text, path
    assert "runtime.attention auto auto|xla|cudnn|pallas:" in text


def test_schema_normalises():
    cfg, warnings = schema.validate({"adapter": {"targets": "q_proj,v_proj", "rank": "8"},
                                     "schedule": {"lr": "3e-4", "warmup": 10.0}})
    assert cfg["adapter"]["targets"] == ["q_proj", "v_proj"] and cfg["adapter"]["rank"] == 8
    assert cfg["schedule"]["lr"] == 3e-4 and cfg["schedule"]["warmup"] == 10
    assert cfg["data"]["max_length"] == 512 and warnings == []
    assert schema.validate({"adapter": {"targets": ["all-linear"]}})[0]["adapter"]["targets"] == "all-linear"


@pytest.mark.parametrize("key, suggestion", [
    ("schedule.learning_rate", "schedule.lr"), ("adapter.lora_alpha", "adapter.alpha"),
    ("data.max_seq_len", "data.max_length"), ("schedule.gradient_accumulation_steps",
                                              "schedule.grad_accum"),
    ("eval.metrc", "eval.metric"), ("data.lr", "schedule.lr"),
])
def test_suggestions(key, suggestion):
    assert f"`{suggestion}`" in schema.suggest(key)


# ------------------------------------------------------------------------------ safety

@pytest.mark.parametrize("text, names", [
    ("${oc.env:HOME}", ["oc.env"]), ("x ${eval:1+1}", ["eval"]), ("${a.b}", []),
    ("plain {text}", []), ("${foo.${oc.decode:x}}", ["oc.decode"]), ("${ now : %Y}", ["now"]),
])
def test_resolver_calls(text, names):
    assert safety.resolver_calls(text) == names


def test_check_config_ignores_hydra_section():
    safety.check_config({"hydra": {"run": {"dir": "outputs/${now:%Y}"},
                                   "launcher": {"_target_": "x"}}, "data": {"path": "${run}"}})
    with pytest.raises(PlanError, match="_partial_"):
        safety.check_config({"adapter": {"_partial_": True}})
    with pytest.raises(PlanError, match="oc.env"):
        safety.check_config({"template": {"system": ["${oc.env:X}"]}})


# ------------------------------------------------------------------------------ summary

def test_summary_panels_and_marked_examples(tmp_path, smollm2_dir):
    from rich.console import Console

    from compiler.summary import marked_text, print_plan

    path = write_jsonl(tmp_path / "few.jsonl", clf_rows(150, seed=6))
    plan = compile_plan(base_config(path, schedule={"lr": 0.05}), recipe_info=None)
    buf = io.StringIO()
    print_plan(plan, run_dir=tmp_path, console=Console(file=buf, width=120, color_system=None))
    out = buf.getvalue()
    for title in ("model", "data", "template", "adapter", "schedule", "resources", "warnings (2)"):
        assert f"─ {title} " in out, title
    assert "usual range" in out and "fewer than 200" in out
    assert "examples a step" in out and "(unpacked:" in out
    assert "p50" in out and "p95" in out and "memory per device" in out
    assert out.count("example ") >= 2 and "⟦" not in out
    text = marked_text("prompt ⟦answer<|im_end|>⟧")
    assert text.plain == "prompt answer<|im_end|>"
    assert any("green" in str(span.style) and text.plain[span.start:span.end] == "answer<|im_end|>"
               for span in text.spans)
    assert plan.to_json() not in out            # a summary, not a JSON dump


def test_attention_blocks_in_plan_summary_and_memory(tmp_path, data_file, smollm2_dir):
    from rich.console import Console

    from compiler.summary import print_plan

    def plan_and_text(block):
        plan = compile_plan(base_config(data_file, data={"max_length": 256},
                                        runtime={"attention_block": block}), recipe_info=None)
        buf = io.StringIO()
        print_plan(plan, run_dir=tmp_path, console=Console(file=buf, width=160, color_system=None))
        return plan, buf.getvalue()

    blocked, text = plan_and_text(64)
    assert blocked.runtime.attention_block == 64 and blocked.schedule.seq_len == 256
    assert "causal blocks of 64 query rows (4 a row of 256)" in text
    whole, text = plan_and_text(0)
    assert "xla, whole rows" in text
    # 4 blocks keep 64·(64 + 128 + 192 + 256) of the 256² score entries: 5/8
    memory = blocked.estimates.memory["attention"] / whole.estimates.memory["attention"]
    assert memory == pytest.approx(5 / 8, rel=1e-6)


def test_compile_module_never_imports_jax():
    import subprocess
    import sys

    code = ("import sys, tune.cli, tune.commands, compiler.compile, compiler.summary, compiler.recipes; "
            "assert not any(m == 'jax' or m.startswith(('jax.', 'flax', 'optax')) for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith(('jax', 'flax', 'optax')))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(compile_mod.__file__).parents[1])


def test_runtime_never_imports_hydra():
    import subprocess
    import sys

    code = ("import sys, runtime.run, runtime.evaluate, runtime.generate, runtime.report, "
            "runtime.export, runtime.checkpoint; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(compile_mod.__file__).parents[1])


def test_matmul_dtype_auto_follows_the_cpu(data_file, smollm2_dir, monkeypatch):
    """runtime.matmul_dtype=auto: bfloat16 operands under float32 compute only on a CPU that multiplies
    bfloat16 natively; an explicit value is kept; a bfloat16 compute dtype multiplies in bfloat16."""
    from compiler import estimates

    def resolved(has_bf16, **runtime):
        monkeypatch.setattr(estimates, "cpu_has_bf16_dot", lambda: has_bf16)
        rt = compile_plan(base_config(data_file, runtime=runtime), recipe_info=None).runtime
        return rt.dtype, rt.matmul_dtype

    assert resolved(True) == ("float32", "bfloat16")
    assert resolved(False) == ("float32", "float32")
    assert resolved(True, matmul_dtype="float32") == ("float32", "float32")
    assert resolved(False, matmul_dtype="bfloat16") == ("float32", "bfloat16")
    assert resolved(False, dtype="bfloat16") == ("bfloat16", "bfloat16")


def test_cpu_bf16_flag_read_from_cpuinfo(tmp_path, monkeypatch):
    from compiler import estimates

    def has(flags):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        real = Path

        monkeypatch.setattr(estimates, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real(p))
        return estimates.cpu_has_bf16_dot()

    assert has("fpu sse avx512f avx512_bf16 avx512_vnni")
    assert has("fpu amx_tile amx_bf16")
    assert not has("fpu sse avx2 avx512f")


def test_row_length_packs_short_examples_tighter(data_file, smollm2_dir):
    """Examples just over half a row take a row each; the plan says how full its rows are, and
    longer rows (runtime.row_length) hold several examples (fewer rows, fuller), every example still
    in exactly one row."""
    from core.token_cache import load_examples
    from core.packing import epoch_rows, example_slots

    first = compile_plan(base_config(data_file), recipe_info=None)
    lengths = [len(x) for x in load_examples(first.data.cache).split("train")[0]]
    max_length = 2 * (min(lengths) - 1) - 1           # two examples never share a row
    assert max_length >= max(lengths)                 # ... and none is truncated
    plan = compile_plan(base_config(data_file, data={"max_length": max_length}), recipe_info=None)
    s = plan.schedule
    assert s.seq_len == max_length and s.rows_per_epoch == plan.data.sizes["train"]
    assert 0.5 < s.row_fill < 0.6

    longer = compile_plan(base_config(data_file, data={"max_length": max_length},
                                      runtime={"row_length": 4 * max_length}), recipe_info=None)
    s4 = longer.schedule
    assert s4.seq_len == 4 * max_length and s4.tokens_per_step == s4.global_batch * 4 * max_length
    assert s4.row_fill > 0.9 and s4.rows_per_epoch * 6 <= s.rows_per_epoch
    # the runtime's rows are the plan's: every example once, none over the row
    ids, _ = load_examples(longer.data.cache).split("train")
    slots = [example_slots(len(x)) for x in ids]
    rows = epoch_rows(slots, s4.seq_len, pack=True, seed=0, epoch=0)
    assert len(rows) == s4.rows_per_epoch
    assert sorted(i for r in rows for i in r) == list(range(len(ids)))
    assert max(sum(slots[i] for i in r) for r in rows) <= s4.seq_len


@pytest.mark.parametrize("runtime, needle", [
    ({"row_length": 64}, "cannot hold an example of data.max_length=128"),
    ({"row_length": 512, "pack": False}, "runtime.pack=false"),
])
def test_row_length_errors(data_file, smollm2_dir, runtime, needle):
    with pytest.raises(PlanError) as e:
        compile_plan(base_config(data_file, data={"max_length": 128}, runtime=runtime),
                     recipe_info=None)
    assert e.value.key == "runtime.row_length" and needle in str(e.value)


def test_packing_that_cuts_the_steps_is_said(data_file, smollm2_dir):
    """Packing several examples per row makes an epoch fewer, larger steps: the plan counts the
    examples a step holds and the steps the same epochs take unpacked; unpacked, the two agree."""
    import math

    plan = compile_plan(base_config(data_file), recipe_info=None)
    s, n = plan.schedule, plan.data.sizes["train"]
    assert s.unpacked_total_steps == math.ceil(n / s.global_batch) * s.epochs
    assert s.total_steps * 3 < s.unpacked_total_steps           # short rows: many per 512 tokens
    assert s.examples_per_step == pytest.approx(n / s.rows_per_epoch * s.global_batch, abs=0.01)
    unpacked = compile_plan(base_config(data_file, runtime={"pack": False}), recipe_info=None)
    u = unpacked.schedule
    assert u.total_steps == u.unpacked_total_steps == s.unpacked_total_steps
    assert u.examples_per_step == u.global_batch
