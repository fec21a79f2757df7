"""Prompting, the one path from text to the tokens a model sees, shared by training data (the
compiler's token cache), evaluation, generation and retrieval:

- clean: Unicode normalisation, whitespace and the model's control tokens (TextPolicy, cleaner);
- render: the recipe's template over a row's fields, then the model's chat template (Prompter.fill,
  Prompter.prompt_ids, through core/templates.py);
- encode: the tokenizer's ids, prompt and answer tokenised apart (core/tokenizer.py).
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass

from core.retrieval import PLACEHOLDER
from core.templates import placeholders, render, render_chat
from core import tokenizer as tok
from core.tokenizer import ESC_CLOSE, ESC_OPEN, encode_prompt, escape_controls

NORMAL_FORMS = ("NFC", "NFKC", "none")
WHITESPACE = ("keep", "strip", "collapse")
CONTROL_POLICIES = ("escape", "refuse", "keep")
CLEANING = ("normalized", "whitespace", "control_tokens")


@dataclass(frozen=True)
class TextPolicy:
    """How the text of the data is cleaned before it is tokenised (data.normalize, data.whitespace,
    data.control_tokens) and the model's control tokens it must not write."""
    normalize: str = "NFC"
    whitespace: str = "strip"
    control_tokens: str = "escape"
    controls: tuple[str, ...] = ()


class Refused(Exception):
    """A control token in text whose policy is `refuse` (args[0]: the token)."""


def text_cleaner(policy: TextPolicy):
    """str → str as the data's text was cleaned (for a prompt typed at generation time: control
    tokens in it are escaped unless the policy keeps them)."""
    if policy.control_tokens == "refuse":
        policy = TextPolicy(policy.normalize, policy.whitespace, "escape", policy.controls)
    return cleaner(policy, dict.fromkeys(CLEANING, 0))


SHORT, REMEMBERED = 64, 100_000     # texts up to SHORT characters are cleaned once each


def cleaner(policy: TextPolicy, counts: dict):
    spaces, blank_lines = re.compile(r"[ \t\f\v]+"), re.compile(r"\n{3,}")
    controls = tuple(policy.controls)

    seen: dict[str, tuple] = {}     # short texts repeat (labels): text → (clean text, changes)

    def clean(text: str) -> str:
        hit = seen.get(text)
        if hit is not None:
            for k, n in hit[1]:
                counts[k] += n
            return hit[0]
        before = dict(counts) if len(text) <= SHORT else None
        out = _clean(text)
        if before is not None and len(seen) < REMEMBERED:
            seen[text] = (out, tuple((k, counts[k] - before[k]) for k in counts
                                     if counts[k] != before[k]))
        return out

    def _clean(text: str) -> str:
        if ESC_OPEN in text or ESC_CLOSE in text:
            text = text.replace(ESC_OPEN, "").replace(ESC_CLOSE, "")
        if policy.normalize != "none":
            normal = unicodedata.normalize(policy.normalize, text)
            counts["normalized"] += normal != text
            text = normal
        if policy.whitespace != "keep":
            new = text.replace("\r\n", "\n").strip()
            if policy.whitespace == "collapse":
                new = blank_lines.sub("\n\n", spaces.sub(" ", new))
            counts["whitespace"] += new != text
            text = new
        if controls and policy.control_tokens != "keep":
            escaped, n = escape_controls(text, controls)
            if n and policy.control_tokens == "refuse":
                raise Refused(min((text.index(c), c) for c in controls if c in text)[1])
            counts["control_tokens"] += bool(n)
            text = escaped
        return text

    return clean


class Prompter:
    """A plan's way from text to prompt ids at evaluation and generation time, as its training data
    was made: the user's text cleaned like the data, put through the recipe's template (one
    placeholder: the text fills it; several: a JSON object with those fields), retrieved passages
    for `{retrieved}` where the plan has retrieval, then the model's chat template (template.chat)
    or the tokenizer's usual prefix."""

    def __init__(self, plan, tokenizer):
        self.tokenizer, self.template, self.retrieval = tokenizer, plan.template, plan.retrieval
        self.chat = plan.template.chat and bool(plan.template.chat_template)
        self.bos_token, self.eos_token = plan.model.bos_token, plan.model.eos_token
        d = plan.data
        self.clean = text_cleaner(TextPolicy(d.normalize, d.whitespace, d.control_tokens,
                                             tok.control_tokens(tokenizer)))
        self._index = None
        self.retrieved: list[str] = []      # the ids of the passages the last prompt retrieved

    def fill(self, text: str, *, raw: bool = False) -> tuple[str, str | None]:
        """(user message, system message) for one input text, through the recipe's template."""
        prompt_fmt, system_fmt = self.template.prompt, self.template.system
        self.retrieved = []
        if raw or not prompt_fmt:
            return self.clean(text), self.system({}, system_fmt)
        fields = [f for f in placeholders(prompt_fmt, key="template.prompt") if f != PLACEHOLDER]
        values = None
        if len(fields) == 1:
            values = {fields[0]: self.clean(text)}
        elif fields:
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and all(f in obj for f in fields):
                values = {k: self.clean(v) if isinstance(v, str) else v for k, v in obj.items()}
        if values is None:
            return self.clean(text), self.system({}, system_fmt)
        if self.retrieval is not None:
            values[PLACEHOLDER] = self.retrieve(values)
        prompt, _, _ = render(values, {"prompt": prompt_fmt, "response": "", "system": None})
        return prompt, self.system(values, system_fmt)

    def retrieve(self, values: dict) -> str:
        """The {retrieved} text for a prompt's fields: the plan's query searched in its index."""
        from core.retrieval import Index, query_text

        r = self.retrieval
        if self._index is None:
            self._index = Index.load(r.index)
        hits = self._index.search([query_text(values, r.query)], r.k)[0][0]
        self.retrieved = [self._index.passages.ids[j] for j in hits]
        return self._index.text(hits)

    @staticmethod
    def system(values: dict, system_fmt):
        if not system_fmt:
            return None
        needed = placeholders(system_fmt, key="template.system")
        if any(f not in values for f in needed):
            return None if needed else system_fmt
        return render(values, {"prompt": "", "response": "", "system": system_fmt})[2]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation (system?, user, assistant, ..., user), ready for the answer."""
        if self.chat:
            text = render_chat(self.template.chat_template, messages, add_generation_prompt=True,
                               bos_token=self.bos_token, eos_token=self.eos_token)
            return encode_prompt(self.tokenizer, text, chat=True).tolist()
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        user = [m["content"] for m in messages if m["role"] == "user"][-1]
        text = f"{system}\n\n{user}" if system else user
        return encode_prompt(self.tokenizer, text, chat=False).tolist()


# ------------------------------------------------------------------------------ shared prompt start

SHARED_MIN = 8      # the classification head computes a start every prompt shares once, if this long
PACK_MAX = 256      # ... and packs the rest in rows at most this long (a length bucket): past it,
                    # attention over whole rows costs more than it saves (PubMedQA abstracts, ~400
                    # tokens, in rows of 768: 1.6 times a prompt a row's time)


def shared_prefix(prompts) -> int:
    """How many leading tokens every prompt shares (a recipe's system prompt and the template's
    opening), leaving each prompt at least one token of its own; 0 for fewer than two prompts.
    The classification head computes them once for all rows (runtime/head.predict)."""
    import numpy as np

    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts) - 1
    if n <= 0:
        return 0
    heads = np.asarray([list(p[:n]) for p in prompts])
    differs = np.any(heads != heads[0], axis=0)
    return int(np.argmax(differs)) if differs.any() else n


def packs_after(prompts, shared: int, bucket) -> bool:
    """Whether the classification head computes these prompts' `shared` first tokens once and
    packs the rest (runtime/head.predict): a start of at least SHARED_MIN tokens, and the longest
    rest's length bucket (`bucket`: runtime/decode.bucket, or the compiler's copy) within
    PACK_MAX."""
    if shared < SHARED_MIN or not len(prompts):
        return False
    return bucket(max(len(p) for p in prompts) - shared) <= PACK_MAX
