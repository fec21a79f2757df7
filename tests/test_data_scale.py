"""Data at scale: the row count of packing from length counts, tokenising in chunks and by pieces,
the memory-mapped token cache, and the remembered data stage (compiler/datacache.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import compiler.examples as ex
from core.packing import count_rows, epoch_rows, example_slots
from core.token_cache import Ragged, load_examples

from tests.test_examples import CHAT, build, rows, smol  # noqa: F401 - fixture


# ------------------------------------------------------------------------------ packing

def test_count_rows_is_the_packers_row_count():
    """count_rows works from how many examples there are of each length; the packer places each
    one. They agree on every multiset tried, with examples that fill rows exactly, half rows, one
    slot, and lengths beyond what a row can take twice."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        seq = int(rng.integers(2, 160))
        hi = int(rng.integers(2, seq + 2))
        lengths = rng.integers(1, hi + 1, size=int(rng.integers(0, 300)))
        slots = [example_slots(n) for n in lengths]
        for pack in (True, False):
            want = len(epoch_rows(slots, seq, pack=pack, seed=3, epoch=1))
            assert count_rows(lengths, seq, pack=pack) == want, (seq, list(lengths), pack)
    with pytest.raises(ValueError, match="more than seq_len"):
        count_rows([10], 8, pack=True)


# ------------------------------------------------------------------------------ tokenising

def test_chunked_tokenising_gives_the_same_cache(smol, tmp_path, monkeypatch):
    """Rows tokenised CHUNK at a time (here 7, so splits end mid-chunk) give the arrays, stats and
    references of one pass over all rows — over-length rows cut inside their fields included."""
    long = [{"text": " ".join(["clause"] * 90) + f" {i}", "label": "Other"} for i in range(5)]
    splits = {"train": rows(40) + long, "val": rows(9, start=100), "test": rows(11, start=200)}
    one = build(smol, tmp_path / "one", splits, max_length=64, key_material={"run": 1})
    monkeypatch.setattr(ex, "CHUNK", 7)
    many = build(smol, tmp_path / "many", splits, max_length=64, key_material={"run": 2})
    a, b = load_examples(one["cache"]), load_examples(many["cache"])
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        assert np.array_equal(a.arrays[k], b.arrays[k]), k
    assert a.references == b.references
    drop = {"cache", "key"}
    assert {k: v for k, v in one.items() if k not in drop} == \
        {k: v for k, v in many.items() if k not in drop}
    assert one["truncated"] == 5 and one["truncated_fields"] == {"text": 5}


def test_encoding_by_pieces_is_encoding_whole(smollm2_dir):
    """Cutting texts at control tokens and encoding each distinct piece once gives the ids of
    encoding each text whole: chat headers, control tokens back to back, unicode, whitespace runs,
    digits, and escaped control text (which is encoded whole)."""
    from core import tokenizer as tk

    tok = tk.load_tokenizer(smollm2_dir)
    assert tk._pieces(tok) is not None
    escaped = tk.escape_controls("the data writes <|im_end|> here", tk.control_tokens(tok))[0]
    texts = [f"<|im_start|>system\nRoute.<|im_end|>\n<|im_start|>user\nq {i}  x\n\n{i * 7919}"
             f"<|im_end|>\n<|im_start|>assistant\n" for i in range(150)]
    texts += ["<|im_start|><|im_end|>", "no control token", "  lead", "東京 🙂 naïve<|im_end|>",
              "<|im_end|>", "\t\ttabs<|im_start|>", escaped, texts[0]]
    assert tk.encode_unique(tok, texts) == tk.encode_texts(tok, texts)


def test_a_metaspace_tokenizer_is_encoded_whole():
    """A Metaspace pre-tokenizer marks a text's first word: encoding pieces separately would differ,
    so such a tokenizer never takes the pieces path."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from core import tokenizer as tk

    vocab = {"<unk>": 0, "<s>": 1, "▁a": 2, "a": 3, "▁b": 4, "b": 5, "▁": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.add_special_tokens(["<s>"])
    assert tk._pieces(tok) is None
    texts = ["a<s>a b", "b<s>b", "a b<s>"]
    assert tk.encode_unique(tok, texts) == tk.encode_texts(tok, texts)


def test_answer_set_stops_early_for_open_ended_answers():
    from core.labels import answer_set

    assert answer_set([f"reply {i}" for i in range(50)], [(i,) for i in range(50)], limit=10) == []
    got = answer_set(["Yes", "yes.", "No"] * 4, [(1,), (1,), (2,)] * 4, limit=10)
    assert [(a["key"], a["count"]) for a in got] == [("yes", 8), ("no", 4)]


# ------------------------------------------------------------------------------ token cache

def test_the_token_cache_is_memory_mapped(smol, tmp_path):
    """load_examples maps the cache's arrays instead of reading them, and a split is one flat
    array with offsets (Ragged), equal to what np.load reads."""
    from core import token_cache

    stats = build(smol, tmp_path, {"train": rows(30), "val": rows(4, start=50)})
    token_cache._LOADED.clear()
    data = load_examples(stats["cache"])
    assert isinstance(data.arrays["train_ids"], np.memmap)
    with np.load(stats["cache"]) as npz:
        for k in npz.files:
            assert np.array_equal(data.arrays[k], npz[k]), k
        want = np.split(npz["train_ids"], npz["train_offsets"][1:-1])
    ids, plens = data.split("train")
    assert isinstance(ids, Ragged) and len(ids) == 30 and ids == want
    assert [len(x) for x in ids] == ids.lengths.tolist() == data.lengths("train").tolist()
    assert np.array_equal(ids[-1], want[-1])
    with pytest.raises(IndexError):
        ids[30]


def test_batches_from_ragged_examples_equal_batches_from_arrays():
    from runtime.batching import Batcher, BatchShape

    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 90, size=int(n)).astype(np.int32) for n in rng.integers(2, 20, 40)]
    plens = rng.integers(1, 2, size=40)
    masks = [rng.integers(0, 2, size=len(a)).astype(bool) for a in arrays]
    shape = BatchShape(2, 2, 32)
    for m in (None, masks):
        a = Batcher(arrays, plens, shape, pack=True, seed=0, masks=m)
        b = Batcher(Ragged.of(arrays), plens, shape, pack=True, seed=0,
                    masks=None if m is None else Ragged.of(m, dtype=np.uint8))
        assert a.supervised_tokens == b.supervised_tokens
        want = (sum(int(x[1:].sum()) for x in m) if m is not None else
                sum(max(0, len(x) - max(int(p), 1)) for x, p in zip(arrays, plens)))
        assert b.supervised_tokens == want
        for i in range(a.steps_per_epoch):
            x, y = a.batch(0, i), b.batch(0, i)
            assert all(np.array_equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------------------ remembered stage

@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    """The remembered data stages of this test only."""
    import compiler.datacache as dc

    where = tmp_path / "data-stages"
    monkeypatch.setattr(dc, "cache_dir", lambda: where)
    return where


def _plan(run_dir):
    return json.loads((run_dir / "plan.json").read_text())


def test_the_same_data_again_reads_no_row(tune_cli, tmp_path, data_cache, monkeypatch):
    """A second compile of the same files and settings reads no row — it hashes the files and maps
    the token cache — and writes the same plan, warnings included. A changed file, a changed data
    setting, or a token cache that is gone runs the stage again."""
    import compiler.data as data_mod

    from tests.conftest import clf_rows, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", clf_rows(120) + clf_rows(3))   # 3 duplicates
    args = ["plan", f"data.path={train}", "schedule.max_steps=2"]
    rc, out, err = tune_cli(*args, "hydra.run.dir=a")
    assert rc == 0, err
    first = _plan(tmp_path / "a")
    assert any("duplicates" in w for w in first["warnings"])
    assert len(list(data_cache.glob("*.json"))) == 1

    real = data_mod.read_table

    def no_reading(*a, **k):
        raise AssertionError("a remembered data stage read the file")

    monkeypatch.setattr(data_mod, "read_table", no_reading)
    rc, out, err = tune_cli(*args, "hydra.run.dir=b")
    assert rc == 0, err
    second = _plan(tmp_path / "b")
    assert second["hash"] == first["hash"] and second["warnings"] == first["warnings"]
    assert second["data"] == first["data"]

    calls = []
    monkeypatch.setattr(data_mod, "read_table", lambda *a, **k: calls.append(1) or real(*a, **k))
    rc, *_ = tune_cli(*args, "data.val_fraction=0.1", "hydra.run.dir=c")    # another setting
    assert rc == 0 and len(calls) == 1
    write_jsonl(train, clf_rows(121))                                            # another file
    rc, *_ = tune_cli(*args, "hydra.run.dir=d")
    assert rc == 0 and len(calls) == 2 and _plan(tmp_path / "d")["data"]["sizes"]["train"] != \
        first["data"]["sizes"]["train"]
    load = _plan(tmp_path / "d")["data"]["cache"]
    from pathlib import Path

    Path(load).unlink()                                                          # cache gone
    rc, *_ = tune_cli(*args, "hydra.run.dir=e")
    assert rc == 0 and len(calls) == 3 and Path(load).is_file()


def test_a_damaged_record_runs_the_stage_again(tune_cli, tmp_path, data_cache):
    from tests.conftest import clf_rows, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", clf_rows(60))
    rc, *_ = tune_cli("plan", f"data.path={train}", "hydra.run.dir=a")
    (record,) = data_cache.glob("*.json")
    record.write_text("{not json")
    rc, out, err = tune_cli("plan", f"data.path={train}", "hydra.run.dir=b")
    assert rc == 0, err
    assert json.loads(record.read_text())["version"] == 1


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
WORD_TEXTS = ["user\nMessage: I still don't have a card (ref 12345)\nIntent:",
              "  multiple   spaces\n\n\ttabs ", "naïve café 東京 🙂 ½ ² ٣ x²", "it's I'LL we've 'quoted'",
              "x" * 300, "a1b22c333d4444", "\u00a0nbsp\u2028line", "trailing \n", " ", "\r\n\r\nwin",
              "emoji👩‍👩‍👧 family", "$AAPL +5.25% (Q3'24)"]


def _variant(smollm2_dir, pre_tokenizer=None, normalizer=None):
    from tokenizers import Tokenizer

    doc = json.loads((smollm2_dir / "tokenizer.json").read_text())
    if pre_tokenizer is not None:
        doc["pre_tokenizer"] = pre_tokenizer
    if normalizer is not None:
        doc["normalizer"] = normalizer
    return Tokenizer.from_str(json.dumps(doc))


@pytest.mark.parametrize("pre", ["smollm2", "llama3", "gpt2"])
def test_word_by_word_encoding_is_the_tokenizers(smollm2_dir, pre):
    """The word encoder reproduces the pre-tokenizer (SmolLM2's Digits + ByteLevel, Llama 3's Split
    regex + ByteLevel without regex, GPT-2's ByteLevel) and so the tokenizer's ids, word for word,
    on unicode, digits, whitespace runs and line ends; and it says so only after checking."""
    from core import tokenizer as tk

    tok = {"smollm2": lambda: tk.load_tokenizer(smollm2_dir),
           "llama3": lambda: _variant(smollm2_dir, {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
                "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                "use_regex": False}]}),
           "gpt2": lambda: _variant(smollm2_dir, {"type": "ByteLevel", "add_prefix_space": False,
                                                   "trim_offsets": True, "use_regex": True})}[pre]()
    words = tk._words(tok)
    assert words is not None
    texts = WORD_TEXTS * 30
    assert words.encode(texts) == tk.encode_texts(tok, texts) and not words.unfit
    assert len(words.cache) > 10                    # it answered from its words


def test_a_tokenizer_not_reproduced_is_encoded_whole(smollm2_dir):
    from core import tokenizer as tk

    assert tk._words(_variant(smollm2_dir, normalizer={"type": "Lowercase"})) is None
    assert tk._words(_variant(smollm2_dir, {"type": "Whitespace"})) is None
    tok = tk.load_tokenizer(smollm2_dir)
    wrong = tk.WordEncoder(tok, [__import__("regex").compile(r"(\s)")])   # splits too little
    assert wrong.encode(["it's a test 123"]) is None and wrong.unfit
