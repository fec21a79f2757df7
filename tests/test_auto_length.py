"""data.max_length=auto, eval.max_new_tokens=auto, and what generate mode decodes, scores and shows.

The tiny word-level model (tiny_chat_dir) tokenises `w11 w12 ...` one token a word, and a plain
(template.chat=false) example is its prompt's words, its answer's words and the end token: the
token counts below are exact.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import write_jsonl


def _row(n_prompt: int, n_answer: int, seed: int) -> dict:
    """A row of n_prompt prompt words and n_answer answer words (its example: n_prompt + n_answer
    + 1 tokens, the end token last)."""
    word = lambda k: f"w{11 + (seed * 7 + k) % 85}"                # noqa: E731
    return {"text": " ".join(word(k) for k in range(n_prompt)),
            "label": " ".join(word(k + 3) for k in range(n_answer))}


def _rows(lengths, answer=2) -> list[dict]:
    """Rows whose examples have these token counts (answers of `answer` words)."""
    return [_row(n - answer - 1, answer, i) for i, n in enumerate(lengths)]


def _compile(model_dir, tmp_path, rows, **data):
    """`tune plan` of these rows (train.jsonl, nothing held out) for the tiny model; `data`: data.*
    settings."""
    from compiler import schema
    from compiler.compile import compile_plan

    cfg = schema.defaults()
    cfg["model"]["path"] = str(model_dir)
    cfg["data"].update(path=str(write_jsonl(tmp_path / "train.jsonl", rows)), val_fraction=0,
                       dedupe=False, task="generation")
    cfg["data"].update(data)
    cfg["template"].update(prompt="{text}", response="{label}", chat=False)
    cfg["runtime"].update(dtype="float32", matmul_dtype="float32")
    return compile_plan(cfg, recipe_info=None, command="plan")


# 197 examples of 40 tokens, two of 100 and one of 230: the p99 is 100 (the max is not)
SKEWED = [40] * 197 + [100, 100, 230]


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


# ------------------------------------------------------------------------------ data.max_length

def test_auto_picks_the_p99_rounded_up(tiny_chat_dir, tmp_path):
    plan = _compile(tiny_chat_dir, tmp_path, _rows(SKEWED), max_length="auto")
    c = plan.data.length_choice
    assert plan.data.max_length == 128 and plan.schedule.seq_len == 128     # rows follow it
    assert (c["tokens"], c["length"], c["rows"], c["over"]) == (100, 128, 200, 1)
    assert c["capped_by"] is None and plan.data.truncated == 1
    assert plan.config["data"]["max_length"] == "auto"

    # an int still works, and the length auto chose is the same token data as that int
    given = _compile(tiny_chat_dir, tmp_path, _rows(SKEWED), max_length=128)
    assert given.data.max_length == 128 and given.data.length_choice is None
    assert given.data.key == plan.data.key and given.data.cache == plan.data.cache
    assert given.hash != plan.hash                       # the config says auto
    default = _compile(tiny_chat_dir, tmp_path, _rows(SKEWED))
    assert default.data.max_length == 512 and default.data.length_choice is None

    # compiled again: the remembered data stage gives the same plan
    again = _compile(tiny_chat_dir, tmp_path, _rows(SKEWED), max_length="auto")
    assert again.hash == plan.hash and again.data.length_choice == c

    # short examples: never below 64; overrun by one token: the next multiple of 64
    assert _compile(tiny_chat_dir, tmp_path, _rows([12] * 50), max_length="auto"
                    ).data.max_length == 64
    assert _compile(tiny_chat_dir, tmp_path, _rows([129] * 50), max_length="auto"
                    ).data.max_length == 192


def test_auto_is_capped_by_the_model_context(tiny_chat_dir, tmp_path):
    plan = _compile(tiny_chat_dir, tmp_path, _rows([300] * 40), max_length="auto")
    c = plan.data.length_choice
    assert plan.model.config.max_position_embeddings == 256
    assert plan.data.max_length == 256 and c["wanted"] == 320
    assert c["capped_by"] == "max_position_embeddings" and plan.data.truncated == 40
    assert "320 wanted, capped at 256 by the model's context (max_position_embeddings=256)" \
        in c["text"]


def test_int_length_past_the_context_refused_when_an_example_reaches_it(tiny_chat_dir, tmp_path):
    from core.errors import PlanError

    # the default 512 is above the tiny model's 256 positions: fine while every example fits
    assert _compile(tiny_chat_dir, tmp_path, _rows([200] * 20)).data.max_length == 512
    with pytest.raises(PlanError) as e:
        _compile(tiny_chat_dir, tmp_path, _rows([200] * 19 + [300]))
    assert e.value.key == "data.max_length"
    assert "max_position_embeddings=256" in str(e.value) and "300 tokens" in str(e.value)
    # at the context, the long example is cut, not refused
    assert _compile(tiny_chat_dir, tmp_path, _rows([200] * 19 + [300]), max_length=256
                    ).data.truncated == 1


def test_auto_makes_room_for_the_longest_answer(tiny_chat_dir, tmp_path):
    """data.overlength=truncate never cuts an answer: auto raises the length to keep the longest
    whole rather than refuse it; with drop, the row is dropped at the p99's length."""
    rows = _rows([40] * 199) + [_row(9, 100, 7)]          # one answer of 101 tokens
    plan = _compile(tiny_chat_dir, tmp_path, rows, max_length="auto")
    c = plan.data.length_choice
    assert (c["tokens"], c["longest_answer"], plan.data.max_length) == (40, 101, 128)
    assert "raised to keep the longest answer (101 tokens) whole" in c["text"]
    # an answer the model's context cannot hold: refused, naming its line and auto's cap
    from core.errors import PlanError

    with pytest.raises(PlanError) as e:
        _compile(tiny_chat_dir, tmp_path, _rows([40] * 199) + [_row(5, 300, 3)], max_length="auto")
    assert (e.value.key, e.value.line) == ("data.max_length", 200)
    assert e.value.file.endswith("train.jsonl") and "The longest is 301 tokens" in e.value.message
    assert "data.max_length=auto chose 64 and may choose at most 256, set by the model's context " \
           "(max_position_embeddings=256)." in e.value.message
    dropped = _compile(tiny_chat_dir, tmp_path, rows, max_length="auto", overlength="drop")
    assert dropped.data.max_length == 64 and dropped.data.dropped_too_long == 1
    assert "1 of 200 rows (0.5%) would be cut at 64, by data.overlength=drop" in \
        dropped.data.length_choice["text"]


def test_auto_is_capped_by_the_memory_estimate(tiny_chat_dir, tmp_path, monkeypatch):
    """The longest length whose training step the memory estimate keeps within 90% of a device
    (an estimate of a MB per token of a row here, on a device of 170 MB: 128 fits, 192 not)."""
    import compiler.compile as C
    from core.plan import Devices

    device = Devices(platform="cpu", kind="small device", count=1, memory=170 * 10**6,
                     peak_flops=None, cores=2)
    monkeypatch.setattr(C, "_devices", lambda: device)
    monkeypatch.setattr(C, "_memory", lambda model, adapter, rt, batch, seq_len, reference: dict(
        weights=0, adapter_optimizer=0, activations=seq_len * 10**6, attention=0, logits=0,
        total=seq_len * 10**6))
    plan = _compile(tiny_chat_dir, tmp_path, _rows([150] * 60), max_length="auto")
    c = plan.data.length_choice
    assert (plan.data.max_length, c["wanted"], c["capped_by"]) == (128, 192, "memory")
    assert "capped at 128 by the memory estimate (rows of 192 tokens would need about 183 MiB a " \
           "device, over 90% of small device's 162 MiB)" in c["text"]
    assert plan.estimates.memory["total"] == 128 * 10**6
    assert not any("memory" in w for w in plan.warnings)


def test_plan_says_what_auto_chose(tune_cli, tiny_chat_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _rows(SKEWED))
    rc, out, err = tune_cli("plan", "hydra.run.dir=run", f"model.path={tiny_chat_dir}",
                            "data.path=train.jsonl", "data.max_length=auto", "data.val_fraction=0",
                            "data.dedupe=false", "data.task=generation", "template.chat=false")
    assert rc == 0, err
    said = ("max_length auto → 128 (p99 of prompt + answer tokens: 100; 1 of 200 rows (0.5%) "
            "would be cut at 128, by data.overlength=truncate)")
    assert said in flat(out)
    assert "eval.max_new_tokens auto → 8 (the longest training answer: 3 tokens with its end " \
           "token, rounded up to a multiple of 8)" in flat(out)
    doc = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert doc["data"]["length_choice"]["text"] == said and doc["data"]["max_length"] == 128
    assert doc["eval"]["max_new_tokens"] == 8 and doc["config"]["eval"]["max_new_tokens"] == "auto"


@pytest.mark.parametrize("override,needles", [
    ("data.max_length=huge", ["data.max_length: must be an integer or `auto`, got 'huge'",
                              "auto lets tune choose"]),
    ("data.max_length=8", ["data.max_length: must be at least 16, got 8"]),
    ("eval.max_new_tokens=lots", ["eval.max_new_tokens: must be an integer or `auto`"]),
    ("eval.max_new_tokens=0", ["eval.max_new_tokens: must be at least 1"]),
])
def test_bad_values_are_refused(tune_cli, clf_data, tmp_path, override, needles):
    clf_data()
    rc, out, err = tune_cli("plan", "hydra.run.dir=run", "data.path=data/train.jsonl", override)
    text = " ".join(err.split())
    assert rc == 2 and "Traceback" not in out + err, err
    for needle in needles:
        assert needle in text, (needle, err)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ eval.max_new_tokens

def test_max_new_tokens_auto_follows_the_longest_answer(tiny_chat_dir, tmp_path):
    rows = [_row(10, 2 + i % 10, i) for i in range(60)] + [_row(10, 16, 99)]   # 17 tokens
    plan = _compile(tiny_chat_dir, tmp_path, rows)
    assert plan.eval.mode == "generate" and plan.eval.max_new_tokens == 24
    assert plan.eval.max_new_tokens_choice == (
        "eval.max_new_tokens auto → 24 (the longest training answer: 17 tokens with its end "
        "token, rounded up to a multiple of 8)")
    # rounded up past data.max_length: data.max_length
    long = [_row(5, 2, i) for i in range(30)] + [_row(2, 58, 3)]             # 59 tokens
    capped = _compile(tiny_chat_dir, tmp_path, long, max_length=60)
    assert capped.eval.max_new_tokens == 60
    assert "; at most data.max_length=60)" in capped.eval.max_new_tokens_choice
    # an int still works
    from compiler import schema
    from compiler.compile import compile_plan

    cfg = json.loads(json.dumps(plan.config))
    cfg["eval"]["max_new_tokens"] = 5
    five = compile_plan(cfg, recipe_info=None)
    assert five.eval.max_new_tokens == 5 and five.eval.max_new_tokens_choice is None
    assert schema.BY_PATH["eval.max_new_tokens"].default == "auto"


def test_max_new_tokens_auto_for_classification(tiny_chat_dir, tmp_path):
    rows = [{"text": f"w{11 + i % 80} w{12 + i % 70}", "label": ("w90", "w91 w92", "w93")[i % 3]}
            for i in range(60)]
    plan = _compile(tiny_chat_dir, tmp_path, rows, task="classification")
    assert plan.eval.mode == "constrained" and plan.eval.max_new_tokens == 16
    assert plan.eval.max_new_tokens_choice.startswith(
        "eval.max_new_tokens auto → 16 (classification: constrained decoding follows the labels'")


# ------------------------------------------------------------------------------ decoding

def test_generation_stops_at_the_end_of_turn_token(tiny_chat_dir, tmp_path):
    """Generate mode's decoder stops at the chat template's end-of-turn token as at the model's
    eos, and the answer's text does not hold it: a tokenizer whose <|im_end|> is the token the
    tiny model generates third ends the answer before it."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel

    from runtime import build
    from runtime.decode import greedy_generate
    from runtime.weights import load_pretrained
    from tests.conftest import make_plan

    model = load_pretrained(tiny_chat_dir)
    prompt = [1, 5, 9, 33, 60, 7]
    # two end ids no token has: the shapes of the decoding below, so one program serves both
    free = greedy_generate(model, [prompt], max_new_tokens=8, eos_ids=(-1, -2), pad_id=0,
                           batch_size=1)[0]
    k = next(j for j in range(1, len(free)) if free[j] not in free[:j] and free[j] > 2)
    assert 2 not in free[:k]
    end = free[k]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": end}
    vocab.update({f"w{i}": i for i in range(3, 96) if i != end})
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<pad>", "<s>", "</s>", "<|im_end|>")])
    plan = make_plan(tiny_chat_dir, evaluation=dict(mode="generate"))
    dec = build.decoding(plan, tok)
    assert set(dec["eos_ids"]) == {2, end}               # the model's eos and the end of turn
    out = greedy_generate(model, [prompt], max_new_tokens=8, **dec)[0]
    assert out == free[:k]
    assert "<|im_end|>" in tok.decode(free[:k + 1], skip_special_tokens=False)
    assert "<|im_end|>" not in tok.decode(out, skip_special_tokens=False)


def test_smollm2_ends_answers_at_im_end(tune_cli, clf_data, tmp_path):
    from core.plan import Plan
    from core.tokenizer import load_tokenizer
    from runtime import build

    clf_data()
    rc, out, err = tune_cli("plan", "hydra.run.dir=run", "data.path=data/train.jsonl",
                            "eval.mode=generate")
    assert rc == 0, err
    plan = Plan.load(tmp_path / "run" / "plan.json")
    tok = load_tokenizer(plan.model.dir)
    ends = build.decoding(plan, tok)["eos_ids"]
    assert tok.token_to_id("<|im_end|>") in ends and set(plan.model.eos_token_ids) <= set(ends)


# ------------------------------------------------------------------------------ eval.json, report

N_TEST = 10


class _Examples:
    """The test rows evaluate() reads instead of a plan's token cache."""

    def __init__(self, prompts, references):
        self.test = ([np.asarray(p + [2], np.int32) for p in prompts],
                     np.asarray([len(p) for p in prompts], np.int32))
        self.references = references

    def split(self, name):
        return self.test if name == "test" else ([], np.zeros(0, np.int32))

    def references_of(self, name):
        return self.references if name == "test" else []


@pytest.mark.slow
def test_eval_json_samples_and_report(tiny_chat_dir, tmp_path, monkeypatch):
    """Generate mode: eval.json's base and tuned entries hold both generation metrics and the first
    8 rows (prompt cut to 300 characters, reference, prediction, its ROUGE-L); the report shows
    them side by side."""
    import html

    import jax
    from flax import nnx

    import runtime.evaluate
    from core.records import EvalFile
    from runtime import metrics as M
    from runtime.evaluate import evaluate_before_after
    from runtime.model import LoraConfig, LoRAParam
    from runtime.peft import save_peft_adapter
    from runtime.report import write_report
    from runtime.weights import load_pretrained
    from tests.conftest import make_plan

    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))
    model = load_pretrained(tiny_chat_dir, lora=lora, rngs=nnx.Rngs(1))
    flat_state = [(p, v.replace(0.5 * jax.random.normal(jax.random.PRNGKey(i), v.shape)))
                  if str(p[-1]) == "lora_B" else (p, v)
                  for i, (p, v) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam)))]
    nnx.update(model, nnx.from_flat_state(flat_state))
    run_dir = tmp_path / "run"
    save_peft_adapter(model, run_dir / "adapter", base_model_name_or_path=str(tiny_chat_dir),
                      lora=lora)
    rng = np.random.default_rng(0)
    # 65 to 91 words: one length bucket (one decoding program); 60 words are 247 characters
    prompts = [[1, 5, 7] + rng.integers(11, 96, size=90 if i == 1 else 60 + i).tolist() + [6, 7]
               for i in range(N_TEST)]
    references = [f"w{20 + i} w{30 + i}" for i in range(N_TEST)]
    monkeypatch.setattr(runtime.evaluate, "load_examples",
                        lambda cache: _Examples(prompts, references))
    plan = make_plan(tiny_chat_dir, sizes={"train": 9, "val": 0, "test": N_TEST},
                     adapter=dict(rank=4, targets=lora.targets),
                     evaluation=dict(metric="exact_match", mode="generate", max_new_tokens=6,
                                     limit=None, batch_size=8))
    evaluate_before_after(plan, run_dir, verbose=False)

    ev = EvalFile.read(run_dir)
    predicted = {}
    for line in (run_dir / "eval_predictions.jsonl").read_text().splitlines():
        r = json.loads(line)
        predicted[r["model"], r["index"]] = r["prediction"]
    for name in ("base", "tuned"):
        entry = ev.entries[name]
        assert entry.metric == "exact_match"
        preds = [predicted[name, i] for i in range(N_TEST)]
        assert entry.get("exact_match") == entry.value == M.exact_match(preds, references)
        assert entry.get("rouge_l") == pytest.approx(M.rouge_l(preds, references))
        samples = entry.get("samples")
        assert [x["index"] for x in samples] == list(range(8))
        for x in samples:
            i = x["index"]
            assert (x["reference"], x["prediction"]) == (references[i], preds[i])
            assert x["rouge_l"] == pytest.approx(M.rouge_l_pair(preds[i], references[i]))
            assert len(x["prompt"]) <= 300 and x["prompt"].endswith("A :")
        assert samples[1]["prompt"].startswith("…") and len(samples[1]["prompt"]) == 300
        assert samples[0]["prompt"].startswith("Q : w")           # 247 characters: whole
    assert [x["prediction"] for x in ev.entries["base"].get("samples")] != \
        [x["prediction"] for x in ev.entries["tuned"].get("samples")]

    from runtime.evaluate import format_results

    printed = format_results(ev)
    assert "exact_match on 10 test rows: base" in printed and "\n  rouge_l: base 0." in printed
    page = write_report(run_dir).read_text()
    assert "<h3>Answers side by side</h3>" in page
    assert "<th>prompt</th><th>reference</th><th>base answer</th><th>tuned answer</th>" in page
    table = page[page.index("Answers side by side"):]
    for i in range(8):                           # each row: prompt, reference, base, tuned
        cells = [html.escape(s) for s in (ev.entries["base"].get("samples")[i]["prompt"],
                                          references[i], predicted["base", i],
                                          predicted["tuned", i])]
        row = table[table.index(f">{cells[0]}</td>"):]
        row, at = row[:row.index("</tr>")], 0
        for c in cells:
            at = row.index(f">{c}<", at) + 1
    metrics = page[:page.index("Answers side by side")]
    assert "<tr><th>rouge_l</th>" in metrics          # the other generation metric, beside
