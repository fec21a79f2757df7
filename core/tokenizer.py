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
    answers) — and, where the tokenizer allows it (_Shortcuts), every distinct piece between its
    control tokens encoded once: a chat template's system prompt and role headers are then
    encoded once for all examples rather than once each."""
    index: dict[str, int] = {}
    for t in texts:
        index.setdefault(t, len(index))
    distinct = list(index)
    ids = None
    if len(distinct) > 1:
        ids = _encode_by_pieces(_shortcuts(tokenizer), distinct)
    if ids is None:
        ids = encode_texts(tokenizer, distinct)
    return [ids[index[t]] for t in texts]


class _Shortcuts:
    """What encode_unique may do instead of encoding each text whole with one tokenizer, worked
    out once from its tokenizer.json:
    - `pieces`: (pattern cutting text at control tokens, control text → id), or None where
      encoding the pieces between control tokens separately could differ from encoding the text
      whole — control tokens that strip whitespace around them, are normalised or match single
      words only; a Metaspace pre-tokenizer (it marks a text's first word differently). Trusted
      once the first CHECKS texts encoded both ways agreed (`checked`); dropped if they do not.
    - `words`: a WordEncoder, or None."""

    CHECKS = 64

    def __init__(self, tokenizer):
        self.tokenizer, self.pieces, self.words, self.checked = tokenizer, None, None, False
        try:
            doc = json.loads(tokenizer.to_str())
            added = tokenizer.get_added_tokens_decoder()
        except Exception:  # noqa: BLE001 - a tokenizer without these accessors: encode whole
            return
        self.pieces = _piece_split(doc, added)
        try:
            steps = _word_steps(doc)
        except Exception:  # noqa: BLE001 - anything unexpected in the tokenizer: encode whole
            steps = None
        self.words = WordEncoder(tokenizer, steps) if steps is not None else None


_SHORTCUTS: dict[int, _Shortcuts] = {}
_KEEP_SHORTCUTS = 8


def _shortcuts(tokenizer) -> _Shortcuts:
    hit = _SHORTCUTS.get(id(tokenizer))
    if hit is None or hit.tokenizer is not tokenizer:
        hit = _SHORTCUTS[id(tokenizer)] = _Shortcuts(tokenizer)
        while len(_SHORTCUTS) > _KEEP_SHORTCUTS:
            _SHORTCUTS.pop(next(iter(_SHORTCUTS)))
    return hit


def _pieces(tokenizer):
    """The tokenizer's piece split (see _Shortcuts), or None."""
    return _shortcuts(tokenizer).pieces


def _words(tokenizer) -> "WordEncoder | None":
    """The tokenizer's WordEncoder, or None where its pipeline is not one reproduced here."""
    return _shortcuts(tokenizer).words


def _encode_by_pieces(shortcuts: _Shortcuts, texts: list[str]) -> list | None:
    """Each text cut at its control tokens, the distinct plain pieces encoded once, the ids put
    back together; None (encode whole) when the tokenizer has no piece split, a text holds
    escaped control text, or the first texts do not encode to the same ids whole."""
    tokenizer = shortcuts.tokenizer
    if shortcuts.pieces is None or any(ESC_OPEN in t for t in texts):
        return None
    pattern, control_ids = shortcuts.pieces
    cut = [pattern.split(t) for t in texts]          # [plain, control, plain, control, ..., plain]
    index: dict[str, int] = {}
    for parts in cut:
        for k in range(0, len(parts), 2):
            if parts[k]:
                index.setdefault(parts[k], len(index))
    words = shortcuts.words
    encoded = (words.encode(list(index)) if words is not None else None) or \
        encode_texts(tokenizer, list(index))
    out = []
    for parts in cut:
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(control_ids[part])
            elif part:
                ids += encoded[index[part]]
        out.append(ids)
    if not shortcuts.checked:
        whole = encode_texts(tokenizer, texts[:shortcuts.CHECKS])
        if whole != out[:shortcuts.CHECKS]:
            shortcuts.pieces = None
            return whole + encode_texts(tokenizer, texts[shortcuts.CHECKS:])
        shortcuts.checked = True
    return out


def _piece_split(doc: dict, added: dict):
    """_Shortcuts.pieces of the tokenizer described by `doc` (its tokenizer.json) with these
    added tokens (id → AddedToken)."""
    if "Metaspace" in json.dumps(doc.get("pre_tokenizer")):
        return None
    controls = {}
    for tid, t in added.items():
        if not t.special or not t.content:
            continue
        if t.lstrip or t.rstrip or t.normalized or t.single_word:
            return None
        controls[t.content] = tid
    if not controls:
        return None
    return _piece_pattern(tuple(sorted(controls, key=lambda c: (-len(c), c)))), controls


@lru_cache(maxsize=8)
def _piece_pattern(controls: tuple[str, ...]):
    return re.compile("(" + "|".join(map(re.escape, controls)) + ")")


# ------------------------------------------------------------------------------ word by word

# GPT-2's pre-tokenizer pattern (tokenizers' ByteLevel with use_regex)
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class WordEncoder:
    """Plain text (no control token in it) encoded word by word, each distinct word once, for a
    byte-level BPE tokenizer whose pre-tokenizer is reproduced here exactly (Digits, Split with a
    regex, ByteLevel — as SmolLM2, Llama 3, Qwen and GPT-2 have them): BPE never merges across the
    pre-tokenizer's words, so a text's ids are its words' ids end to end. Data repeats its words,
    and a dictionary lookup is far cheaper than the tokenizer's per-text work (it dominated
    compiling 10⁶ rows).

    Checked like ChatFrame: the first CHECKS texts and every CHECK_EVERY-th after are encoded by the
    tokenizer too; one difference and this tokenizer is encoded by the tokenizer from then on."""

    CHECKS, CHECK_EVERY, MAX_WORDS = 256, 1000, 1_000_000

    def __init__(self, tokenizer, steps: list):
        self.tokenizer, self.steps = tokenizer, steps
        self.cache: dict[str, list[int]] = {}
        self.seen, self.unfit = 0, False
        self.bytes = _byte_chars()

    def split(self, text: str) -> list[str]:
        """The pre-tokenizer's words of `text`: each step isolates its pattern's matches (and the
        text between them) inside the previous step's pieces."""
        pieces = [text]
        for pattern in self.steps:
            out: list[str] = []
            for piece in pieces:
                out += [p for p in pattern.split(piece) if p]
            pieces = out
        return pieces

    def encode(self, texts: list[str]) -> list[list[int]] | None:
        """Ids of each text, or None when this tokenizer turned out not to fit."""
        if self.unfit:
            return None
        model, cache, chars = self.tokenizer.model, self.cache, self.bytes
        if len(cache) > self.MAX_WORDS:
            cache.clear()
        out = []
        for text in texts:
            ids: list[int] = []
            for word in self.split(text):
                got = cache.get(word)
                if got is None:
                    mapped = "".join(chars[b] for b in word.encode("utf-8"))
                    got = cache[word] = [t.id for t in model.tokenize(mapped)]
                ids += got
            out.append(ids)
        n = len(texts)
        check = [i for i in range(n) if self.seen + i < self.CHECKS
                 or (self.seen + i) % self.CHECK_EVERY == 0]
        self.seen += n
        if check:
            whole = self.tokenizer.encode_batch([texts[i] for i in check], add_special_tokens=False)
            if any(out[i] != e.ids for i, e in zip(check, whole)):
                self.unfit = True
                return None
        return out


@lru_cache(maxsize=1)
def _byte_chars() -> list[str]:
    """GPT-2's byte → printable character table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _word_steps(doc: dict) -> list | None:
    """The WordEncoder's split steps for the tokenizer `doc` (its tokenizer.json) describes, or
    None where its pipeline is not one reproduced here."""
    import regex

    model = doc.get("model") or {}
    if doc.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
        return None
    if any(not t.get("special") for t in doc.get("added_tokens") or []):
        return None                        # plain added tokens are matched inside the text
    pre = doc.get("pre_tokenizer")
    parts = pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre]
    steps, byte_level = [], False
    for part in parts:
        kind = (part or {}).get("type")
        if kind == "Digits":
            steps.append(regex.compile(r"\p{N}" if part.get("individual_digits") else r"\p{N}+"))
        elif kind == "Split" and part.get("behavior") == "Isolated" and not part.get("invert"):
            pattern = part.get("pattern") or {}
            if "Regex" in pattern:
                steps.append(regex.compile(pattern["Regex"]))
            elif "String" in pattern:
                steps.append(regex.compile(regex.escape(pattern["String"])))
            else:
                return None
        elif kind == "ByteLevel" and not part.get("add_prefix_space") and not byte_level:
            if part.get("use_regex", True):
                steps.append(regex.compile(GPT2_SPLIT))
            byte_level = True
        else:
            return None
    # each step as one C call per piece: split on the pattern wrapped in a group keeps both the
    # matches and the text between them (Isolated); a pattern with groups of its own does not fit
    if any(step.groups for step in steps):
        return None
    return [regex.compile(f"({step.pattern})", step.flags) for step in steps] if byte_level \
        else None
