"""Multi-turn conversations: a data field holding the turns, trained through the model's chat template
with the loss on every assistant turn and on nothing else.

Two forms are read (and may be mixed): OpenAI's `[{"role": "system"|"user"|"assistant", "content":
...}]` and ShareGPT's `[{"from": "system"|"human"|"gpt", "value": ...}]`. A cell that holds the list as
JSON text (CSV, Parquet) is read too. Content is a string, or OpenAI's list of text parts.

Rendering is turn by turn, not by markers in the template: for the i-th assistant turn the template
is rendered over the turns before it with the generation prompt (everything up to where the model
starts writing) and over the turns up to it without (the same text plus the answer and its end
token). The difference is the supervised span. Both renders must extend what came before (a
template that rewrites earlier turns, such as one that drops past reasoning, cannot be split and is
refused), so the spans are exact by construction; compiler/examples.py then checks that each span's
tokens decode to its text and hold the assistant's words.
"""
from __future__ import annotations

import json

from core.errors import PlanError
from core.templates import render_chat

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "model": "assistant"}


def normalise(value) -> list[dict]:
    """The conversation in `value` as [{"role", "content"}] with roles system/user/assistant; a
    ValueError saying what is wrong (the caller names the file and line)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("is text, not a list of turns (nor JSON of one)") from None
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of turns, got " +
                         ("an empty list" if isinstance(value, list) else type(value).__name__))
    turns = []
    for k, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {k} is {type(turn).__name__}, not an object")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        elif "from" in turn:
            role, content = turn.get("from"), turn.get("value")
        else:
            raise ValueError(f"turn {k} has neither role/content (OpenAI) nor from/value (ShareGPT)")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise ValueError(f"turn {k} has role {role!r}; known roles: "
                             f"{', '.join(sorted(ROLES))}")
        role = ROLES[role.lower()]
        if isinstance(content, list):      # OpenAI content parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and
                       isinstance(p.get("text"), str) for p in content):
                raise ValueError(f"turn {k}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"turn {k} ({role}) has content of type {type(content).__name__}, "
                             "not text")
        if role == "system" and k:
            raise ValueError(f"turn {k} is a system turn; only the first turn may be")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError("has no assistant turn: there would be nothing to learn")
    return turns


def with_system(turns: list[dict], system: str | None) -> list[dict]:
    """The turns with template.system as their system turn when they have none."""
    if system is None or (turns and turns[0]["role"] == "system"):
        return turns
    return [{"role": "system", "content": system}] + turns


def segments(turns: list[dict], *, chat_template: str, bos_token: str = "",
             eos_token: str = "") -> list[tuple[str, bool]]:
    """The conversation as consecutive (text, supervised) pieces: the supervised ones are the
    assistant turns as the template writes them (text and end token), the rest everything else."""
    out: list[tuple[str, bool]] = []
    done = ""

    def render(msgs, gen):
        return render_chat(chat_template, msgs, add_generation_prompt=gen, bos_token=bos_token,
                           eos_token=eos_token)

    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        head = render(turns[:i], True)
        if not head.startswith(done):
            raise _unstable(i, "the turns before it render differently once it follows them")
        full = render(turns[:i + 1], False)
        if not full.startswith(head):
            raise _unstable(i, "the conversation with this answer does not start with the prompt "
                               "rendered for it")
        span = full[len(head):].rstrip()
        if not span:
            raise PlanError("template.messages", f"the chat template renders nothing for "
                            f"assistant turn {i}.", hint="check the model's chat template.")
        if head[len(done):]:
            out.append((head[len(done):], False))
        out.append((span, True))
        done = head + span
    return out


def _unstable(i: int, what: str) -> PlanError:
    return PlanError("template.messages", f"the model's chat template cannot be split into turns at "
                     f"assistant turn {i}: {what}, so the assistant's text cannot be told from the "
                     "rest.", hint="use a model whose template renders each turn the same way "
                                   "whatever follows, or train single turns (template.prompt / "
                                   "template.response).")


def last_exchange(turns: list[dict]) -> tuple[list[dict], str]:
    """(the turns before the last assistant turn, that turn's text): a test row's prompt and
    reference."""
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return turns[:last], turns[last]["content"]
