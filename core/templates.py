"""Turn a data row into the text the model reads (the prompt) and the text it learns to write.

`template.prompt`, `template.response` and `template.system` are Python format strings over the row's
fields — data, never code: a placeholder is a bare field name, with no attribute or index access, no
conversion and no format spec, so `{x.__class__}` or `{x[0]}` cannot reach anything but the value.
With `template.chat` the pair is wrapped in the model's own chat template, rendered by Jinja in an
immutable sandbox, as transformers does.
"""
from __future__ import annotations

import string
from collections.abc import Iterable
from functools import lru_cache

from core.errors import PlanError, did_you_mean

PARTS = ("prompt", "response", "system")
OPEN, CLOSE = "⟦", "⟧"   # marks the supervised span in the plan's rendered examples


# ------------------------------------------------------------------------------ format strings

def placeholders(fmt: str, *, key: str) -> list[str]:
    """The field names a format string uses, in order of first use. Refuses anything but `{name}`."""
    return list(_placeholders(fmt, key))


@lru_cache(maxsize=256)
def _placeholders(fmt: str, key: str) -> tuple[str, ...]:
    if not isinstance(fmt, str):
        raise PlanError(key, f"must be a string, got {type(fmt).__name__}.")
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as e:
        raise PlanError(key, f"is not a valid format string: {e}.",
                        hint="placeholders are {field}; write {{ and }} for literal braces.") from None
    names: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if name == "" or name.isdigit():
            raise PlanError(key, f"positional placeholder `{shown}`: placeholders must name a field.",
                            hint="write {text} rather than {} or {0}.")
        if "." in name or "[" in name:
            raise PlanError(key, f"placeholder `{shown}` uses attribute or index access, which "
                            "templates do not allow (a recipe is data, not code).",
                            hint="name a field of the data as it is, e.g. {text}; for a nested value, "
                                 "flatten the data first.")
        if conversion or spec:
            raise PlanError(key, f"placeholder `{shown}` has a conversion or format spec, which templates "
                            "do not allow.", hint="write the bare field, e.g. {" + name + "}.")
        if name not in names:
            names.append(name)
    return tuple(names)


def prompt_fields(template: dict) -> list[str]:
    """The fields template.prompt and template.system read, in order of first use."""
    out: list[str] = []
    for part in ("prompt", "system"):
        if template.get(part) is not None:
            out += [f for f in placeholders(template[part], key=f"template.{part}") if f not in out]
    return out


def check_fields(template: dict, fields: Iterable[str], *, file: str) -> list[str]:
    """Every placeholder of template.prompt/response/system must be a field of the data in `file`.
    Returns the fields the template uses, in order of first use."""
    fields = list(fields)
    used: list[str] = []
    messages = template.get("messages")
    if messages is not None:
        return _check_conversation(template, messages, fields, file)
    for part in PARTS:
        fmt = template.get(part)
        if fmt is None:
            if part != "system":
                raise PlanError(f"template.{part}", "is not set.",
                                hint=f"a format string over the data's fields: {_field_list(fields)}.")
            continue
        for name in placeholders(fmt, key=f"template.{part}"):
            if name not in fields:
                talk = next((f for f in ("messages", "conversations") if f in fields), None)
                raise PlanError(f"template.{part}", f"placeholder {{{name}}} is not a field of {file}.",
                                hint=f"its fields are {_field_list(fields)}.{did_you_mean(name, fields)}"
                                + (f" It holds conversations in `{talk}`: use template=conversation"
                                   + (f" template.messages={talk}" if talk != "messages" else "")
                                   + "." if talk else ""))
            if name not in used:
                used.append(name)
    if not template["response"].strip():
        raise PlanError("template.response", "is empty: there would be nothing to learn.",
                        hint=f"a format string over the data's fields, e.g. {{{fields[-1]}}}."
                        if fields else None)
    return used


def _check_conversation(template: dict, messages: str, fields: list[str], file: str) -> list[str]:
    """template.messages: the field must exist, the chat template is on, and prompt/response are
    unset (the conversation holds both)."""
    if not isinstance(messages, str) or messages not in fields:
        raise PlanError("template.messages", f"`{messages}` is not a field of {file}.",
                        hint=f"its fields are {_field_list(fields)}.{did_you_mean(str(messages), fields)}")
    for part in ("prompt", "response"):
        if template.get(part) is not None:
            raise PlanError(f"template.{part}", "is not used with template.messages (the "
                            "conversation holds the prompts and the answers).",
                            hint="use template=conversation, or set "
                                 f"template.{part}=null.")
    if not template.get("chat"):
        raise PlanError("template.chat", "must be true with template.messages: conversations are "
                        "rendered turn by turn by the model's chat template.")
    used = [messages]
    if template.get("system") is not None:
        for name in placeholders(template["system"], key="template.system"):
            if name not in fields:
                raise PlanError("template.system", f"placeholder {{{name}}} is not a field of "
                                f"{file}.", hint=f"its fields are {_field_list(fields)}.")
            used.append(name)
    return used


def _field_list(fields: list[str]) -> str:
    return ", ".join(f"`{f}`" for f in fields) or "(none)"


class _Row(dict):
    """A row whose values format as str(value)."""
    def __getitem__(self, name):
        v = dict.__getitem__(self, name)
        return v if isinstance(v, str) else str(v)


def render(row: dict, template: dict) -> tuple[str, str, str | None]:
    """(prompt, response, system) texts of one row; system is None when the template has none."""
    values = _Row(row)
    out = []
    for part in PARTS:
        fmt = template.get(part)
        if fmt is None:
            out.append(None)
            continue
        placeholders(fmt, key=f"template.{part}")       # cached: refuses what check_fields refuses
        try:
            out.append(fmt.format_map(values))
        except KeyError as e:
            raise PlanError(f"template.{part}", f"the row has no field {{{e.args[0]}}}.",
                            hint=f"its fields are {_field_list(list(row))}.") from None
    return out[0], out[1], out[2]


# ------------------------------------------------------------------------------ chat templates

@lru_cache(maxsize=16)
def _compile_chat(template_src: str):
    import jinja2

    from core import chat_sandbox

    version = tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit())
    if version < (3, 1, 6):   # older sandboxes have known escapes; a chat template is untrusted input
        raise PlanError("template.chat", f"jinja2 {jinja2.__version__} is too old to render a chat "
                        "template safely.", hint="pip install 'jinja2>=3.1.6'.")
    if len(template_src) > chat_sandbox.MAX_SOURCE:
        raise PlanError("template.chat", f"the model's chat template is {len(template_src):,} "
                        f"characters long; tune renders templates of at most "
                        f"{chat_sandbox.MAX_SOURCE:,}.", hint=_CHAT_HINT)
    try:
        return chat_sandbox.environment().from_string(template_src)
    except jinja2.TemplateSyntaxError as e:
        raise PlanError("template.chat", f"the model's chat template does not parse: {e.message} "
                        f"(template line {e.lineno}).") from None
    except (jinja2.TemplateError, SyntaxError, RecursionError, MemoryError, ArithmeticError,
            LookupError, ValueError, TypeError) as e:   # e.g. nesting too deep for a compiler
        raise PlanError("template.chat", f"the model's chat template cannot be compiled: "
                        f"{type(e).__name__}: {e}.", hint=_CHAT_HINT) from None


_CHAT_HINT = "set template.chat=false to use the plain prompt and response."


def render_chat(template_src: str, messages: list[dict], *, add_generation_prompt: bool,
                bos_token: str = "", eos_token: str = "") -> str:
    """The chat template rendered over `messages`, in a sandbox, as transformers renders it; its
    work, the values it builds and its output are bounded (core/chat_sandbox.py)."""
    from core import chat_sandbox

    compiled = _compile_chat(template_src)
    try:
        return chat_sandbox.render(compiled, messages=messages,
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=bos_token, eos_token=eos_token)
    except chat_sandbox.Exceeded as e:
        raise PlanError("template.chat", f"the model's chat template {e} for one example; tune "
                        "stopped it there.",
                        hint="a chat template renders a conversation with a little work; "
                             + _CHAT_HINT) from None
    except Exception as e:  # noqa: BLE001 - whatever the template's code raises (1/0, a bad
        # argument, a missing key) is the template's failure, not tune's
        text = " ".join(str(e).split())
        raise PlanError("template.chat", f"the model's chat template failed: {type(e).__name__}: "
                        f"{text[:300] + '…' if len(text) > 300 else text}.",
                        hint=_CHAT_HINT) from None


def chat_messages(prompt: str, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": prompt}]


def to_prompt_completion(prompt: str, response: str, system: str | None, *, chat: bool,
                         chat_template: str | None, eos_token: str, bos_token: str = ""
                         ) -> tuple[str, str]:
    """(unsupervised text, supervised text) of one example; the model reads the first and learns the
    second, which ends with the model's end token.

    chat: the template over [system, user] with the generation prompt, and the rest of the template
    over [system, user, assistant] — the assistant turn and its end token, trailing whitespace after
    it dropped (SmolLM2's "<|im_end|>\\n" → "<|im_end|>": generation stops at the end token).
    plain: (system + "\\n\\n" +) prompt, then response + eos_token.
    """
    if not chat:
        head = f"{system}\n\n{prompt}" if system else prompt
        return head, response + eos_token
    if not chat_template:
        raise PlanError("template.chat", "this model has no chat template.",
                        hint="set template.chat=false to train on the plain prompt and response.")
    frame = _chat_frame(chat_template, bos_token, eos_token, system is not None)
    if frame is not None:
        fast = frame.split(prompt, response, system)
        if fast is not None:
            return fast
    return _rendered_pair(prompt, response, system, chat_template=chat_template,
                          eos_token=eos_token, bos_token=bos_token)


def _rendered_pair(prompt: str, response: str, system: str | None, *, chat_template: str,
                   eos_token: str, bos_token: str) -> tuple[str, str]:
    """to_prompt_completion's chat case, the template rendered twice (see ChatFrame)."""
    msgs = chat_messages(prompt, system)
    head = render_chat(chat_template, msgs, add_generation_prompt=True, bos_token=bos_token,
                       eos_token=eos_token)
    full = render_chat(chat_template, msgs + [{"role": "assistant", "content": response}],
                       add_generation_prompt=False, bos_token=bos_token, eos_token=eos_token)
    if not full.startswith(head):
        at = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        raise PlanError("template.chat", "the model's chat template is not prefix-stable: the "
                        "conversation with the answer does not start with the prompt rendered for "
                        f"generation (they differ at character {at}: {head[at:at + 30]!r} vs "
                        f"{full[at:at + 30]!r}), so the answer cannot be separated from the prompt.",
                        hint="set template.chat=false, or use a model whose template renders the "
                             "generation prompt as the start of the assistant turn.")
    tail = full[len(head):].rstrip()
    if not tail:
        raise PlanError("template.chat", "the chat template renders nothing for the assistant turn.",
                        hint="set template.chat=false.")
    return head, tail


# Distinct texts that no data holds (private-use characters around a tag): a frame is the chat
# template rendered once over them.
_SENTINELS = {"system": "\ue002tune-system\ue003", "prompt": "\ue002tune-prompt\ue003",
              "response": "\ue002tune-response\ue003"}
# string methods through which a template can look inside a message's text
_INSPECTING = {"startswith", "endswith", "split", "rsplit", "replace", "find", "rfind", "index",
               "count", "partition", "rpartition", "strip", "lstrip", "rstrip", "splitlines"}


class ChatFrame:
    """A chat template rendered once over placeholder texts, so that an example's prompt and
    completion are the frame's literal pieces with the example's texts put in — the same strings
    the template renders, at a small fraction of the cost (rendering dominated compiling 10⁵ rows).

    Exact where the template treats a message's text as opaque. That is checked three ways: the
    frame is built only when every placeholder appears once, unchanged, in prompt and full
    rendering (a template that trims, escapes or repeats a message's text has no frame); a text
    with whitespace at either end, or holding a literal the template tests messages against
    (`'</think>' in content`, `.split('...')`), is rendered in full; and the first VERIFY uses and
    every VERIFY_EVERY-th after are rendered in full too and compared — any difference retires the
    frame for good and the full rendering is returned."""

    VERIFY, VERIFY_EVERY = 32, 997

    def __init__(self, template: str, bos_token: str, eos_token: str, has_system: bool,
                 head: list, full: list, literals: tuple[str, ...]):
        self.template, self.bos, self.eos, self.has_system = template, bos_token, eos_token, \
            has_system
        self.head, self.full, self.literals = head, full, literals
        self.uses, self.retired = 0, False

    def split(self, prompt: str, response: str, system: str | None) -> tuple[str, str] | None:
        """(prompt part, supervised part) as to_prompt_completion returns them, or None when this
        example must be rendered in full."""
        if self.retired:
            return None
        texts = {"prompt": prompt, "response": response, "system": system}
        for name, text in texts.items():
            if text is None:
                continue
            if not text or text[0].isspace() or text[-1].isspace() or "\ue002" in text \
                    or any(lit in text for lit in self.literals):
                return None
        head = "".join(texts[p] if slot else p for slot, p in self.head)
        full = "".join(texts[p] if slot else p for slot, p in self.full)
        pair = (head, full[len(head):].rstrip())
        self.uses += 1
        if self.uses <= self.VERIFY or self.uses % self.VERIFY_EVERY == 0:
            slow = _rendered_pair(prompt, response, system, chat_template=self.template,
                                  eos_token=self.eos, bos_token=self.bos)
            if slow != pair:
                self.retired = True
                return slow
        return pair


def _frame_pieces(text: str, names: list[str]) -> list | None:
    """`text` cut at each placeholder: (False, literal text) and (True, placeholder name) pieces,
    or None unless each of `names` occurs exactly once."""
    found = []
    for name in names:
        if text.count(_SENTINELS[name]) != 1:
            return None
        found.append((text.index(_SENTINELS[name]), name))
    pieces, at = [], 0
    for start, name in sorted(found):
        pieces += [(False, text[at:start]), (True, name)]
        at = start + len(_SENTINELS[name])
    return pieces + [(False, text[at:])]


@lru_cache(maxsize=16)
def _chat_frame(template: str, bos_token: str, eos_token: str, has_system: bool
                ) -> ChatFrame | None:
    s = _SENTINELS
    try:
        head, tail = _rendered_pair(s["prompt"], s["response"], s["system"] if has_system else None,
                                    chat_template=template, eos_token=eos_token,
                                    bos_token=bos_token)
    except PlanError:
        return None               # rendered in full, the real example gives the error
    names = ["system", "prompt"] if has_system else ["prompt"]
    head_pieces = _frame_pieces(head, names)
    full_pieces = _frame_pieces(head + tail, names + ["response"])
    if head_pieces is None or full_pieces is None or s["response"] in head:
        return None
    return ChatFrame(template, bos_token, eos_token, has_system, head_pieces, full_pieces,
                     _inspected_literals(template))


def _inspected_literals(template: str) -> tuple[str, ...]:
    """String constants the template compares a value against (`x in y`, `x == y`) or passes to a
    string method that looks inside text (`.split(x)`, `.startswith(x)`): a message's text holding
    one may render differently from the frame."""
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateError:
        return ()
    def strings(part) -> set[str]:           # the string constants in `part`, itself included
        consts = [part, *part.find_all(nodes.Const)]
        return {c.value for c in consts if isinstance(c, nodes.Const) and isinstance(c.value, str)}

    found: set[str] = set()
    for node in ast.find_all(nodes.Compare):
        if not _mentions_role(node):         # message['role'] == 'user': roles, not texts
            for part in [node.expr] + [op.expr for op in node.ops]:
                found |= strings(part)
    for node in ast.find_all(nodes.Call):
        if isinstance(node.node, nodes.Getattr) and node.node.attr in _INSPECTING:
            for arg in node.args:
                found |= strings(arg)
    return tuple(sorted(v for v in found if v))


def _mentions_role(node) -> bool:
    from jinja2 import nodes

    return any(isinstance(n, nodes.Getattr) and n.attr == "role"
               or isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const)
               and n.arg.value == "role" or isinstance(n, nodes.Name) and n.name == "role"
               for n in node.find_all((nodes.Getattr, nodes.Getitem, nodes.Name)))


def mark_example(prompt_part: str, supervised_part: str) -> str:
    """The example as the model sees it, its supervised span between ⟦ and ⟧."""
    return f"{prompt_part}{OPEN}{supervised_part}{CLOSE}"
