"""Rendered examples → token ids, cached on disk; the token data the runtime trains and scores on.

An example is its prompt tokens (not supervised) followed by its supervised tokens (the answer and its
end token). The two parts are tokenised separately and concatenated, so a prompt at generation time
tokenises exactly as it did in training. Pure numpy + tokenizers: the runtime imports this module.

Over-length examples (prompt + answer > data.max_length tokens):
- overlength=drop: the example is dropped and counted.
- overlength=truncate: the prompt is cut from the LEFT — its end (the question's last words, the
  chat template's assistant header) and the whole answer are kept. If the answer alone needs
  max_length tokens or more, the last prompt token is kept and the answer is cut at its end to
  max_length - 1 tokens (it then lacks its end token; counted as truncated all the same).
Examples with no supervised token are dropped and counted (no_supervised).

Cache: `<cache_dir>/<key>.npz` (arrays, see SPEC "Token data") + `<key>.json` (stats, test references,
labels). The key hashes everything the tokens depend on, including the rows themselves, so a second
compile of the same inputs loads the cache without tokenising.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from compiler.errors import PlanError
from compiler.templates import mark_example, placeholders, render, to_prompt_completion

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
MAX_LABELS = 1000      # more distinct answers than this is generation, not classification: no label set
POLICIES = ("truncate", "drop")


# ------------------------------------------------------------------------------ tokenizer

def load_tokenizer(tokenizer_dir: str | Path):
    """The tokenizers.Tokenizer of tokenizer_dir/tokenizer.json, with truncation and padding off
    (some tokenizer.json files ship with them on; lengths are this module's business)."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise PlanError("model.path", f"{tokenizer_dir} has no tokenizer.json.",
                        hint="save one with `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`.")
    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def special_prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (Llama's BOS; nothing for SmolLM2,
    Qwen). Plain (non-chat) prompts start with them, as `tokenizer(text)` would; chat prompts get
    whatever the chat template writes itself."""
    plain = tokenizer.encode("x", add_special_tokens=False).ids
    full = tokenizer.encode("x", add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def encode_prompt(tokenizer, prompt_part: str, *, chat: bool) -> np.ndarray:
    """Token ids of a prompt exactly as training tokenised it (for generation)."""
    ids = tokenizer.encode(prompt_part, add_special_tokens=False).ids
    prefix = [] if chat else special_prefix_ids(tokenizer)
    return np.asarray(prefix + list(ids), dtype=np.int32)


def tokenizer_bos_token(tokenizer_dir: str | Path) -> str:
    """tokenizer_config.json's bos_token as text ('' when none), for chat templates that print it."""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    try:
        bos = json.loads(path.read_text(encoding="utf-8")).get("bos_token")
    except (OSError, ValueError):
        return ""
    if isinstance(bos, dict):
        bos = bos.get("content")
    return bos if isinstance(bos, str) else ""


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ build

def build_examples(splits: dict[str, list[dict]], *, template: dict, tokenizer_dir: str,
                   chat_template: str | None, eos_token: str, max_length: int, overlength: str,
                   cache_dir: Path, key_material: dict, bos_token: str | None = None) -> dict:
    """Tokenise the rows of each split (train, val, test; missing = empty) and write the cache, or
    load it when the same inputs were built before. Returns the data stats for the plan."""
    if overlength not in POLICIES:
        raise PlanError("data.overlength", f"unknown policy `{overlength}`.",
                        hint="truncate (cut the prompt's start, keep the answer) or drop.")
    max_length = int(max_length)
    if max_length < 2:
        raise PlanError("data.max_length", f"must be at least 2 tokens, got {max_length}.",
                        hint="a prompt token and an answer token; 512 is typical.")
    chat = bool(template.get("chat"))
    if bos_token is None:
        bos_token = tokenizer_bos_token(tokenizer_dir)
    tokenizer_path = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise PlanError("model.path", f"{tokenizer_dir} has no tokenizer.json.")
    splits = {name: list(splits.get(name) or []) for name in SPLITS}
    tmpl = {k: template.get(k) for k in ("prompt", "response", "system", "chat")}

    key = _cache_key(splits, tmpl=tmpl, chat_template=chat_template if chat else None,
                     tokenizer_hash=_sha256_file(tokenizer_path), eos_token=eos_token,
                     bos_token=bos_token, max_length=max_length, overlength=overlength,
                     key_material=key_material)
    cache_dir = Path(cache_dir).expanduser().resolve()
    npz_path, meta_path = cache_dir / f"{key}.npz", cache_dir / f"{key}.json"
    if npz_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("key") == key and meta.get("version") == CACHE_VERSION:
                return {"cache": str(npz_path), "key": key, **meta["stats"]}
        except (OSError, ValueError, KeyError):
            pass  # unreadable sidecar: rebuild over it

    tokenizer = load_tokenizer(tokenizer_dir)
    prefix = [] if chat else special_prefix_ids(tokenizer)

    # render: (prompt part, supervised part, response text) per row, split by split
    rendered: dict[str, list[tuple[str, str, str]]] = {}
    for name, rows in splits.items():
        out = []
        for row in rows:
            prompt, response, system = render(row, tmpl)
            head, tail = to_prompt_completion(prompt, response, system, chat=chat,
                                              chat_template=chat_template, eos_token=eos_token,
                                              bos_token=bos_token)
            out.append((head, tail, response))
        rendered[name] = out

    # tokenise each distinct text once (classification answers repeat), in two multithreaded batches
    heads = _encode_unique(tokenizer, [h for r in rendered.values() for h, _, _ in r])
    tails = _encode_unique(tokenizer, [t for r in rendered.values() for _, t, _ in r])

    arrays: dict[str, np.ndarray] = {}
    stats = {"truncated": 0, "dropped_too_long": 0, "no_supervised": 0}
    per_split, sizes = {}, {}
    train_lengths = np.zeros(0, dtype=np.int64)
    train_supervised: list[int] = []
    shown: list[str] = []
    references: list[str] = []
    labels: set[str] = set()
    i = 0
    for name in SPLITS:
        counts = {"truncated": 0, "dropped_too_long": 0, "no_supervised": 0}
        seqs, plens, lengths = [], [], []
        for head, tail, response in rendered[name]:
            p_ids, s_ids = prefix + heads[i], tails[i]
            i += 1
            n_p, n_s = len(p_ids), len(s_ids)
            lengths.append(n_p + n_s)
            if n_s == 0:
                counts["no_supervised"] += 1
                continue
            cut = False
            if n_p + n_s > max_length:
                if overlength == "drop":
                    counts["dropped_too_long"] += 1
                    continue
                p_ids, s_ids = truncate(p_ids, s_ids, max_length)
                counts["truncated"] += 1
                cut = True
            seqs.append(p_ids + s_ids)
            plens.append(len(p_ids))
            if name == "train":
                train_supervised.append(len(s_ids))
                labels.add(response.strip().casefold())
                if len(shown) < 2:
                    if cut:
                        head = tokenizer.decode(p_ids, skip_special_tokens=False)
                        tail = tokenizer.decode(s_ids, skip_special_tokens=False)
                    shown.append(mark_example(head, tail))
            elif name == "test":
                references.append(response)
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        arrays[f"{name}_ids"] = np.fromiter(chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
        arrays[f"{name}_offsets"] = offsets
        arrays[f"{name}_prompt_lens"] = np.asarray(plens, dtype=np.int32)
        sizes[name] = len(seqs)
        per_split[name] = counts
        for k in stats:
            stats[k] += counts[k]
        if name == "train":
            train_lengths = np.asarray(lengths, dtype=np.int64)

    distinct = sorted(labels)
    stats = {
        "tokens": _percentiles(train_lengths),
        **stats,
        "supervised": {"min": int(min(train_supervised)) if train_supervised else 0,
                       "mean": round(float(np.mean(train_supervised)), 2) if train_supervised else 0.0},
        "sizes": sizes,
        "per_split": per_split,
        "max_length": max_length,
        "overlength": overlength,
        "n_labels": len(distinct),
        "examples": shown,
    }
    meta = {"version": CACHE_VERSION, "key": key, "stats": stats,
            "test": {"references": references},
            "labels": distinct if len(distinct) <= MAX_LABELS else []}
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(npz_path, lambda f: np.savez(f, **arrays))
    _write_atomic(meta_path, lambda f: f.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))
    return {"cache": str(npz_path), "key": key, **stats}


def truncate(p_ids: list[int], s_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + supervised ids into max_length tokens (see the module docstring for the rule)."""
    if len(s_ids) < max_length:                  # the whole answer fits with ≥ 1 prompt token
        return p_ids[len(p_ids) - (max_length - len(s_ids)):], s_ids
    keep = min(len(p_ids), 1)
    return p_ids[len(p_ids) - keep:], s_ids[:max_length - keep]


def _encode_unique(tokenizer, texts: list[str]) -> list[list[int]]:
    index: dict[str, int] = {}
    for t in texts:
        index.setdefault(t, len(index))
    encoded = tokenizer.encode_batch(list(index), add_special_tokens=False)
    ids = [e.ids for e in encoded]
    return [ids[index[t]] for t in texts]


def _percentiles(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"p50": 0, "p95": 0, "max": 0}
    p50, p95 = np.percentile(lengths, [50, 95])
    return {"p50": int(round(p50)), "p95": int(round(p95)), "max": int(lengths.max())}


def _cache_key(splits: dict, *, tmpl: dict, chat_template, tokenizer_hash: str, eos_token: str,
               bos_token: str, max_length: int, overlength: str, key_material: dict) -> str:
    # The rows themselves are hashed (only the fields the template reads, as text), so anything that
    # changes them — the file, max_rows, dedupe, the split seed — changes the key even if
    # key_material forgets it.
    used = []
    for part in ("prompt", "response", "system"):
        if tmpl.get(part) is not None:
            used += [f for f in placeholders(tmpl[part], key=f"template.{part}") if f not in used]
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "material": key_material, "template": tmpl,
                         "chat_template": chat_template, "tokenizer": tokenizer_hash, "eos": eos_token,
                         "bos": bos_token, "max_length": max_length, "overlength": overlength,
                         "fields": used}, sort_keys=True, default=str).encode())
    for name in SPLITS:
        rows = [[r.get(f) if isinstance(r.get(f), str) else str(r.get(f)) for f in used]
                for r in splits[name]]
        h.update(f"\n{name}:".encode())
        h.update(json.dumps(rows, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ------------------------------------------------------------------------------ load

@dataclass(frozen=True)
class Examples:
    """The token data of a plan. `split(name)` → (ids per example, prompt lengths)."""
    path: str
    arrays: dict = field(repr=False)
    references: list = field(repr=False)       # test answers (response text, no end token)
    labels: list = field(repr=False)           # sorted distinct normalised train answers ([] if many)
    stats: dict = field(repr=False)

    def split(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        ids = self.arrays.get(f"{name}_ids")
        if ids is None:
            return [], np.zeros(0, dtype=np.int32)
        offsets = self.arrays[f"{name}_offsets"]
        n = len(offsets) - 1
        return (np.split(ids, offsets[1:-1]) if n > 0 else []), self.arrays[f"{name}_prompt_lens"]

    def lengths(self, name: str) -> np.ndarray:
        offsets = self.arrays.get(f"{name}_offsets")
        return np.diff(offsets) if offsets is not None else np.zeros(0, dtype=np.int64)


def load_examples(data_section: dict) -> Examples:
    """The token data a plan's data section points at (its `cache`)."""
    if not data_section.get("cache"):
        raise FileNotFoundError("the plan's data section names no token cache; compile the plan again")
    path = Path(data_section["cache"])
    meta_path = path.with_suffix(".json")
    for p in (path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"the plan's token cache {p} is missing (deleted, or the plan was "
                                    "compiled on another machine); compile the plan again to rebuild it")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return Examples(path=str(path), arrays=arrays, references=list(meta["test"]["references"]),
                    labels=list(meta.get("labels") or []), stats=meta.get("stats") or {})
