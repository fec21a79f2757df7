"""Evaluation (base, tuned, before/after, eval.json) and generation, on a tiny random Llama with a
word-level tokenizer."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from runtime.decode import greedy_generate
from core.records import EvalFile
from runtime.evaluate import evaluate, evaluate_before_after, format_results, write_eval
from runtime.model import LoraConfig, LoRAParam

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
EOS = 2
DECODE = {"batch_size": 8, "pad_id": 0}
N_TEST = 6


class Examples:
    def __init__(self, splits, references, labels):
        self._splits, self.references, self.labels = splits, references, labels

    def split(self, name):
        return self._splits.get(name, ([], np.zeros(0, np.int32)))

    def references_of(self, name):
        return self.references if name == "test" else []


@pytest.fixture
def use_examples(monkeypatch):
    """use_examples(examples): the test rows evaluate() reads (instead of the plan's token cache)."""
    import runtime.evaluate

    def apply(examples):
        monkeypatch.setattr(runtime.evaluate, "load_examples", lambda cache: examples)

    return apply


def _labels():
    """The toy label set: w50, w51, w52, each answered by its word then the end token."""
    from core.plan import Label

    return tuple(Label(f"w{t}", (t, EOS), 3) for t in (50, 51, 52))


def _plan(model_dir, *, n_test=N_TEST, chat=False, system=None, labels=(), seed=0, **eval_cfg):
    """A typed plan for the tiny chat model: its template, evaluation settings and test row count."""
    from conftest import TINY_CHAT_TEMPLATE, make_plan

    ev = dict(metric="exact_match", max_new_tokens=6, limit=None, batch_size=8, mode="generate")
    ev.update(eval_cfg)
    return make_plan(model_dir, sizes={"train": 9, "val": 0, "test": n_test}, evaluation=ev,
                     labels=labels, seed=seed, adapter=dict(rank=4, targets=LORA.targets),
                     template=dict(prompt="Q : {text} A :", response="{label}", chat=chat,
                                   system=system, chat_template=TINY_CHAT_TEMPLATE if chat else None))


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[1, 5, 7] + rng.integers(11, 96, size=int(rng.integers(2, 9))).tolist() + [6, 7]
            for _ in range(n)]


def _decode(tokenizer, outs):
    return [t.strip() for t in tokenizer.decode_batch(outs, skip_special_tokens=True)]


@pytest.fixture(scope="module")
def setup(tiny_chat_dir, tmp_path_factory):
    """A run directory with a (random, non-zero) adapter, and what base and tuned answer."""
    from core.tokenizer import load_tokenizer
    from runtime.peft import save_peft_adapter
    from runtime.weights import load_pretrained

    tok = load_tokenizer(tiny_chat_dir)
    model = load_pretrained(tiny_chat_dir, lora=LORA, rngs=nnx.Rngs(1))
    state = nnx.state(model, LoRAParam)
    flat = [(p, v.replace(0.5 * jax.random.normal(jax.random.PRNGKey(i), v.shape)))
            if str(p[-1]) == "lora_B" else (p, v) for i, (p, v) in enumerate(nnx.to_flat_state(state))]
    nnx.update(model, nnx.from_flat_state(flat))
    run_dir = tmp_path_factory.mktemp("run")
    save_peft_adapter(model, run_dir / "adapter", base_model_name_or_path=str(tiny_chat_dir), lora=LORA)

    prompts = _prompts(N_TEST)
    base = load_pretrained(tiny_chat_dir)
    base_out = _decode(tok, greedy_generate(base, prompts, max_new_tokens=6, eos_ids=[EOS, 4], **DECODE))
    tuned_out = _decode(tok, greedy_generate(model, prompts, max_new_tokens=6, eos_ids=[EOS, 4], **DECODE))
    assert base_out != tuned_out                 # the adapter changes the answers
    # references: the base model's answers for the first half, something else for the rest
    refs = base_out[:N_TEST // 2] + ["w20 w21"] * (N_TEST - N_TEST // 2)
    train = ([np.asarray(p + [50 + (i % 3), EOS], np.int32) for i, p in enumerate(_prompts(9, seed=5))],
             np.asarray([len(p) for p in _prompts(9, seed=5)], np.int32))
    test = ([np.asarray(p + [EOS], np.int32) for p in prompts], np.asarray([len(p) for p in prompts]))
    examples = Examples({"train": train, "test": test}, refs, ["w50", "w51", "w52"])
    return SimpleNamespace(dir=tiny_chat_dir, run_dir=run_dir, tok=tok, base_out=base_out,
                           tuned_out=tuned_out, refs=refs, examples=examples, prompts=prompts,
                           tuned=model)


def test_base_and_tuned(setup, use_examples, tmp_path):
    use_examples(setup.examples)
    plan = _plan(setup.dir)
    base = evaluate(plan)
    assert base["model"] == "base" and base["n"] == N_TEST
    assert base["predictions"] == setup.base_out
    assert base["value"] == pytest.approx(0.5)
    assert len(base["worst"]) == N_TEST // 2 and base["worst"][0]["reference"] == "w20 w21"
    assert base["worst"][0]["prompt_tail"].endswith("A :")

    tuned = evaluate(plan, adapter_dir=setup.run_dir / "adapter")
    assert tuned["model"] == "tuned" and tuned["predictions"] == setup.tuned_out

    # eval.limit: rows drawn with the plan's seed (a sorted test file's first rows would be one
    # class), the same ones every time; their predictions are those of the full run
    limited = evaluate(plan, limit=2)
    rows = limited["rows"]
    assert limited["n"] == 2 and len(rows) == 2 and rows == sorted(rows)
    assert limited["predictions"] == [setup.base_out[i] for i in rows]
    assert limited["references"] == [setup.refs[i] for i in rows]
    assert evaluate(plan, limit=2)["rows"] == rows
    draws = {tuple(evaluate(_plan(setup.dir, limit=3, seed=s))["rows"]) for s in range(6)}
    assert len(draws) > 1 and all(len(d) == 3 for d in draws)


def test_before_after_writes_eval_json(setup, use_examples, tmp_path):
    import shutil

    use_examples(setup.examples)
    run_dir = tmp_path / "run"
    shutil.copytree(setup.run_dir, run_dir)
    plan = _plan(setup.dir)
    doc = evaluate_before_after(plan, run_dir, verbose=False)
    on_disk = json.loads((run_dir / "eval.json").read_text())
    assert doc.to_dict() == on_disk and EvalFile.from_dict(on_disk) == doc
    assert on_disk["metric"] == "exact_match" and on_disk["n"] == N_TEST
    assert on_disk["base"]["value"] == pytest.approx(0.5)
    tuned_value = np.mean([p == r for p, r in zip(setup.tuned_out, setup.refs)])
    assert on_disk["tuned"]["value"] == pytest.approx(tuned_value)
    assert on_disk["value"] == on_disk["tuned"]["value"]
    assert on_disk["delta"] == pytest.approx(tuned_value - 0.5)
    assert "predictions" not in on_disk["tuned"]
    rows = [json.loads(x) for x in (run_dir / "eval_predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows if r["model"] == "base"] == setup.base_out
    assert [r["prediction"] for r in rows if r["model"] == "tuned"] == setup.tuned_out

    # `tune eval run=DIR` later: the tuned entry is replaced, the base entry (same rows) is kept
    evaluate(plan, str(run_dir), str(run_dir / "adapter"), verbose=False)
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["base"] == on_disk["base"] and again["tuned"]["value"] == on_disk["tuned"]["value"]
    # ... but a different row count does not mix with it
    evaluate(plan, str(run_dir), str(run_dir / "adapter"), limit=2, verbose=False)
    assert "base" not in json.loads((run_dir / "eval.json").read_text())
    assert "exact_match on 2 test rows: tuned" in format_results(EvalFile.read(run_dir))


def test_no_test_rows(setup, use_examples, tmp_path):
    use_examples(Examples({}, [], []))
    assert evaluate_before_after(_plan(setup.dir, n_test=0), tmp_path, verbose=False) is None
    with pytest.raises(ValueError, match="data.test_path"):
        evaluate(_plan(setup.dir))


def test_choices_mode(setup, use_examples):
    from runtime.decode import choice_logprobs
    from runtime.weights import load_pretrained

    use_examples(setup.examples)
    refs = ["w50", "w51", "w52", "w50", "w51", "w52"]
    setup.examples.references = refs
    try:
        plan = _plan(setup.dir, mode="choices", metric="macro_f1", labels=_labels())
        res = evaluate(plan)
    finally:
        setup.examples.references = setup.refs
    base = load_pretrained(setup.dir)
    scores = choice_logprobs(base, setup.prompts, [[50, EOS], [51, EOS], [52, EOS]], **DECODE)
    want = [["w50", "w51", "w52"][k] for k in scores.argmax(1)]
    assert res["predictions"] == want
    assert res["mode"] == "choices" and set(res["per_class"]) <= {"w50", "w51", "w52"}
    from runtime.metrics import macro_f1

    assert res["value"] == pytest.approx(macro_f1(want, refs, ["w50", "w51", "w52"]))


def test_constrained_mode_answers_within_the_label_set(setup, use_examples):
    from runtime.decode import LabelTrie, classify
    from runtime.weights import load_pretrained

    use_examples(setup.examples)
    refs = ["w50", "w51", "w52", "w50", "w51", "w52"]
    setup.examples.references = refs
    try:
        res = evaluate(_plan(setup.dir, mode="constrained", metric="accuracy", labels=_labels()))
        free = evaluate(_plan(setup.dir, mode="generate", metric="accuracy", labels=_labels()))
    finally:
        setup.examples.references = setup.refs
    base = load_pretrained(setup.dir)
    picked, _ = classify(base, setup.prompts, LabelTrie.build([[50, EOS], [51, EOS], [52, EOS]]),
                         eos_ids=(), **DECODE)
    assert res["predictions"] == [["w50", "w51", "w52"][k] for k in picked]
    assert res["mode"] == "constrained" and set(res["predictions"]) <= {"w50", "w51", "w52"}
    # free generation from the same prefill is reported beside it, and is the generate mode's answer
    assert res["free"]["accuracy"] == pytest.approx(free["value"])
    valid = sum(p in ("w50", "w51", "w52") for p in free["predictions"]) / len(refs)
    assert res["free"]["invalid_rate"] == pytest.approx(1 - valid)
    assert res["confusion"]["labels"] == ["w50", "w51", "w52"]
    assert sum(map(sum, res["confusion"]["matrix"])) == len(refs)
    assert res["accuracy"] == pytest.approx(np.mean([p == r for p, r in zip(res["predictions"],
                                                                              refs)]))
    with pytest.raises(ValueError, match="label set"):
        evaluate(_plan(setup.dir, mode="constrained"))


def test_write_eval_single_and_pair(tmp_path):
    r = {"metric": "accuracy", "value": 0.25, "n": 4, "worst": [], "model": "base", "data_key": "k",
         "mode": "generate", "predictions": ["a"] * 4, "references": ["b"] * 4}
    write_eval(tmp_path, r)
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["value"] == 0.25 and doc["base"]["value"] == 0.25 and "tuned" not in doc
    write_eval(tmp_path, dict(r, model="tuned", value=0.75))
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["value"] == 0.75 and doc["base"]["value"] == 0.25 and doc["delta"] == 0.5
    assert "base 0.2500, tuned 0.7500 (change +0.5000)" in format_results(EvalFile.from_dict(doc))
    assert EvalFile.read(tmp_path).entries["tuned"].get("worst") == []


# --- generate -----------------------------------------------------------------------------------

def _write_plan(run_dir, model_dir, *, chat, system=None):
    _plan(model_dir, chat=chat, system=system).write(run_dir / "plan.json")


@pytest.fixture
def loaded(setup, monkeypatch):
    """generate() gets the already loaded tuned model (no second load and compile), after checking
    it asked for the run's adapter."""
    import runtime.build

    def load(plan, adapter_dir=None, **kw):
        assert adapter_dir is not None and adapter_dir.name == "adapter"
        assert (adapter_dir / "adapter_model.safetensors").is_file()
        return setup.tuned

    monkeypatch.setattr(runtime.build, "scoring_model", load)


def test_generate_plain(setup, loaded, tmp_path):
    import shutil

    from runtime.generate import generate

    run_dir = tmp_path / "run"
    shutil.copytree(setup.run_dir, run_dir)
    _write_plan(run_dir, setup.dir, chat=False)
    out = io.StringIO()
    answer = generate(str(run_dir), "w30 w31", max_new_tokens=6, out=out)
    # the text fills template.prompt, then gets the tokenizer's prefix (none here): Q : w30 w31 A :
    ids = [5, 7, 30, 31, 6, 7]
    want = _decode(setup.tok, greedy_generate(setup.tuned, [ids], max_new_tokens=6, eos_ids=[EOS, 4], **DECODE))[0]
    assert answer == want and out.getvalue().strip() == want
    raw = generate(str(run_dir), "w30 w31", max_new_tokens=6, raw=True, out=io.StringIO())
    assert raw == _decode(setup.tok, greedy_generate(setup.tuned, [[30, 31]], max_new_tokens=6,
                                                     eos_ids=[EOS, 4], **DECODE))[0]


def test_generate_chat_and_interactive(setup, loaded, tmp_path, monkeypatch):
    import shutil

    import runtime.generate as G

    run_dir = tmp_path / "run"
    shutil.copytree(setup.run_dir, run_dir)
    _write_plan(run_dir, setup.dir, chat=True, system="w40")
    seen = []
    real = G.stream_tokens

    def spy(model, ids, **kw):
        seen.append(list(ids))
        return real(model, ids, **kw)

    monkeypatch.setattr(G, "stream_tokens", spy)
    answer = G.generate(str(run_dir), "w30", max_new_tokens=6, out=io.StringIO())
    # <|im_start|>system w40<|im_end|><|im_start|>user Q : w30 A :<|im_end|><|im_start|>assistant
    assert seen[0] == [3, 10, 40, 4, 3, 8, 5, 7, 30, 6, 7, 4, 3, 9]
    want = _decode(setup.tok, greedy_generate(setup.tuned, seen[:1], max_new_tokens=6, eos_ids=[EOS, 4], **DECODE))[0]
    assert answer == want

    seen.clear()
    lines = iter(["w30", "", "w31", "exit", "never read"])
    out = io.StringIO()
    assert G.generate(str(run_dir), None, max_new_tokens=6, out=out, input_fn=lambda _: next(lines)) is None
    assert len(seen) == 2
    assert seen[1][:len(seen[0])] == seen[0]          # the second turn sees the first (history)
    assert len(seen[1]) > len(seen[0]) + 5
    lines = iter(["w30"])

    def eof(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert G.generate(str(run_dir), None, max_new_tokens=2, out=io.StringIO(), input_fn=eof) is None


@pytest.mark.parametrize("mode, labelled", [("constrained", True), ("generate", False)])
def test_generate_answers_as_the_runs_plan_says(setup, loaded, tmp_path, monkeypatch, mode, labelled):
    """A classification run answers within its label set, unless its own plan (its recipe) set
    eval.mode=generate: the decision is read from the run, not re-derived from this command line."""
    import shutil

    import runtime.generate as G

    run_dir = tmp_path / "run"
    shutil.copytree(setup.run_dir, run_dir)
    _plan(setup.dir, chat=False, mode=mode, metric="accuracy", labels=_labels()).write(
        run_dir / "plan.json")
    calls = []
    monkeypatch.setattr(G, "classify", lambda *a, **kw: calls.append("labels") or ([1], None))
    real = G.stream_tokens
    monkeypatch.setattr(G, "stream_tokens",
                        lambda *a, **kw: calls.append("free") or real(*a, **kw))
    answer = G.generate(str(run_dir), "w30", max_new_tokens=4, out=io.StringIO())
    assert calls == (["labels"] if labelled else ["free"])
    if labelled:
        assert answer == "w51"
    calls.clear()           # the command line's own eval.mode wins over the plan's
    G.generate(str(run_dir), "w30", max_new_tokens=4, out=io.StringIO(), free=labelled)
    assert calls == (["free"] if labelled else ["labels"])


def test_generate_samples_with_a_seed(setup, loaded, tmp_path):
    """temperature / top_p / seed: the answer is drawn (not the greedy one), and the same seed
    draws the same answer — the tokens of the decoder's own sampling for that prompt."""
    import shutil

    from runtime.decode import Sampling, stream_tokens
    from runtime.generate import generate

    run_dir = tmp_path / "run"
    shutil.copytree(setup.run_dir, run_dir)
    _write_plan(run_dir, setup.dir, chat=False)
    ids = [5, 7, 30, 31, 6, 7]                      # Q : w30 w31 A :  (see test_generate_plain)
    hot = [Sampling(temperature=2.0, top_p=0.98, seed=s) for s in range(4)]
    answers = [generate(str(run_dir), "w30 w31", max_new_tokens=8, out=io.StringIO(), sampling=h)
               for h in hot]
    for h, a in zip(hot, answers):
        want = list(stream_tokens(setup.tuned, ids, max_new_tokens=8, eos_ids=[EOS, 4], pad_id=0,
                                  sampling=h))
        assert a == _decode(setup.tok, [want])[0]
        assert generate(str(run_dir), "w30 w31", max_new_tokens=8, out=io.StringIO(),
                        sampling=h) == a
    greedy = generate(str(run_dir), "w30 w31", max_new_tokens=8, out=io.StringIO())
    assert len(set(answers + [greedy])) > 1
