"""Preference data: (prompt, chosen, rejected) pairs — or KTO's unpaired (prompt, completion, label)
rows — read, checked and tokenised into the token cache's *units* (runtime/preference.py).

Formats (TRL's, so a dataset prepared for TRL reads as it is; field names mappable with data.fields.*):
- paired: `prompt` (text, or OpenAI/ShareGPT turns ending with the user's), `chosen` and `rejected`
  (text, or a list whose last turn is the assistant's reply). Without a prompt field, chosen and
  rejected may be whole conversations: the prompt is the turns they share (TRL's implicit prompt).
- unpaired (objective=kto): `prompt`, `completion` and a boolean `label` (true: desirable). Paired
  data trains KTO too: each pair gives a desirable and an undesirable row, as TRL unpairs it.

The prompt is rendered exactly as in supervised training: a text prompt through template.prompt
(by default the prompt field itself) and template.system, then the model's chat template
(template.chat); a conversation through the chat template, template.system its system turn unless
it has one. The replies are the response, each ending with the model's end token.

Checked, with file and line: a prompt that is text in one row and turns in another (or a paired
row in unpaired data), a KTO label that is not a boolean, a turn list that does not end where it
must. Counted and dropped: rows missing a side, with an empty side, with identical chosen and
rejected, duplicates. A pair longer than data.max_length (prompt + the longer reply) keeps both
replies whole: the prompt is cut from its start (counted), or the pair dropped
(data.overlength=drop). A reply that does not fit behind one prompt token (compiler/examples.py's
rule) is refused with its file and line, or with data.overlength=truncate_answer cut at its end
(counted as answers_cut).

Token cache layout: every split holds units of two examples side by side — (chosen, rejected) for
pairs; for KTO's training and validation rows (completion, KL completion): the same prompt with
another row's completion, whose log-probabilities estimate KTO's KL term, drawn once with the seed
(TRL cycles completions within each batch; a fixed draw keeps steps and resumes exact). The test
split always holds pairs (preference accuracy ranks chosen against rejected).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from core.errors import PlanError, did_you_mean
from core.files import sha256_file
from core.plan import TableStats
from core.prompting import CLEANING, Refused, cleaner
from core.templates import (mark_example, placeholders, prompt_fields, render,
                            to_prompt_completion)
from core.tokenizer import encode_unique, special_prefix_ids, unescape

PAIRED = ("chosen", "rejected")
UNPAIRED = ("completion", "label")
REASONS = ("missing_field", "empty_field", "identical", "duplicate")
REASON_TEXT = {"identical": "chosen identical to rejected"}
COUNTS = ("truncated", "dropped_too_long", "no_supervised", "answers_cut")


def names(config: dict) -> dict:
    """data.fields.* : role (prompt, chosen, rejected, completion, label) → the data's field."""
    return dict(config["data"]["fields"])


def resolve_template(config: dict) -> dict:
    """The config with the template a preference objective reads: the prompt field itself unless
    template.prompt names others (its default `{text}` becomes `{<data.fields.prompt>}`), no
    template.response (the replies are the responses)."""
    t, f = dict(config["template"]), names(config)
    if t["messages"] is not None:
        raise PlanError("template.messages", "does not apply to preference data: a conversation "
                        f"goes in the prompt field (data.fields.prompt={f['prompt']}) as a list of "
                        "turns.", hint="leave template.messages null.")
    if t["prompt"] in (None, "{text}"):
        t["prompt"] = "{" + f["prompt"] + "}"
    t["response"] = None
    return {**config, "template": t}


# ------------------------------------------------------------------------------ reading

def read_file(key: str, path: Path, d: dict, t: dict, objective: str, policy, *, dedupe: bool,
              extra: list[str], test: bool) -> tuple[list[dict], TableStats]:
    """The usable rows of one preference file, as canonical dicts: the file's fields (cleaned) with
    `prompt` a string or a list of turns, and `chosen`/`rejected` (pairs) or `completion`/`label`
    (KTO) under the roles' names (data.fields maps them from the file's). `test`: the file scored
    by preference accuracy, which must hold pairs."""
    from compiler import data as data_mod
    from compiler.conversations import normalise

    f = dict(d["fields"])
    rows = data_mod.read_table(path, key=key, fmt=d["format"], max_mb=d["max_file_mb"])
    fields = data_mod.table_fields(rows)
    locate = data_mod.row_locator(path, fmt=d["format"])
    rows = data_mod.with_origins(rows, str(path), locate)     # the token checks name lines
    paired = _layout(key, path, fields, f, objective, test)
    counts = dict.fromkeys(CLEANING, 0)
    clean = cleaner(policy, counts)
    extra_fields = [x for x in prompt_fields(t) if x != f["prompt"] and x not in extra]
    for name in extra_fields:
        if name not in fields:
            raise PlanError("template.prompt" if name in placeholders(t["prompt"] or "",
                                                                     key="template.prompt")
                            else "template.system", f"placeholder {{{name}}} is not a field of "
                            f"{path}.", hint=f"its fields are {', '.join(fields)}."
                            f"{did_you_mean(name, fields)}")
    sides = PAIRED if paired else UNPAIRED
    kinds: dict[str, tuple[str, int]] = {}          # what a field holds, first seen where
    dropped = dict.fromkeys(REASONS, 0)
    kept, seen = [], set()
    for i, row in enumerate(rows):
        where = lambda: locate(i)                                           # noqa: E731
        if not paired and any(row.get(f[s]) is not None for s in PAIRED) and \
                all(row.get(f[s]) is None for s in UNPAIRED):
            line, at = where()
            raise PlanError(key, f"{at} is a (chosen, rejected) pair, but the file's rows are "
                            "unpaired (completion, label): mixed formats.", file=str(path),
                            line=line, hint="keep one format per file.")
        values = {s: row.get(f[s]) for s in sides}
        prompt = row.get(f["prompt"]) if f["prompt"] in fields else None
        if any(v is None for v in values.values()) or (f["prompt"] in fields and prompt is None):
            dropped["missing_field"] += 1
            continue
        out = {k: v for k, v in row.items() if k in extra_fields}
        try:
            for name in extra_fields:
                v = out.get(name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int, float))):
                    raise _Bad(f"field `{name}` is a JSON {type(v).__name__}, not text or a number")
                _finite(v, name)
                if v is not None:
                    out[name] = clean(str(v))
            if paired:
                c, r = values["chosen"], values["rejected"]
                _same_kind(kinds, "chosen", c, i, where, key, path)
                _same_kind(kinds, "rejected", r, i, where, key, path)
                if prompt is None:                                # TRL's implicit prompt
                    prompt, c, r = _implicit_prompt(c, r, f)
                out["chosen"], out["rejected"] = _reply(c, f["chosen"], clean), \
                    _reply(r, f["rejected"], clean)
            else:
                out["completion"] = _reply(values["completion"], f["completion"], clean)
                out["label"] = _label(values["label"], f["label"], path)
            _same_kind(kinds, "prompt", prompt, i, where, key, path)
            if isinstance(prompt, list):
                turns = normalise_prompt(prompt, normalise)
                out["prompt"] = [{"role": u["role"], "content": clean(u["content"])} for u in turns]
            elif isinstance(prompt, bool) or not isinstance(prompt, (str, int, float)):
                raise _Bad(f"field `{f['prompt']}` is a JSON {type(prompt).__name__}, not text or "
                           "a list of turns")
            else:
                _finite(prompt, f["prompt"])
                out["prompt"] = out[f["prompt"]] = clean(str(prompt))   # the template reads it
        except (_Bad, ValueError, Refused) as e:
            line, at = where()
            what = (f"contains the model's control token {e.args[0]!r} (data.control_tokens="
                    "refuse)" if isinstance(e, Refused) else str(e))
            raise PlanError(key, f"{at}: {what}.", file=str(path), line=line,
                            hint=_FORMAT_HINT) from None
        texts = [out["prompt"]] if isinstance(out["prompt"], str) else \
            [u["content"] for u in out["prompt"] if u["role"] == "user"][-1:]
        texts += [out[s] for s in sides if s != "label"]
        if any(not x.strip() for x in texts):
            dropped["empty_field"] += 1
            continue
        if paired and out["chosen"] == out["rejected"]:
            dropped["identical"] += 1
            continue
        sig = json.dumps([out.get(s) for s in ("prompt",) + sides] +
                         [out.get(x) for x in extra_fields], sort_keys=True, ensure_ascii=False)
        if dedupe and sig in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(sig)
        out[data_mod.ORIGIN] = row[data_mod.ORIGIN]
        kept.append(out)
    if not kept:
        raise PlanError(key, f"no usable rows: all {len(rows)} rows were dropped "
                        f"({', '.join(f'{n} {REASON_TEXT.get(k, k)}' for k, n in dropped.items() if n)}).",
                        file=str(path), hint=f"each row needs a prompt and non-empty "
                                             f"{' and '.join(f[s] for s in sides)}.")
    if paired and objective == "kto" and not test:
        kept = unpair(kept)
    return kept, TableStats(file=str(path), sha256=sha256_file(path), fields=tuple(fields),
                            read=len(rows), kept=len(kept), dropped=dropped, cleaning=counts)


_FORMAT_HINT = ('preference rows are {"prompt": ..., "chosen": ..., "rejected": ...} (KTO: '
                '{"prompt": ..., "completion": ..., "label": true|false}); a prompt is text or '
                '[{"role": "user", "content": ...}], a reply text or [{"role": "assistant", '
                '"content": ...}]; data.fields.* maps other field names.')


class _Bad(ValueError):
    pass


def _layout(key: str, path: Path, fields: list[str], f: dict, objective: str, test: bool) -> bool:
    """Whether the file holds pairs (True) or KTO's unpaired rows (False); a PlanError when it holds
    neither, or a layout the objective cannot train on."""
    has = lambda roles: all(f[r] in fields for r in roles)                  # noqa: E731
    if has(PAIRED):
        return True
    if has(UNPAIRED):
        if test:
            raise PlanError("data.test_path", "holds unpaired rows (completion, label); the "
                            "held-out score ranks a chosen reply against a rejected one.",
                            file=str(path), hint="give a test file of (prompt, chosen, rejected) "
                                                 "pairs, or leave data.test_path unset.")
        if objective != "kto":
            raise PlanError("objective", f"{objective} trains on (chosen, rejected) pairs, but "
                            f"{path} holds unpaired rows (completion, label).",
                            hint="use objective=kto for thumbs-up/down data.")
        if f["prompt"] not in fields:
            raise _missing(key, path, fields, f, ("prompt",))
        return False
    raise _missing(key, path, fields, f, PAIRED, kto=objective == "kto")


def _missing(key, path, fields, f, roles, kto=False) -> PlanError:
    absent = [f[r] for r in roles if f[r] not in fields]
    name = absent[0]
    return PlanError(key, f"has no field `{name}` ({', '.join(r for r in roles if f[r] == name)}"
                     f"); its fields are {', '.join(fields)}.{did_you_mean(name, fields)}",
                     file=str(path), hint="map the data's own names with data.fields.prompt=..., "
                     "data.fields.chosen=..., data.fields.rejected=..."
                     + (" (KTO's unpaired rows: data.fields.completion=..., "
                        "data.fields.label=...)" if kto else ""))


def _same_kind(kinds: dict, role: str, value, i: int, where, key: str, path: Path) -> None:
    """A field holds text in every row or turns in every row: mixed formats are an error."""
    kind = "turns" if isinstance(value, list) else "text"
    if value is None:
        return
    first = kinds.setdefault(role, (kind, i))
    if first[0] != kind:
        line, at = where()
        raise PlanError(key, f"{at}: the {role} is {kind}, but the first row's is {first[0]}: "
                        "mixed formats.", file=str(path), line=line,
                        hint="write every row's " + role + " the same way (text, or a list of turns).")


def normalise_prompt(value, normalise) -> list[dict]:
    """A prompt's turns (conversations.normalise's forms) ending with the user's."""
    turns = normalise(list(value) + [{"role": "assistant", "content": "x"}])[:-1]
    if not turns or turns[-1]["role"] != "user":
        raise _Bad("the prompt's turns must end with the user's")
    return turns


def _reply(value, name: str, clean) -> str:
    """A reply's text: text as it is, or the content of a turn list's last (assistant) turn."""
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict):
            raise _Bad(f"field `{name}` must be text or a list of turns ending with the "
                       "assistant's")
        last = value[-1]
        role = last.get("role", last.get("from"))
        content = last.get("content", last.get("value"))
        if str(role).lower() not in ("assistant", "gpt", "model") or not isinstance(content, str):
            raise _Bad(f"field `{name}`'s last turn must be the assistant's, with text content")
        return clean(content)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Bad(f"field `{name}` is a JSON {type(value).__name__}, not text or a list of turns")
    _finite(value, name)
    return clean(str(value))


def _finite(value, name: str) -> None:
    """A number is finite: NaN or Infinity would be trained as the text `nan` / `inf`."""
    from compiler.data import json_number

    if isinstance(value, float) and not math.isfinite(value):
        raise _Bad(f"field `{name}` is {json_number(value)}, not text or a finite number (it would "
                   f"be trained as the text {str(value)!r})")


def _implicit_prompt(chosen, rejected, f: dict):
    """(prompt turns, chosen reply, rejected reply) of two whole conversations: the prompt is the
    turns both share up to the last user turn before the replies (TRL's extract_prompt)."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise _Bad(f"there is no prompt field (`{f['prompt']}`), and the replies are text, not "
                   "conversations that hold it")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and str(chosen[n - 1].get("role", chosen[n - 1].get("from"))).lower() not in \
            ("user", "human"):
        n -= 1
    if not n:
        raise _Bad("chosen and rejected share no prompt turns")
    if len(chosen) != n + 1 or len(rejected) != n + 1:
        raise _Bad("after the shared prompt, chosen and rejected must each be one assistant turn")
    return chosen[:n], chosen[n:], rejected[n:]


def _label(value, name: str, path: Path) -> bool:
    """KTO's label: a boolean (a CSV cell: true / false)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and Path(path).suffix.lower() == ".csv" and \
            value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Bad(f"field `{name}` is {value!r}, not a boolean (true: a desirable completion, false: "
               "an undesirable one)")


def unpair(rows: list[dict]) -> list[dict]:
    """Pairs as KTO's unpaired rows: chosen desirable, rejected undesirable (TRL's
    unpair_preference_dataset)."""
    out = []
    for r in rows:
        base = {k: v for k, v in r.items() if k not in PAIRED}
        out.append({**base, "completion": r["chosen"], "label": True})
        out.append({**base, "completion": r["rejected"], "label": False})
    return out


def signature(row: dict) -> str:
    """What makes two rows the same prompt (the test/train leak check)."""
    return json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False)


def mismatched(n: int, prompts: list[str], seed: int) -> np.ndarray:
    """For KTO's KL term: row i's completion comes from row perm[i], never itself and where it can
    be avoided never a row of the same prompt (a fixed draw with the seed)."""
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0x4B54])
    out = np.empty(n, dtype=np.int64)
    src = rng.permutation(n)
    out[src] = np.roll(src, 1)                                  # a derangement (one cycle)
    for i in range(n):                                          # same prompt: swap with a neighbour
        j = out[i]
        if prompts[j] == prompts[i]:
            for k in range(1, min(n, 8)):
                m = (i + k) % n
                if prompts[out[m]] != prompts[i] and prompts[j] != prompts[m] and out[m] != m \
                        and j != m:
                    out[i], out[m] = out[m], j
                    break
    return out


# ------------------------------------------------------------------------------ tokenising

def tokenise_splits(splits: dict, tmpl: dict, tokenizer, *, prompt_field: str, seed: int,
                    max_length: int, overlength: str, chat: bool, chat_template, eos_token: str,
                    bos_token: str) -> dict:
    """Each split's units as token sequences (examples.py's per-split dict, plus `unit_labels` for
    KTO's training and validation splits). See the module doc for the layout and the rules."""
    chat_args = dict(chat_template=chat_template, eos_token=eos_token, bos_token=bos_token)
    prefix = [] if chat else special_prefix_ids(tokenizer)
    out = {}
    for name, rows in splits.items():
        rendered = [_render(row, tmpl, prompt_field, chat=chat, **chat_args) for row in rows]
        heads = encode_unique(tokenizer, [h for h, _ in rendered])
        tails = encode_unique(tokenizer, [x for _, ts in rendered for x in ts])
        it = iter(tails)
        tail_ids = [[next(it) for _ in ts] for _, ts in rendered]
        kto = bool(rows) and "completion" in rows[0]
        out[name] = _units(rows, rendered, [prefix + h for h in heads], tail_ids, tokenizer,
                           kto=kto, seed=seed, max_length=max_length, overlength=overlength)
    return out


def _render(row: dict, tmpl: dict, prompt_field: str, *, chat: bool, chat_template, eos_token,
            bos_token) -> tuple[str, list[str]]:
    """(prompt text, [reply texts with their end token]) of one row."""
    replies = [row["chosen"], row["rejected"]] if "chosen" in row else [row["completion"]]
    system = None
    if tmpl.get("system") is not None:
        system = render(row, {"prompt": "", "response": "", "system": tmpl["system"]})[2]
    if isinstance(row["prompt"], list):
        from compiler.conversations import segments, with_system

        if not chat or not chat_template:
            raise PlanError("template.chat", "the preference data's prompts are conversations, "
                            "which need the model's chat template.",
                            hint="set template.chat=true with a model that has a chat template.")
        turns = with_system(row["prompt"], system)
        head, tails = None, []
        for reply in replies:
            segs = segments(turns + [{"role": "assistant", "content": reply}],
                            chat_template=chat_template, bos_token=bos_token, eos_token=eos_token)
            h = "".join(text for text, _ in segs[:-1])
            if head is not None and h != head:
                raise PlanError("template.chat", "the chat template renders the prompt "
                                "differently before the chosen and the rejected reply.",
                                hint="set template.chat=false.")
            head = h
            tails.append(segs[-1][0])
        return head, tails
    prompt = render({**row, prompt_field: row["prompt"]},
                    {"prompt": tmpl["prompt"], "response": "", "system": None})[0]
    head, tails = None, []
    for reply in replies:
        h, tail = to_prompt_completion(prompt, reply, system, chat=chat,
                                       chat_template=chat_template, eos_token=eos_token,
                                       bos_token=bos_token)
        if head is not None and h != head:
            raise PlanError("template.chat", "the chat template renders the prompt differently "
                            "before the chosen and the rejected reply.",
                            hint="set template.chat=false.")
        head = h
        tails.append(tail)
    return head, tails


def _units(rows, rendered, heads, tails, tokenizer, *, kto: bool, seed: int, max_length: int,
           overlength: str) -> dict:
    """One split's units after the over-length rule: pairs (chosen, rejected), or for KTO rows
    (completion, KL completion) with the rows' labels."""
    counts = {**dict.fromkeys(COUNTS, 0), "field_cuts": {}}
    seqs, plens, lengths, supervised, responses, answer_ids, shown, labels = \
        [], [], [], [], [], [], [], []
    answer_cuts = []                        # (row, reply tokens) of replies that do not fit
    kl = mismatched(len(rows), [signature(r) for r in rows], seed) if kto else None
    for i, (row, (head, texts), p_ids, t_ids) in enumerate(zip(rows, rendered, heads, tails)):
        replies = list(t_ids)
        if kto:
            replies.append(tails[int(kl[i])][0] if len(rows) > 1 else t_ids[0])
        lengths.extend(len(p_ids) + len(x) for x in replies)
        longest = max(len(x) for x in (replies[:1] if kto else replies))
        if any(not x for x in replies):
            counts["no_supervised"] += 1
            continue
        cut = len(p_ids) + longest > max_length
        # compiler/examples.py's rule (cuts_answer): a reply fits behind at least one prompt token
        answer_cut = cut and overlength != "drop" and longest > max_length - min(len(p_ids), 1)
        if cut:
            if overlength == "drop":
                counts["dropped_too_long"] += 1
                continue
            if answer_cut:
                answer_cuts.append((i, longest))
                counts["answers_cut"] += 1
                if overlength != "truncate_answer":
                    continue                # refused once every split is counted
                longest = max_length - min(len(p_ids), 1)
                replies = [x[:longest] for x in replies]
            p_ids = p_ids[len(p_ids) - (max_length - longest):]
            counts["truncated"] += 1
        if kto:                          # the KL completion is cut to fit (it only estimates KL)
            replies[1] = replies[1][:max(1, max_length - len(p_ids))]
        for x in replies:
            seqs.append(list(p_ids) + list(x))
            plens.append(len(p_ids))
            supervised.append(len(x))
        responses.append(unescape(row["chosen"] if "chosen" in row else row["completion"]))
        answer_ids.append(tuple(replies[0]))
        if kto:
            labels.append(int(bool(row["label"])))
        if len(shown) < 2:
            prompt_text = tokenizer.decode(p_ids, skip_special_tokens=False) if cut else \
                unescape(head)
            shown_replies = ([tokenizer.decode(x, skip_special_tokens=False) for x in replies]
                             if answer_cut else [unescape(x) for x in texts])
            shown.append(_shown(prompt_text, shown_replies, kto, row))
    out = {"seqs": seqs, "plens": plens, "lengths": lengths, "supervised": supervised,
           "responses": responses, "answer_ids": answer_ids, "shown": shown, "counts": counts,
           "answer_cuts": answer_cuts}
    if kto:
        out["unit_labels"] = labels
    return out


def _shown(prompt: str, replies: list[str], kto: bool, row: dict) -> str:
    if kto:
        return mark_example(prompt, replies[0]) + ("  (desirable)" if row["label"] else
                                                    "  (undesirable)")
    return mark_example(prompt, replies[0]) + "\n  rejected: " + mark_example("", replies[1])


def pair_stats(out: dict) -> dict:
    """What the plan says about the pairs beyond examples.py's stats: units per split, tokens per
    pair (or per KTO row), desirable/undesirable rows."""
    stats = {"unit": 2, "units": {}, "pair_tokens": {}, "labels": {}}
    for name, o in out.items():
        n = len(o["seqs"]) // 2
        if not n and name == "test_plain":
            continue
        stats["units"][name] = n
        if name == "train" and n:
            per = np.asarray([len(a) + len(b) for a, b in zip(o["seqs"][::2], o["seqs"][1::2])])
            stats["pair_tokens"] = {"mean": round(float(per.mean()), 1),
                                    "p95": int(np.percentile(per, 95)), "max": int(per.max())}
        if "unit_labels" in o:
            c = Counter(o["unit_labels"])
            stats["labels"][name] = {"desirable": c[1], "undesirable": c[0]}
    return stats
