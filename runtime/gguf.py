"""`tune export format=gguf`: a merged model as one GGUF file (llama.cpp, Ollama, LM Studio), written
as llama.cpp's own convert_hf_to_gguf.py writes the checkpoint: a Llama-architecture model as arch
"llama" (q/k rows in llama.cpp's rope order, the byte-level BPE tokenizer), Gemma 3 as arch "gemma3"
(every RMSNorm weight plus one, the SentencePiece tokenizer as llama.cpp's "llama" model). Names and
the per-architecture facts live in core/gguf.py; check_gguf_export refuses, before anything heavy
runs, a model llama.cpp would not run as the checkpoint does.
"""
from __future__ import annotations

import json
import logging
import math
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from core.errors import PlanError
from core.gguf import gemma_norm_shift, gguf_name, permute_qk

# tune's family -> llama.cpp's architecture (general.architecture)
GGUF_ARCHES = {"llama": "llama", "mistral": "llama", "gemma3": "gemma3"}
COVERED = ("Llama-architecture models (Llama, SmolLM, Mistral without a sliding window) without "
           "RoPE scaling, and Gemma 3 text models (Gemma3ForCausalLM)")
_MERGED_HINT = "export format=merged and convert it with llama.cpp's convert_hf_to_gguf.py."
# what llama.cpp's loader fixes for Gemma 3 (src/llama-model.cpp, LLM_ARCH_GEMMA3) instead of
# reading it from the file: the layer pattern, the sliding layers' RoPE and the queries' scale
GEMMA3_GLOBAL_EVERY, GEMMA3_LOCAL_ROPE_THETA, GEMMA3_27B_LAYERS = 6, 10000.0, 62


def check_gguf_export(cfg) -> None:
    """PlanError (key `format`) unless a GGUF of this model (a ModelConfig) runs in llama.cpp as
    the checkpoint does in transformers: a family with llama.cpp's tensor layout here, and none of
    the settings llama.cpp's loader ignores or fixes otherwise."""
    arch = GGUF_ARCHES.get(cfg.family)
    if arch == "llama" and not cfg.sliding_windows and not cfg.rope_scaling:
        return
    if cfg.multimodal:
        raise PlanError("format", f"GGUF export covers {COVERED}; this is a multimodal Gemma 3 "
                        "(Gemma3ForConditionalGeneration), which llama.cpp runs from two GGUF files: "
                        "the text model and the vision tower (mmproj).",
                        hint="export format=merged and convert it with llama.cpp's "
                             "convert_hf_to_gguf.py, once more with --mmproj for the vision tower.")
    if arch != "gemma3":
        why = "" if arch is None else " with RoPE scaling" if cfg.rope_scaling else \
            " with sliding-window attention"
        raise PlanError("format", f"GGUF export covers {COVERED}; this is {cfg.family}{why}.",
                        hint=_MERGED_HINT)
    departures = _gemma3_departures(cfg)
    if departures:
        raise PlanError("format", "llama.cpp runs every Gemma 3 GGUF with settings of its own, "
                        "not the file's, and this checkpoint departs from them: "
                        + "; ".join(departures) + ". Its GGUF would compute another model.",
                        hint="export format=merged: transformers and vLLM run it as configured.")


def _gemma3_departures(cfg) -> list[str]:
    """How a Gemma 3 config differs from what llama.cpp assumes of every Gemma 3 (as published)."""
    out = []
    window = max(cfg.sliding_windows, default=0)
    pattern = tuple(0 if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else window
                    for i in range(cfg.num_layers))
    if not window or cfg.sliding_windows != pattern:
        out.append(f"one global layer in every {GEMMA3_GLOBAL_EVERY}, the others sliding "
                   "(layer_types / sliding_window_pattern differ)")
    if cfg.local_rope_theta != GEMMA3_LOCAL_ROPE_THETA:
        out.append(f"the sliding layers' RoPE base {GEMMA3_LOCAL_ROPE_THETA:g} (this one: "
                   f"{cfg.local_rope_theta:g})")
    scalar = cfg.hidden_size // cfg.num_heads if cfg.num_layers == GEMMA3_27B_LAYERS \
        else cfg.head_dim
    if not math.isclose(cfg.query_scale, scalar ** -0.5, rel_tol=1e-6):
        out.append(f"queries scaled by 1/√{scalar} (query_pre_attn_scalar={scalar}; this one: "
                   f"{cfg.query_scale ** -2:g})")
    rope_type = dict(cfg.rope_scaling or ()).get("rope_type", "linear")
    if rope_type != "linear":
        out.append(f"linear RoPE scaling or none (this one: {rope_type})")
    if cfg.attention_bias or cfg.o_bias:
        out.append("no attention biases (attention_bias=true)")
    if cfg.attn_softcap:
        out.append("no attention-logit soft-capping (attn_logit_softcapping)")
    return out


def write_gguf(tensors: dict[str, np.ndarray], model_dir: Path, out: Path, *, kind: str,
               name: str) -> Path:
    """A GGUF file (llama.cpp, Ollama, LM Studio) of `tensors` under their Hugging Face names (e.g. a
    merged adapter's) with the config and tokenizer of model_dir, as convert_hf_to_gguf.py writes
    it: weight matrices in `kind` (f32, f16, bf16, q8_0), vectors and norms in f32; the metadata
    and the tensors' layout of the model's llama.cpp architecture (GGUF_ARCHES)."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    from core.architecture import read_config

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    check_gguf_export(cfg)
    arch = GGUF_ARCHES[cfg.family]
    qtype, ftype = {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
                    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
                    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
                    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}[kind]
    vocab = _sentencepiece_vocab(model_dir, cfg.vocab_size) if arch == "gemma3" else None
    w = GGUFWriter(str(out), arch=arch)
    w.add_type("model")
    w.add_name(name)
    if arch == "gemma3":
        _add_gemma3_parameters(w, cfg)
    else:
        _add_llama_parameters(w, cfg)
    w.add_file_type(ftype)
    w.add_quantization_version(GGML_QUANT_VERSION)
    if vocab is None:
        _add_byte_level_tokenizer(w, model_dir, cfg.vocab_size)
    else:
        _add_sentencepiece_tokenizer(w, model_dir, *vocab)
    for hf_name, value in tensors.items():
        value = np.asarray(value, dtype=np.float32)
        if arch == "gemma3":
            value = value + np.float32(gemma_norm_shift(hf_name))
        elif ".self_attn.q_proj." in hf_name:
            value = permute_qk(value, cfg.num_heads)
        elif ".self_attn.k_proj." in hf_name:
            value = permute_qk(value, cfg.num_kv_heads)
        target = gguf_name(hf_name, arch)
        if value.ndim == 1 or kind == "f32":
            w.add_tensor(target, np.ascontiguousarray(value))
        elif kind == "f16":
            w.add_tensor(target, value.astype(np.float16))
        else:
            data = quantize(value, qtype)
            w.add_tensor(target, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def _add_sizes(w, cfg) -> None:
    """The sizes every architecture's GGUF gives (`{arch}.context_length`, ...)."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)


def _add_llama_parameters(w, cfg) -> None:
    _add_sizes(w, cfg)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)


def _add_gemma3_parameters(w, cfg) -> None:
    """gemma3.* as convert_hf_to_gguf.py's Gemma3Model (and TextModel before it) writes them: the
    sizes, the global layers' RoPE base and linear scaling, the sliding layers' base, the window,
    the final soft-cap when there is one. No vocab_size, no rope.dimension_count."""
    from gguf import RopeScalingType

    _add_sizes(w, cfg)
    scaling = dict(cfg.rope_scaling or ())
    if scaling:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_freq_base_swa(cfg.local_rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if cfg.final_softcap:
        w.add_final_logit_softcapping(cfg.final_softcap)
    w.add_sliding_window(max(cfg.sliding_windows))


def _add_byte_level_tokenizer(w, model_dir: Path, vocab_size: int) -> None:
    """The byte-level BPE tokenizer of tokenizer.json as GGUF metadata (llama.cpp's "gpt2" model)."""
    from core.tokenizer import chat_template, load_tokenizer, special_prefix_ids, special_token

    doc = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise PlanError("format", f"GGUF export writes byte-level BPE tokenizers; this one is "
                        f"{model.get('type')!r}.", hint="export format=merged instead.")
    tok = load_tokenizer(model_dir)
    size = max(tok.get_vocab_size(with_added_tokens=True), vocab_size)
    tokens = [tok.id_to_token(i) or f"[PAD{i}]" for i in range(size)]
    specials = {t["id"] for t in doc.get("added_tokens") or [] if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = json.dumps(doc.get("pre_tokenizer") or {})
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm" if '"individual_digits": true' in pre else "default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(size)])
    w.add_token_merges(merges)
    for add, key in ((w.add_bos_token_id, "bos_token"), (w.add_eos_token_id, "eos_token"),
                     (w.add_unk_token_id, "unk_token"), (w.add_pad_token_id, "pad_token")):
        token_id = tok.token_to_id(special_token(model_dir, key)) if special_token(model_dir, key) \
            else None
        if token_id is not None:
            add(token_id)
    w.add_add_bos_token(bool(special_prefix_ids(tok)))
    w.add_add_space_prefix(False)
    template = chat_template(model_dir)
    if template:
        w.add_chat_template(template)


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _sentencepiece_vocab(model_dir: Path, vocab_size: int) -> tuple[list, list, list]:
    """(tokens, scores, token types) of Gemma's SentencePiece vocabulary from tokenizer.json and
    tokenizer_config.json, as convert_hf_to_gguf.py's _create_vocab_sentencepiece makes them of
    tokenizer.model (which it needs, and transformers no longer saves: on a directory without one,
    Gemma3Model falls back to a byte-level "gpt2" vocabulary, which llama.cpp cannot run for a
    SentencePiece model). The config's vocab_size ids, [PAD<i>] (unused) where the tokenizer has
    none; <0xXX> pieces are bytes (score 0); the added tokens are control tokens (special, or
    looking it) or user-defined ones with ▁ written as a space (score -1000), and so are Gemma's
    runs of ▁, user-defined in its SentencePiece model (tune's own conversion, compiler/gguf.py,
    keeps them as merges). A normal piece's score — SentencePiece's own, absent from tokenizer.json
    — is minus its rank among the normal pieces: the ids follow the scores, and llama.cpp only
    compares them (for Gemma 3 270M, the first 236k are its very scores)."""
    from gguf import TokenType

    from core.tokenizer import read_tokenizer_config

    path = model_dir / "tokenizer.json"
    doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model = doc.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise PlanError("format", "GGUF export writes Gemma 3's SentencePiece tokenizer, which "
                        "tokenizer.json holds as a BPE with byte fallback; "
                        + (f"this one is {model.get('type')!r}" + (" without byte fallback"
                           if model.get("type") == "BPE" else "") if doc
                           else f"{model_dir} has no tokenizer.json") + ".",
                        file=str(path), hint=_MERGED_HINT)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [TokenType.UNUSED] * vocab_size
    for piece, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = piece
            types[i] = TokenType.BYTE if _BYTE_PIECE.fullmatch(piece) else \
                TokenType.UNKNOWN if piece == model.get("unk_token") else TokenType.NORMAL
            scores[i] = 0.0
    decoder = read_tokenizer_config(model_dir).get("added_tokens_decoder")
    added = [{**t, "id": int(i)} for i, t in decoder.items()] if isinstance(decoder, dict) \
        else doc.get("added_tokens") or []
    runs = [{"id": i, "content": t} for i, t in enumerate(tokens)
            if len(t) > 1 and set(t) == {"▁"} and types[i] == TokenType.NORMAL]
    for t in added + runs:
        i, text = t["id"], t["content"]
        if i < vocab_size:
            control = t.get("special") or _looks_special(text)
            tokens[i] = text if control else text.replace("▁", " ")
            types[i] = TokenType.CONTROL if control else TokenType.USER_DEFINED
            scores[i] = -1000.0
    rank = 0
    for i, kind in enumerate(types):
        if kind == TokenType.NORMAL:
            scores[i] = -float(rank)
            rank += 1
    return tokens, scores, [int(t) for t in types]


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens some models leave unmarked
    (Gemma's <unusedN>, <mask>, ...) that are control tokens all the same."""
    return text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") \
        or text.startswith("<|") and text.endswith("|>") \
        or text.startswith("<｜") and text.endswith("｜>") \
        or text.startswith("<unused") and text.endswith(">")


def _add_sentencepiece_tokenizer(w, model_dir: Path, tokens, scores, types) -> None:
    """llama.cpp's "llama" (SentencePiece) tokenizer metadata, then the special tokens' ids, the
    add_bos/eos/sep flags and the chat template as gguf-py's SpecialVocab reads them from the
    directory (as convert_hf_to_gguf.py does), and no space prefix (Gemma3Model)."""
    from gguf import SpecialVocab

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    with _quiet("gguf.vocab"):     # its notes on Gemma's <bos>-separated pairs are not ours to show
        SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
