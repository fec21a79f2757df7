"""`tune export format=gguf`: a merged model as one GGUF file (llama.cpp, Ollama, LM Studio), written
as llama.cpp's own convert_hf_to_gguf.py writes the checkpoint, per llama.cpp architecture
(GGUF_ARCHES): Llama, Mistral and Mixtral as arch "llama" (q/k rows in llama.cpp's rope order;
Mixtral's experts stacked [experts, out, in], its router), Qwen2/2.5 as "qwen2" (q/k/v biases),
Qwen3 as "qwen3" (q/k norms) and Qwen3-MoE as "qwen3moe" (its experts likewise), Phi-3 as "phi3"
(the fused qkv and gate/up projections as they are, the rotated part of each head, LongRoPE's
factors as two tensors), Gemma 2 as "gemma2" and Gemma 3 as "gemma3" (every RMSNorm weight plus
one; Gemma 2's soft-caps and window); a multimodal Gemma 3's text model as "gemma3" too (its
vision tower, llama.cpp's second "mmproj" file, is for the converter to write from format=merged).
The tokenizer goes as the converter writes it: byte-level BPE as llama.cpp's "gpt2" model (Qwen's
pre-tokenizer by its name), SentencePiece (tokenizer.json's BPE with byte fallback) as its "llama"
model. Names and the per-architecture facts live in core/gguf.py;
check_gguf_export refuses, before anything heavy runs, a model llama.cpp would not run as the
checkpoint does: a setting its loader ignores (a sliding window where it has none) or fixes (Gemma's
layer pattern and query scale, Qwen3-MoE's renormalised expert weights), or one this export does
not write (RoPE scaling other than Gemma 3's linear and Phi-3's LongRoPE). Of LongRoPE's two sets
of factors llama.cpp takes the long one for a whole context longer than the pretraining length,
transformers once a sequence passes that length: the same model either side of it.
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
from core.gguf import gemma_norm_shift, gguf_name, permute_qk, split_experts

# tune's family -> llama.cpp's architecture (general.architecture)
GGUF_ARCHES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2",
               "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "phi3": "phi3", "gemma2": "gemma2",
               "gemma3": "gemma3"}
COVERED = ("the text models llama.cpp maps and runs as configured: Llama-architecture models "
           "(Llama, SmolLM, Mistral, Mixtral), Qwen2/2.5, Qwen3, Qwen3-MoE, Phi-3, Gemma 2 and "
           "Gemma 3 (of a multimodal Gemma 3, the text model)")
_MERGED_HINT = "export format=merged and convert it with llama.cpp's convert_hf_to_gguf.py."
_AS_CONFIGURED = "export format=merged: transformers and vLLM run it as configured."
# what llama.cpp's loader fixes for Gemma 2 and 3 (src/llama-model.cpp) instead of reading it from
# the file: the layer pattern (one global layer in every 2, every 6), the queries' scale (1/√head
# size, 1/√(hidden/heads) for the 27B models: 46, 62 layers), Gemma 3's sliding layers' RoPE base;
# Gemma 2's converter writes no RoPE base (llama.cpp's default: 10000)
GEMMA_GLOBAL_EVERY = {"gemma2": 2, "gemma3": 6}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA3_LOCAL_ROPE_THETA, GEMMA2_ROPE_THETA = 10000.0, 10000.0
# tokenizer.json's pre-tokenizer regex -> llama.cpp's name for it (tokenizer.ggml.pre), for the
# families whose converter names it by the tokenizer (convert_hf_to_gguf.py's get_vocab_base_pre)
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def check_gguf_export(cfg) -> None:
    """PlanError (key `format`) unless a GGUF of this model (a ModelConfig) runs in llama.cpp as
    the checkpoint does in transformers: a family with llama.cpp's tensor layout here, and none of
    the settings llama.cpp's loader ignores or fixes otherwise. A multimodal Gemma 3's text model
    is checked as a Gemma 3 text model (its GGUF is one); its vision tower is not written here."""
    arch = GGUF_ARCHES.get(cfg.family)
    if arch is None:
        raise PlanError("format", f"GGUF export covers {COVERED}; this is {cfg.family}.",
                        hint=_MERGED_HINT)
    departures = _departures(cfg, arch)
    if departures:
        what = f"this {cfg.family} model's GGUF" if not cfg.multimodal else \
            "the GGUF of this multimodal Gemma 3's text model"
        raise PlanError("format", f"llama.cpp would run {what} (arch {arch}) otherwise than the "
                        "checkpoint computes: " + "; ".join(departures)
                        + ". Its GGUF would compute another model.", hint=_AS_CONFIGURED)


def check_gguf_tokenizer(model_dir: Path, cfg) -> None:
    """PlanError (key `format`) unless model_dir's tokenizer goes into a GGUF of this model (a
    ModelConfig check_gguf_export passed) as the converter writes it: read before anything heavy
    runs, as write_gguf reads it again."""
    _tokenizer_writer(Path(model_dir), cfg, GGUF_ARCHES[cfg.family])


def _departures(cfg, arch: str) -> list[str]:
    """How llama.cpp would run an `arch` GGUF of this config otherwise than transformers runs the
    checkpoint (empty: the same model)."""
    if arch in ("gemma2", "gemma3"):
        return _gemma_departures(cfg)
    out = []
    window = min((w for w in cfg.sliding_windows if w), default=0)
    if window and window < cfg.max_position_embeddings:     # a window the context can pass
        out.append(f"it ignores Phi-3's sliding window (sliding_window={window}): every layer "
                   "attends over the whole context" if arch == "phi3" else
                   f"its {arch} architecture has no sliding window (sliding_window={window}): every "
                   "layer attends over the whole context")
    scaling = dict(cfg.rope_scaling or ())
    rope_type = scaling.get("rope_type")
    if arch == "phi3" and rope_type == "longrope":
        out += _longrope_departures(cfg, scaling)
    elif rope_type:
        out.append(f"RoPE scaling ({rope_type}), which this export does not write for {arch} "
                   "(it does Phi-3's LongRoPE and Gemma 3's linear scaling)")
    if arch in ("qwen3", "qwen3moe") and (cfg.attention_bias or cfg.o_bias):
        out.append(f"its {arch} architecture has no attention biases (attention_bias=true)")
    if cfg.num_experts and not cfg.norm_topk_prob:
        out.append("it renormalises the weights of each token's chosen experts to sum to 1 "
                   "(norm_topk_prob=false here)")
    return out


def _longrope_departures(cfg, scaling: dict) -> list[str]:
    """What llama.cpp's Phi-3 LongRoPE takes otherwise than the config gives: the converter writes
    the cos/sin scale as √(1 + ln(s) / ln(original)), s = max_position_embeddings / original,
    whatever attention_factor or factor config.json gives."""
    original = scaling["original_max_position_embeddings"]
    s = cfg.max_position_embeddings / original
    want = math.sqrt(1 + math.log(s) / math.log(original)) if s > 1 else 1.0
    if math.isclose(scaling["attention_factor"], want, rel_tol=1e-6):
        return []
    return [f"LongRoPE's cos/sin scale √(1 + ln(s)/ln({original})) = {want:.6g} with s = "
            f"max_position_embeddings / original_max_position_embeddings (this one: "
            f"{scaling['attention_factor']:.6g})"]


def _gemma_departures(cfg) -> list[str]:
    """How a Gemma 2 or 3 config differs from what llama.cpp assumes of every such model (as
    published), or from what its converter writes."""
    family = cfg.family
    every = GEMMA_GLOBAL_EVERY[family]
    out = []
    window = max(cfg.sliding_windows, default=0)
    pattern = tuple(0 if (i + 1) % every == 0 else window for i in range(cfg.num_layers))
    if not window or cfg.sliding_windows != pattern:
        out.append(f"one global layer in every {every}, the others sliding "
                   f"(layer_types{' / sliding_window_pattern' if family == 'gemma3' else ''} "
                   "differ)")
    if family == "gemma3" and cfg.local_rope_theta != GEMMA3_LOCAL_ROPE_THETA:
        out.append(f"the sliding layers' RoPE base {GEMMA3_LOCAL_ROPE_THETA:g} (this one: "
                   f"{cfg.local_rope_theta:g})")
    if family == "gemma2" and cfg.rope_theta != GEMMA2_ROPE_THETA:
        out.append(f"RoPE base {GEMMA2_ROPE_THETA:g}, its default: the converter writes none for "
                   f"Gemma 2 (this one: {cfg.rope_theta:g})")
    scalar = cfg.hidden_size // cfg.num_heads if cfg.num_layers == GEMMA_27B_LAYERS[family] \
        else cfg.head_dim
    if not math.isclose(cfg.query_scale, scalar ** -0.5, rel_tol=1e-6):
        out.append(f"queries scaled by 1/√{scalar} (query_pre_attn_scalar={scalar}; this one: "
                   f"{cfg.query_scale ** -2:g})")
    rope_type = dict(cfg.rope_scaling or ()).get("rope_type")
    if rope_type and (family == "gemma2" or rope_type != "linear"):
        out.append(f"{'linear RoPE scaling or ' if family == 'gemma3' else ''}no RoPE scaling "
                   f"(this one: {rope_type})")
    if cfg.attention_bias or cfg.o_bias:
        out.append("no attention biases (attention_bias=true)")
    if family == "gemma3" and cfg.attn_softcap:
        out.append("no attention-logit soft-capping (attn_logit_softcapping)")
    if family == "gemma2":
        for key, cap in (("attn_logit_softcapping", cfg.attn_softcap),
                         ("final_logit_softcapping", cfg.final_softcap)):
            if not cap:
                out.append(f"soft-capping always ({key}: null here; it caps at its default)")
        if not cfg.tie_word_embeddings:
            out.append("the output head tied to the embedding (the converter leaves lm_head out; "
                       "tie_word_embeddings=false here)")
    return out


def write_gguf(tensors: dict[str, np.ndarray], model_dir: Path, out: Path, *, kind: str,
               name: str) -> Path:
    """A GGUF file (llama.cpp, Ollama, LM Studio) of `tensors` under their Hugging Face names (e.g. a
    merged adapter's) with the config and tokenizer of model_dir, as convert_hf_to_gguf.py writes
    it: weight matrices (and stacked experts) in `kind` (f32, f16, bf16, q8_0; f16 for a q8_0 row
    not a whole number of blocks), vectors, norms and routers in f32; the metadata and the
    tensors' layout of the model's llama.cpp architecture (GGUF_ARCHES). A multimodal Gemma 3
    (Gemma3ForConditionalGeneration) gives its text model, as the converter does run without
    --mmproj: a gemma3 GGUF like a Gemma3ForCausalLM's, of text_config's hyperparameters, its text
    tensors under either naming (TEXT_TOWER, TEXT_TOWER_LEGACY) and its vision tensors left out."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import QuantError, quantize

    from core.architecture import read_config

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    check_gguf_export(cfg)
    arch = GGUF_ARCHES[cfg.family]
    hf = _converter_config(model_dir)
    if cfg.multimodal:
        hf = {**hf, **(hf.get("text_config") or {})}    # TextModel: text_config moved to the root
        tensors = _text_model_tensors(tensors)
    qtype, ftype = {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
                    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
                    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
                    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}[kind]
    add_tokenizer = _tokenizer_writer(model_dir, cfg, arch)   # refused before a file is made
    w = GGUFWriter(str(out), arch=arch)
    w.add_type("model")
    w.add_name(name)
    _PARAMETERS[arch](w, cfg, hf)
    w.add_file_type(ftype)
    w.add_quantization_version(GGML_QUANT_VERSION)
    add_tokenizer(w)
    for target, value in _gguf_tensors(tensors, cfg, arch):
        if value.ndim == 1 or kind == "f32" or ".ffn_gate_inp." in target:
            w.add_tensor(target, np.ascontiguousarray(value))
        elif kind == "f16":
            w.add_tensor(target, value.astype(np.float16))
        else:
            try:
                data, raw = quantize(value, qtype), qtype
            except QuantError:          # rows not a whole number of blocks: the converter's f16
                data, raw = quantize(value, GGMLQuantizationType.F16), GGMLQuantizationType.F16
            w.add_tensor(target, data, raw_shape=data.shape, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def _text_model_tensors(tensors: dict) -> dict:
    """A multimodal Gemma 3's text tensors under a Gemma 3 text model's names (model.layers...,
    lm_head...), from either of the multimodal namings; the vision tower and projector left out."""
    from core.architecture import TEXT_TOWER, TEXT_TOWER_LEGACY, is_vision_tensor

    out = {}
    for name, value in tensors.items():
        if is_vision_tensor(name):
            continue
        for short, long in (*TEXT_TOWER_LEGACY.items(), *TEXT_TOWER.items()):
            if name.startswith(long):
                name = short + name.removeprefix(long)
                break
        out[name] = value
    return out


def _gguf_tensors(tensors: dict, cfg, arch: str):
    """(llama.cpp's name, float32 value) of every tensor as the converter writes it for `arch`:
    Phi-3's LongRoPE factors first (generated, as the converter does), Gemma's norms plus one,
    Llama's q/k rows (and biases) in rope order, the experts one stacked tensor per projection."""
    scaling = dict(cfg.rope_scaling or ())
    if arch == "phi3" and scaling.get("rope_type") == "longrope":
        yield "rope_factors_long.weight", np.asarray(scaling["long_factor"], np.float32)
        yield "rope_factors_short.weight", np.asarray(scaling["short_factor"], np.float32)
    for hf_name, value in tensors.items():
        for part, v in split_experts(hf_name, np.asarray(value, dtype=np.float32)):
            if arch in ("gemma2", "gemma3"):
                v = v + np.float32(gemma_norm_shift(part))
            elif arch == "llama" and ".self_attn.q_proj." in part:
                v = permute_qk(v, cfg.num_heads)
            elif arch == "llama" and ".self_attn.k_proj." in part:
                v = permute_qk(v, cfg.num_kv_heads)
            yield gguf_name(part, arch), v


def _converter_config(model_dir: Path) -> dict:
    """config.json as the converter reads it: transformers' config of the directory, to_dict()
    (the defaults of keys config.json leaves out filled in)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).to_dict()


def _add_sizes(w, cfg) -> None:
    """The sizes every architecture's GGUF gives (`{arch}.context_length`, ...)."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)


def _add_text_model_parameters(w, cfg, hf: dict) -> None:
    """What convert_hf_to_gguf.py's TextModel writes (Qwen2, Qwen3, Qwen3-MoE write nothing more
    but the experts' width): the sizes, the RoPE base, the RMSNorm epsilon, the experts' count and
    how many each token uses, the head size where the config gives one."""
    _add_sizes(w, cfg)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.experts_per_token)
    if hf.get("head_dim") is not None:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


def _add_llama_parameters(w, cfg, hf: dict) -> None:
    """LlamaModel's (Mixtral's too): TextModel's, the vocabulary's size, the rotated dimensions."""
    _add_text_model_parameters(w, cfg, hf)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)


def _add_qwen_parameters(w, cfg, hf: dict) -> None:
    """Qwen2Model's and Qwen3Model's (TextModel's), Qwen3-MoE's with each expert's width."""
    _add_text_model_parameters(w, cfg, hf)
    if cfg.num_experts:
        w.add_expert_feed_forward_length(cfg.expert_intermediate_size)


def _add_phi3_parameters(w, cfg, hf: dict) -> None:
    """Phi3MiniModel's: the sizes, the pretraining length (rope.scaling.original_context_length),
    the rotated dimensions of a head, the RoPE base, the window (0 for none, as for Phi-4);
    LongRoPE's cos/sin scale (rope.scaling.attn_factor), its factors being tensors (llama.cpp
    takes them for LongRoPE; no scaling type is written)."""
    scaling = dict(cfg.rope_scaling or ())
    params = hf.get("rope_parameters") or {}
    original = scaling.get("original_max_position_embeddings") or \
        params.get("original_max_position_embeddings") or \
        hf.get("original_max_position_embeddings") or cfg.max_position_embeddings
    _add_sizes(w, cfg)
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.rotary_dim or cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_sliding_window(hf.get("sliding_window") or 0)
    if scaling.get("rope_type") == "longrope":
        w.add_rope_scaling_attn_factors(scaling["attention_factor"])


def _add_gemma2_parameters(w, cfg, hf: dict) -> None:
    """Gemma2Model's: the sizes, the head size, both soft-caps, the window; no RoPE base."""
    _add_sizes(w, cfg)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_attn_logit_softcapping(cfg.attn_softcap)
    w.add_final_logit_softcapping(cfg.final_softcap)
    w.add_sliding_window(max(cfg.sliding_windows))


def _add_gemma3_parameters(w, cfg, hf: dict) -> None:
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


_PARAMETERS = {"llama": _add_llama_parameters, "qwen2": _add_qwen_parameters,
               "qwen3": _add_qwen_parameters, "qwen3moe": _add_qwen_parameters,
               "phi3": _add_phi3_parameters, "gemma2": _add_gemma2_parameters,
               "gemma3": _add_gemma3_parameters}


def _tokenizer_writer(model_dir: Path, cfg, arch: str):
    """add(writer): the tokenizer metadata the converter writes for `arch`, read (and refused,
    PlanError) before any file is made. Gemma's SentencePiece vocabulary; Llama-architecture models
    byte-level BPE (Llama 3, SmolLM) or SentencePiece (Mistral, Mixtral: a BPE with byte fallback
    in tokenizer.json); Qwen's byte-level BPE with its pre-tokenizer; Phi-3's SentencePiece, or
    Phi-4's byte-level BPE (tokenizer_class GPT2Tokenizer)."""
    from core.tokenizer import read_tokenizer_config

    doc = _tokenizer_json(model_dir)
    model = doc.get("model") or {}
    spm = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    if arch in ("gemma2", "gemma3"):
        vocab = _sentencepiece_vocab(model_dir, doc, cfg.vocab_size, "gemma")
        return lambda w: _add_sentencepiece_tokenizer(w, model_dir, *vocab, space_prefix=False)
    if arch == "llama" and spm:
        vocab = _sentencepiece_vocab(model_dir, doc, cfg.vocab_size, "llama")
        prefix = read_tokenizer_config(model_dir).get("add_prefix_space")
        return lambda w: _add_sentencepiece_tokenizer(w, model_dir, *vocab, space_prefix=prefix)
    if arch == "phi3" and read_tokenizer_config(model_dir).get("tokenizer_class") != \
            "GPT2Tokenizer":
        vocab = _sentencepiece_vocab(model_dir, doc, cfg.vocab_size, "phi3")
        return lambda w: _add_sentencepiece_tokenizer(w, model_dir, *vocab, space_prefix=None)
    vocab = _byte_level_vocab(model_dir, doc, cfg.vocab_size)
    if arch == "llama":
        return lambda w: _add_llama_byte_level_tokenizer(w, model_dir, doc, *vocab)
    pre = _pre_tokenizer(model_dir, doc)
    return lambda w: _add_byte_level_tokenizer(w, model_dir, *vocab, pre=pre)


def _tokenizer_json(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise PlanError("format", f"GGUF export writes the tokenizer of tokenizer.json, and "
                        f"{model_dir} has none.", file=str(path), hint=_MERGED_HINT)
    return json.loads(path.read_text(encoding="utf-8"))


def _byte_level_vocab(model_dir: Path, doc: dict, vocab_size: int) -> tuple[list, list]:
    """(tokens, token types) of a byte-level BPE as convert_hf_to_gguf.py's get_vocab_base makes
    them: the config's vocab_size ids (more if the tokenizer has more), [PAD<i>] (unused) where it
    has none; added tokens control tokens if special (or looking it), else user-defined."""
    from gguf import TokenType

    from core.tokenizer import load_tokenizer

    model = doc.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise PlanError("format", "GGUF export writes this model's tokenizer as byte-level BPE; "
                        f"this one is {model.get('type')!r}"
                        + (" with byte fallback (SentencePiece's)" if model.get("type") == "BPE"
                           else "") + ".", file=str(model_dir / "tokenizer.json"),
                        hint=_MERGED_HINT)
    tok = load_tokenizer(model_dir)
    size = max(tok.get_vocab_size(with_added_tokens=True), vocab_size)
    tokens = [tok.id_to_token(i) or f"[PAD{i}]" for i in range(size)]
    types = [TokenType.NORMAL if tok.id_to_token(i) is not None else TokenType.UNUSED
             for i in range(size)]
    for t in doc.get("added_tokens") or []:
        control = t.get("special") or _looks_special(t["content"])
        types[t["id"]] = TokenType.CONTROL if control else TokenType.USER_DEFINED
        if not control:
            tokens[t["id"]] = t["content"].replace("▁", " ")
    return tokens, [int(t) for t in types]


def _pre_tokenizer(model_dir: Path, doc: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for tokenizer.json's pre-tokenizer: the converter
    knows it by the tokens it makes of a test text, here by its splitting regex (_PRE_TOKENIZERS);
    PlanError for one llama.cpp would split otherwise."""
    pre = doc.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") or [pre]
    regexes = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    name = _PRE_TOKENIZERS.get(regexes[0]) if len(regexes) == 1 else None
    if name is None:
        raise PlanError("format", "llama.cpp splits text before byte-level BPE by a pre-tokenizer "
                        "it knows by name (tokenizer.ggml.pre), and this export knows "
                        + ", ".join(sorted(set(_PRE_TOKENIZERS.values()))) + f"'s; the one of "
                        f"{model_dir / 'tokenizer.json'} is another.", hint=_MERGED_HINT)
    return name


def _add_byte_level_tokenizer(w, model_dir: Path, tokens, types, *, pre: str) -> None:
    """convert_hf_to_gguf.py's _set_vocab_gpt2: llama.cpp's "gpt2" model, the pre-tokenizer's
    name, tokens and types, then the merges, special tokens' ids, add_bos/eos flags and chat
    template as gguf-py's SpecialVocab reads them from the directory."""
    from gguf import SpecialVocab

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with _quiet("gguf.vocab"):
        SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _add_llama_byte_level_tokenizer(w, model_dir: Path, doc: dict, tokens, types) -> None:
    """A Llama-architecture byte-level BPE (Llama 3, SmolLM) as LlamaModel writes SmolLM2's:
    the "gpt2" model, SmolLM's digit splitting by name, the merges, the special tokens' ids."""
    from core.tokenizer import chat_template, load_tokenizer, special_prefix_ids, special_token

    model = doc.get("model") or {}
    tok = load_tokenizer(model_dir)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = json.dumps(doc.get("pre_tokenizer") or {})
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm" if '"individual_digits": true' in pre else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
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


def _sentencepiece_vocab(model_dir: Path, doc: dict, vocab_size: int,
                         style: str) -> tuple[list, list, list]:
    """(tokens, scores, token types) of a SentencePiece vocabulary from tokenizer.json and
    tokenizer_config.json, as convert_hf_to_gguf.py makes them of tokenizer.model (which it
    needs, and transformers no longer saves: on a directory without one, Gemma3Model falls back to
    a byte-level "gpt2" vocabulary, which llama.cpp cannot run for a SentencePiece model). The
    config's vocab_size ids, [PAD<i>] (unused) where the tokenizer has none; <0xXX> pieces are
    bytes (score 0); the added tokens are control tokens (special) or user-defined ones (score
    -1000). `style`: "gemma" and "llama" (_create_vocab_sentencepiece) count tokens looking special
    as control tokens and write a user-defined token's ▁ as a space; "gemma" makes Gemma's runs of ▁
    user-defined, as its SentencePiece model does (tune's own conversion, compiler/gguf.py, keeps
    them as merges); "phi3" (Phi3MiniModel) takes the added tokens as they are. A normal piece's
    score — SentencePiece's own, absent from tokenizer.json — is minus its rank among the normal
    pieces: the ids follow the scores, and llama.cpp only compares them (for Gemma 3 270M, the
    first 236k are its very scores)."""
    from gguf import TokenType

    from core.tokenizer import read_tokenizer_config

    path = model_dir / "tokenizer.json"
    model = doc.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise PlanError("format", "GGUF export writes this model's SentencePiece tokenizer, which "
                        "tokenizer.json holds as a BPE with byte fallback; "
                        f"this one is {model.get('type')!r}" + (" without byte fallback"
                           if model.get("type") == "BPE" else "") + ".",
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
    if style == "phi3":     # tokenizer.json's added tokens after the config's, as Phi3MiniModel
        added += doc.get("added_tokens") or []
    runs = [{"id": i, "content": t} for i, t in enumerate(tokens)
            if len(t) > 1 and set(t) == {"▁"} and types[i] == TokenType.NORMAL] \
        if style == "gemma" else []
    for t in added + runs:
        i, text = t["id"], t["content"]
        if i < vocab_size:
            control = t.get("special") or style != "phi3" and _looks_special(text)
            tokens[i] = text if control or style == "phi3" else text.replace("▁", " ")
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


def _add_sentencepiece_tokenizer(w, model_dir: Path, tokens, scores, types, *,
                                 space_prefix: bool | None) -> None:
    """llama.cpp's "llama" (SentencePiece) tokenizer metadata, then the special tokens' ids, the
    add_bos/eos/sep flags and the chat template as gguf-py's SpecialVocab reads them from the
    directory (as convert_hf_to_gguf.py does), and add_space_prefix when given: false for Gemma,
    tokenizer_config.json's add_prefix_space for a Llama (llama.cpp's default otherwise: true)."""
    from gguf import SpecialVocab

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    with _quiet("gguf.vocab"):     # its notes on Gemma's <bos>-separated pairs are not ours to show
        SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    if space_prefix is not None:
        w.add_add_space_prefix(bool(space_prefix))


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
