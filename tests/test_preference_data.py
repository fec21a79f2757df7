"""Preference data through the compiler: the formats it reads (text or chat-turn prompts, TRL's
implicit prompt, other field names), what it refuses with file and line (mixed formats, non-boolean
KTO labels, pairs for an objective that cannot use them), what it counts and drops (identical,
empty, duplicate pairs; replies too long), over length cutting the prompt and never a reply, the
token cache's units (pairs side by side, KTO's KL completions from another prompt) and init.run's
checks. Command-line refusals: exit code 2, one paragraph, no traceback."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import PlanError
from core.token_cache import load_examples
from tests.conftest import pref_plan, pref_rows, write_jsonl
from tests.test_checks import refused

CHAT = [{"role": "user", "content": "Where is my card?"}]


def _units(plan, split="train"):
    """(prompt ids, reply ids) of each example of a split, pairs as consecutive items."""
    ex = load_examples(plan.data.cache)
    ids, plens = ex.split(split)
    return [(list(x[:p]), list(x[p:])) for x, p in zip(ids, plens)]


def _words(tokenizer_dir, ids):
    from core.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir).decode(list(ids), skip_special_tokens=False)


# ------------------------------------------------------------------------------ formats

def test_pairs_are_units_of_chosen_then_rejected_with_one_prompt(tiny_chat_dir, tmp_path):
    rows = pref_rows(20)
    plan = pref_plan(tiny_chat_dir, tmp_path, rows=rows, n_test=4, n_val=2)
    assert plan.data.unit == 2 and plan.objective.kind == "dpo"
    assert plan.data.sizes == {"train": 14, "val": 2, "test": 4}      # units (pairs), not examples
    assert plan.schedule.seq_len == 2 * plan.data.max_length          # a pair shares one row
    assert plan.template.prompt == "{prompt}" and plan.template.response is None
    units = _units(plan, "test")
    assert len(units) == 8
    for (p_c, chosen), (p_r, rejected), row in zip(units[::2], units[1::2], rows[-4:]):
        assert p_c == p_r                                              # the same prompt tokens
        assert _words(tiny_chat_dir, p_c) == row["prompt"]
        assert _words(tiny_chat_dir, chosen) == row["chosen"] + " </s>"  # each reply ends with eos
        assert _words(tiny_chat_dir, rejected) == row["rejected"] + " </s>"
    assert plan.eval.mode == "preference" and plan.eval.metric == "preference_accuracy"


def test_chat_turn_prompts_and_the_implicit_prompt_give_the_same_tokens(tiny_chat_dir, tmp_path):
    """A prompt of turns goes through the chat template; TRL's implicit-prompt form (whole
    conversations in chosen and rejected, no prompt field) reads as the same pairs."""
    explicit, implicit = [], []
    for i, r in enumerate(pref_rows(12)):
        turns = [{"role": "user", "content": r["prompt"]}]
        explicit.append({"prompt": turns, "chosen": [{"role": "assistant", "content": r["chosen"]}],
                         "rejected": r["rejected"]})
        implicit.append({"chosen": turns + [{"role": "assistant", "content": r["chosen"]}],
                         "rejected": turns + [{"role": "assistant", "content": r["rejected"]}]})
    plans = []
    for name, rows in (("explicit", explicit), ("implicit", implicit)):
        d = tmp_path / name
        d.mkdir()
        plans.append(_chat_plan(tiny_chat_dir, d, rows))
    a, b = (_units(p) for p in plans)
    assert a == b and len(a) == 2 * plans[0].data.sizes["train"]
    prompt, chosen = a[0]
    text = _words(tiny_chat_dir, prompt)
    assert text.startswith("<|im_start|> user ") and text.endswith("<|im_start|> assistant")
    assert _words(tiny_chat_dir, chosen).endswith("<|im_end|>")       # the template's end of turn


def _chat_plan(model_dir, workdir, rows, **kw):
    from compiler import schema
    from compiler.compile import compile_plan

    path = write_jsonl(workdir / "pairs.jsonl", rows)
    cfg = schema.defaults()
    cfg["model"]["path"] = str(model_dir)
    cfg["data"].update(path=str(path), val_fraction=0.0, max_length=32, dedupe=False)
    cfg["objective"]["kind"] = kw.pop("objective", "dpo")
    cfg["schedule"]["batch_size"] = 2
    for key, value in kw.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return compile_plan(cfg, recipe_info=None, command="train")


def test_field_names_map_with_data_fields(tune_cli, tmp_path):
    rows = [{"question": f"Where is card {i}?", "good": f"It ships in {i} days.",
             "bad": "No idea."} for i in range(10)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    rc, out, err = tune_cli("plan", "objective=dpo", "data.path=pairs.jsonl", "hydra.run.dir=run",
                            "schedule.batch_size=2")
    refused((rc, out, err), "data.path", "has no field `chosen`", "data.fields.chosen")
    rc, out, err = tune_cli("plan", "objective=dpo", "data.path=pairs.jsonl", "hydra.run.dir=run",
                            "schedule.batch_size=2", "data.fields.prompt=question",
                            "data.fields.chosen=good", "data.fields.rejected=bad")
    assert rc == 0, err
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["data"]["sizes"]["train"] + plan["data"]["sizes"]["val"] == 10
    assert plan["template"]["prompt"] == "{question}"


# ------------------------------------------------------------------------------ refusals

def test_mixed_prompt_formats_are_refused_with_the_line(tune_cli, tmp_path):
    rows = [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}] * 2
    rows.append({"prompt": CHAT, "chosen": "Hello.", "rejected": "Go away."})
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    text = refused(tune_cli("plan", "objective=dpo", "data.path=pairs.jsonl", "hydra.run.dir=run"),
                   "data.path", "line 3", "mixed formats", "pairs.jsonl", tmp_path=tmp_path)
    assert "the prompt is turns, but the first row's is text" in text


def test_kto_label_must_be_a_boolean(tune_cli, tmp_path):
    rows = [{"prompt": "Hi", "completion": "Hello.", "label": True},
            {"prompt": "Hey", "completion": "Go away.", "label": "no"}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    refused(tune_cli("plan", "objective=kto", "data.path=rows.jsonl", "hydra.run.dir=run"),
            "data.path", "line 2", "field `label` is 'no', not a boolean", tmp_path=tmp_path)


def test_unpaired_rows_need_kto(tune_cli, tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Hi", "completion": "Hello.", "label": True}])
    refused(tune_cli("plan", "objective=dpo", "data.path=rows.jsonl", "hydra.run.dir=run"),
            "objective", "dpo trains on (chosen, rejected) pairs", "objective=kto",
            tmp_path=tmp_path)


def test_a_reply_that_is_not_the_assistants_is_refused(tune_cli, tmp_path):
    rows = [{"prompt": "Hi", "chosen": [{"role": "user", "content": "Hello."}],
             "rejected": "Go away."}]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    refused(tune_cli("plan", "objective=dpo", "data.path=pairs.jsonl", "hydra.run.dir=run"),
            "data.path", "line 1", "last turn must be the assistant's", tmp_path=tmp_path)


def test_template_messages_does_not_apply(tiny_chat_dir, tmp_path):
    with pytest.raises(PlanError) as e:
        _chat_plan(tiny_chat_dir, tmp_path, pref_rows(4), **{"template.messages": "prompt"})
    assert e.value.key == "template.messages"


# ------------------------------------------------------------------------------ counted, dropped

def test_identical_empty_and_duplicate_pairs_are_counted_and_dropped(tiny_chat_dir, tmp_path):
    rows = pref_rows(12)
    rows[1] = {**rows[1], "rejected": rows[1]["chosen"]}
    rows[2] = {**rows[2], "chosen": "  "}
    rows[3] = dict(rows[4])
    del rows[5]["rejected"]
    plan = _chat_plan(tiny_chat_dir, tmp_path, rows, **{"data.dedupe": True,
                                                          "template.chat": False})
    assert plan.data.train.dropped == {"missing_field": 1, "empty_field": 1, "identical": 1,
                                       "duplicate": 1}
    assert plan.data.sizes["train"] == 8


def test_over_length_cuts_the_prompt_never_a_reply(tiny_chat_dir, tmp_path):
    long_prompt = " ".join(f"w{11 + i % 80}" for i in range(40))
    rows = [{"prompt": long_prompt, "chosen": "w20 w21 w22", "rejected": "w30 w31"}] + pref_rows(6)
    plan = _chat_plan(tiny_chat_dir, tmp_path, rows, **{"template.chat": False})
    assert plan.data.truncated == 1 and plan.data.dropped_too_long == 0
    (p_c, chosen), (p_r, rejected) = _units(plan)[:2]
    assert len(p_c) + len(chosen) == plan.data.max_length                   # the longer side fits
    assert _words(tiny_chat_dir, chosen) == "w20 w21 w22 </s>"               # whole
    assert _words(tiny_chat_dir, rejected) == "w30 w31 </s>"
    assert _words(tiny_chat_dir, p_c) == " ".join(long_prompt.split()[-len(p_c):])  # its end kept
    assert any("prompts were cut from the start" in w for w in plan.warnings)
    # a reply that alone does not fit is refused, naming its line (tests/test_overlength.py)
    long_reply = {"prompt": "w12", "chosen": " ".join(["w40"] * 40), "rejected": "w41"}
    with pytest.raises(PlanError) as e:
        _chat_plan(tiny_chat_dir, tmp_path, rows + [long_reply], **{"template.chat": False})
    assert e.value.key == "data.max_length" and e.value.line == len(rows) + 1


# ------------------------------------------------------------------------------ KTO

def test_kto_unpairs_pairs_and_draws_kl_completions_from_other_prompts(tiny_chat_dir, tmp_path):
    rows = pref_rows(24)
    plan = pref_plan(tiny_chat_dir, tmp_path, objective="kto", rows=rows, n_test=4, n_val=0)
    ex = load_examples(plan.data.cache)
    labels = ex.unit_labels("train")
    assert plan.data.sizes["train"] == 40 == len(labels)            # 20 pairs → 40 KTO rows
    assert labels.sum() == 20                                        # desirable: the chosen
    units = _units(plan)
    completions = {tuple(c) for _, c in units[::2]}
    for (prompt, completion), (kl_prompt, kl_completion) in zip(units[::2], units[1::2]):
        assert kl_prompt == prompt
        assert tuple(kl_completion) in completions                  # another row's completion ...
        assert kl_completion != completion
    # ... never one of the same prompt
    by_prompt = {}
    for prompt, completion in units[::2]:
        by_prompt.setdefault(tuple(prompt), set()).add(tuple(completion))
    for prompt, kl in units[1::2]:
        assert tuple(kl) not in by_prompt[tuple(prompt)]
    assert ex.unit_labels("test") is None and plan.data.sizes["test"] == 4   # test: pairs


def test_kto_test_file_must_hold_pairs(tiny_chat_dir, tmp_path):
    rows = [{"prompt": f"w{11 + i}", "completion": f"w{40 + i}", "label": bool(i % 2)}
            for i in range(12)]
    with pytest.raises(PlanError) as e:
        pref_plan(tiny_chat_dir, tmp_path, objective="kto", rows=rows, n_test=4, n_val=0)
    assert e.value.key == "data.test_path" and "unpaired" in str(e.value)
    plan = pref_plan(tiny_chat_dir, tmp_path, objective="kto", rows=rows, n_test=0, n_val=0)
    assert plan.data.pairs["labels"]["train"] == {"desirable": 6, "undesirable": 6}


# ------------------------------------------------------------------------------ init.run

def test_init_run_must_be_a_finished_run_of_the_same_shape(tiny_chat_dir, tmp_path):
    with pytest.raises(PlanError) as e:
        pref_plan(tiny_chat_dir, tmp_path, init_run=tmp_path / "nowhere")
    assert e.value.key == "init.run" and "no plan.json" in str(e.value)
    start = tmp_path / "sft"
    pref_plan(tiny_chat_dir, tmp_path, rank=8).write(start / "plan.json")
    with pytest.raises(PlanError) as e:
        pref_plan(tiny_chat_dir, tmp_path, init_run=start)
    assert "adapter.rank: 8 there, 4 here" in str(e.value) and "adapter.rank=8" in e.value.hint
    with pytest.raises(PlanError) as e:
        pref_plan(tiny_chat_dir, tmp_path, init_run=start, rank=8)
    assert "has not finished training" in str(e.value)


def test_supervised_plans_hash_as_before_objectives(tiny_chat_dir, tmp_path):
    """The keys preference tuning added (objective, init, data.fields, the data section's unit and
    pairs) leave a supervised plan's hash as it was: its runs still resume."""
    import dataclasses

    from conftest import tiny_plan
    from core.plan import content_hash

    plan = tiny_plan(tiny_chat_dir, tmp_path)
    doc = plan.to_dict()
    for key in ("objective", "init"):
        doc["config"].pop(key)
    doc["config"]["data"].pop("fields")
    doc.pop("objective")
    doc["data"].pop("unit")
    doc["data"].pop("pairs")
    from core.plan import Plan

    old = Plan.from_dict(doc)         # as a plan.json written before read back
    assert content_hash(old) == plan.hash == content_hash(dataclasses.replace(plan))
    assert pref_plan(tiny_chat_dir, tmp_path).hash != plan.hash
    np.testing.assert_equal(plan.data.unit, 1)
