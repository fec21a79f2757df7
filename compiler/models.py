"""Find the model a config names and describe it from its config.json and tokenizer, reading no weights.

`model.path` null is the embedded SmolLM2-135M-Instruct (converted once from its GGUF, see
compiler/gguf.py); a directory is a local Hugging Face checkpoint; an `org/name` that is not a directory
is downloaded from the Hugging Face Hub (safetensors, json and tokenizer files only).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from compiler.errors import PlanError, did_you_mean

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCH_BY_MODEL_TYPE = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
MODULE_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PATH_HINT = ("model.path takes a local Hugging Face checkpoint directory (config.json, *.safetensors, "
              "tokenizer.json), a Hub id such as `HuggingFaceTB/SmolLM2-360M-Instruct`, or null for "
              "the embedded SmolLM2-135M-Instruct.")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str                 # "embedded" | "local" | "hub"
    dir: str                    # absolute path of the HF-layout directory
    architecture: str           # e.g. "LlamaForCausalLM"
    family: str                 # "llama" | "mistral" | "qwen2" | "qwen3"
    hf_config: dict             # config.json as read
    dims: dict                  # layers, hidden, intermediate, heads, kv_heads, head_dim, vocab
    params: int                 # total parameter count (lm_head counted once when tied)
    module_names: tuple         # the linear modules LoRA can target
    linear_shapes: dict         # module name -> (in_features, out_features)
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int           # the end-of-response token the tokenizer declares
    eos_token_ids: tuple        # every id that ends generation (tokenizer, config, generation config)
    pad_token_id: int
    config_hash: str            # sha256 of canonical config.json
    tokenizer_hash: str         # sha256 of tokenizer.json + chat template


# ------------------------------------------------------------------------------ public API

def resolve_model(model_cfg: dict) -> ModelInfo:
    """Locate the model of the `model` config section and describe it. Raises PlanError."""
    path = model_cfg.get("path")
    name = model_cfg.get("name")
    if path is None or str(path).strip() in ("", "null", "None"):
        from compiler.gguf import ensure_embedded_model

        return _describe(ensure_embedded_model(), source="embedded",
                         name=name or "smollm2-135m-instruct")
    path = str(path).strip()
    local = Path(path).expanduser()
    if local.is_dir():
        return _describe(local.resolve(), source="local", name=name or local.resolve().name)
    if local.exists():
        what = ("a GGUF file; only the embedded SmolLM2 GGUF is converted"
                if local.suffix == ".gguf" else "a file, not a checkpoint directory")
        raise PlanError("model.path", f"`{path}` is {what}.", hint=_PATH_HINT)
    if _HUB_ID.fullmatch(path) and ".." not in path:
        return _describe(_download(path, model_cfg.get("revision")), source="hub", name=name or path)
    raise PlanError("model.path", f"`{path}` is not a directory (looked for {local.absolute()}) "
                    "and does not look like a Hugging Face Hub id (`org/name`).", hint=_PATH_HINT)


def load_tokenizer(model_dir):
    """The model's tokenizers.Tokenizer, from its tokenizer.json."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise PlanError("model.path", f"{model_dir} has no tokenizer.json (the fast tokenizer "
                        "format, which tune reads).",
                        hint="save one with `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`.")
    return Tokenizer.from_file(str(path))


def chat_template(model_dir) -> str | None:
    """The model's own chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or the "default" entry of a list of named templates); None if none."""
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():  # transformers prefers this file over the tokenizer_config entry
        return jinja.read_text(encoding="utf-8")
    template = _read_json(model_dir / "tokenizer_config.json", required=False).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def model_dims(hf: dict) -> dict:
    """The shapes that matter, with transformers' defaults where config.json leaves them out."""
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        dims = {
            "layers": int(hf["num_hidden_layers"]),
            "hidden": hidden,
            "intermediate": int(hf["intermediate_size"]),
            "heads": heads,
            "kv_heads": int(hf.get("num_key_value_heads") or heads),
            "vocab": int(hf["vocab_size"]),
        }
    except KeyError as e:
        raise PlanError("model.path", f"config.json lacks `{e.args[0]}`.",
                        hint="is this a complete Hugging Face causal-LM checkpoint?") from None
    head_dim = hf.get("head_dim")
    if not head_dim:  # Qwen3Config defaults head_dim to 128; the others derive it
        head_dim = 128 if hf.get("model_type") == "qwen3" else hidden // heads
    dims["head_dim"] = int(head_dim)
    return dims


def linear_shapes(hf: dict) -> dict:
    """module name -> (in_features, out_features) of each linear LoRA can target."""
    d = model_dims(hf)
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    h, i = d["hidden"], d["intermediate"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def count_params(hf: dict) -> int:
    """Parameter count from the config alone, as transformers' num_parameters() would report."""
    d = model_dims(hf)
    family = hf.get("model_type")
    shapes = linear_shapes(hf)
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    attn = sum(a * b for m, (a, b) in shapes.items() if m in MODULE_NAMES[:4])
    if family == "qwen2":
        attn += q + 2 * kv  # q/k/v carry biases, o does not
    elif family in ("llama", "qwen3") and hf.get("attention_bias"):
        attn += q + 2 * kv + h
    if family == "qwen3":
        attn += 2 * d["head_dim"]  # q_norm, k_norm
    mlp = sum(a * b for m, (a, b) in shapes.items() if m in MODULE_NAMES[4:])
    if family == "llama" and hf.get("mlp_bias"):
        mlp += 2 * d["intermediate"] + h
    per_layer = attn + mlp + 2 * h  # + input and post-attention RMSNorm
    embed = d["vocab"] * h
    lm_head = 0 if hf.get("tie_word_embeddings", False) else d["vocab"] * h
    return embed + d["layers"] * per_layer + h + lm_head


def config_hash(hf: dict) -> str:
    return hashlib.sha256(json.dumps(hf, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


# ----------------------------------------------------------------------------- internals

def _describe(model_dir: Path, *, source: str, name: str) -> ModelInfo:
    model_dir = Path(model_dir).resolve()
    hf = _read_json(model_dir / "config.json", required=True)
    architecture = _architecture(hf)
    family = SUPPORTED_ARCHITECTURES[architecture]
    _check_supported_features(hf)
    _check_weights(model_dir)
    tokenizer = load_tokenizer(model_dir)
    template = chat_template(model_dir)
    tok_cfg = _read_json(model_dir / "tokenizer_config.json", required=False)
    gen_cfg = _read_json(model_dir / "generation_config.json", required=False)
    ids = _special_ids(hf, gen_cfg, tok_cfg, tokenizer)

    digest = hashlib.sha256((model_dir / "tokenizer.json").read_bytes())
    digest.update(b"\0" + (template or "").encode("utf-8"))
    return ModelInfo(
        name=str(name), source=source, dir=str(model_dir), architecture=architecture,
        family=family, hf_config=hf, dims=model_dims(hf), params=count_params(hf),
        module_names=MODULE_NAMES, linear_shapes=linear_shapes(hf), chat_template=template,
        config_hash=config_hash(hf), tokenizer_hash=digest.hexdigest(), **ids)


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") in _ARCH_BY_MODEL_TYPE:
        archs = [_ARCH_BY_MODEL_TYPE[hf["model_type"]]]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    found = ", ".join(archs) or f"model_type {hf.get('model_type')!r}"
    raise PlanError("model.path", f"architecture {found} is not supported; tune trains "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}.{did_you_mean(found, SUPPORTED_ARCHITECTURES)}",
                    hint="pick a checkpoint of the Llama family (Llama 2/3, Mistral, Qwen2/2.5/3, "
                         "SmolLM).")


def _check_supported_features(hf: dict) -> None:
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise PlanError("model.path", f"the checkpoint is quantized ({method}); tune loads "
                        "unquantized safetensors weights.",
                        hint="use the original bf16/fp16/fp32 checkpoint.")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise PlanError("model.path", f"RoPE scaling type {rope_type!r} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")


def _check_weights(model_dir: Path) -> None:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_read_json(index, required=True).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise PlanError("model.path", f"{index} lists shards that are missing: "
                            f"{', '.join(missing)}.", hint="finish downloading the checkpoint.")
        return
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise PlanError("model.path", f"{model_dir} holds only pickle weights ({', '.join(pickles)}); "
                        "weights load from safetensors only, since unpickling can run code.",
                        hint="convert once with transformers: `AutoModelForCausalLM.from_pretrained(DIR)"
                             ".save_pretrained(DIR, safe_serialization=True)`.")
    raise PlanError("model.path", f"{model_dir} has no weights (*.safetensors or "
                    "model.safetensors.index.json).", hint=_PATH_HINT)


def _special_ids(hf: dict, gen: dict, tok_cfg: dict, tokenizer) -> dict:
    def token_id(key):
        tok = tok_cfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return tokenizer.token_to_id(tok) if isinstance(tok, str) else None

    def as_list(value):
        if value is None:
            return []
        return [int(v) for v in value] if isinstance(value, list) else [int(value)]

    config_eos = as_list(hf.get("eos_token_id")) + as_list(gen.get("eos_token_id"))
    eos = token_id("eos_token")
    if eos is None:
        if not config_eos:
            raise PlanError("model.path", "neither config.json nor the tokenizer declares an end "
                            "token (eos_token_id / eos_token).",
                            hint="set eos_token_id in config.json.")
        eos = config_eos[0]
    eos_ids = tuple(dict.fromkeys([eos, *config_eos]))
    pad = next((v for v in (token_id("pad_token"), *as_list(hf.get("pad_token_id")),
                            *as_list(gen.get("pad_token_id"))) if v is not None), eos)
    bos = next((v for v in (*as_list(hf.get("bos_token_id")), token_id("bos_token"))
                if v is not None), None)
    return {"bos_token_id": bos, "eos_token_id": eos, "eos_token_ids": eos_ids, "pad_token_id": pad}


def _read_json(path: Path, *, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise PlanError("model.path", f"{path.parent} has no {path.name}.", hint=_PATH_HINT)
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PlanError("model.path", f"{path} is not valid JSON ({e}).", file=str(path)) from None


def _download(repo_id: str, revision: str | None) -> Path:
    """A Hub checkpoint's safetensors/json/tokenizer files, from the local HF cache or the network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PlanError("model.path", f"`{repo_id}` is not a local directory, and downloading "
                        "it needs the huggingface_hub package, which is not installed.",
                        hint=_PATH_HINT) from None
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision,
                                      allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, gated or missing repo: all the user's to fix
        reason = (str(e).strip().splitlines() or [""])[0]
        raise PlanError("model.path", f"`{repo_id}` is not a local directory, and downloading it "
                        f"from the Hugging Face Hub failed ({type(e).__name__}: {reason}).",
                        hint="check the id and your network (or `huggingface-cli login` for gated "
                             "models), or give a local checkpoint directory. " + _PATH_HINT) from None
