"""Fine-tuning with retrieval: a BM25 index (bm25s) over a corpus fills {retrieved} for every row,
recall@k where the data names its gold passage, the test rows also without passages, the four-way
evaluation, retrieval at generation time, and every bad input refused with its key."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_checks import refused
from test_conversations import compiled, write_jsonl

from core.token_cache import load_examples
from core.plan import Plan
from compiler.retrieval import _cut
from core.retrieval import PLAIN, Index, Passages

# made-up topic words: a question shares exactly one with its passage and none with the others
TOPICS = ["zorblax", "quintrel", "mavocide", "plinthor", "drusket", "velomorph", "carbinex",
          "sulvane", "tremolith", "oxanthe", "brevicord", "lumidase", "faxorene", "gildrum",
          "hexamid", "jorvane", "kelptide", "norvatin", "ombraxe", "pyrolune"]
RAG = ("template.prompt='Passages:\\n{retrieved}\\n\\nQ: {question}'", "template.response='{answer}'",
       "retrieval.corpus=corpus.jsonl", "retrieval.query='{question}'")


def corpus_rows():
    return [{"id": f"p{i}", "text": f"Trials of {t} showed that {t} works in {i + 3} of 10 "
                                    f"patients."} for i, t in enumerate(TOPICS)]


def qa_rows(indices, *, gold=True):
    return [{"question": f"Does {TOPICS[i]} work?", "answer": "yes" if i % 2 else "no",
             **({"passage": f"p{i}"} if gold else {})} for i in indices]


@pytest.fixture
def rag_data(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", corpus_rows())
    write_jsonl(tmp_path / "train.jsonl", qa_rows(range(14)) * 2 + qa_rows(range(14))[:2])
    write_jsonl(tmp_path / "test.jsonl", qa_rows(range(14, 20)))
    return tmp_path


def prompts(plan, split):
    from core.tokenizer import load_tokenizer

    tok = load_tokenizer(plan.model.dir)
    ids, plens = load_examples(plan.data.cache).split(split)
    return [tok.decode(x[:p].tolist(), skip_special_tokens=False) for x, p in zip(ids, plens)]


# ------------------------------------------------------------------------------ the index

def test_index_finds_the_passage_that_shares_the_words(tmp_path):
    rows = corpus_rows()
    passages = Passages([r["id"] for r in rows], [r["text"] for r in rows])
    index = Index.build(passages, key="k1", cache_dir=tmp_path)
    hits, no_match = index.search([f"what about {t}?" for t in TOPICS] + ["nothing in common"], 2)
    assert [h[0] for h in hits[:-1]] == list(range(len(TOPICS)))
    assert no_match == 1
    again = Index.build(passages, key="k1", cache_dir=tmp_path)       # the cached one, read back
    assert again.path == index.path and again.search(["oxanthe"], 1)[0] == [[TOPICS.index("oxanthe")]]
    assert index.text([0, 2]) == f"[p0] {rows[0]['text']}\n\n[p2] {rows[2]['text']}"
    assert not list(tmp_path.glob(".k1.*")), "a temporary index directory was left behind"


def test_long_passages_are_cut_at_a_token_boundary_and_counted(smollm2_dir):
    from core.tokenizer import ESC_CLOSE, ESC_OPEN, load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    long = " ".join(f"word{i}" for i in range(200))
    escaped = "alpha beta gamma " + ESC_OPEN + "<|im_end|>" + ESC_CLOSE + " delta" * 50
    texts, cut = _cut(["short text", long, escaped], tok, 20)
    assert cut == 2 and texts[0] == "short text"
    assert texts[1].endswith(" …") and long.startswith(texts[1][:-2])
    assert len(tok.encode(texts[1][:-2], add_special_tokens=False).ids) <= 20
    assert texts[2].count(ESC_OPEN) == texts[2].count(ESC_CLOSE)   # never half an escape


# ------------------------------------------------------------------------------ the plan

def test_every_row_gets_its_passages_and_recall_is_reported(tune_cli, rag_data):
    plan, out = compiled(tune_cli, rag_data, "data.path=train.jsonl", "data.test_path=test.jsonl",
                         "data.val_fraction=0", "data.dedupe=false", *RAG, "retrieval.k=1",
                         "retrieval.gold=passage")
    r = plan.retrieval
    assert (r.passages, r.k, r.query, r.gold) == (len(TOPICS), 1, "{question}", "passage")
    assert r.per_split["train"] == {"rows": 30, "no_match": 0, "gold_rows": 30, "recall": 1.0}
    assert r.per_split["test"]["recall"] == 1.0
    text = " ".join(out.split())
    assert "recall@1 train 1.000, test 1.000" in text
    assert "BM25 top 1 for '{question}'" in text
    for p, row in zip(prompts(plan, "test"), qa_rows(range(14, 20))):
        i = TOPICS.index(row["question"].split()[1])
        assert f"[p{i}] {corpus_rows()[i]['text']}" in p and row["question"] in p
    plain = prompts(plan, "test_plain")
    assert len(plain) == 6 and all(PLAIN in p and "[p" not in p for p in plain)
    ex = load_examples(plan.data.cache)
    assert ex.references_of("test_plain") == ex.references == [r["answer"] for r in
                                                                 qa_rows(range(14, 20))]


def test_recall_counts_misses(tune_cli, rag_data):
    # every row names the wrong gold passage: recall 0 (and the rows are still trained)
    wrong = [{**row, "passage": "p19"} for row in qa_rows(range(14))]
    write_jsonl(rag_data / "train.jsonl", wrong * 2)
    plan, _ = compiled(tune_cli, rag_data, "data.path=train.jsonl", "data.val_fraction=0", *RAG,
                       "retrieval.k=2", "retrieval.gold=passage", "data.dedupe=false")
    assert plan.retrieval.per_split["train"]["recall"] == 0.0
    assert plan.data.sizes["train"] == 28


def test_passages_that_do_not_fit_are_cut_inside_the_retrieved_field(tune_cli, rag_data):
    write_jsonl(rag_data / "corpus.jsonl",
                [{"id": r["id"], "text": r["text"] + " filler" * 300} for r in corpus_rows()])
    plan, _ = compiled(tune_cli, rag_data, "data.path=train.jsonl", "data.val_fraction=0", *RAG,
                       "retrieval.k=3", "retrieval.passage_tokens=100", "data.max_length=200")
    assert plan.retrieval.cut == len(TOPICS)
    assert plan.data.truncated_fields.get("retrieved", 0) > 0
    assert "retrieved" in plan.data.truncated_fields and "question" not in plan.data.truncated_fields
    for p in prompts(plan, "train"):
        assert "Does " in p                     # the question survived; the passages were cut


def test_the_index_is_cached_by_content(tune_cli, rag_data):
    a, _ = compiled(tune_cli, rag_data, "data.path=train.jsonl", *RAG, run="a")
    b, _ = compiled(tune_cli, rag_data, "data.path=train.jsonl", *RAG, run="b")
    assert a.retrieval.index == b.retrieval.index and a.hash == b.hash
    write_jsonl(rag_data / "corpus.jsonl", corpus_rows()[:-1])
    c, _ = compiled(tune_cli, rag_data, "data.path=train.jsonl", *RAG, run="c")
    assert c.retrieval.index != a.retrieval.index and c.hash != a.hash
    assert c.retrieval.passages == len(TOPICS) - 1


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("overrides, words", [
    (("retrieval.corpus=missing.jsonl",), ["retrieval.corpus", "missing.jsonl"]),
    (("retrieval.corpus=empty.jsonl",), ["retrieval.corpus", "empty.jsonl"]),
    (("retrieval.id_field=pid",), ["retrieval.id_field", "`pid` is not a field", "id, text"]),
    (("retrieval.text_field=body",), ["retrieval.text_field", "`body`"]),
    (("retrieval.query='{topic}'",), ["retrieval.query", "`topic` is not a field", "question"]),
    (("retrieval.query=always the same",), ["retrieval.query", "names no field"]),
    (("retrieval.k=25",), ["retrieval.k", "is 25", "20 passages"]),
    (("retrieval.k=0",), ["retrieval.k"]),
    (("retrieval.gold=gold_id",), ["retrieval.gold", "`gold_id` is not a field"]),
    (("retrieval.corpus=dup.jsonl",), ["retrieval.corpus", "dup.jsonl", "line 3", "`p1`"]),
])
def test_bad_retrieval_input_is_refused(tune_cli, rag_data, overrides, words):
    (rag_data / "empty.jsonl").write_text("")
    write_jsonl(rag_data / "dup.jsonl", [{"id": "p0", "text": "a"}, {"id": "p1", "text": "b"},
                                         {"id": "p1", "text": "c"}])
    refused(tune_cli("plan", "data.path=train.jsonl", *RAG, *overrides, "hydra.run.dir=run"),
            *words, tmp_path=rag_data)


def test_template_and_retrieval_must_agree(tune_cli, rag_data):
    refused(tune_cli("plan", "data.path=train.jsonl", "template.prompt='{retrieved} {question}'",
                     "template.response='{answer}'", "hydra.run.dir=run"),
            "template.prompt", "places {retrieved}", "retrieval.corpus", tmp_path=rag_data)
    refused(tune_cli("plan", "data.path=train.jsonl", "template.prompt='{question}'",
                     "template.response='{answer}'", "retrieval.corpus=corpus.jsonl",
                     "hydra.run.dir=run"),
            "retrieval.corpus", "no {retrieved} placeholder", tmp_path=rag_data)


# ------------------------------------------------------------------------------ eval, generate

@pytest.mark.slow
def test_four_way_evaluation_and_generation_retrieve(tune_cli, rag_data, capsys):
    rc, out, err = tune_cli("data.path=train.jsonl", "data.test_path=test.jsonl", *RAG,
                            "retrieval.k=1", "schedule.max_steps=2", "runtime.checkpoint_every=0",
                            "schedule.batch_size=2", "data.max_length=128", "hydra.run.dir=run")
    assert rc == 0, err
    ev = json.loads((rag_data / "run" / "eval.json").read_text())
    four = ev["four_way"]
    assert list(four) == ["base", "base + retrieval", "tuned", "tuned + retrieval"]
    assert four["tuned + retrieval"] == ev["tuned"]["value"] and ev["tuned"]["retrieval"] is True
    assert four["base"] == ev["base_no_retrieval"]["value"]
    assert ev["base_no_retrieval"]["retrieval"] is False and ev["base_no_retrieval"]["n"] == 6
    lines = [json.loads(x) for x in (rag_data / "run" / "eval_predictions.jsonl").open()]
    assert {x["model"] for x in lines} == {"base", "tuned", "base_no_retrieval",
                                           "tuned_no_retrieval"}
    assert "With and without retrieval" in (rag_data / "run" / "report.html").read_text()

    from runtime.generate import Chat

    plan = Plan.load(rag_data / "run" / "plan.json")
    chat = Chat(plan, model=object())
    user, _ = chat.fill("Is kelptide any good?")
    assert chat.retrieved == [f"p{TOPICS.index('kelptide')}"]
    assert user.startswith("Passages:\n[p16] Trials of kelptide") and user.endswith(
        "Q: Is kelptide any good?")
    assert np.isfinite(ev["tuned"]["value"])
