"""llama.cpp's GGUF layout of the architectures tune reads and writes as GGUF, the facts both
directions need (the embedded models' conversion undoes them, compiler/gguf.py; `tune export
format=gguf` applies them, runtime/gguf.py): the tensor names against Hugging Face's per llama.cpp
architecture (ARCH_LAYER_NAMES: Llama's, Qwen2's and Qwen3's, Phi-3's fused ones, Gemma's, the
experts of a mixture), Llama's rope permutation of the q/k rows, and Gemma's +1 on every RMSNorm
weight (gemma_norm_shift).
"""
from __future__ import annotations

import numpy as np

# llama.cpp tensor names -> HF names (per layer, after "model.layers.{i}.")
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# Gemma 3 (gguf-py's tensor map for MODEL_ARCH.GEMMA3) adds q/k norms and sandwich norms: HF's
# post_attention_layernorm follows attention here (in Llama it names the norm before the MLP,
# ffn_norm), and the MLP has a norm before it (ffn_norm) and after it (post_ffw_norm)
GEMMA3_LAYER_NAMES = {
    **LAYER_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of q/k rows: per head, [pairs interleaved] -> [halves]."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def gemma_norm_shift(hf_name: str) -> float:
    """What llama.cpp's Gemma 3 layout adds to an HF tensor: 1 to every RMSNorm weight (q/k norms
    included; HF's Gemma3RMSNorm scales by 1 + w, ggml's by w: convert_hf_to_gguf.py's
    Gemma3Model.norm_shift), 0 to the others."""
    return 1.0 if hf_name.endswith("norm.weight") else 0.0


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# Qwen3 (and Qwen3-MoE) normalise each head of q and k (Qwen2 has Llama's names, biases included)
QWEN3_LAYER_NAMES = {**LAYER_NAMES, "attn_q_norm": "self_attn.q_norm",
                     "attn_k_norm": "self_attn.k_norm"}
# Phi-3 keeps its fused projections: q/k/v rows in one attn_qkv, the gate's rows then the up's in
# one ffn_up (llama.cpp splits them at run time)
PHI3_LAYER_NAMES = {"attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
                    "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj",
                    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# a mixture of experts (Mixtral as arch llama, Qwen3-MoE): the router, and each projection of the
# experts stacked [experts, out, in] (split_experts names them from tune's fused ones)
EXPERT_NAMES = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
                "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj"}
# general.architecture -> its per-layer names (llama.cpp -> HF); Gemma 2 has Gemma 3's sandwich
# norms without the q/k norms
ARCH_LAYER_NAMES = {"llama": {**LAYER_NAMES, **EXPERT_NAMES}, "qwen2": LAYER_NAMES,
                    "qwen3": QWEN3_LAYER_NAMES, "qwen3moe": {**QWEN3_LAYER_NAMES, **EXPERT_NAMES},
                    "phi3": PHI3_LAYER_NAMES, "gemma2": GEMMA3_LAYER_NAMES,
                    "gemma3": GEMMA3_LAYER_NAMES}
_HF_TO_GGUF = {arch: {hf: gg for gg, hf in names.items()}
               for arch, names in ARCH_LAYER_NAMES.items()}
_HF_GLOBAL_TO_GGUF = {hf: gg for gg, hf in GLOBAL_NAMES.items()}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's rope layout of q/k rows (the inverse of unpermute_qk): per head, halves → pairs.
    `w` is a weight [out, in] or a bias [out]."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def split_experts(hf_name: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A tensor of tune's merged state dict under the per-projection names gguf_name maps: the
    experts' fused gate_up_proj [E, 2F, D] (the gates' rows, then the ups') as mlp.experts.gate_proj
    and up_proj [E, F, D], their down_proj [E, D, F] as mlp.experts.down_proj (the published
    checkpoints' per-expert tensors stacked, as llama.cpp's converter stacks them); the others as
    they are."""
    if hf_name.endswith(".mlp.experts.gate_up_proj"):
        half = value.shape[1] // 2
        base = hf_name[:-len("gate_up_proj")]
        return [(base + "gate_proj.weight", value[:, :half]), (base + "up_proj.weight",
                                                                value[:, half:])]
    if hf_name.endswith(".mlp.experts.down_proj"):
        return [(hf_name + ".weight", value)]
    return [(hf_name, value)]


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    """llama.cpp's tensor name in an `arch` GGUF for a Hugging Face one
    (model.layers.3.self_attn.q_proj.weight → blk.3.attn_q.weight)."""
    parts = hf_name.split(".")
    if parts[0] == "model" and parts[1] == "layers":
        module = ".".join(parts[3:-1])
        return f"blk.{parts[2]}.{_HF_TO_GGUF[arch][module]}.{parts[-1]}"
    return f"{_HF_GLOBAL_TO_GGUF['.'.join(parts[:-1])]}.{parts[-1]}"
