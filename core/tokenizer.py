"""A model directory's tokenizer files: tokenizer.json, its chat template and special tokens.

One reader for the compiler (which tokenises the data) and the runtime (which encodes prompts and
decodes answers), so that a prompt at generation time is encoded exactly as in training.
Pure Python + tokenizers: no JAX.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.errors import PlanError

TOKENIZER_FILE = "tokenizer.json"
# Control-token text that comes from the data (a customer writing "<|im_end|>") is marked with these
# private-use characters by compiler/data.py and encoded as plain text, so that only the template
# writes real control tokens. The data's own U+E000/U+E001 are removed when it is cleaned.
ESC_OPEN, ESC_CLOSE = "\ue000", "\ue001"
_ESCAPED = re.compile("\ue000(.*?)\ue001", re.S)


def load_tokenizer(model_dir: str | Path):
    """The tokenizers.Tokenizer of model_dir/tokenizer.json, with truncation and padding off (some
    tokenizer.json files ship with them on; lengths are tune's business)."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise PlanError("model.path", f"{model_dir} has no tokenizer.json (the fast tokenizer "
                        "format, which tune reads).",
                        hint="save one with `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`.")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 — tokenizers raises a bare Exception for a bad file
        raise PlanError("model.path", f"{path} is not a tokenizer the `tokenizers` library can "
                        f"read ({e}).", file=str(path),
                        hint="save it again with `AutoTokenizer.from_pretrained(DIR)"
                             ".save_pretrained(DIR)`.") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def read_tokenizer_config(model_dir: str | Path) -> dict:
    """tokenizer_config.json as a dict ({} when there is none); PlanError when it is not a JSON
    object."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlanError("model.path", f"{path} is not valid JSON ({e}).", file=str(path)) from None
    if not isinstance(cfg, dict):
        raise PlanError("model.path", f"{path} must hold a JSON object.", file=str(path))
    return cfg


def chat_template(model_dir: str | Path) -> str | None:
    """The model's own chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or the "default" entry of a list of named templates); None if none."""
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():  # transformers prefers this file over the tokenizer_config entry
        return jinja.read_text(encoding="utf-8")
    template = read_tokenizer_config(model_dir).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def special_token(model_dir: str | Path, name: str) -> str:
    """tokenizer_config.json's `name` token (bos_token, eos_token, ...) as text; '' when none."""
    tok = read_tokenizer_config(model_dir).get(name)
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else ""


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


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The texts of the tokenizer's special added tokens (<|im_start|>, <|im_end|>, <s>, ...),
    longest first: what the data must not be able to write."""
    return tuple(sorted({t.content for t in tokenizer.get_added_tokens_decoder().values()
                         if t.special and t.content}, key=lambda c: (-len(c), c)))


@lru_cache(maxsize=8)
def _control_pattern(controls: tuple[str, ...]):
    return re.compile("|".join(map(re.escape, controls))) if controls else None


def escape_controls(text: str, controls: tuple[str, ...]) -> tuple[str, int]:
    """(text with every control-token occurrence marked to be encoded as plain text, how many)."""
    pattern = _control_pattern(tuple(controls))
    if pattern is None:
        return text, 0
    return pattern.subn(lambda m: ESC_OPEN + m.group(0) + ESC_CLOSE, text)


def unescape(text: str) -> str:
    """The text as written (the escape marks removed)."""
    return text.replace(ESC_OPEN, "").replace(ESC_CLOSE, "") if ESC_OPEN in text else text


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added). Control-token text the data wrote (marked
    by escape_controls) is encoded as plain text; everything else as the tokenizer does."""
    ids: list[list[int] | None] = [None] * len(texts)
    plain = [i for i, t in enumerate(texts) if ESC_OPEN not in t]
    for i, enc in zip(plain, tokenizer.encode_batch([texts[i] for i in plain],
                                                    add_special_tokens=False)):
        ids[i] = enc.ids
    for i, t in enumerate(texts):
        if ids[i] is None:
            ids[i] = _encode_escaped(tokenizer, t)
    return ids


def _encode_escaped(tokenizer, text: str) -> list[int]:
    out, at = [], 0
    for m in _ESCAPED.finditer(text):
        if m.start() > at:
            out += tokenizer.encode(text[at:m.start()], add_special_tokens=False).ids
        tokenizer.encode_special_tokens = True
        try:
            out += tokenizer.encode(m.group(1), add_special_tokens=False).ids
        finally:
            tokenizer.encode_special_tokens = False
        at = m.end()
    if at < len(text):
        out += tokenizer.encode(unescape(text[at:]), add_special_tokens=False).ids
    return out


def encode_prompt(tokenizer, prompt_part: str, *, chat: bool) -> np.ndarray:
    """Token ids of a prompt exactly as training tokenised it (for generation)."""
    ids = encode_texts(tokenizer, [prompt_part])[0]
    prefix = [] if chat else special_prefix_ids(tokenizer)
    return np.asarray(prefix + list(ids), dtype=np.int32)


def encode_unique(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, every distinct text encoded once (data repeats its prompts and
    answers)."""
    index: dict[str, int] = {}
    for t in texts:
        index.setdefault(t, len(index))
    ids = encode_texts(tokenizer, list(index))
    return [ids[index[t]] for t in texts]
