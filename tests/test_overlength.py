"""Over-length examples never lose their answer silently (data.overlength), and data and config
values are read as what they say: no NaN label, no `1_6` for 16.

Answers: data.overlength=truncate (the default) cuts prompts only and refuses an answer that does
not fit, naming data.max_length, the rows' file:line, their count and the longest answer; drop
drops them (counted); truncate_answer cuts them, counted in the plan with a warning. The same for
a conversation's kept assistant turn and a preference pair's replies.
"""
from __future__ import annotations

import json
import time

import pytest

from compiler import schema
from compiler.examples import cuts_answer
from core.errors import PlanError
from core.plan import Plan
from core.token_cache import load_examples
from tests.conftest import clf_rows, pref_rows, write_jsonl


def refused(result, *needles, tmp_path=None) -> str:
    """Exit code 2, one paragraph holding every needle, no traceback, no run directory."""
    rc, out, err = result
    assert rc == 2, (rc, out, err)
    text = " ".join(err.replace("│", " ").split())
    for needle in needles:
        assert needle in text, (needle, err)
    assert "Traceback" not in out + err
    if tmp_path is not None:
        assert not (tmp_path / "run").exists(), "a refused compile left its run directory"
    return text


def plan_of(tmp_path, run="run") -> Plan:
    return Plan.load(tmp_path / run / "plan.json")


# ------------------------------------------------------------------------------ the rule

def test_an_answer_keeps_one_prompt_token_before_it():
    assert not cuts_answer(10, 7, 8)            # 1 prompt token + 7 answer tokens
    assert cuts_answer(10, 8, 8)                # fits alone, but leaves no prompt token: a cut
    assert cuts_answer(10, 9, 8)
    assert not cuts_answer(0, 8, 8)             # no prompt at all: the whole row is the answer
    assert cuts_answer(0, 9, 8)


# ------------------------------------------------------------------------------ single turns, CLI

LONG = " ".join(["Indeed, the clause concerns a great many matters."] * 30)   # ~ 330 tokens


def long_answer_table(tmp_path, lines: tuple[int, ...], n=260):
    """data/train.jsonl: clf_rows with a very long answer on the given (1-based) lines."""
    rows = clf_rows(n)
    for line in lines:
        rows[line - 1] = {**rows[line - 1], "label": LONG + f" ({line})"}
    return write_jsonl(tmp_path / "data" / "train.jsonl", rows)


def test_answer_that_does_not_fit_is_refused_naming_rows(tune_cli, tmp_path):
    lines = (7, 30, 31, 90, 150, 200, 201)
    long_answer_table(tmp_path, lines)
    write_jsonl(tmp_path / "data" / "test.jsonl", clf_rows(3, seed=1) +
                [{"text": "x", "label": LONG + " (test)"}])
    file, test = "data/train.jsonl", "data/test.jsonl"
    result = tune_cli("plan", "hydra.run.dir=run", f"data.path={file}", f"data.test_path={test}",
                      "data.max_length=128")
    # the validation rows (carved from the train file) and the test file's row 4 are among them
    text = refused(result, f"{file}:7: data.max_length:", "8 examples have an answer longer than "
                   "the 127 tokens data.max_length=128", f"{file} lines 7, 30, 31, 90, 150 and 3 "
                   "more.", "data.overlength=drop", "data.overlength=truncate_answer",
                   tmp_path=tmp_path)
    longest = int(text.split("The longest is ")[1].split()[0])
    assert longest > 300
    assert f"raise data.max_length to {longest + 1}" in text

    # the hint's length is enough: every answer whole, only prompts cut
    rc, out, err = tune_cli("plan", "hydra.run.dir=run", f"data.path={file}",
                            f"data.test_path={test}", f"data.max_length={longest + 1}")
    assert rc == 0, err
    plan = plan_of(tmp_path)
    assert plan.data.answers_cut == 0 and plan.data.dropped_too_long == 0
    examples, end = load_examples(plan.data.cache), examples_end(plan)
    for split in ("train", "val", "test"):
        ids, _ = examples.split(split)
        assert ids and all(x[-1] == end for x in ids)   # every answer ends with its end token


def examples_end(plan: Plan) -> int:
    from core.tokenizer import load_tokenizer

    return load_tokenizer(plan.model.dir).token_to_id("<|im_end|>")


def test_drop_and_truncate_answer_count_what_they_did(tune_cli, tmp_path):
    lines = (5, 6, 40)
    long_answer_table(tmp_path, lines)
    base = ("plan", "data.path=data/train.jsonl", "data.max_length=128", "data.val_fraction=0")

    rc, out, err = tune_cli(*base, "data.overlength=drop", "hydra.run.dir=drop")
    assert rc == 0, err
    plan = plan_of(tmp_path, "drop")
    assert plan.data.dropped_too_long == 3 and plan.data.answers_cut == 0
    assert plan.data.sizes["train"] == 257

    rc, out, err = tune_cli(*base, "data.overlength=truncate_answer", "hydra.run.dir=cut")
    assert rc == 0, err
    plan = plan_of(tmp_path, "cut")
    assert plan.data.answers_cut == 3 and plan.data.truncated == 3
    assert plan.data.sizes["train"] == 260
    warning = next(w for w in plan.warnings if "answers were cut" in w)
    assert "3 answers were cut at their end to fit data.max_length=128" in warning
    assert "data/train.jsonl lines 5, 6, 40; the longest is " in warning
    assert warning.count("train.jsonl") == 1                             # one file, named once
    assert "3 answers cut at their end" in " ".join(out.replace("│", " ").split())   # the summary
    # the training data holds them cut: one prompt token, 127 answer tokens, no end token
    ids, plens = load_examples(plan.data.cache).split("train")
    end = examples_end(plan)
    for line in lines:
        x, p = ids[line - 1], plens[line - 1]
        assert (len(x), p) == (128, 1) and x[-1] != end
    others = [x for i, x in enumerate(ids) if i + 1 not in lines]
    assert all(x[-1] == end for x in others)

    # the same data under the default refuses: the truncate_answer cache is not reused
    refused(tune_cli(*base, "hydra.run.dir=run"), "data/train.jsonl:5: data.max_length:",
            "3 examples have an answer", tmp_path=tmp_path)


def test_truncate_cuts_prompts_and_never_an_answer(tune_cli, tmp_path):
    rows = clf_rows(240) + [{"text": LONG + f" ({i})", "label": "Beta Gamma Alpha"}
                            for i in range(12)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    rc, out, err = tune_cli("plan", "hydra.run.dir=run", "data.path=data/train.jsonl",
                            "data.max_length=64", "data.val_fraction=0")
    assert rc == 0, err
    plan = plan_of(tmp_path)
    assert plan.data.truncated == 12 and plan.data.answers_cut == 0
    from core.tokenizer import load_tokenizer

    tok = load_tokenizer(plan.model.dir)
    ids, plens = load_examples(plan.data.cache).split("train")
    for x, p, row in zip(ids, plens, rows):
        assert len(x) <= 64
        assert tok.decode(x[p:].tolist(), skip_special_tokens=False) == row["label"] + "<|im_end|>"


# ------------------------------------------------------------------------------ the edge, exactly

def tiny_plan_of(model_dir, workdir, rows, *, max_length=16, **settings):
    """compile_plan over `rows` (train.jsonl) for the tiny word-level model: plain template, every
    word one token, the answer's end token `</s>` one more."""
    from compiler.compile import compile_plan

    path = write_jsonl(workdir / "train.jsonl", rows)
    cfg = schema.defaults()
    cfg["model"]["path"] = str(model_dir)
    cfg["data"].update(path=str(path), val_fraction=0.0, max_length=max_length, dedupe=False,
                       task="generation")
    cfg["template"].update(prompt="{text}", response="{label}", chat=False)
    cfg["schedule"]["batch_size"] = 2
    for key, value in settings.items():
        section, name = key.split(".", 1)
        node = cfg[section]
        for part in name.split(".")[:-1]:
            node = node[part]
        node[name.split(".")[-1]] = value
    return compile_plan(cfg, recipe_info=None, command="train")


def words(n, start=20):
    return " ".join(f"w{start + i % 70}" for i in range(n))


def test_an_answer_of_max_length_tokens_counts_as_cut(tiny_chat_dir, tmp_path):
    # max_length 16: an answer of 14 words + </s> = 15 tokens fits behind one prompt token
    fits = [{"text": words(3), "label": words(14)}] + [{"text": words(3), "label": "w11"}] * 3
    plan = tiny_plan_of(tiny_chat_dir, tmp_path, fits)
    (x, *_), (p, *_) = load_examples(plan.data.cache).split("train")
    assert (len(x), p) == (16, 1) and plan.data.truncated == 1 and plan.data.answers_cut == 0

    # 15 words + </s> = 16 tokens: it fits alone, but only without its prompt: refused
    edge = [{"text": words(3), "label": words(15)}] + fits[1:]
    with pytest.raises(PlanError) as e:
        tiny_plan_of(tiny_chat_dir, tmp_path, edge)
    assert e.value.key == "data.max_length" and e.value.line == 1
    assert e.value.file == str(tmp_path / "train.jsonl")
    assert "The longest is 16 tokens" in e.value.message and "to 17" in e.value.hint
    plan = tiny_plan_of(tiny_chat_dir, tmp_path, edge, **{"data.overlength": "truncate_answer"})
    (x, *_), (p, *_) = load_examples(plan.data.cache).split("train")
    assert (len(x), p) == (16, 1) and plan.data.answers_cut == 1 and x[-1] != 2   # no </s>


# ------------------------------------------------------------------------------ conversations

def test_conversation_whose_kept_turn_does_not_fit(tune_cli, tmp_path):
    def convo(i, answer):
        return {"messages": [{"role": "user", "content": f"Question {i}: where is my card?"},
                             {"role": "assistant", "content": answer},
                             {"role": "user", "content": "And then?"},
                             {"role": "assistant", "content": f"Then it ships, order {i}."}]}

    rows = [convo(i, f"It is on its way, order {i}.") for i in range(20)]
    rows[3] = convo(3, LONG)                 # its first answer alone is longer than 128 tokens
    write_jsonl(tmp_path / "train.jsonl", rows)
    base = ("plan", "data.path=train.jsonl", "template=conversation", "data.max_length=128",
            "data.val_fraction=0")
    refused(tune_cli(*base, "hydra.run.dir=run"), "train.jsonl:4: data.max_length: 1 "
            "conversation has an assistant turn it must keep (its first) longer than the 127 "
            "tokens", tmp_path=tmp_path)

    rc, out, err = tune_cli(*base, "data.overlength=truncate_answer", "hydra.run.dir=cut")
    assert rc == 0, err
    plan = plan_of(tmp_path, "cut")
    assert plan.data.answers_cut == 1 and plan.data.truncated >= 1
    assert any("train.jsonl line 4;" in w and "1 answer was cut" in w for w in plan.warnings)
    x, m = load_examples(plan.data.cache).split("train")[0][3], \
        load_examples(plan.data.cache).masks("train")[3]
    assert len(x) == 128 and m[1:].all() and not m[0]       # one context token, the cut answer

    rc, out, err = tune_cli(*base, "data.overlength=drop", "hydra.run.dir=drop")
    assert rc == 0, err
    plan = plan_of(tmp_path, "drop")
    assert plan.data.answers_cut == 0 and plan.data.dropped_too_long == 1


# ------------------------------------------------------------------------------ preference pairs

def test_pair_whose_reply_does_not_fit(tiny_chat_dir, tmp_path):
    rows = pref_rows(8)
    rows[2] = {"prompt": "w12 w13", "chosen": words(40), "rejected": "w41"}
    settings = {"objective.kind": "dpo", "template.chat": False}
    with pytest.raises(PlanError) as e:
        tiny_plan_of(tiny_chat_dir, tmp_path, rows, max_length=32, **settings)
    assert e.value.key == "data.max_length" and e.value.line == 3
    assert "1 pair (KTO: row) has a reply longer than the 31 tokens" in e.value.message
    assert "to 42" in e.value.hint                                  # 40 words + </s>, + 1

    plan = tiny_plan_of(tiny_chat_dir, tmp_path, rows, max_length=32,
                        **settings, **{"data.overlength": "truncate_answer"})
    assert plan.data.answers_cut == 1
    ids, plens = load_examples(plan.data.cache).split("train")
    chosen, rejected = ids[4], ids[5]                                # the third pair's two sides
    assert len(chosen) == 32 and plens[4] == 1 and chosen[-1] != 2   # cut: no </s>
    assert rejected[-1] == 2                                         # the short side stays whole
    assert any("1 reply was cut" in w and "train.jsonl line 3;" in w for w in plan.warnings)

    plan = tiny_plan_of(tiny_chat_dir, tmp_path, rows, max_length=32,
                        **settings, **{"data.overlength": "drop"})
    assert plan.data.dropped_too_long == 1 and plan.data.answers_cut == 0


# ------------------------------------------------------------------------------ NaN and friends

@pytest.mark.parametrize("literal, shown", [("NaN", "NaN"), ("Infinity", "Infinity"),
                                             ("-Infinity", "-Infinity"), ("1e999", "Infinity")])
def test_non_finite_label_is_refused_with_its_line(tune_cli, tmp_path, literal, shown):
    lines = [json.dumps(r) for r in clf_rows(20)]
    lines[11] = '{"text": "a clause", "label": ' + literal + '}'
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    refused(tune_cli("plan", "hydra.run.dir=run", "data.path=train.jsonl"),
            "train.jsonl:12: data.path: field `label` of line 12 is " + shown,
            "not a finite number", tmp_path=tmp_path)


def test_non_finite_value_in_any_read_field_and_format(tune_cli, tmp_path):
    rows = clf_rows(20)
    rows[4] = {"text": float("nan"), "label": "Alpha"}
    (tmp_path / "train.json").write_text(json.dumps(rows))                 # json writes NaN
    refused(tune_cli("plan", "hydra.run.dir=run", "data.path=train.json"),
            "data.path: field `text` of item 4 of the list is NaN", tmp_path=tmp_path)

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [r["text"] for r in clf_rows(20)],
                      "label": [1.0] * 7 + [float("inf")] + [2.0] * 12})
    pq.write_table(table, tmp_path / "train.parquet")
    refused(tune_cli("plan", "hydra.run.dir=run", "data.path=train.parquet"),
            "field `label` of row 8 is Infinity", tmp_path=tmp_path)


def test_nan_outside_the_template_is_harmless(tune_cli, tmp_path):
    lines = [json.dumps({**r, "score": 1.0}) for r in clf_rows(250)]
    lines[3] = lines[3][:-1] + ', "note": NaN}'
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    rc, out, err = tune_cli("plan", "hydra.run.dir=run", "data.path=train.jsonl")
    assert rc == 0, err


def test_other_label_values_each_have_their_handling(tune_cli, tmp_path):
    base = [json.dumps(r) for r in clf_rows(250)]
    # null: the row is dropped and counted (a missing value)
    lines = list(base)
    lines[9] = '{"text": "a clause", "label": null}'
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    rc, out, err = tune_cli("plan", "hydra.run.dir=run", "data.path=train.jsonl")
    assert rc == 0, err
    assert plan_of(tmp_path).data.train.dropped["missing_field"] == 1
    # an object, a list, a boolean: refused with the line (they would train as Python reprs)
    for value, kind in (('{"name": "Alpha"}', "object"), ('["Alpha"]', "array"),
                        ("true", "boolean")):
        lines = list(base)
        lines[9] = '{"text": "a clause", "label": ' + value + '}'
        (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
        refused(tune_cli("plan", "hydra.run.dir=bad", "data.path=bad.jsonl"),
                f"bad.jsonl:10: data.path: field `label` of line 10 is a JSON {kind}")
        assert not (tmp_path / "bad").exists()


def test_non_finite_reply_in_preference_data(tiny_chat_dir, tmp_path):
    rows = pref_rows(8)
    rows[5] = {**rows[5], "rejected": float("nan")}
    with pytest.raises(PlanError) as e:
        tiny_plan_of(tiny_chat_dir, tmp_path, rows, max_length=32, **{"objective.kind": "dpo"})
    assert e.value.line == 6 and "field `rejected` is NaN" in e.value.message


# ------------------------------------------------------------------------------ config numbers

@pytest.mark.parametrize("override, needles", [
    ("adapter.rank='1_6'", ("adapter.rank: must be an integer, got '1_6'", "plain decimal")),
    ("adapter.rank=1_6", ("adapter.rank: `1_6` groups digits with underscores", "write 16")),
    ("adapter.rank=' 16'", ("adapter.rank: must be an integer, got ' 16'",)),
    ("adapter.rank='016'", ("adapter.rank: must be an integer, got '016'",)),
    ("adapter.rank='0x10'", ("adapter.rank: must be an integer, got '0x10'",)),
    ("adapter.rank='١٦'", ("adapter.rank: must be an integer",)),
    ("adapter.rank=true", ("adapter.rank: must be an integer, got True",)),
    ("adapter.rank=16.5", ("adapter.rank: must be an integer, got 16.5",)),
    ("schedule.lr='1_0e-4'", ("schedule.lr: must be a number, got '1_0e-4'",)),
    ("schedule.lr=1_0e-4", ("schedule.lr: `1_0e-4` groups digits", "write 0.001")),
    ("schedule.lr=' 2e-4'", ("schedule.lr: must be a number, got ' 2e-4'",)),
    ("schedule.lr='nan'", ("schedule.lr: must be a finite number",)),
    ("runtime.mesh.data='1_0'", ("runtime.mesh.data: must be an integer",)),
    ("template.chat=' true'", ("template.chat: must be true or false",)),
    ("model.revision=2_0", ("model.revision: `2_0` groups digits", "model.revision='2_0'")),
    ("data.overlength=' drop'", ("data.overlength: must be one of truncate, drop, "
                                 "truncate_answer",)),
])
def test_config_numbers_are_plain_decimal(tune_cli, tmp_path, override, needles):
    tune_cli("plan", "adapter.rank=x")                  # warm: imports are not the refusal's cost
    started = time.perf_counter()
    result = tune_cli("plan", "hydra.run.dir=run", override)
    took = time.perf_counter() - started
    refused(result, *needles, tmp_path=tmp_path)
    assert took < 1.0, took


def test_plain_numbers_still_read():
    key = schema.BY_PATH
    assert schema.coerce(key["adapter.rank"], "16") == 16
    assert schema.coerce(key["adapter.rank"], "+16") == 16
    assert schema.coerce(key["adapter.rank"], 16.0) == 16
    assert schema.coerce(key["schedule.lr"], "2e-4") == 2e-4
    assert schema.coerce(key["schedule.lr"], ".5") == 0.5
    assert schema.coerce(key["template.chat"], "True") is True
    assert schema.coerce(key["data.overlength"], "truncate_answer") == "truncate_answer"
    assert schema.coerce(key["adapter.targets"], "q_proj, v_proj") == ["q_proj", "v_proj"]


@pytest.mark.parametrize("text, needle", [
    ("rank: 1_6", "`1_6` is read by YAML as the number 16"),
    ("rank: 010", "`010` is read by YAML as the number 8"),
    ("rank: 0x10", "`0x10` is read by YAML as the number 16"),
    ("alpha: 1:30", "`1:30` is read by YAML as the number 90"),
])
def test_recipe_numbers_are_plain_decimal(tune_cli, tmp_path, text, needle):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text(
        f"# @package _global_\n# a team recipe\nadapter:\n  {text}\n")
    started = time.perf_counter()
    result = tune_cli("plan", "+recipe=mine", "hydra.run.dir=run")
    took = time.perf_counter() - started
    refused(result, "mine.yaml:4: adapter.", needle, "plain decimal", tmp_path=tmp_path)
    assert took < 1.0, took
