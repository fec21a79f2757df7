"""The decoder families tune trains, as a Hugging Face `config.json` describes them: read once, into one
`ModelConfig`.

The compiler reads it to check a model and size a plan (shapes, parameter count, LoRA targets); the
plan carries it; the runtime builds its NNX decoder from it. Nothing else parses config.json.
Pure Python (no JAX): both sides import it.

The family members differ by a handful of switches: grouped-query attention, RoPE scaling, tied
embeddings, q/k/v biases (Qwen2), per-head RMSNorm of q and k (Qwen3), sliding-window attention (some
Mistral and Qwen configs). Anything outside what the decoder implements is refused here, with the
key `model.path`, before anything heavy runs. A multimodal Gemma 3 (Gemma3ForConditionalGeneration)
reads as its text model (config.json's text_config), its tensors under the text tower's names.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import PlanError, did_you_mean

# architecture (config.json `architectures`) → family (config.json `model_type`)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
FAMILIES = tuple(dict.fromkeys(ARCHITECTURES.values()))
# config.json `model_type` → family, for a config that names no architecture
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
               "mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}
GEMMA = ("gemma2", "gemma3")
# Mixture-of-experts families → the dense family whose attention they share
MOE = {"mixtral": "mistral", "qwen3_moe": "qwen3"}
# The experts' linear layers, each one 3-D parameter [experts, out, in] under `mlp.experts.` (as
# transformers 5 stores them; LoRA adapts them as PEFT's target_parameters do)
EXPERT_MODULES = ("gate_up_proj", "down_proj")
# Multimodal architectures whose text model tune trains, the vision tower left as it is → their
# config.json `model_type`. config.json keeps the text model's config under `text_config`; keys left
# out there take transformers' Gemma3TextConfig defaults (transformers 5.25), some of them unlike
# what tune assumes of a config.json that leaves them out.
MULTIMODAL = {"Gemma3ForConditionalGeneration": "gemma3"}
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    "bos_token_id": 2, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None}
# ... and its tensors under other names than the text model's `model.` and `lm_head.`: transformers 5
# (in memory, and checkpoints transformers 4.52-4.57 saved) under `model.language_model.` with the
# head at the top; the Hub's google/gemma-3-* (and transformers 5's save_pretrained) under
# `language_model.model.` and `language_model.lm_head.`. The vision tower's tensors lie beside them,
# under VISION_PREFIXES (or `model.` + them).
TEXT_TOWER = {"model.": "model.language_model.", "lm_head.": "lm_head."}
TEXT_TOWER_LEGACY = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
# The MLP's gate activation, by the names config.json gives it (hidden_act / hidden_activation)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_tanh": "gelu_tanh"}
# The linear layers of a block, by their Hugging Face (and PEFT) names: what LoRA can target.
# Phi-3 fuses q/k/v into one qkv_proj and gate/up into one gate_up_proj (LoRA then adapts the fused
# layer, as PEFT does): FUSED maps each fused module to the ones it stands for.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
MODULE_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = MODULE_NAMES + tuple(FUSED)     # every linear module name of every family
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_HINT = ("pick a checkpoint of a supported family: Llama 2/3, Mistral, Qwen2/2.5/3, SmolLM, "
         "Gemma 2, Gemma 3, Phi-3/3.5/4, Mixtral, Qwen3-MoE.")
_CONFIG_HINT = ("is this a complete Hugging Face causal-LM checkpoint? Fix config.json, or use the "
                "checkpoint as published.")
_RANGE_HINT = ("every published model of the supported families lies within these bounds: fix "
               "config.json, or use the checkpoint as published.")
_REQUIRED = object()


@dataclass(frozen=True)
class _Field:
    """What one config.json field may hold. A field with a default may be left out or null."""
    kind: str                   # int | float | bool | ids (a token id, or a list of them)
    low: float = 0
    high: float = 0
    default: object = _REQUIRED

    def describe(self, vocab: int | None = None) -> str:
        if self.kind == "int":
            return f"an integer from {self.low:,} to {self.high:,}"
        if self.kind == "float":
            return f"a number from {self.low:g} to {self.high:g}"
        if self.kind == "bool":
            return "true or false"
        return f"a token id from 0 to {(vocab or 1) - 1:,}, or a list of them"


# Every config.json field tune reads, with its type and range, checked before anything is sized by
# it (a config.json with num_hidden_layers=100000000 is refused at once, not after a loop over its
# layers). The upper bounds are far above any published model of the family (the largest have 126
# layers, a hidden size of 16,384, about 256k tokens of vocabulary, 128 heads, a 53,248-wide MLP and
# a few million positions) and low enough that nothing sized by them runs away.
CONFIG_FIELDS: dict[str, _Field] = {
    "vocab_size": _Field("int", 1, 2**22),
    "hidden_size": _Field("int", 1, 2**16),
    "intermediate_size": _Field("int", 1, 2**20),
    "num_hidden_layers": _Field("int", 1, 1024),
    "num_attention_heads": _Field("int", 1, 1024),
    "num_key_value_heads": _Field("int", 1, 1024, None),        # None: num_attention_heads
    "head_dim": _Field("int", 1, 1024, None),                   # None: derived (see from_hf)
    "max_position_embeddings": _Field("int", 1, 2**24, 2048),
    "rms_norm_eps": _Field("float", 1e-12, 1.0, 1e-6),
    "rope_theta": _Field("float", 1.0, 1e10, 10000.0),
    "sliding_window": _Field("int", 0, 2**24, None),            # 0 or None: no window
    "max_window_layers": _Field("int", 0, 1024, None),
    "use_sliding_window": _Field("bool", default=False),
    "tie_word_embeddings": _Field("bool", default=False),
    "attention_bias": _Field("bool", default=False),
    "mlp_bias": _Field("bool", default=False),
    "bos_token_id": _Field("ids", default=None),
    "eos_token_id": _Field("ids", default=None),
    "pad_token_id": _Field("ids", default=None),
    # Gemma 2/3
    "query_pre_attn_scalar": _Field("float", 1e-6, 1e6, None),
    "attn_logit_softcapping": _Field("float", 1e-6, 1e6, None),
    "final_logit_softcapping": _Field("float", 1e-6, 1e6, None),
    "rope_local_base_freq": _Field("float", 1.0, 1e10, None),
    "use_bidirectional_attention": _Field("bool", default=False),
    # Phi-3 (older configs; transformers 5 moves it into rope_parameters)
    "partial_rotary_factor": _Field("float", 1e-6, 1.0, None),
    "original_max_position_embeddings": _Field("int", 1, 2**24, None),
    # mixture of experts (Mixtral: num_local_experts; Qwen3-MoE: num_experts)
    "num_local_experts": _Field("int", 1, 4096, None),
    "num_experts": _Field("int", 1, 4096, None),
    "num_experts_per_tok": _Field("int", 1, 4096, None),
    "moe_intermediate_size": _Field("int", 1, 2**20, None),
    "norm_topk_prob": _Field("bool", default=None),
    "router_aux_loss_coef": _Field("float", 0.0, 1e3, None),
    "router_jitter_noise": _Field("float", 0.0, 1.0, None),
    "decoder_sparse_step": _Field("int", 1, 1024, None),
}
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# ModelConfig attribute → the config.json field it holds (ModelConfig.check bounds them alike)
_SIZE_ATTRS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
               "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
               "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
               "head_dim": "head_dim", "max_position_embeddings": "max_position_embeddings"}


@dataclass(frozen=True)
class ModelConfig:
    """What the decoder needs to know about a checkpoint. Hashable (the NNX module keeps it as a
    static attribute) and JSON-friendly (the plan stores it)."""
    family: str                         # llama | mistral | qwen2 | qwen3 | gemma2 | gemma3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None          # sorted (key, value) pairs incl. ("rope_type", ...); None = default
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool                # biases on q/k/v (Qwen2 always; Llama/Qwen3 when attention_bias)
    qk_norm: bool                       # Qwen3: RMSNorm over each head of q and k, before RoPE
    o_bias: bool = False                # bias on o_proj (Llama/Qwen3 attention_bias; not Qwen2)
    sliding_windows: tuple = ()         # per layer, 0 = full; () = no layer slides
    # Gemma 2/3 (the defaults are the Llama family's)
    norm_offset: float = 0.0            # every RMSNorm scales by (norm_offset + w): 1 for Gemma
    activation: str = "silu"            # the MLP's gate: silu | gelu_tanh
    embed_scale: float = 1.0            # the embedding's output times this: √hidden for Gemma
    sandwich_norms: bool = False        # the attention's and the MLP's outputs normalised too
                                        # (post_attention / pre_ and post_feedforward_layernorm)
    query_scale: float | None = None    # attention scores' scale; None: head_dim ** -0.5
    attn_softcap: float | None = None   # scores → cap·tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # logits → cap·tanh(logits / cap) (Gemma 2)
    local_rope_theta: float | None = None   # RoPE base of the sliding layers (Gemma 3), unscaled;
                                            # None: every layer turns as rope_theta / rope_scaling
    # Phi-3
    fused: bool = False                 # qkv_proj and gate_up_proj instead of q/k/v and gate/up
    rotary_dim: int | None = None       # RoPE turns the first rotary_dim of each head; None: all
    # mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is num_experts experts, each token
    # routed to experts_per_token of them (0: a dense MLP)
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0   # each expert's MLP width
    norm_topk_prob: bool = True         # the chosen experts' weights renormalised to sum to 1
    router_aux_coef: float = 0.0        # router_aux_loss_coef: the load-balancing loss's weight
    # the text model of a multimodal checkpoint (MULTIMODAL): its tensors under TEXT_TOWER's names
    multimodal: bool = False

    @classmethod
    def from_hf(cls, hf: dict, *, source: str | Path = "config.json") -> "ModelConfig":
        """Read a config.json (as a dict; `source`: its path, named in messages). PlanError (a
        ValueError) for anything unsupported, of the wrong type or out of range (CONFIG_FIELDS),
        raised before anything sized by these numbers runs."""
        if not isinstance(hf, dict):
            raise PlanError("model.path", f"config.json must hold a JSON object, got "
                            f"{type(hf).__name__}.", file=str(source), hint=_HINT)
        arch = architecture(hf, source=source)
        if arch in MULTIMODAL:
            return _text_model(hf, source)
        family = ARCHITECTURES[arch]
        base = MOE.get(family, family)          # the dense family whose attention it has
        v = _check_fields(hf, source)
        activation = _check_supported(hf, source, family)
        theta, scaling, local_theta = _rope(hf, source, family)
        heads, layers, hidden = v["num_attention_heads"], v["num_hidden_layers"], v["hidden_size"]
        head_dim = v["head_dim"]
        if head_dim is None:        # transformers' Qwen3 and Gemma configs default it; the others
            default = {"qwen3": 128, "gemma2": 256, "gemma3": 256}.get(family)      # derive it
            if default is None and hidden % heads:
                raise _field_error(source, f"hidden_size={hidden} is not divisible by "
                                   f"num_attention_heads={heads}, and config.json gives no head_dim "
                                   "to size the heads otherwise.")
            head_dim = default or hidden // heads
        rotary_dim = _rotary_dim(hf, v, family, head_dim, scaling, source)
        bias = v["attention_bias"] and family != "phi3"
        gemma = family in GEMMA
        extra = _moe(hf, v, family, layers, source) if family in MOE else {}
        if gemma:
            # a key left out takes transformers' default; null switches soft-capping off
            def given(name, default):
                return v[name] if name in hf else default

            extra = dict(norm_offset=1.0, embed_scale=hidden ** 0.5, sandwich_norms=True,
                         query_scale=given("query_pre_attn_scalar", 256.0) ** -0.5,
                         attn_softcap=given("attn_logit_softcapping",
                                            50.0 if family == "gemma2" else None),
                         final_softcap=given("final_logit_softcapping",
                                             30.0 if family == "gemma2" else None),
                         local_rope_theta=local_theta)
        config = cls(
            family=family, vocab_size=v["vocab_size"], hidden_size=hidden,
            intermediate_size=v["intermediate_size"], num_layers=layers, num_heads=heads,
            num_kv_heads=v["num_key_value_heads"] or heads, head_dim=head_dim,
            rms_norm_eps=v["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=v["max_position_embeddings"],
            tie_word_embeddings=v["tie_word_embeddings"] if "tie_word_embeddings" in hf or not gemma
            else True,
            attention_bias=True if family == "qwen2" else (bias and base != "mistral"),
            o_bias=bias and base in ("llama", "qwen3") + GEMMA,
            qk_norm=base in ("qwen3", "gemma3"), activation=activation,
            fused=family == "phi3", rotary_dim=rotary_dim,
            sliding_windows=_sliding_windows(hf, v, family, layers, source), **extra)
        config.check(source=source)
        return config

    def check(self, *, source: str | Path = "config.json") -> None:
        """Sizes a decoder can be built from: each within CONFIG_FIELDS' range, heads grouping
        evenly, an even head size (RoPE turns pairs of dimensions), a window per layer."""
        for attr, name in _SIZE_ATTRS.items():
            _checked(name, getattr(self, attr), CONFIG_FIELDS[name], source)
        if self.num_heads % self.num_kv_heads:
            raise _field_error(source, f"config.json's {self.num_heads} attention heads do not group "
                               f"evenly over {self.num_kv_heads} key/value heads "
                               f"({_key(source, 'num_attention_heads')}={self.num_heads} must be a "
                               f"multiple of {_key(source, 'num_key_value_heads')}="
                               f"{self.num_kv_heads}).")
        if self.head_dim % 2:
            raise _field_error(source, f"{_key(source, 'head_dim')}={self.head_dim} is odd; rotary "
                               "position embeddings need an even head size.")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise _field_error(source, f"{_key(source, 'layer_types')} gives "
                               f"{len(self.sliding_windows)} layer types for {self.num_layers} "
                               "layers.")

    # -- shapes the compiler sizes a plan with

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """module name → (in_features, out_features) of each linear LoRA can target."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        if self.num_experts:    # each expert's, in EXPERT_MODULES (module_copies: how many)
            f = self.expert_intermediate_size
            return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                    "gate_up_proj": (h, 2 * f), "down_proj": (f, h)}
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i),
                    "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_names(self) -> tuple[str, ...]:
        """The linear modules of a layer, by their Hugging Face (and PEFT) names."""
        return tuple(self.linear_shapes())

    def module_copies(self, name: str) -> int:
        """How many of linear module `name` a layer has: num_experts for an expert's, else 1."""
        return self.num_experts if self.num_experts and name in EXPERT_MODULES else 1

    def linear_params(self) -> int:
        """Weights of every layer's linear modules (experts included)."""
        return self.num_layers * sum(a * b * self.module_copies(m)
                                     for m, (a, b) in self.linear_shapes().items())

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def hf_name(self, name: str, *, legacy: bool = False) -> str:
        """A text model's tensor name (`model.layers.0.…`, `lm_head.weight`) as this checkpoint
        names it: unchanged, or the text tower's name in a multimodal one (TEXT_TOWER; legacy:
        TEXT_TOWER_LEGACY). Other names (a classification head's `score.weight`) are unchanged."""
        if self.multimodal:
            for short, long in (TEXT_TOWER_LEGACY if legacy else TEXT_TOWER).items():
                if name.startswith(short):
                    return long + name[len(short):]
        return name

    def tensor_shapes(self, *, legacy: bool = False) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of this config holds, by its Hugging Face name (hf_name), with
        its shape (the lm_head only when untied; a multimodal checkpoint's vision tensors not)."""
        if self.multimodal:
            return {self.hf_name(n, legacy=legacy): shape for n, shape in
                    dataclasses.replace(self, multimodal=False).tensor_shapes().items()}
        d, h = self.hidden_size, self.head_dim
        out = {"model.embed_tokens.weight": (self.vocab_size, d), "model.norm.weight": (d,)}
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, d)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            for m, (n_in, n_out) in self.linear_shapes().items():
                part = "self_attn" if m in ATTENTION_MODULES else "mlp"
                if self.num_experts and m in EXPERT_MODULES:    # transformers 5's 3-D tensors
                    out[f"{p}mlp.experts.{m}"] = (self.num_experts, n_out, n_in)
                    continue
                out[f"{p}{part}.{m}.weight"] = (n_out, n_in)
                if (self.attention_bias and m in ("q_proj", "k_proj", "v_proj")) or \
                        (self.o_bias and m == "o_proj"):
                    out[f"{p}{part}.{m}.bias"] = (n_out,)
            for norm in self.layer_norm_names():
                out[f"{p}{norm}.weight"] = (d,)
            if self.qk_norm:
                out[f"{p}self_attn.q_norm.weight"] = (h,)
                out[f"{p}self_attn.k_norm.weight"] = (h,)
            if self.num_experts:
                out[self.router_name(i)] = (self.num_experts, d)
        return out

    def layer_norm_names(self) -> tuple[str, ...]:
        """The RMSNorms over the hidden state in each layer."""
        return LAYER_NORMS + (SANDWICH_NORMS if self.sandwich_norms else ())

    def param_count(self) -> int:
        """Parameters, as transformers' num_parameters() counts them (a tied head counted once)."""
        shapes = self.linear_shapes()
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = sum(a * b for m, (a, b) in shapes.items() if m in ATTENTION_MODULES)
        attn += (q + 2 * kv) * self.attention_bias + h * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlp = sum(a * b * self.module_copies(m) for m, (a, b) in shapes.items()
                  if m in MLP_MODULES)
        mlp += self.num_experts * h                                     # the router
        per_layer = attn + mlp + len(self.layer_norm_names()) * h       # + the layer's RMSNorms
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_layers * per_layer + h + head

    def active_param_count(self) -> int:
        """Parameters one token computes with: param_count less the experts it is not routed to."""
        if not self.num_experts:
            return self.param_count()
        per_expert = sum(a * b for m, (a, b) in self.linear_shapes().items()
                         if m in EXPERT_MODULES)
        idle = self.num_experts - self.experts_per_token
        return self.param_count() - self.num_layers * idle * per_expert

    def token_intermediate(self) -> int:
        """The MLP width a token's activations take: a mixture's token goes through
        experts_per_token experts' MLPs."""
        if self.num_experts:
            return self.experts_per_token * self.expert_intermediate_size
        return self.intermediate_size

    def expert_params(self) -> int:
        """Weights of every layer's experts."""
        return self.num_layers * self.num_experts * sum(
            a * b for m, (a, b) in self.linear_shapes().items() if m in EXPERT_MODULES)


def is_vision_tensor(name: str) -> bool:
    """A tensor of a multimodal checkpoint's vision tower or projector (VISION_PREFIXES), in either
    naming."""
    return name.removeprefix("model.").startswith(VISION_PREFIXES)


def legacy_names(names) -> bool:
    """Whether a multimodal checkpoint's tensor names are the older ones (TEXT_TOWER_LEGACY)."""
    return any(n.startswith("language_model.") for n in names)


# Existing modules adapter.train_modules can train in full, besides the linear layers: the embedding,
# the output head, the final norm and each block's norms.
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")      # Gemma 2/3
WHOLE_MODULES = ("embed_tokens", "lm_head", "norm") + LAYER_NORMS
# every name adapter.train_modules (and a PEFT adapter's modules_to_save) may give, in any family
ALL_WHOLE_MODULES = WHOLE_MODULES + SANDWICH_NORMS + ("q_norm", "k_norm")


def full_module_names(cfg: "ModelConfig") -> tuple[str, ...]:
    """What adapter.train_modules may name for this model (not the experts: PEFT saves whole
    modules only, and a mixture's experts are parameters of one module)."""
    linear = tuple(m for m in cfg.linear_names() if cfg.module_copies(m) == 1)
    return (WHOLE_MODULES + (SANDWICH_NORMS if cfg.sandwich_norms else ())
            + (("q_norm", "k_norm") if cfg.qk_norm else ()) + linear)


def full_module_params(cfg: "ModelConfig", names) -> dict[str, int]:
    """Parameters each named module has (all layers). With tied embeddings `lm_head` and
    `embed_tokens` are one matrix: the second of them named counts 0."""
    d, L, hd = cfg.hidden_size, cfg.num_layers, cfg.head_dim
    shapes = cfg.linear_shapes()
    out, matrix_counted = {}, False
    for name in names:
        if name in ("embed_tokens", "lm_head"):
            shared = cfg.tie_word_embeddings
            out[name] = 0 if shared and matrix_counted else cfg.vocab_size * d
            matrix_counted = matrix_counted or shared
        elif name == "norm":
            out[name] = d
        elif name in LAYER_NORMS + SANDWICH_NORMS:
            out[name] = L * d
        elif name in ("q_norm", "k_norm"):
            out[name] = L * hd
        else:
            n_in, n_out = shapes[name]
            bias = (cfg.attention_bias and name in ("q_proj", "k_proj", "v_proj")) or \
                (cfg.o_bias and name == "o_proj")
            out[name] = L * (n_out * n_in + (n_out if bias else 0))
    return out


def peft_module_name(name: str) -> str:
    """The name PEFT's `modules_to_save` matches (by suffix): the final norm is `model.norm`, so that
    it does not also match every `...input_layernorm`."""
    return "model.norm" if name == "norm" else name


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """LoRA's output scale: alpha / rank, or alpha / sqrt(rank) rank-stabilised (rsLoRA), as PEFT."""
    return alpha / rank ** 0.5 if rslora else alpha / rank


def _check_fields(hf: dict, source) -> dict:
    """CONFIG_FIELDS' values of a config.json, each checked (type, then range) and defaulted."""
    out: dict = {}
    for name, field in CONFIG_FIELDS.items():
        value = hf.get(name)
        if name == "pad_token_id" and value == -1:
            value = None                # older Llama configs' way of saying "no pad token"
        if value is None and field.default is _REQUIRED:
            what = f"gives {_key(source, name)}=null" if name in hf else \
                f"lacks `{_key(source, name)}`"
            raise _field_error(source, f"config.json {what}; it must be {field.describe()}.")
        out[name] = field.default if value is None else \
            _checked(name, value, field, source, vocab=out.get("vocab_size"))
    return out


def check_token_ids(doc: dict, vocab_size: int, source) -> None:
    """The bos/eos/pad token ids of a config.json or generation_config.json: null, a token id of
    the vocabulary, or a list of them."""
    for name in TOKEN_ID_FIELDS:
        if name == "pad_token_id" and doc.get(name) == -1:
            continue                    # older Llama configs' way of saying "no pad token"
        if doc.get(name) is not None:
            _checked(name, doc[name], CONFIG_FIELDS[name], source, vocab=vocab_size)


def _checked(name: str, value, field: _Field, source, *, vocab: int | None = None):
    """`value` of config field `name` as its kind's Python type; PlanError naming both if it has
    the wrong type or lies outside the field's range."""
    shown = _show(value)

    def wrong(why: str, hint: str = _CONFIG_HINT) -> PlanError:
        return _field_error(source, f"{_key(source, name)}={shown} {why}; it must be "
                            f"{field.describe(vocab)}.", hint=hint)

    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if field.kind == "bool":
        if not isinstance(value, bool):
            raise wrong(f"has the wrong type ({_json_type(value)})")
        return value
    if field.kind == "ids":
        ids = value if isinstance(value, list) else [value]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise wrong(f"has the wrong type ({_json_type(value)})")
        if not all(0 <= i < (vocab or 0) for i in ids):
            raise wrong("is not a token id of the vocabulary", _RANGE_HINT)
        return value
    if not number:
        raise wrong(f"has the wrong type ({_json_type(value)})")
    if isinstance(value, float) and not math.isfinite(value):
        raise wrong("is not a finite number")
    if not field.low <= value <= field.high:     # before float(): an int may be beyond a float
        raise wrong("is out of range", _RANGE_HINT)
    if field.kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise wrong("has the wrong type (a fraction)")
        return int(value)
    return float(value)


def _field_error(source, message: str, *, hint: str = _CONFIG_HINT) -> PlanError:
    return PlanError("model.path", message, file=str(source), hint=hint)


@dataclass(frozen=True)
class _Within:
    """A config.json read within one of its objects: the file (its str(), what messages name) and
    the object's key path (`text_config.`), put before each key a message names (_key)."""
    file: str
    prefix: str

    def __str__(self) -> str:
        return self.file


def _key(source, name: str) -> str:
    """A config key as messages about `source` (a path, or a _Within) name it."""
    return getattr(source, "prefix", "") + name


def _text_model(hf: dict, source) -> ModelConfig:
    """The text model of a multimodal checkpoint (MULTIMODAL): config.json's text_config, keys left
    out taking transformers' Gemma3TextConfig defaults, read as a Gemma 3 text model's config.json
    is, with the top level's tie_word_embeddings (transformers ties by it, by default) and
    quantization_config; the top level's token ids checked too."""
    text = hf.get("text_config")
    text = {} if text is None else text         # transformers: every Gemma3TextConfig default
    if not isinstance(text, dict):
        raise _field_error(source, f"text_config={_show(text)} has the wrong type "
                           f"({_json_type(text)}); it must be an object, the text model's config.")
    within = _Within(str(source), "text_config.")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise _field_error(within, f"text_config.model_type={_show(text['model_type'])}: the text "
                           "model of Gemma3ForConditionalGeneration is gemma3_text.", hint=_HINT)
    if text.get("final_logit_softcapping") is not None:
        raise _field_error(within, "text_config.final_logit_softcapping="
                           f"{_show(text['final_logit_softcapping'])}: transformers' "
                           "Gemma3ForConditionalGeneration does not soft-cap its logits (its "
                           "Gemma3ForCausalLM does), so this checkpoint computes one model or "
                           "another depending on what runs it.",
                           hint="use the checkpoint as published: Gemma 3 sets it null.")
    tie = hf.get("tie_word_embeddings", True)
    tie = _checked("tie_word_embeddings", tie, CONFIG_FIELDS["tie_word_embeddings"], source)
    text = {**GEMMA3_TEXT_DEFAULTS, **text, "architectures": None, "model_type": "gemma3_text",
            "tie_word_embeddings": tie,
            "quantization_config": hf.get("quantization_config") or text.get("quantization_config")}
    config = ModelConfig.from_hf(text, source=within)
    check_token_ids(hf, config.vocab_size, source)
    return dataclasses.replace(config, multimodal=True)


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_type(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(value),
                                                                      type(value).__name__)


def read_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory's config.json."""
    path = Path(model_dir) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError("model.path", f"{Path(model_dir)} has no config.json.", file=str(path),
                        hint=_CONFIG_HINT) from None
    except (ValueError, RecursionError) as e:
        raise PlanError("model.path", f"{path} is not valid JSON ({e}).", file=str(path),
                        hint=_CONFIG_HINT) from None
    except OSError as e:
        raise PlanError("model.path", f"{path} cannot be read ({e.strerror or e}).",
                        file=str(path), hint=_CONFIG_HINT) from None
    return ModelConfig.from_hf(hf, source=path)


def architecture(hf: dict, *, source: str | Path = "config.json") -> str:
    """The supported architecture a config.json (`source`, named in messages) names, or implies by
    its model_type."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    by_type = {model_type: arch for arch, model_type in MULTIMODAL.items()}
    by_type.update((model_type, next(a for a, f in ARCHITECTURES.items() if f == family))
                   for model_type, family in MODEL_TYPES.items())
    model_type = hf.get("model_type")
    if not archs and isinstance(model_type, str) and model_type in by_type:
        archs = [by_type[model_type]]
    for arch in archs:
        if isinstance(arch, str) and arch in ARCHITECTURES:
            return arch
    found = ", ".join(map(str, archs)) or f"model_type {hf.get('model_type')!r}"
    raise PlanError("model.path", f"architecture {found} is not supported; tune trains "
                    f"{', '.join(ARCHITECTURES)}.{did_you_mean(found, ARCHITECTURES)}",
                    file=str(source), hint=_HINT)


def _check_supported(hf: dict, source, family: str) -> str:
    """Refuse what the decoder does not implement; the MLP gate's activation (ACTIVATIONS' value)."""
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise PlanError("model.path", f"the checkpoint is quantized ({method}); tune loads "
                        "unquantized safetensors weights.", file=str(source),
                        hint="use the original bf16/fp16/fp32 checkpoint.")
    gemma = family in GEMMA
    # Gemma's configs name it hidden_activation (older ones hidden_act as well)
    key = "hidden_activation" if gemma and hf.get("hidden_activation") is not None else "hidden_act"
    want = "gelu_pytorch_tanh" if gemma else "silu"
    name = hf.get(key) or want
    if ACTIVATIONS.get(name) != ACTIVATIONS[want] if isinstance(name, str) else True:
        raise PlanError("model.path", f"{_key(source, key)} {name!r} is not supported; {family} "
                        f"uses {want}.", file=str(source), hint=_HINT)
    if hf.get("mlp_bias"):
        raise PlanError("model.path", "mlp_bias=true (biases on the MLP projections) is not "
                        "supported.", file=str(source), hint=_HINT)
    if hf.get("use_bidirectional_attention"):
        raise PlanError("model.path", f"{_key(source, 'use_bidirectional_attention')}=true (an "
                        "embedding model's attention) is not supported; tune trains causal "
                        "language models.",
                        file=str(source), hint=_HINT)
    return ACTIVATIONS[want]


# The RoPE scaling parameters each supported type needs (rope_scaling / rope_parameters), bounded as
# CONFIG_FIELDS are.
_ROPE_FIELDS = {"factor": _Field("float", 1e-6, 1e6), "low_freq_factor": _Field("float", 1e-6, 1e6),
                "high_freq_factor": _Field("float", 1e-6, 1e6),
                "original_max_position_embeddings": _Field("int", 1, 2**24)}
_ROPE_NEEDS = {"linear": ("factor",), "llama3": _ROPE_KEYS}


def _rope(hf: dict, source, family: str) -> tuple[float, tuple | None, float | None]:
    """(rope_theta, rope_scaling, local_rope_theta). Gemma 3 turns its sliding layers at a second,
    unscaled base: transformers 5 writes `rope_parameters` per layer type ({"full_attention": ...,
    "sliding_attention": ...}), older configs `rope_theta` / `rope_scaling` for the global layers
    and `rope_local_base_freq` for the local ones."""
    if family != "gemma3":
        return (*_rope_of(hf, source, CONFIG_FIELDS["rope_theta"].default, family), None)
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & set(params):
        theta, scaling = _rope_of({"rope_parameters": params.get("full_attention") or {}}, source,
                                  1e6)
        local, local_scaling = _rope_of({"rope_parameters": params.get("sliding_attention") or {}},
                                        source, 1e4)
        if local_scaling is not None:
            raise PlanError("model.path", "RoPE scaling of the sliding layers "
                            f"({_key(source, 'rope_parameters.sliding_attention')}) is not "
                            "supported; Gemma 3 scales its global layers only.", file=str(source),
                            hint=_HINT)
        return theta, scaling, local
    theta, scaling = _rope_of(hf, source, 1e6)
    local = hf.get("rope_local_base_freq")
    local = 1e4 if local is None else _checked("rope_local_base_freq", local,
                                                CONFIG_FIELDS["rope_local_base_freq"], source)
    return theta, scaling, local


def _rope_of(hf: dict, source, default_theta: float,
             family: str = "") -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling) from either config style: transformers<5 writes `rope_theta` and
    `rope_scaling` ({"type"|"rope_type": ...}); transformers 5 writes `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise PlanError("model.path", f"config.json's {_key(source, 'rope_scaling')} / "
                        f"{_key(source, 'rope_parameters')} must be an object.", file=str(source),
                        hint=_HINT)
    field = CONFIG_FIELDS["rope_theta"]
    if params.get("rope_theta") is not None:
        theta = _checked("rope_parameters.rope_theta", params["rope_theta"], field, source)
    elif hf.get("rope_theta") is not None:
        theta = _checked("rope_theta", hf["rope_theta"], field, source)
    else:
        theta = default_theta
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if family == "phi3" and rope_type in ("su", "yarn"):    # Phi-3's early names for LongRoPE
        rope_type = "longrope"
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES or \
            (rope_type == "longrope" and family != "phi3"):
        raise PlanError("model.path", f"RoPE scaling type {rope_type!r} is not supported; "
                        f"supported: {', '.join(ROPE_TYPES)}.", file=str(source), hint=_HINT)
    if rope_type == "default":
        return theta, None
    if rope_type == "longrope":
        return theta, _longrope(scaling, hf, source)
    for key in _ROPE_KEYS:
        if scaling.get(key) is not None:
            scaling[key] = _checked(f"rope_scaling.{key}", scaling[key], _ROPE_FIELDS[key], source)
        elif key in _ROPE_NEEDS[rope_type]:
            raise _field_error(source, f"RoPE scaling {rope_type!r} needs `{key}`, which "
                               "config.json does not give.", hint=_HINT)
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise _field_error(source, "llama3 RoPE scaling needs high_freq_factor "
                           f"({scaling['high_freq_factor']:g}) above low_freq_factor "
                           f"({scaling['low_freq_factor']:g}).")
    return theta, tuple(sorted([("rope_type", rope_type)] +
                               [(k, v) for k, v in scaling.items() if k in _ROPE_KEYS]))


def _rotary_dim(hf: dict, v: dict, family: str, head_dim: int, scaling: tuple | None,
                source) -> int | None:
    """How much of each head RoPE turns (Phi-3's partial_rotary_factor, in rope_parameters or at
    the top level); None: all of it. LongRoPE's factors must cover its pairs."""
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    partial = params.get("partial_rotary_factor", v["partial_rotary_factor"])
    partial = 1.0 if partial is None else _checked(
        "partial_rotary_factor", partial, CONFIG_FIELDS["partial_rotary_factor"], source)
    rotary = int(head_dim * partial)
    if partial != 1.0 and family != "phi3":
        raise PlanError("model.path", f"partial_rotary_factor={_show(partial)}: only 1 (RoPE over "
                        f"the whole head) is supported for {family}.", file=str(source),
                        hint=_HINT)
    if rotary != head_dim and (rotary % 2 or rotary < 2):     # (an odd head: ModelConfig.check)
        raise _field_error(source, f"partial_rotary_factor={partial:g} of head_dim={head_dim} "
                           f"turns {rotary} dimensions; RoPE needs an even number.")
    factors = dict(scaling or ())
    for key in ("short_factor", "long_factor"):
        if key in factors and len(factors[key]) != rotary // 2:
            raise _field_error(source, f"rope_scaling.{key} has {len(factors[key])} factors; "
                               f"the {rotary} rotated dimensions of a head need {rotary // 2}.")
    return None if rotary == head_dim else rotary


def _longrope(scaling: dict, hf: dict, source) -> tuple:
    """Phi-3's LongRoPE: a factor per rotated dimension pair for sequences within the pretraining
    length (short_factor) and for longer ones (long_factor), and the cos/sin scale (attention_factor,
    by default √(1 + ln(factor) / ln(original length)) with factor = context / original length),
    as transformers computes them. The factors' count is checked against the head in from_hf."""
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        if not (isinstance(value, list) and value and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                and x > 0 for x in value)):
            raise _field_error(source, f"longrope RoPE scaling needs `{key}`, a list of positive "
                               f"numbers; config.json gives {_show(value)}.", hint=_HINT)
        factors[key] = tuple(float(x) for x in value)
    original = scaling.get("original_max_position_embeddings",
                           hf.get("original_max_position_embeddings", 4096))
    original = _checked("original_max_position_embeddings", original,
                        _ROPE_FIELDS["original_max_position_embeddings"], source)
    context = _checked("max_position_embeddings", hf.get("max_position_embeddings", 2048),
                       CONFIG_FIELDS["max_position_embeddings"], source)
    factor = scaling.get("factor")
    factor = context / original if factor is None else \
        _checked("rope_scaling.factor", factor, _ROPE_FIELDS["factor"], source)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    else:
        attention = _checked("rope_scaling.attention_factor", attention, _ROPE_FIELDS["factor"],
                             source)
    return tuple(sorted([("rope_type", "longrope"), ("attention_factor", float(attention)),
                         ("original_max_position_embeddings", original), *factors.items()]))


def _sliding_windows(hf: dict, v: dict, family: str, num_layers: int,
                     source) -> tuple[int, ...]:
    """Per-layer attention window in tokens, 0 = full causal attention (the usual case). `v`: the
    checked CONFIG_FIELDS values."""
    window = v["sliding_window"]
    if family in ("mistral", "phi3", "mixtral") or (family == "qwen3_moe" and
                                                    v["use_sliding_window"]):
        return (window,) * num_layers if window else ()
    if family in ("qwen2", "qwen3") and v["use_sliding_window"] and window:
        first = num_layers if v["max_window_layers"] is None else v["max_window_layers"]
        local = [i >= first for i in range(num_layers)]
    elif family in GEMMA:
        # transformers' defaults: Gemma 2 alternates local and global layers, Gemma 3 has one
        # global layer in every sliding_window_pattern (6). A null window keeps the layer types
        # (they pick Gemma 3's RoPE base) and limits nothing.
        window = 4096 if "sliding_window" not in hf else (window or v["max_position_embeddings"])
        every = 2 if family == "gemma2" else \
            hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise _field_error(source, f"{_key(source, 'sliding_window_pattern')}={_show(every)} "
                               "must be a positive integer.")
        local = [bool((i + 1) % every) for i in range(num_layers)]
    else:
        return ()
    types = hf.get("layer_types")          # when given, it decides which layers slide
    kinds = ("sliding_attention", "full_attention")
    if types is not None:
        if not (isinstance(types, list) and len(types) == num_layers
                and all(isinstance(t, str) and t in kinds for t in types)):
            raise _field_error(source, f"{_key(source, 'layer_types')} must list one of "
                               f"{' / '.join(kinds)} for each of the {num_layers} layers.")
        local = [t == kinds[0] for t in types]
    windows = tuple(window if slides else 0 for slides in local)
    return windows if any(windows) else ()


def _moe(hf: dict, v: dict, family: str, num_layers: int, source) -> dict:
    """ModelConfig's mixture-of-experts fields of a Mixtral or Qwen3-MoE config.json, with
    transformers' defaults for keys left out. Every layer must be a mixture-of-experts layer (the
    decoder scans one layer type); Mixtral's router jitter (noise on the training inputs) is
    refused."""
    defaults = {"mixtral": (8, 2, True), "qwen3_moe": (128, 8, False)}[family]
    experts = v["num_local_experts"] if v["num_local_experts"] is not None else v["num_experts"]
    experts = defaults[0] if experts is None else experts
    per_token = defaults[1] if v["num_experts_per_tok"] is None else v["num_experts_per_tok"]
    if per_token > experts:
        raise _field_error(source, f"num_experts_per_tok={per_token} routes each token to more "
                           f"experts than the {experts} there are.")
    if family == "mixtral":
        width, norm = v["intermediate_size"], True
        if v["router_jitter_noise"]:
            raise PlanError("model.path", f"router_jitter_noise={v['router_jitter_noise']:g} "
                            "(noise on the router's inputs in training) is not supported.",
                            file=str(source), hint="set router_jitter_noise to 0 in config.json.")
    else:
        width = 768 if v["moe_intermediate_size"] is None else v["moe_intermediate_size"]
        norm = defaults[2] if v["norm_topk_prob"] is None else v["norm_topk_prob"]
        dense = hf.get("mlp_only_layers") or []
        step = v["decoder_sparse_step"] or 1
        if not isinstance(dense, list) or step != 1 or dense:
            raise PlanError("model.path", "config.json makes some layers dense "
                            f"(decoder_sparse_step={_show(hf.get('decoder_sparse_step'))}, "
                            f"mlp_only_layers={_show(hf.get('mlp_only_layers'))}); tune trains "
                            "models whose every layer is a mixture of experts.", file=str(source),
                            hint="use a checkpoint with decoder_sparse_step 1 and no "
                                 "mlp_only_layers, as the published Qwen3-MoE models have.")
    coef = 0.001 if v["router_aux_loss_coef"] is None else v["router_aux_loss_coef"]
    return dict(num_experts=experts, experts_per_token=per_token, expert_intermediate_size=width,
                norm_topk_prob=norm, router_aux_coef=coef)


def expert_legacy_names(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], ...]]:
    """A mixture's tensors as the published checkpoints (and transformers' save_pretrained) store
    them, one per expert, by the 3-D name tensor_shapes gives: fused name → its parts, each one
    name per expert (gate_up_proj: the gates, then the ups, concatenated along the output). Mixtral
    names them block_sparse_moe.experts.{j}.w1 (gate), w3 (up), w2 (down) and its router
    block_sparse_moe.gate; Qwen3-MoE mlp.experts.{j}.gate_proj, up_proj, down_proj."""
    out: dict[str, tuple[tuple[str, ...], ...]] = {}
    if not cfg.num_experts:
        return out
    mixtral = cfg.family == "mixtral"
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        expert = p + ("block_sparse_moe.experts." if mixtral else "mlp.experts.")

        def each(name):
            return tuple(f"{expert}{j}.{name}.weight" for j in range(cfg.num_experts))

        gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        out[f"{p}mlp.experts.gate_up_proj"] = (each(gate), each(up))
        out[f"{p}mlp.experts.down_proj"] = (each(down),)
        if mixtral:
            out[cfg.router_name(i)] = ((f"{p}block_sparse_moe.gate.weight",),)
    return out


def fold_expert_names(found: dict, cfg: ModelConfig) -> dict:
    """`found` (tensor name → shape) with each complete group of per-expert tensors replaced by
    the 3-D tensor it makes (expert_legacy_names), so that checkpoints in either layout check
    against tensor_shapes. An incomplete or inconsistent group is left as it is (and reported
    as missing / unexpected tensors)."""
    out = dict(found)
    for fused, parts in expert_legacy_names(cfg).items():
        names = [n for part in parts for n in part]
        if fused in out or not all(n in out for n in names):
            continue
        shapes = {tuple(found[n]) for n in names}
        if len(shapes) != 1:
            continue
        (shape,) = shapes
        for n in names:
            del out[n]
        router = fused.endswith(".mlp.gate.weight")
        out[fused] = shape if router else (len(parts[0]), len(parts) * shape[0], *shape[1:])
    return out


def unfold_expert_tensors(state: dict, cfg: ModelConfig) -> dict:
    """A state dict with each 3-D expert tensor (and Mixtral's router) under the per-expert names
    of expert_legacy_names, as transformers' save_pretrained writes them and the published
    checkpoints (and llama.cpp's converter) have them. Other tensors pass through."""
    out = dict(state)
    for fused, parts in expert_legacy_names(cfg).items():
        if fused not in out:
            continue
        value = out.pop(fused)
        if fused.endswith(".mlp.gate.weight"):
            out[parts[0][0]] = value
            continue
        width = value.shape[1] // len(parts)
        for k, part in enumerate(parts):
            for j, name in enumerate(part):
                out[name] = value[j, k * width:(k + 1) * width].copy()
    return out
