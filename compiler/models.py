"""Find the model a config names and describe it from its config.json and tokenizer, reading no weights.

`model.path` null is the embedded model `model.embedded` names (SmolLM2-135M-Instruct by default, or
Gemma 3 270M; converted once from its GGUF, see compiler/gguf.py); a directory is a local Hugging Face
checkpoint; an `org/name` that is not a directory is downloaded from the Hugging Face Hub (safetensors,
json and tokenizer files only).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from core.architecture import (ModelConfig, architecture, check_token_ids, fold_expert_names,
                               is_vision_tensor, legacy_names)
from core.errors import PlanError
from core.plan import ModelSection
from core.tokenizer import (TOKENIZER_FILE, chat_template, load_tokenizer, read_tokenizer_config,
                                special_token)
from core.weight_files import INDEX_FILE, index_shards, read_header

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PATH_HINT = ("model.path takes a local Hugging Face checkpoint directory (config.json, *.safetensors, "
              "tokenizer.json), a Hub id such as `HuggingFaceTB/SmolLM2-360M-Instruct`, or null for "
              "the embedded model model.embedded names (model=smollm2-135m, the default, or "
              "model=gemma3-270m).")


# ------------------------------------------------------------------------------ public API

def resolve_model(model_cfg: dict) -> ModelSection:
    """Locate the model of the `model` config section and describe it. Raises PlanError."""
    path = model_cfg.get("path")
    name = model_cfg.get("name")
    if path is None or str(path).strip() in ("", "null", "None"):
        from compiler.gguf import DEFAULT_EMBEDDED, EMBEDDED, ensure_embedded_model

        embedded = model_cfg.get("embedded") or DEFAULT_EMBEDDED
        return _describe(ensure_embedded_model(embedded), source="embedded",
                         name=name or EMBEDDED[embedded].dirname)
    path = str(path).strip()
    local = Path(path).expanduser()
    if local.is_dir():
        return _describe(local.resolve(), source="local", name=name or local.resolve().name)
    if local.exists():
        what = ("a GGUF file; only the embedded models' GGUFs are converted (model.embedded)"
                if local.suffix == ".gguf" else "a file, not a checkpoint directory")
        raise PlanError("model.path", f"`{path}` is {what}.", hint=_PATH_HINT)
    if _HUB_ID.fullmatch(path) and ".." not in path:
        return _describe(_download(path, model_cfg.get("revision")), source="hub", name=name or path)
    raise PlanError("model.path", f"`{path}` is not a directory (looked for {local.absolute()}) "
                    "and does not look like a Hugging Face Hub id (`org/name`).", hint=_PATH_HINT)


def config_hash(hf: dict) -> str:
    return hashlib.sha256(json.dumps(hf, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


# ----------------------------------------------------------------------------- internals

def _describe(model_dir: Path, *, source: str, name: str) -> ModelSection:
    model_dir = Path(model_dir).resolve()
    hf = _read_json(model_dir / "config.json", required=True)
    config = ModelConfig.from_hf(hf, source=model_dir / "config.json")
    arch = architecture(hf, source=model_dir / "config.json")
    _check_weights(model_dir, config)
    tokenizer = load_tokenizer(model_dir)
    template = chat_template(model_dir)
    gen_path = model_dir / "generation_config.json"
    gen_cfg = _read_json(gen_path, required=False)
    if not isinstance(gen_cfg, dict):
        raise PlanError("model.path", f"generation_config.json must hold a JSON object, got "
                        f"{type(gen_cfg).__name__}.", file=str(gen_path),
                        hint="fix it, or remove it: it is optional.")
    check_token_ids(gen_cfg, config.vocab_size, gen_path)
    ids = _special_ids(hf, gen_cfg, read_tokenizer_config(model_dir), tokenizer)
    eos_text = tokenizer.id_to_token(ids["eos_token_id"]) or ""

    digest = hashlib.sha256((model_dir / TOKENIZER_FILE).read_bytes())
    digest.update(b"\0" + (template or "").encode("utf-8"))
    return ModelSection(
        name=str(name), source=source, dir=str(model_dir), architecture=arch, config=config,
        params=config.param_count(), chat_template=template, config_hash=config_hash(hf),
        tokenizer_hash=digest.hexdigest(), bos_token=special_token(model_dir, "bos_token"),
        eos_token=eos_text, **ids)


def _check_weights(model_dir: Path, config: ModelConfig) -> None:
    weight_map = index_shards(model_dir, key="model.path")      # None: no index
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
        missing = sorted(str(s.relative_to(model_dir)) for s in shards if not s.is_file())
        if missing:
            raise PlanError("model.path", f"{INDEX_FILE} lists shards that are missing: "
                            f"{', '.join(missing)}.", file=str(model_dir / INDEX_FILE),
                            hint="finish downloading the checkpoint.")
        _check_tensors(shards, config)
        return
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        _check_tensors(files, config)
        return
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise PlanError("model.path", f"{model_dir} holds only pickle weights ({', '.join(pickles)}); "
                        "weights load from safetensors only, since unpickling can run code.",
                        hint="convert once with transformers: `AutoModelForCausalLM.from_pretrained(DIR)"
                             ".save_pretrained(DIR, safe_serialization=True)`.")
    raise PlanError("model.path", f"{model_dir} has no weights (*.safetensors or "
                    "model.safetensors.index.json).", hint=_PATH_HINT)


FLOAT_DTYPES = ("F32", "F16", "BF16")
_IGNORED = ("rotary_emb.inv_freq",)          # buffers some checkpoints carry; recomputed


def _check_tensors(files: list[Path], config: ModelConfig) -> None:
    """The safetensors headers (read alone: no weights; each file's size checked against them)
    against what config.json implies: every tensor there, none unexpected (a multimodal
    checkpoint's vision tensors aside), the right shapes, float dtypes."""
    found: dict[str, tuple] = {}
    for f in files:
        for name, info in read_header(f, key="model.path").items():
            if info.dtype not in FLOAT_DTYPES:
                raise PlanError("model.path", f"{f.name} stores {name} as {info.dtype}; tune loads "
                                f"{', '.join(FLOAT_DTYPES)} weights.", file=str(f),
                                hint="use the original (unquantized) checkpoint.")
            found[name] = info.shape
    legacy = config.multimodal and legacy_names(found)
    want = config.tensor_shapes(legacy=legacy)
    found = fold_expert_names(found, config)        # a mixture's per-expert tensors, as 3-D ones
    tied_head = config.hf_name("lm_head.weight", legacy=legacy) if config.tie_word_embeddings \
        else None
    missing = [n for n in want if n not in found]
    extra = [n for n in found if n not in want and not n.endswith(_IGNORED) and n != tied_head
             and not (config.multimodal and is_vision_tensor(n))]
    wrong = [f"{n} {list(found[n])} (config.json implies {list(want[n])})"
             for n in want if n in found and found[n] != want[n]]
    for what, names in (("lacks", missing), ("has tensors this architecture does not use:", extra),
                        ("has tensors of the wrong shape:", wrong)):
        if names:
            raise PlanError("model.path", f"the checkpoint {what} {', '.join(names[:3])}"
                            + (f" and {len(names) - 3} more" if len(names) > 3 else "") + ".",
                            hint="are config.json and the weights of the same model?")


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
                            *as_list(gen.get("pad_token_id"))) if v is not None and v >= 0), eos)
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
    except (ValueError, RecursionError) as e:
        raise PlanError("model.path", f"{path} is not valid JSON ({e}).", file=str(path),
                        hint="fix the file, or download the checkpoint again.") from None


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
