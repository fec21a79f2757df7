"""A model directory's tokenizer files: tokenizer.json, its chat template and special tokens.

One reader for the compiler (which tokenises the data) and the runtime (which encodes prompts and
decodes answers), so that a prompt at generation time is encoded exactly as in training.
Pure Python + tokenizers: no JAX.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from compiler.errors import PlanError

TOKENIZER_FILE = "tokenizer.json"


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


def encode_prompt(tokenizer, prompt_part: str, *, chat: bool) -> np.ndarray:
    """Token ids of a prompt exactly as training tokenised it (for generation)."""
    ids = tokenizer.encode(prompt_part, add_special_tokens=False).ids
    prefix = [] if chat else special_prefix_ids(tokenizer)
    return np.asarray(prefix + list(ids), dtype=np.int32)
