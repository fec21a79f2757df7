"""`tune export format=gguf`: a merged model as one GGUF file (llama.cpp, Ollama, LM Studio)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.errors import PlanError
from core.gguf import gguf_name, permute_qk

def write_gguf(tensors: dict[str, np.ndarray], model_dir: Path, out: Path, *, kind: str,
               name: str) -> Path:
    """A GGUF file (llama.cpp, Ollama, LM Studio) of a Llama-architecture model: `tensors` under
    their Hugging Face names (e.g. a merged adapter's), the config and tokenizer of model_dir.
    Weight matrices in `kind` (f32, f16, bf16, q8_0), norms in f32; q/k rows in llama.cpp's rope
    order; the tokenizer with its pre-tokenizer named (SmolLM2's digits split one by one)."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    from core.architecture import read_config

    cfg = read_config(model_dir)
    if cfg.family not in ("llama", "mistral") or cfg.sliding_windows or cfg.rope_scaling:
        raise PlanError("format", f"GGUF export covers Llama-architecture models without RoPE "
                        f"scaling or sliding windows; this is {cfg.family}"
                        + (" with RoPE scaling" if cfg.rope_scaling else "") + ".",
                        hint="export format=merged and convert it with llama.cpp's "
                             "convert_hf_to_gguf.py.")
    qtype, ftype = {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
                    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
                    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
                    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}[kind]
    hf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    w = GGUFWriter(str(out), arch="llama")
    w.add_type("model")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(ftype)
    w.add_quantization_version(GGML_QUANT_VERSION)
    _add_tokenizer(w, Path(model_dir), hf)
    for hf_name, value in tensors.items():
        value = np.asarray(value, dtype=np.float32)
        if ".self_attn.q_proj." in hf_name:
            value = permute_qk(value, cfg.num_heads)
        elif ".self_attn.k_proj." in hf_name:
            value = permute_qk(value, cfg.num_kv_heads)
        if value.ndim == 1 or kind == "f32":
            w.add_tensor(gguf_name(hf_name), np.ascontiguousarray(value))
        elif kind == "f16":
            w.add_tensor(gguf_name(hf_name), value.astype(np.float16))
        else:
            data = quantize(value, qtype)
            w.add_tensor(gguf_name(hf_name), data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def _add_tokenizer(w, model_dir: Path, hf: dict) -> None:
    """The byte-level BPE tokenizer of tokenizer.json as GGUF metadata (llama.cpp's "gpt2" model)."""
    from core.tokenizer import chat_template, load_tokenizer, special_prefix_ids, special_token

    doc = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise PlanError("format", f"GGUF export writes byte-level BPE tokenizers; this one is "
                        f"{model.get('type')!r}.", hint="export format=merged instead.")
    tok = load_tokenizer(model_dir)
    size = max(tok.get_vocab_size(with_added_tokens=True), int(hf["vocab_size"]))
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
