"""The embedded GGUF conversion, checked against transformers' own GGUF loader (an independent
dequantiser and un-permuter) and against hand-written expectations."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from compiler import gguf as conv
from core.gguf import unpermute_qk
from core.tokenizer import load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "The Licensee shall indemnify and hold harmless the Licensor against all claims arising hereunder.",
    "Notwithstanding the foregoing, either party may terminate this Agreement upon written notice.",
    "Patient presents with acute dyspnea, bilateral crackles and elevated troponin; rule out NSTEMI.",
    "Metformin is contraindicated in severe renal impairment (eGFR below thirty).",
    "Net interest margin compressed as deposit betas rose faster than loan yields.",
    "Quarterly EBITDA beat consensus; guidance for FY revenue was raised to $1,234.5M (+12%).",
    "Ünïcödé: naïve café, Straße, 東京, Ελληνικά, emoji 🚀🙂 and a tab\tand\nnewline.",
    "<|im_start|>user\nIs this clause enforceable?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>",
    "  leading spaces,   runs of spaces and trailing ones   ",
]


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    folder, name = smollm2_gguf
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    folder, name = smollm2_gguf
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def our_weights(smollm2_dir):
    return load_file(str(smollm2_dir / "model.safetensors"))


# ------------------------------------------------------------------------------ files/config

def test_converted_dir_is_complete_and_recorded(smollm2_dir):
    for name in conv.OUTPUT_FILES:
        assert (smollm2_dir / name).is_file(), name
    assert smollm2_dir == conv.tune_home() / "models" / "smollm2-135m-instruct"
    record = json.loads((smollm2_dir / "tune_conversion.json").read_text())
    src = conv.embedded_gguf_path()
    assert record["converter_version"] == conv.CONVERTER_VERSION
    # by size and content (another install of the same package may have converted it)
    assert [f["size"] for f in record["source"]["files"]] == [src.stat().st_size]
    assert record["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert list(smollm2_dir.parent.glob(".smollm2-135m-instruct.*-*")) == []  # no half conversion


def test_config_json(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30,
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
    }
    assert {k: cfg.get(k) for k in expected} == expected
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"], tok_cfg["unk_token"]) \
        == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tok_cfg["model_max_length"] == 8192
    special_map = json.loads((smollm2_dir / "special_tokens_map.json").read_text())
    assert special_map["eos_token"] == "<|im_end|>"


def test_second_call_reuses_the_conversion(smollm2_dir):
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-c", "from compiler.gguf import ensure_embedded_model as e;"
                          "print(e())"], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "TUNE_HOME": str(conv.tune_home())})
    assert out.stdout.strip() == str(smollm2_dir)
    assert "converting" not in out.stderr
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


# --------------------------------------------------------------------------------- tokenizer

def test_digits_are_split_one_by_one(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    enc = tok.encode("12345")
    assert len(enc.ids) == 5
    assert [tok.decode([i]) for i in enc.ids] == list("12345")
    # the pre-tokenizer itself splits digits (as the original SmolLM2 tokenizer does), not just
    # the absence of digit merges in this vocabulary
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("12345")] == list("12345")
    pre = json.loads(tok.to_str())["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"] is True
    assert pre["pretokenizers"][1]["add_prefix_space"] is False


def test_transformers_gguf_tokenizer_lacks_digit_splitting(hf_gguf_tokenizer):
    # Why we build our own tokenizer: theirs pre-tokenizes "12345" as one piece.
    pieces = hf_gguf_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345")
    assert len(pieces) == 1


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers_gguf_tokenizer(smollm2_dir, hf_gguf_tokenizer, text):
    ours = load_tokenizer(smollm2_dir).encode(text).ids
    theirs = hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == theirs
    assert load_tokenizer(smollm2_dir).decode(ours, skip_special_tokens=False) == text


def test_special_tokens(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.get_vocab_size() == 49152
    # a special token inside text is one token, never split into pieces
    assert tok.encode("a<|im_end|>b").ids == [tok.token_to_id("a"), 2, tok.token_to_id("b")]


CHAT = [{"role": "user", "content": "Classify: the party shall pay."}]
EXPECTED_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                 "Face<|im_end|>\n<|im_start|>user\nClassify: the party shall pay.<|im_end|>\n"
                 "<|im_start|>assistant\n")


def test_chat_template_renders(smollm2_dir):
    import jinja2.sandbox

    from core.tokenizer import chat_template

    template = chat_template(smollm2_dir)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(template).render(messages=CHAT, add_generation_prompt=True)
    assert rendered == EXPECTED_CHAT
    with_system = env.from_string(template).render(
        messages=[{"role": "system", "content": "Be brief."}] + CHAT, add_generation_prompt=False)
    assert with_system == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                           "Classify: the party shall pay.<|im_end|>\n")


def test_auto_tokenizer_on_converted_dir_keeps_our_tokenizer(smollm2_dir, hf_gguf_tokenizer):
    # Used by PEFT/transformers references: it must load tokenizer.json as written.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345")) == 5
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (2, 2, 1)
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == EXPECTED_CHAT
    text = TEXTS[0]
    assert tok(text)["input_ids"] == hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------- weights

def test_weights_equal_transformers_gguf(our_weights, hf_gguf_model):
    theirs = hf_gguf_model.state_dict()
    assert set(our_weights) == set(theirs) - {"lm_head.weight"}
    assert our_weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert our_weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    for layer in (0, 1, 17, 29):
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                    "post_attention_layernorm"):
            key = f"model.layers.{layer}.{mod}.weight"
            assert our_weights[key].dtype == np.float32
            np.testing.assert_allclose(our_weights[key], theirs[key].numpy(), atol=1e-6, rtol=0,
                                       err_msg=key)
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        np.testing.assert_allclose(our_weights[key], theirs[key].numpy(), atol=1e-6, rtol=0)


def _llama_cpp_permute(w, n_head):
    # convert_hf_to_gguf.py's LlamaModel.permute, written out independently of ours
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_direction(our_weights, hf_gguf_model, smollm2_gguf):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    theirs = hf_gguf_model.state_dict()
    reader = GGUFReader(os.path.join(*smollm2_gguf))
    raw = {t.name: t for t in reader.tensors if t.name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight")}
    raw_q = dequantize(raw["blk.3.attn_q.weight"].data, raw["blk.3.attn_q.weight"].tensor_type)
    raw_k = dequantize(raw["blk.3.attn_k.weight"].data, raw["blk.3.attn_k.weight"].tensor_type)
    ref_q = theirs["model.layers.3.self_attn.q_proj.weight"].numpy()
    ref_k = theirs["model.layers.3.self_attn.k_proj.weight"].numpy()
    # the still-permuted rows are wrong: the test can tell the difference
    assert np.abs(raw_q - ref_q).max() > 1e-2
    assert np.abs(raw_k - ref_k).max() > 1e-2
    # and un-permuting with the head counts (k with the KV heads) makes them right
    np.testing.assert_allclose(unpermute_qk(raw_q, 9), ref_q, atol=1e-6, rtol=0)
    np.testing.assert_allclose(unpermute_qk(raw_k, 3), ref_k, atol=1e-6, rtol=0)
    # the other direction (applying llama.cpp's permutation once more) would be wrong, and is caught
    assert np.abs(_llama_cpp_permute(raw_q, 9) - ref_q).max() > 1e-2
    assert np.abs(_llama_cpp_permute(raw_k, 3) - ref_k).max() > 1e-2
    # ours inverts llama.cpp's permutation exactly
    w = np.random.default_rng(0).standard_normal((192, 8)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(w, 3), 3), w)


def test_logits_equal_transformers_gguf(smollm2_dir, hf_gguf_model):
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([load_tokenizer(smollm2_dir).encode(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n").ids])
    with torch.no_grad():
        a = ours(ids).logits
        b = hf_gguf_model(ids).logits
    assert a.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert int(a[0, -1].argmax()) == int(b[0, -1].argmax())


# ----------------------------------------------------- atomicity and staleness on a tiny GGUF

def _write_tiny_gguf(path: Path, seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    hidden, heads, kv, inter = 8, 2, 1, 16
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "1", "2", "Ġ"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template("{{ messages[0]['content'] }}")

    def t(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    t("token_embd.weight", len(tokens), hidden)
    t("output_norm.weight", hidden)
    t("blk.0.attn_norm.weight", hidden)
    t("blk.0.ffn_norm.weight", hidden)
    t("blk.0.attn_q.weight", hidden, hidden)
    t("blk.0.attn_k.weight", hidden // heads * kv, hidden)
    t("blk.0.attn_v.weight", hidden // heads * kv, hidden)
    t("blk.0.attn_output.weight", hidden, hidden)
    t("blk.0.ffn_gate.weight", inter, hidden)
    t("blk.0.ffn_up.weight", inter, hidden)
    t("blk.0.ffn_down.weight", hidden, inter)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_conversion_reconverts_when_source_changes(tmp_path, capsys):
    src, target = tmp_path / "tiny.gguf", tmp_path / "models" / "tiny"
    _write_tiny_gguf(src, seed=0)
    conv.ensure_converted(src, target)
    assert "converting" in capsys.readouterr().err
    first = load_file(str(target / "model.safetensors"))
    assert first["model.layers.0.self_attn.k_proj.weight"].shape == (4, 8)
    assert json.loads((target / "config.json").read_text())["num_key_value_heads"] == 1

    conv.ensure_converted(src, target)
    assert "converting" not in capsys.readouterr().err

    _write_tiny_gguf(src, seed=1)  # same size, different content
    conv.ensure_converted(src, target)
    assert "converting" in capsys.readouterr().err
    second = load_file(str(target / "model.safetensors"))
    assert not np.array_equal(first["model.norm.weight"], second["model.norm.weight"])
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["tiny"]


def test_tiny_gguf_in_pieces_converts_as_the_whole(tmp_path, capsys):
    # as Gemma's GGUF ships: in chunks, joined for the conversion (then deleted), each one stamped
    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src)
    data = src.read_bytes()
    parts = [tmp_path / f"tiny.gguf.part{i}" for i in range(3)]
    for part, piece in zip(parts, (data[:100], data[100:1000], data[1000:])):
        part.write_bytes(piece)
    whole, pieces = tmp_path / "models" / "whole", tmp_path / "models" / "pieces"
    conv.ensure_converted(src, whole)
    conv.ensure_converted(parts, pieces)
    for name in conv.OUTPUT_FILES[:-1]:
        assert (pieces / name).read_bytes() == (whole / name).read_bytes(), name
    assert sorted(p.name for p in pieces.iterdir()) == sorted(conv.OUTPUT_FILES)
    record = json.loads((pieces / conv.RECORD_FILE).read_text())
    assert [f["path"] for f in record["source"]["files"]] == [str(p) for p in parts]
    assert record["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    capsys.readouterr()
    conv.ensure_converted(parts, pieces)
    assert "converting" not in capsys.readouterr().err
    parts[2].write_bytes(data[1000:-1] + bytes([data[-1] ^ 1]))  # one byte of a weight changed
    conv.ensure_converted(parts, pieces)
    assert "converting" in capsys.readouterr().err


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    src, target = tmp_path / "tiny.gguf", tmp_path / "models" / "tiny"
    _write_tiny_gguf(src)
    real = conv.convert_gguf

    def dies_halfway(gguf_path, out_dir):
        real(gguf_path, out_dir)       # every file but the record, written after
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        conv.ensure_converted(src, target)
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(conv, "convert_gguf", real)
    (target.parent / ".tiny.tmp-killed").mkdir()  # as a SIGKILLed conversion would leave it
    assert conv.ensure_converted(src, target) == target
    assert (target / "tune_conversion.json").is_file()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == ["tiny"]


def test_concurrent_conversions_convert_once(tmp_path):
    src, target = tmp_path / "tiny.gguf", tmp_path / "models" / "tiny"
    _write_tiny_gguf(src)
    code = (f"from compiler.gguf import ensure_converted; "
            f"print(ensure_converted({str(src)!r}, {str(target)!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert all(out.strip() == str(target) for out, _ in results)
    assert sum("converting" in err for _, err in results) == 1
    assert load_tokenizer(target).encode("ab").ids == [5]
