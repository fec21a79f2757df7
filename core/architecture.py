"""The Llama family as a Hugging Face `config.json` describes it: read once, into one `ModelConfig`.

The compiler reads it to check a model and size a plan (shapes, parameter count, LoRA targets); the
plan carries it; the runtime builds its NNX decoder from it. Nothing else parses config.json.
Pure Python (no JAX): both sides import it.

The family members differ by a handful of switches: grouped-query attention, RoPE scaling, tied
embeddings, q/k/v biases (Qwen2), per-head RMSNorm of q and k (Qwen3), sliding-window attention (some
Mistral and Qwen configs). Anything outside what the decoder implements is refused here, with the
key `model.path`, before anything heavy runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import PlanError, did_you_mean

# architecture (config.json `architectures`) → family (config.json `model_type`)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
FAMILIES = tuple(ARCHITECTURES.values())
# The linear layers of a block, by their Hugging Face (and PEFT) names: what LoRA can target.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
MODULE_NAMES = ATTENTION_MODULES + MLP_MODULES
ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_HINT = "pick a checkpoint of the Llama family (Llama 2/3, Mistral, Qwen2/2.5/3, SmolLM)."


@dataclass(frozen=True)
class ModelConfig:
    """What the decoder needs to know about a checkpoint. Hashable (the NNX module keeps it as a
    static attribute) and JSON-friendly (the plan stores it)."""
    family: str                         # llama | mistral | qwen2 | qwen3
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

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read a config.json (as a dict); PlanError (a ValueError) for anything unsupported."""
        if not isinstance(hf, dict):
            raise PlanError("model.path", f"config.json must hold a JSON object, got "
                            f"{type(hf).__name__}.", hint=_HINT)
        family = ARCHITECTURES[architecture(hf)]
        _check_supported(hf)
        theta, scaling = _rope(hf)
        try:
            heads, layers = int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
            hidden = int(hf["hidden_size"])
            head_dim = hf.get("head_dim")
            if not head_dim:        # transformers' Qwen3Config defaults to 128; the others derive it
                head_dim = 128 if family == "qwen3" else hidden // heads
            bias = bool(hf.get("attention_bias", False))
            config = cls(
                family=family, vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]), num_layers=layers,
                num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(head_dim), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta, rope_scaling=scaling,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=True if family == "qwen2" else (bias and family != "mistral"),
                o_bias=bias and family in ("llama", "qwen3"), qk_norm=family == "qwen3",
                sliding_windows=_sliding_windows(hf, family, layers))
        except KeyError as e:
            raise PlanError("model.path", f"config.json lacks `{e.args[0]}`.",
                            hint="is this a complete Hugging Face causal-LM checkpoint?") from None
        except (TypeError, ValueError) as e:
            raise PlanError("model.path", f"config.json has a value of the wrong type ({e}).",
                            hint="is this a complete Hugging Face causal-LM checkpoint?") from None
        except ZeroDivisionError:
            raise PlanError("model.path", "config.json gives num_attention_heads=0.",
                            hint="is this a complete Hugging Face causal-LM checkpoint?") from None
        config.check()
        return config

    def check(self) -> None:
        """Sizes a decoder can be built from: positive, heads grouping evenly."""
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                 "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                 "head_dim": self.head_dim}
        bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
        if bad:
            raise PlanError("model.path", f"config.json gives sizes no model can have: "
                            f"{', '.join(bad)}.", hint="is this a complete Hugging Face causal-LM "
                            "checkpoint?")
        if self.num_heads % self.num_kv_heads:
            raise PlanError("model.path", f"config.json's {self.num_heads} attention heads do not "
                            f"group evenly over {self.num_kv_heads} key/value heads.",
                            hint="is this a complete Hugging Face causal-LM checkpoint?")

    # -- shapes the compiler sizes a plan with

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """module name → (in_features, out_features) of each linear LoRA can target."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of this config holds, by its Hugging Face name, with its shape
        (the lm_head only when untied)."""
        d, h = self.hidden_size, self.head_dim
        out = {"model.embed_tokens.weight": (self.vocab_size, d), "model.norm.weight": (d,)}
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, d)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            for m, (n_in, n_out) in self.linear_shapes().items():
                part = "self_attn" if m in ATTENTION_MODULES else "mlp"
                out[f"{p}{part}.{m}.weight"] = (n_out, n_in)
                if (self.attention_bias and m in ("q_proj", "k_proj", "v_proj")) or \
                        (self.o_bias and m == "o_proj"):
                    out[f"{p}{part}.{m}.bias"] = (n_out,)
            out[f"{p}input_layernorm.weight"] = (d,)
            out[f"{p}post_attention_layernorm.weight"] = (d,)
            if self.qk_norm:
                out[f"{p}self_attn.q_norm.weight"] = (h,)
                out[f"{p}self_attn.k_norm.weight"] = (h,)
        return out

    def param_count(self) -> int:
        """Parameters, as transformers' num_parameters() counts them (a tied head counted once)."""
        shapes = self.linear_shapes()
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = sum(a * b for m, (a, b) in shapes.items() if m in ATTENTION_MODULES)
        attn += (q + 2 * kv) * self.attention_bias + h * self.o_bias + 2 * self.head_dim * self.qk_norm
        mlp = sum(a * b for m, (a, b) in shapes.items() if m in MLP_MODULES)
        per_layer = attn + mlp + 2 * h                  # + input and post-attention RMSNorm
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_layers * per_layer + h + head


# Existing modules adapter.train_modules can train in full, besides the linear layers: the embedding,
# the output head, the final norm and each block's norms.
WHOLE_MODULES = ("embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm")


def full_module_names(cfg: "ModelConfig") -> tuple[str, ...]:
    """What adapter.train_modules may name for this model."""
    return WHOLE_MODULES + (("q_norm", "k_norm") if cfg.qk_norm else ()) + MODULE_NAMES


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
        elif name in ("input_layernorm", "post_attention_layernorm"):
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


def read_config(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory's config.json."""
    path = Path(model_dir) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError("model.path", f"{Path(model_dir)} has no config.json.", file=str(path)) from None
    except ValueError as e:
        raise PlanError("model.path", f"{path} is not valid JSON ({e}).", file=str(path)) from None
    return ModelConfig.from_hf(hf)


def architecture(hf: dict) -> str:
    """The supported architecture a config.json names (or implies by its model_type)."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    by_type = {family: arch for arch, family in ARCHITECTURES.items()}
    if not archs and hf.get("model_type") in by_type:
        archs = [by_type[hf["model_type"]]]
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    found = ", ".join(map(str, archs)) or f"model_type {hf.get('model_type')!r}"
    raise PlanError("model.path", f"architecture {found} is not supported; tune trains "
                    f"{', '.join(ARCHITECTURES)}.{did_you_mean(found, ARCHITECTURES)}", hint=_HINT)


def _check_supported(hf: dict) -> None:
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise PlanError("model.path", f"the checkpoint is quantized ({method}); tune loads "
                        "unquantized safetensors weights.",
                        hint="use the original bf16/fp16/fp32 checkpoint.")
    if hf.get("hidden_act", "silu") != "silu":
        raise PlanError("model.path", f"hidden_act {hf.get('hidden_act')!r} is not supported; the "
                        "Llama family uses silu.", hint=_HINT)
    if hf.get("mlp_bias"):
        raise PlanError("model.path", "mlp_bias=true (biases on the MLP projections) is not "
                        "supported.", hint=_HINT)


def _rope(hf: dict) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling) from either config style: transformers<5 writes `rope_theta` and
    `rope_scaling` ({"type"|"rope_type": ...}); transformers 5 writes `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise PlanError("model.path", "config.json's rope_scaling / rope_parameters must be an "
                        "object.", hint=_HINT)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type not in ROPE_TYPES:
        raise PlanError("model.path", f"RoPE scaling type {rope_type!r} is not supported; "
                        f"supported: {', '.join(ROPE_TYPES)}.", hint=_HINT)
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise PlanError("model.path", "partial_rotary_factor != 1 is not supported.", hint=_HINT)
    if rope_type == "default":
        return theta, None
    return theta, tuple(sorted([("rope_type", rope_type)] +
                               [(k, v) for k, v in scaling.items() if k in _ROPE_KEYS]))


def _sliding_windows(hf: dict, family: str, num_layers: int) -> tuple[int, ...]:
    """Per-layer attention window in tokens, 0 = full causal attention (the usual case)."""
    window = hf.get("sliding_window")
    if family == "mistral" and window:
        return (int(window),) * num_layers
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window") and window:
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", num_layers) else "full_attention"
            for i in range(num_layers)]
        windows = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
        return windows if any(windows) else ()
    return ()
