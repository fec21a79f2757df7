"""compiler/examples.py: tokenised examples, the over-length policy, and the on-disk cache."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import compiler.examples as ex
import core.tokenizer as tk
from core.errors import PlanError
from compiler.examples import build_examples, truncate
from core.token_cache import load_examples

CHAT = {"prompt": "{text}", "response": "{label}", "system": None, "chat": True}
PLAIN = {"prompt": "{text}\nSentiment:", "response": " {label}", "system": None, "chat": False}
FINANCE = Path(__file__).resolve().parents[2] / "shared/data/financial/twitter_financial_news_sentiment"


def rows(n, *, start=0, words=4):
    labels = ["Bullish", "Bearish", "Neutral"]
    return [{"text": " ".join(f"word{i}_{j}" for j in range(words)), "label": labels[i % 3]}
            for i in range(start, start + n)]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from core.tokenizer import chat_template

    return {"tokenizer_dir": str(smollm2_dir), "chat_template": chat_template(smollm2_dir),
            "eos_token": "<|im_end|>"}


def build(smol, tmp_path, splits, **kw):
    args = dict(smol, template=CHAT, max_length=256, overlength="truncate", cache_dir=tmp_path / "cache",
                key_material={"data": "sha-of-file"})
    args.update(kw)
    return build_examples(splits, **args)


def tok(smol):
    return tk.load_tokenizer(smol["tokenizer_dir"])


# ------------------------------------------------------------------------------ layout

def test_examples_are_prompt_then_supervised_tokens_tokenised_separately(smol, tmp_path):
    splits = {"train": rows(10), "val": rows(3, start=10), "test": rows(4, start=20)}
    stats = build(smol, tmp_path, splits)
    data = load_examples(stats["cache"])
    t = tok(smol)
    ids, plens = data.split("train")
    assert len(ids) == 10 and plens.dtype == np.int32 and all(x.dtype == np.int32 for x in ids)
    from core.templates import render, to_prompt_completion
    for row, x, p in zip(splits["train"], ids, plens):
        head, tail = to_prompt_completion(*render(row, CHAT), chat=True, chat_template=smol["chat_template"],
                                          eos_token="<|im_end|>")
        want = t.encode(head, add_special_tokens=False).ids + t.encode(tail, add_special_tokens=False).ids
        assert x.tolist() == want
        assert t.decode(x[p:].tolist(), skip_special_tokens=False) == row["label"] + "<|im_end|>"
        assert x[-1] == t.token_to_id("<|im_end|>")
    assert stats["sizes"] == {"train": 10, "val": 3, "test": 4}
    assert data.references == [r["label"] for r in splits["test"]]
    assert data.labels == ["bearish", "bullish", "neutral"]
    assert [len(x) for x in data.split("val")[0]] == data.lengths("val").tolist()
    assert stats["examples"][0].endswith("<|im_start|>assistant\n⟦Bullish<|im_end|>⟧")
    assert len(stats["examples"]) == 2
    assert stats["supervised"] == {"min": 3, "mean": pytest.approx(np.mean(
        [len(x) - p for x, p in zip(ids, plens)]), abs=0.01)}
    assert {"p50", "p95", "max"} <= set(stats["tokens"]) and stats["tokens"]["max"] == max(map(len, ids))


def test_cache_file_layout_matches_the_spec(smol, tmp_path):
    stats = build(smol, tmp_path, {"train": rows(5)})
    path = Path(stats["cache"])
    assert path.is_absolute() and path.name == stats["key"] + ".npz"
    with np.load(path) as z:
        for split in ("train", "val", "test"):
            assert z[f"{split}_ids"].dtype == np.int32
            assert z[f"{split}_offsets"].dtype == np.int64
            assert z[f"{split}_prompt_lens"].dtype == np.int32
            assert z[f"{split}_offsets"][0] == 0 and z[f"{split}_offsets"][-1] == len(z[f"{split}_ids"])
        assert len(z["test_ids"]) == 0 and len(z["train_prompt_lens"]) == 5
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["test"] == {"references": []} and meta["labels"] == ["bearish", "bullish", "neutral"]
    assert load_examples(stats["cache"]).split("test") == ([], pytest.approx(np.zeros(0)))
    assert not list(path.parent.glob(".*tmp"))        # atomic writes leave no temporaries


def test_plain_template_appends_eos_and_adds_the_tokenizers_bos(tmp_path, bos_tokenizer_dir):
    stats = build_examples({"train": [{"text": "a b", "label": "c"}]}, template={
        "prompt": "{text}", "response": " {label}", "system": None, "chat": False},
        tokenizer_dir=str(bos_tokenizer_dir), chat_template=None, eos_token="</s>", max_length=64,
        overlength="truncate", cache_dir=tmp_path, key_material={})
    ids, plens = load_examples(stats["cache"]).split("train")
    # vocab: <s>=0 </s>=1 a=2 b=3 c=4; the post-processor's "<s> $A" gives the BOS; truncation in
    # tokenizer.json (max 2) is switched off
    assert ids[0].tolist() == [0, 2, 3, 4, 1] and plens.tolist() == [3]
    assert tk.encode_prompt(tk.load_tokenizer(bos_tokenizer_dir), "a b", chat=False).tolist() == [0, 2, 3]
    assert tk.encode_prompt(tk.load_tokenizer(bos_tokenizer_dir), "a b", chat=True).tolist() == [2, 3]


def test_plain_template_smollm2_has_no_bos(smol, tmp_path):
    stats = build(smol, tmp_path, {"train": rows(2)}, template=PLAIN)
    ids, plens = load_examples(stats["cache"]).split("train")
    t = tok(smol)
    assert ids[0].tolist() == t.encode("word0_0 word0_1 word0_2 word0_3\nSentiment:", add_special_tokens=False).ids \
        + t.encode(" Bullish<|im_end|>", add_special_tokens=False).ids
    assert stats["examples"][0] == "word0_0 word0_1 word0_2 word0_3\nSentiment:⟦ Bullish<|im_end|>⟧"


def test_example_with_nothing_to_learn_is_dropped_and_counted(smol, tmp_path):
    r = rows(3)
    r[1]["label"] = ""
    stats = build(smol, tmp_path, {"train": r}, template=dict(PLAIN, response="{label}"), eos_token="")
    assert stats["no_supervised"] == 1 and stats["sizes"]["train"] == 2


# ------------------------------------------------------------------------------ over-length

def test_truncate_rule():
    p, s = list(range(10)), [100, 101, 102]
    assert truncate(p, s, 8) == ([5, 6, 7, 8, 9], s)            # prompt cut from the left
    assert truncate(p, s, 4) == ([9], s)                        # one prompt token + the whole answer
    assert truncate(p, s, 3) == ([9], [100, 101])               # answer too long: its end is cut
    assert truncate([], s, 2) == ([], [100, 101])
    assert truncate(p, s, 13) == (p, s)


def test_truncate_and_drop_policies(smol, tmp_path):
    long = {"text": " ".join(["lorem"] * 300), "label": "Bullish"}
    splits = {"train": rows(5) + [long], "test": [long]}
    t = tok(smol)
    stats = build(smol, tmp_path, splits, max_length=64)
    ids, plens = load_examples(stats["cache"]).split("train")
    assert stats["truncated"] == 2 and stats["per_split"]["train"]["truncated"] == 1
    assert len(ids[-1]) == 64
    assert t.decode(ids[-1][plens[-1]:].tolist(), skip_special_tokens=False) == "Bullish<|im_end|>"
    prompt = t.decode(ids[-1][:plens[-1]].tolist())      # cut inside the text, not at its start
    assert prompt.startswith("system\nYou are a helpful AI assistant") and "user\nlorem lorem" in prompt
    assert prompt.endswith("\nassistant\n") and stats["truncated_fields"] == {"text": 2}
    assert stats["tokens"]["max"] > 300                          # lengths before truncation
    assert load_examples(stats["cache"]).references == ["Bullish"]

    stats = build(smol, tmp_path, splits, max_length=64, overlength="drop")
    assert stats["dropped_too_long"] == 2 and stats["truncated"] == 0
    assert stats["sizes"] == {"train": 5, "val": 0, "test": 0}
    assert load_examples(stats["cache"]).references == []

    # the answer alone is longer than max_length: refused under truncate; truncate_answer keeps
    # one prompt token and the answer's start
    long_answer = {"text": "q", "label": " ".join(["yes"] * 50)}
    with pytest.raises(PlanError, match="data.max_length") as e:
        build(smol, tmp_path, {"train": [long_answer]}, max_length=16)
    assert "train split row 1" in str(e.value) and "data.overlength=truncate_answer" in str(e.value)
    stats = build(smol, tmp_path, {"train": [long_answer]}, max_length=16,
                  overlength="truncate_answer")
    ids, plens = load_examples(stats["cache"]).split("train")
    assert plens.tolist() == [1] and len(ids[0]) == 16 and stats["answers_cut"] == 1
    assert "⟦yes yes" in stats["examples"][0]


def test_bad_policy_and_max_length(smol, tmp_path):
    with pytest.raises(PlanError) as e:
        build(smol, tmp_path, {"train": rows(2)}, overlength="wrap")
    assert e.value.key == "data.overlength"
    with pytest.raises(PlanError) as e:
        build(smol, tmp_path, {"train": rows(2)}, max_length=1)
    assert e.value.key == "data.max_length"


def test_chat_template_missing(smol, tmp_path):
    with pytest.raises(PlanError) as e:
        build(smol, tmp_path, {"train": rows(2)}, chat_template=None)
    assert e.value.key == "template.chat"


# ------------------------------------------------------------------------------ cache

def test_second_build_loads_the_cache_without_tokenising(smol, tmp_path, monkeypatch):
    splits = {"train": rows(50), "val": rows(5, start=50), "test": rows(5, start=60)}
    first = build(smol, tmp_path, splits)

    def no_tokenizer(*a, **k):
        raise AssertionError("tokenised although cached")

    monkeypatch.setattr(ex, "load_tokenizer", no_tokenizer)
    second = build(smol, tmp_path, splits)
    assert second == first
    assert load_examples(second["cache"]).references == load_examples(first["cache"]).references


def test_cache_key_changes_with_every_input(smol, tmp_path, monkeypatch):
    base = {"train": rows(20), "test": rows(3, start=40)}
    key = build(smol, tmp_path, base)["key"]
    changed_rows = {"train": rows(19) + [{"text": "different", "label": "Bullish"}], "test": base["test"]}
    variants = [
        build(smol, tmp_path, base, template=dict(CHAT, system="Classify.")),
        build(smol, tmp_path, base, template=PLAIN),
        build(smol, tmp_path, base, max_length=128),
        build(smol, tmp_path, base, overlength="drop"),
        build(smol, tmp_path, base, key_material={"data": "another-file"}),
        build(smol, tmp_path, changed_rows),
        build(smol, tmp_path, {"train": base["train"], "val": base["test"]}),   # same rows, other split
    ]
    keys = [v["key"] for v in variants]
    assert key not in keys and len(set(keys)) == len(keys)
    # a column the template does not read does not matter
    extra = {k: [dict(r, unused=i) for i, r in enumerate(v)] for k, v in base.items()}
    assert build(smol, tmp_path, extra)["key"] == key


def test_load_examples_missing_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="compile the plan again"):
        load_examples(tmp_path / "gone.npz")


def test_vanished_sidecar_rebuilds(smol, tmp_path):
    stats = build(smol, tmp_path, {"train": rows(4)})
    Path(stats["cache"]).with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError):
        load_examples(stats["cache"])
    assert build(smol, tmp_path, {"train": rows(4)}) == stats
    assert len(load_examples(stats["cache"]).split("train")[0]) == 4


# ------------------------------------------------------------------------------ the real thing

@pytest.mark.skipif(not (FINANCE / "train.jsonl").is_file(), reason="finance dataset not present")
def test_finance_dataset_build_time(smol, tmp_path):
    from compiler.data import clean_rows, read_table, split_validation

    t0 = time.perf_counter()
    table = read_table(FINANCE / "train.jsonl", key="data.path")
    kept, _ = clean_rows(table, fields=["text", "label"])
    train, val = split_validation(kept, 0.05, seed=0)
    t1 = time.perf_counter()
    stats = build(smol, tmp_path, {"train": train, "val": val}, max_length=512)
    t2 = time.perf_counter()
    again = build(smol, tmp_path, {"train": train, "val": val}, max_length=512)
    t3 = time.perf_counter()
    print(f"\nfinance train ({len(table)} rows): read+clean {t1 - t0:.2f}s, cold build {t2 - t1:.2f}s, "
          f"warm build {t3 - t2:.3f}s; tokens {stats['tokens']}, sizes {stats['sizes']}")
    assert again == stats and stats["sizes"]["train"] + stats["sizes"]["val"] == len(kept)
    assert stats["truncated"] == 0 and stats["n_labels"] == 3


# ------------------------------------------------------------------------------ cutting inside fields

FIELDS = {"prompt": "Bill: {title}\nSummary: {summary}\nCompany: {company}\nDoes the bill affect "
                    "the company?", "response": "{label}", "system": "Answer Yes or No.", "chat": True}


def _long_row(i=0):
    return {"title": " ".join(f"title{i}w{j}" for j in range(40)),
            "summary": " ".join(f"sum{i}w{j}" for j in range(200)),
            "company": "Acme " + " ".join(f"co{i}w{j}" for j in range(30)), "label": "Yes"}


def test_over_length_rows_are_cut_inside_their_fields(smol, tmp_path):
    rows = [_long_row(i) for i in range(3)]
    stats = build(smol, tmp_path, {"train": rows}, template=FIELDS, max_length=160)
    ids, plens = load_examples(stats["cache"]).split("train")
    t = tok(smol)
    assert stats["truncated"] == 3 and stats["truncated_fields"] == {"title": 3, "summary": 3,
                                                                      "company": 3}
    for row, x, p in zip(rows, ids, plens):
        assert len(x) <= 160
        text = t.decode(x[:p].tolist(), skip_special_tokens=False)
        # the template's own words, the system prompt and the whole answer are kept...
        for words in ("Answer Yes or No.", "Bill: ", "\nSummary: ", "\nCompany: ",
                      "Does the bill affect the company?"):
            assert words in text, words
        assert t.decode(x[p:].tolist(), skip_special_tokens=False) == "Yes<|im_end|>"
        # ...and each field keeps its start, the longest cut the most (down to a common length)
        title = text.split("Bill: ")[1].split("\nSummary: ")[0]
        summary = text.split("\nSummary: ")[1].split("\nCompany: ")[0]
        company = text.split("\nCompany: ")[1].split("\nDoes the bill")[0]
        assert row["title"].startswith(title) and row["summary"].startswith(summary)
        assert row["company"].startswith(company) and company.startswith("Acme")
        lengths = [len(t.encode(f, add_special_tokens=False).ids) for f in (title, summary, company)]
        assert max(lengths) - min(lengths) <= 3, lengths
    assert "⟦Yes<|im_end|>⟧" in stats["examples"][0] and "Does the bill" in stats["examples"][0]


def test_only_the_named_fields_are_cut(smol, tmp_path):
    row = _long_row()
    stats = build(smol, tmp_path, {"train": [row]}, template=FIELDS, max_length=500,
                  truncate_fields=["summary"])
    (x,), (p,) = load_examples(stats["cache"]).split("train")
    text = tok(smol).decode(x[:p].tolist(), skip_special_tokens=False)
    assert stats["truncated_fields"] == {"summary": 1} and len(x) <= 500
    assert row["title"] in text and row["company"] in text and row["summary"] not in text
    with pytest.raises(PlanError, match="data.truncate_fields") as e:
        build(smol, tmp_path, {"train": [row]}, template=FIELDS, truncate_fields=["label"])
    assert "title, summary, company" in str(e.value)


def test_fields_too_short_to_absorb_fall_back_to_the_prompts_start(smol, tmp_path):
    template = dict(FIELDS, prompt=" ".join(["Read this carefully."] * 60) + " {title}")
    stats = build(smol, tmp_path, {"train": [{"title": "short", "label": "No"}]}, template=template,
                  max_length=64)
    (x,), (p,) = load_examples(stats["cache"]).split("train")
    assert stats["truncated"] == 1 and stats["truncated_fields"] == {} and len(x) == 64
    assert tok(smol).decode(x[p:].tolist(), skip_special_tokens=False) == "No<|im_end|>"
