"""Rendered examples → token ids, cached on disk; the token data the runtime trains and scores on.

An example is its prompt tokens (not supervised) followed by its supervised tokens (the answer and its
end token). The two parts are tokenised separately and concatenated, so a prompt at generation time
tokenises exactly as it did in training. The runtime reads the cache through core/token_cache.py.

Over-length examples (prompt + answer > data.max_length tokens):
- overlength=drop: the example is dropped and counted.
- overlength=truncate (the default): the prompt's fields are cut inside — the longest first, down
  to a common length, each keeping its start (data.truncate_fields names which; default every
  field of the prompt) — and the example re-rendered, so the template's own words, the system
  prompt and the answer stay whole; the plan counts the rows cut per field. Only a row its fields
  cannot absorb is cut from the prompt's LEFT (keeping its end and the whole answer). Both count as
  truncated. The answer is never cut: an example whose answer does not fit is refused (a PlanError
  naming data.max_length, the first rows' file:line, how many there are and the longest answer).
- overlength=truncate_answer: as truncate, but an answer that does not fit is cut at its end (it
  then lacks its end token) behind the prompt's last token; counted as truncated and as
  answers_cut, which the plan warns about.
An answer "does not fit" when it is longer than max_length - 1 tokens: an example keeps at least
one prompt token, since a sequence's first token is never predicted and an answer with no context
teaches nothing. So an answer of exactly max_length tokens counts as cut too (its end token is
what would go). Conversations apply the same rule to the one assistant turn they must keep (the
first, when no run of whole turns fits), preference data (compiler/preference.py) to the longer
reply of a pair. The rows are named through compiler/data.origin, which every row read from a
file carries.
Examples with no supervised token are dropped and counted (no_supervised).

data.max_length=auto (a LengthRule): the training rows are tokenised once without any cap, their
p99 of tokens as written is rounded up to a multiple of 64 (at least 64, at most the cap the
compiler sets: the model's context, runtime.row_length or the memory estimate), and the rows are
then tokenised at that length exactly as if it had been given — the same cache, the same
over-length policy. The measured lengths are remembered beside the cache (`<key>.lengths.npy`).

Cache: `<cache_dir>/<key>.npz` — per split (train, val, test) `{split}_ids` (int32, all examples'
ids end to end), `{split}_offsets` (int64, where each example starts; one more than examples) and
`{split}_prompt_lens` (int32), and when the training answers form a label set `train_class` and
`val_class` (int32: each example's label, its index in the label set, most frequent first; -1 for
a validation answer outside it) —
plus `<key>.json` (stats, test references, labels). The key hashes
everything the tokens depend on, including the rows themselves, so a second compile of the same
inputs loads the cache without tokenising. A process reads a cache at most once (load_examples).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from compiler.data import origin
from core.errors import PlanError, did_you_mean
from core.files import sha256_file, write_atomic
from core.labels import answer_set, normalise
from core.processes import note
from core.token_cache import remember, to_examples
from core.templates import CLOSE, OPEN, mark_example, placeholders, render, to_prompt_completion
from core.tokenizer import (TOKENIZER_FILE, encode_texts, escape_controls, load_tokenizer,
                                special_prefix_ids, special_token, unescape)
from core.tokenizer import encode_unique as _encode_unique

CACHE_VERSION = 10
# test_plain: the test rows without retrieved passages (compiler/retrieval.py), scored beside them
SPLITS = ("train", "val", "test", "test_plain")
COUNTS = ("truncated", "dropped_too_long", "no_supervised", "answers_cut")
MAX_LABELS = 1000      # more distinct answers than this is generation, not classification: no label set
POLICIES = ("truncate", "drop", "truncate_answer")
LARGE_SPLITS = 20_000  # rows from which tokenising says that it is (seconds, on a CPU)
SHOWN_CUTS = 5         # rows whose answer does not fit that a refusal or warning names


# ------------------------------------------------------------------------------ build

def build_examples(splits: dict[str, list[dict]], *, template: dict, tokenizer_dir: str,
                   chat_template: str | None, eos_token: str, max_length: int, overlength: str,
                   cache_dir: Path, key_material: dict, bos_token: str | None = None,
                   truncate_fields: list[str] | None = None, preference: dict | None = None
                   ) -> dict:
    """Tokenise the rows of each split (train, val, test; missing = empty) and write the cache, or
    load it when the same inputs were built before. Returns the data stats for the plan, with the
    cache's path (`cache`) and content key (`key`); `load_examples(stats["cache"])` then costs no
    second read in this process. `max_length` may be a LengthRule (data.max_length=auto): the
    length is then chosen from the rows' tokens (_auto_length) and said in `length_choice`."""
    if isinstance(max_length, LengthRule):
        return _auto_length(splits, max_length, dict(
            template=template, tokenizer_dir=tokenizer_dir, chat_template=chat_template,
            eos_token=eos_token, overlength=overlength, cache_dir=cache_dir,
            key_material=key_material, bos_token=bos_token, truncate_fields=truncate_fields,
            preference=preference))
    max_length, tokenizer_path = _checked(overlength, max_length, tokenizer_dir)
    chat = bool(template.get("chat"))
    if bos_token is None:
        bos_token = special_token(tokenizer_dir, "bos_token")
    splits = {name: list(splits.get(name) or []) for name in SPLITS}
    tmpl = {k: template.get(k) for k in ("prompt", "response", "system", "chat", "messages")}
    if preference is not None:
        tmpl["preference"] = dict(preference)
    conversation = tmpl["messages"] is not None
    if conversation and truncate_fields:
        raise PlanError("data.truncate_fields", "does not apply to conversations "
                        "(template.messages): an over-length conversation loses its last turns.",
                        hint="leave data.truncate_fields null.")
    cut = cuttable_fields(tmpl, truncate_fields) if overlength != "drop" and not conversation \
        else []

    key = _cache_key(splits, tmpl=tmpl, chat_template=chat_template if chat else None,
                     tokenizer_hash=sha256_file(tokenizer_path), eos_token=eos_token,
                     bos_token=bos_token, max_length=max_length, overlength=overlength,
                     key_material={**key_material, "truncate_fields": cut})
    cache_dir = Path(cache_dir).expanduser().resolve()
    npz_path, meta_path = cache_dir / f"{key}.npz", cache_dir / f"{key}.json"
    cached = _cached_stats(npz_path, meta_path, key)
    if cached is not None:
        return {"cache": str(npz_path), "key": key, **cached}

    tokenizer = load_tokenizer(tokenizer_dir)
    chat_args = dict(chat_template=chat_template, eos_token=eos_token, bos_token=bos_token)
    rows = sum(len(v) for v in splits.values())
    started = time.perf_counter()
    if rows >= LARGE_SPLITS:
        note(f"tokenising {rows:,} rows (once: the token cache keeps them) ...")
    out = _tokenised(splits, tmpl, tokenizer, cut, max_length=max_length, overlength=overlength,
                     **chat_args)
    cuts = _answer_cuts(splits, out)
    if cuts and overlength == "truncate":
        raise _refuse_cut_answers(cuts, max_length, "pairs" if preference is not None else
                                  "conversations" if conversation else "examples")
    arrays: dict[str, np.ndarray] = {}
    for name in SPLITS:
        arrays.update(out[name].pop("arrays", None) or
                      _pack_arrays(name, out[name]["seqs"], out[name]["plens"],
                                   out[name].get("masks")))
        if "unit_labels" in out[name]:
            arrays[f"{name}_unit_labels"] = np.asarray(out[name]["unit_labels"], dtype=np.int32)
    stats = _stats(out, tokenizer, max_length=max_length, overlength=overlength)
    stats["answers_cut_rows"] = [[name, j] for _, _, name, j, _ in cuts[:SHOWN_CUTS]]
    stats["answers_cut_in_rows"] = len(cuts)          # a KTO pair's two rows are one here
    stats["longest_cut_answer"] = max((n for *_, n in cuts), default=0)
    labels = stats.pop("_labels")
    if preference is None and stats["answers"]:
        # what data.balance counts and weighs, and the classification head's targets
        arrays["train_class"] = _classes(out["train"]["responses"], stats["answers"])
        arrays["val_class"] = _classes(out["val"]["responses"], stats["answers"])
    if preference is not None:      # pairs: no label set; sizes count units (pairs, KTO rows)
        from compiler.preference import pair_stats

        stats.update(pair_stats(out), answers=[], n_labels=0)
        stats["sizes"] = dict(stats["units"])
        labels = []
    if rows >= LARGE_SPLITS:
        note(f"tokenised in {time.perf_counter() - started:.1f} s")
    meta = {"version": CACHE_VERSION, "key": key, "stats": stats,
            "test": {"references": out["test"]["responses"]},
            "test_plain": {"references": out["test_plain"]["responses"]}, "labels": labels}
    write_atomic(npz_path, lambda f: np.savez(f, **arrays))
    write_atomic(meta_path, json.dumps(meta, ensure_ascii=False))
    remember(npz_path, to_examples(npz_path, arrays, meta))
    return {"cache": str(npz_path), "key": key, **stats}


def _classes(responses: list[str], answers: list[dict]) -> np.ndarray:
    """Each example's label: its index in the label set (answer_set's order, which is the plan's
    data.labels order), the answer's text compared as labels are (core/labels.normalise); -1 for
    an answer outside the set (a validation answer no training row has)."""
    index = {a["key"]: i for i, a in enumerate(answers)}
    memo: dict[str, int] = {}
    return np.fromiter((memo[r] if r in memo else memo.setdefault(
        r, index.get(normalise(r, classification=True), -1)) for r in responses), dtype=np.int32,
        count=len(responses))


def _checked(overlength: str, max_length, tokenizer_dir) -> tuple[int, Path]:
    if overlength not in POLICIES:
        raise PlanError("data.overlength", f"unknown policy `{overlength}`.",
                        hint="truncate (cut inside the prompt's fields, keep the answer), drop, "
                             "or truncate_answer (also cut answers that do not fit).")
    max_length = int(max_length)
    if max_length < 2:
        raise PlanError("data.max_length", f"must be at least 2 tokens, got {max_length}.",
                        hint="a prompt token and an answer token; 512 is typical.")
    tokenizer_path = Path(tokenizer_dir) / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise PlanError("model.path", f"{tokenizer_dir} has no tokenizer.json.")
    return max_length, tokenizer_path


def _tokenised(splits, tmpl, tokenizer, cut, *, max_length: int, overlength: str, **chat_args
               ) -> dict[str, dict]:
    """Each split tokenised by its kind of rows: preference pairs (compiler/preference.py),
    conversations or single turns."""
    chat = bool(tmpl.get("chat"))
    preference = tmpl.get("preference")
    if preference is not None:
        from compiler.preference import tokenise_splits

        return tokenise_splits(splits, tmpl, tokenizer, prompt_field=preference["prompt_field"],
                               seed=preference["seed"], max_length=max_length,
                               overlength=overlength, chat=chat, **chat_args)
    if tmpl["messages"] is not None:
        return _conversation_splits(splits, tmpl, tokenizer, max_length=max_length,
                                    overlength=overlength, **chat_args)
    return _single_turn_splits(splits, tmpl, tokenizer, cut, max_length=max_length,
                               overlength=overlength, chat=chat, **chat_args)


# ------------------------------------------------------------------------------ max_length=auto

AUTO_PERCENTILE = 99    # data.max_length=auto: the share of training examples that fit whole
AUTO_MULTIPLE = 64      # ... rounded up to a multiple of this (PALLAS_BLOCK for pallas attention)
AUTO_FLOOR = 64         # ... and never below this


@dataclass(frozen=True)
class LengthRule:
    """How data.max_length=auto picks the length: the AUTO_PERCENTILE-th percentile of the training
    examples' tokens as written (prompt + answer, before any cut), rounded up to `multiple`, at
    least AUTO_FLOOR, at most `cap` (what sets it: `capped_by`). The compiler decides the cap (the
    model's context, runtime.row_length, the memory estimate); the data decides the rest."""
    cap: int
    capped_by: str          # max_position_embeddings | runtime.row_length | memory
    multiple: int = AUTO_MULTIPLE
    cap_note: str = ""      # why the cap is what it is, for the plan (memory: what would not fit)


def choose_length(lengths: np.ndarray, rule: LengthRule, *, at_least: int = 0) -> dict:
    """The length `rule` picks for examples of these token counts (`at_least`: the fewest tokens
    it may have): {"length", "tokens" (the percentile), "rows", "over" (rows longer than the
    length), "wanted" (the rounded length before the cap), "capped_by" (None when the cap did not
    bind), ...}."""
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = int(np.percentile(lengths, AUTO_PERCENTILE, method="higher")) if len(lengths) else 0
    m = rule.multiple
    wanted = max(AUTO_FLOOR, -(-max(tokens, at_least) // m) * m)
    top = rule.cap // m * m if rule.cap >= m else rule.cap      # the cap, on the grid if it can be
    length = min(wanted, top)
    return {"percentile": AUTO_PERCENTILE, "tokens": tokens, "length": length, "wanted": wanted,
            "rows": int(len(lengths)), "over": int((lengths > length).sum()),
            "multiple": m, "cap": rule.cap, "capped_by": rule.capped_by if wanted > top else None,
            "cap_note": rule.cap_note if wanted > top else "", "longest_answer": None}


def length_text(choice: dict, overlength: str) -> str:
    """What the plan says of data.max_length=auto's choice."""
    n, rows, over = choice["length"], choice["rows"], choice["over"]
    share = f"{over / rows:.1%}" if rows else "0%"
    text = (f"max_length auto → {n} (p{choice['percentile']} of prompt + answer tokens: "
            f"{choice['tokens']}; {over} of {rows} rows ({share}) would be cut at {n}, by "
            f"data.overlength={overlength}")
    if choice.get("longest_answer"):
        text += (f"; raised to keep the longest answer ({choice['longest_answer']} tokens) whole: "
                 "data.overlength=truncate never cuts an answer")
    if choice.get("capped_by"):
        text += (f"; {choice['wanted']} wanted, capped at {n} by "
                 f"{_cap_words(choice['capped_by'], choice['cap'])}")
        if choice.get("cap_note"):
            text += f" ({choice['cap_note']})"
    return text + ")"


def _cap_words(capped_by: str, cap: int) -> str:
    return {"max_position_embeddings": f"the model's context (max_position_embeddings={cap})",
            "runtime.row_length": f"runtime.row_length={cap}",
            "memory": "the memory estimate"}.get(capped_by, capped_by)


def _auto_length(splits: dict, rule: LengthRule, settings: dict) -> dict:
    """build_examples for data.max_length=auto: the length chosen from the rows' tokens as written
    (measured once, and remembered), then the rows tokenised at it as for that length given — the
    same token cache. With data.overlength=truncate, which never cuts an answer, the length is
    raised (within the cap) to keep the longest answer whole instead of refusing it."""
    lengths = _measured_lengths(splits, **settings)
    choice = choose_length(lengths, rule)
    try:
        stats = build_examples(splits, max_length=choice["length"], **settings)
    except AnswersCut as e:
        wanted = choose_length(lengths, rule, at_least=e.longest + 1)
        if wanted["length"] <= e.longest:           # the cap leaves it no room
            raise PlanError(e.key, f"{e.message} data.max_length=auto chose "
                            f"{choice['length']} and may choose at most {rule.cap}, set by "
                            f"{_cap_words(rule.capped_by, rule.cap)}.",
                            hint=e.hint, file=e.file, line=e.line) from None
        choice = {**wanted, "longest_answer": e.longest}
        stats = build_examples(splits, max_length=choice["length"], **settings)
    choice["text"] = length_text(choice, settings["overlength"])
    return {**stats, "length_choice": choice}


def _measured_lengths(splits: dict, *, template: dict, tokenizer_dir: str, chat_template,
                      eos_token: str, cache_dir: Path, key_material: dict, bos_token=None,
                      preference: dict | None = None, **_) -> np.ndarray:
    """Tokens per training row as written (prompt + answer, before any cut; a preference pair's
    longer side), or per row of every split when there is no training row; remembered in
    `<cache_dir>/<key>.lengths.npy`, keyed as the token cache is."""
    chat = bool(template.get("chat"))
    if bos_token is None:
        bos_token = special_token(tokenizer_dir, "bos_token")
    measured = "train" if splits.get("train") else None
    rows = {name: list(splits.get(name) or []) if measured in (None, name) else []
            for name in SPLITS if name != "test_plain"}
    rows["test_plain"] = []
    tmpl = {k: template.get(k) for k in ("prompt", "response", "system", "chat", "messages")}
    if preference is not None:
        tmpl["preference"] = dict(preference)
    _, tokenizer_path = _checked("drop", 2, tokenizer_dir)
    key = _cache_key(rows, tmpl=tmpl, chat_template=chat_template if chat else None,
                     tokenizer_hash=sha256_file(tokenizer_path), eos_token=eos_token,
                     bos_token=bos_token, max_length="auto", overlength="as written",
                     key_material=key_material)
    path = Path(cache_dir).expanduser().resolve() / f"{key}.lengths.npy"
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        pass                        # not measured yet, or unreadable: measured again
    n = sum(len(v) for v in rows.values())
    if n >= LARGE_SPLITS:
        note(f"measuring {n:,} rows' tokens (data.max_length=auto; once: remembered) ...")
    out = _tokenised(rows, tmpl, load_tokenizer(tokenizer_dir), [], max_length=2**62,
                     overlength="drop", chat_template=chat_template, eos_token=eos_token,
                     bos_token=bos_token)
    lengths = np.concatenate([np.asarray(out[name]["lengths"], dtype=np.int64)
                              for name in SPLITS if rows[name]] or [np.zeros(0, np.int64)])
    if preference is not None and len(lengths):     # two sequences a row: the pair's longer one
        pairs = lengths.reshape(-1, 2)               # (KTO: the completion; its KL partner is cut)
        kto = any("completion" in r for split in rows.values() for r in split[:1])
        lengths = pairs[:, 0] if kto else pairs.max(axis=1)
    write_atomic(path, lambda f: np.save(f, lengths))
    return lengths


CHUNK = 16_384            # rows rendered and tokenised at a time: memory stays flat with the rows


def _single_turn_splits(splits, tmpl, tokenizer, cut, *, max_length, overlength, chat, **chat_args
                        ) -> dict[str, dict]:
    """Each split tokenised as prompt part + supervised part (template.prompt / template.response),
    CHUNK rows at a time: what is kept per example is its tokens in flat arrays, its lengths, and
    its answer (shared between examples with the same one), never its rendered text or token
    lists, so the memory this takes grows with the tokens, not with Python objects per row."""
    prefix = [] if chat else special_prefix_ids(tokenizer)
    fit = _FieldFitter(tmpl, cut, tokenizer, prefix, max_length, **chat_args)
    shared: dict = {}                         # answer text / answer ids → one object for all rows
    out = {}
    for name in SPLITS:
        rows, parts = splits[name], []
        for lo in range(0, len(rows), CHUNK):
            chunk = rows[lo:lo + CHUNK]
            rendered = _render({name: chunk}, tmpl, **chat_args)[name]
            heads = _encode_unique(tokenizer, [h for h, _, _ in rendered])
            tails = _encode_unique(tokenizer, [t for _, t, _ in rendered])
            lengths = [len(prefix) + len(h) + len(t) for h, t in zip(heads, tails)]   # as written
            split_heads, field_cuts = fit.split(chunk, rendered, heads, tails)
            part = _tokenise_split(rendered, [prefix + h for h in split_heads] if prefix else
                                   split_heads, tails, tokenizer,
                                   max_length=max_length, overlength=overlength, name=name)
            part["counts"]["field_cuts"] = field_cuts
            part["counts"]["truncated"] += fit.fitted
            part["lengths"] = lengths
            part["answer_cuts"] = [(j + lo, n) for j, n in part["answer_cuts"]]
            part["responses"] = [shared.setdefault(r, r) for r in part["responses"]]
            part["answer_ids"] = [shared.setdefault(a, a) for a in part["answer_ids"]]
            parts.append(part)
            del rendered, heads, tails, split_heads
        out[name] = _joined(name, parts)
    return out


def _joined(name: str, parts: list[dict]) -> dict:
    """One split's chunks (from _tokenise_split) as one: arrays end to end, lists joined, counts
    added."""
    if not parts:
        empty = _tokenise_split([], [], [], None, max_length=2, overlength="truncate", name=name)
        empty["counts"]["field_cuts"] = {}
        empty["lengths"] = []
        return empty
    out = {k: list(chain.from_iterable(p[k] for p in parts))
           for k in ("plens", "lengths", "supervised", "responses", "answer_ids", "answer_cuts")}
    out["shown"] = list(chain.from_iterable(p["shown"] for p in parts))[:2]
    counts = dict.fromkeys(COUNTS, 0)
    field_cuts: Counter = Counter()
    for p in parts:
        for k in COUNTS:
            counts[k] += p["counts"][k]
        field_cuts.update(p["counts"]["field_cuts"])
    counts["field_cuts"] = dict(field_cuts)
    out["counts"] = counts
    ids = np.concatenate([p["arrays"][f"{name}_ids"] for p in parts])
    offsets = [parts[0]["arrays"][f"{name}_offsets"]]
    for p in parts[1:]:
        offsets.append(p["arrays"][f"{name}_offsets"][1:] + offsets[-1][-1])
    out["arrays"] = {f"{name}_ids": ids, f"{name}_offsets": np.concatenate(offsets),
                     f"{name}_prompt_lens": np.asarray(out["plens"], dtype=np.int32)}
    return out


def _conversation_splits(splits, tmpl, tokenizer, *, max_length, overlength, chat_template,
                         eos_token, bos_token) -> dict[str, dict]:
    """Each split tokenised turn by turn (compiler/conversations.py): training and validation
    examples supervise every assistant turn; a test example is the conversation up to its last
    assistant turn (the prompt) and that turn (the reference). Every supervised span is checked:
    its tokens decode to its text, which holds the assistant's words."""
    from compiler.conversations import segments, with_system

    out = {}
    for name in SPLITS:
        pieces, turns_of = [], []
        for row in splits[name]:
            system = (render(row, {"prompt": "", "response": "", "system": tmpl["system"]})[2]
                      if tmpl["system"] is not None else None)
            turns = with_system(row[tmpl["messages"]], system)
            segs = segments(turns, chat_template=chat_template, bos_token=bos_token,
                            eos_token=eos_token)
            answers = [t["content"] for t in turns if t["role"] == "assistant"]
            if name == "test":                 # the prompt: everything before the last answer
                last = max(k for k, (_, sup) in enumerate(segs) if sup)
                segs, answers = [("".join(t for t, _ in segs[:last]), False), segs[last]], \
                    answers[-1:]
            pieces.append(segs)
            turns_of.append(answers)
        ids = iter(_encode_unique(tokenizer, [t for segs in pieces for t, _ in segs]))
        encoded = [[(next(ids), sup) for _, sup in segs] for segs in pieces]
        _check_spans(tokenizer, pieces, encoded, turns_of, split=name)
        out[name] = _tokenise_turns(pieces, encoded, [a[-1] for a in turns_of], tokenizer,
                                    max_length=max_length, overlength=overlength)
    return out


def _check_spans(tokenizer, pieces, encoded, answers, *, split: str) -> None:
    """Every supervised span's tokens decode to the span's text exactly, and the span holds the
    assistant turn's text: the loss falls on the assistant's words and nothing else."""
    for j, (segs, enc, texts) in enumerate(zip(pieces, encoded, answers)):
        spans = [(text, ids) for (text, sup), (ids, _) in zip(segs, enc) if sup]
        for k, ((text, ids), answer) in enumerate(zip(spans, texts)):
            decoded, want = tokenizer.decode(ids, skip_special_tokens=False), unescape(text)
            if decoded != want or unescape(answer).strip() not in want:
                raise PlanError("template.messages", f"{split} conversation {j}, assistant turn "
                                f"{k}: the supervised tokens decode to {decoded[:80]!r}, which is "
                                + ("not the span's text " + repr(want[:80]) if decoded != want else
                                   "not the assistant's text " + repr(unescape(answer)[:80]))
                                + ".", hint="the model's chat template changes the assistant's "
                                            "text; train single turns instead.")


def _tokenise_turns(pieces, encoded, responses, tokenizer, *, max_length: int, overlength: str
                    ) -> dict:
    """One split of conversations as token sequences with per-token supervision masks, after the
    over-length policy: `truncate` keeps the longest run of whole turns that ends with an answer
    and fits (later turns are dropped and counted); when even the first answer does not fit, the
    context before it is cut from the left as for single turns — and the answer itself only with
    `truncate_answer` (otherwise build_examples refuses it)."""
    counts = {**dict.fromkeys(COUNTS, 0), "turns_dropped": 0, "field_cuts": {}}
    seqs, masks, plens, lengths, supervised, kept_responses, answer_ids, shown = \
        [], [], [], [], [], [], [], []
    answer_cuts = []                        # (conversation, answer tokens): answers that do not fit
    for j, (segs, enc, response) in enumerate(zip(pieces, encoded, responses)):
        lengths.append(sum(len(ids) for ids, _ in enc))
        if not any(ids for ids, sup in enc if sup):
            counts["no_supervised"] += 1
            continue
        cut = lengths[-1] > max_length
        if cut:
            if overlength == "drop":
                counts["dropped_too_long"] += 1
                continue
            n = _first_answer_cut(enc, max_length)
            if n:
                answer_cuts.append((j, n))
                counts["answers_cut"] += 1
                if overlength != "truncate_answer":
                    continue                # refused once every split is counted
            enc, dropped = _fit_turns(enc, max_length)
            counts["truncated"] += 1
            counts["turns_dropped"] += dropped
        seq = [t for ids, _ in enc for t in ids]
        mask = np.fromiter((sup for ids, sup in enc for _ in ids), dtype=np.uint8, count=len(seq))
        seqs.append(seq)
        masks.append(mask)
        plens.append(int(np.argmax(mask)))
        supervised.append(int(mask.sum()))
        kept_responses.append(unescape(response))
        answer_ids.append(tuple(next(ids for ids, sup in reversed(enc) if sup)))
        # the plan shows the first examples, a multi-turn one first when there is one
        turns = sum(sup for _, sup in enc)
        if len(shown) < 2 or (turns > 1 and not any(n > 1 for n, _ in shown)):
            text = ("".join(OPEN + tokenizer.decode(ids, skip_special_tokens=False) + CLOSE
                            if sup else tokenizer.decode(ids, skip_special_tokens=False)
                            for ids, sup in enc) if cut else
                    "".join(OPEN + unescape(t) + CLOSE if sup else unescape(t) for t, sup in segs))
            shown.append((turns, text))
    shown = sorted(shown, key=lambda x: x[0] < 2)[:2]      # stable: multi-turn first
    return {"seqs": seqs, "masks": masks, "plens": plens, "lengths": lengths,
            "supervised": supervised, "responses": kept_responses, "answer_ids": answer_ids,
            "shown": [text for _, text in shown], "counts": counts, "answer_cuts": answer_cuts}


def _first_answer_cut(enc: list[tuple[list[int], bool]], max_length: int) -> int:
    """The first answer's tokens when _fit_turns would cut it (no run of whole turns fits and it
    does not fit behind one token of its context), else 0."""
    first = next(k for k, (_, sup) in enumerate(enc) if sup)
    before, n = sum(len(ids) for ids, _ in enc[:first]), len(enc[first][0])
    return n if before + n > max_length and cuts_answer(before, n, max_length) else 0


def _fit_turns(enc: list[tuple[list[int], bool]], max_length: int
               ) -> tuple[list[tuple[list[int], bool]], int]:
    """(pieces that fit max_length, answers dropped): see _tokenise_turns."""
    total, best = 0, None
    for k, (ids, sup) in enumerate(enc):
        total += len(ids)
        if total > max_length:
            break
        if sup:
            best = k + 1
    answers = sum(sup for _, sup in enc)
    if best is not None:
        return enc[:best], answers - sum(sup for _, sup in enc[:best])
    first = next(k for k, (_, sup) in enumerate(enc) if sup)
    p_ids, s_ids = truncate([t for ids, _ in enc[:first] for t in ids], enc[first][0], max_length)
    return [(p_ids, False), (s_ids, True)], answers - 1


def _stats(out: dict, tokenizer, *, max_length: int, overlength: str) -> dict:
    """The plan's data stats from the tokenised splits (and, under `_labels`, the label set)."""
    train = out["train"]
    shown = list(train["shown"])
    counted = [o for name, o in out.items() if name != "test_plain"]   # its rows are test's
    reported = {name: o for name, o in out.items() if name != "test_plain" or o["plens"]}
    distinct = sorted({response.strip().casefold() for response in train["responses"]})
    answers = answer_set(train["responses"], train["answer_ids"], limit=MAX_LABELS)
    supervised = train["supervised"]
    return {
        "tokens": _percentiles(np.asarray(train["lengths"], dtype=np.int64)),
        **{k: sum(o["counts"][k] for o in counted) for k in COUNTS},
        "truncated_fields": dict(sum((Counter(o["counts"]["field_cuts"]) for o in counted),
                                     Counter())),
        "supervised": {"min": int(min(supervised)) if supervised else 0,
                       "mean": round(float(np.mean(supervised)), 2) if supervised else 0.0},
        "sizes": {name: len(o["plens"]) for name, o in reported.items()},
        "per_split": {name: {k: v for k, v in o["counts"].items() if k != "field_cuts"}
                      for name, o in reported.items()},
        "turns_dropped": sum(o["counts"].get("turns_dropped", 0) for o in counted),
        "max_length": max_length,
        "overlength": overlength,
        # the longest answer kept, end token included (a conversation's last, a pair's chosen
        # reply): what eval.max_new_tokens=auto allows a generated one
        "longest_answer": {name: max(map(len, out[name]["answer_ids"]), default=0)
                           for name in ("train", "test")},
        "n_labels": len(distinct),
        "answers": answers,
        "examples": shown,
        "_labels": distinct if len(distinct) <= MAX_LABELS else [],
    }


def _cached_stats(npz_path: Path, meta_path: Path, key: str) -> dict | None:
    if not (npz_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") == key and meta.get("version") == CACHE_VERSION:
            return meta["stats"]
    except (OSError, ValueError, KeyError):
        pass  # unreadable sidecar: rebuild over it
    return None


def cuttable_fields(tmpl: dict, named: list[str] | None) -> list[str]:
    """The fields over-length examples may be cut inside: those data.truncate_fields names, else
    every field of the prompt — never the system prompt's, the answer's, or the template's own
    words."""
    keep = set()
    for part in ("system", "response"):
        if tmpl.get(part) is not None:
            keep.update(placeholders(tmpl[part], key=f"template.{part}"))
    prompt = [f for f in placeholders(tmpl["prompt"], key="template.prompt") if f not in keep]
    if named is None:
        return prompt
    for f in named:
        if f not in prompt:
            raise PlanError("data.truncate_fields", f"`{f}` is not a field the prompt may be cut "
                            f"inside.{did_you_mean(f, prompt)} Fields of template.prompt (not in "
                            f"the system prompt or the answer): {', '.join(prompt) or 'none'}.",
                            hint="name fields of template.prompt, or leave it null for all of them.")
    return list(named)


class _FieldFitter:
    """Over-length examples fitted by cutting inside their fields — the longest first, down to a
    common length (water-filling), keeping each field's start — and re-rendered, so the prompt's
    own words, the system prompt and the answer stay whole. A row the fields cannot absorb is left
    to `truncate` (the prompt's start)."""

    def __init__(self, tmpl, fields, tokenizer, prefix, max_length, **chat):
        from core.tokenizer import control_tokens

        self.tmpl, self.fields, self.tok, self.prefix = tmpl, fields, tokenizer, prefix
        self.max_length, self.chat = max_length, chat
        self.controls = control_tokens(tokenizer)

    def split(self, rows, rendered, heads, tails) -> tuple[list[list[int]], dict[str, int]]:
        """The heads (token ids) of one split with over-length rows fitted; rows cut per field.
        `self.fitted`: how many rows of this split were fitted."""
        heads, cuts = list(heads), Counter()
        self.fitted = 0
        for j, (row, head_ids, tail_ids) in enumerate(zip(rows, heads, tails)):
            over = len(self.prefix) + len(head_ids) + len(tail_ids) - self.max_length
            if over <= 0 or not self.fields or not tail_ids or \
                    cuts_answer(len(self.prefix) + len(head_ids), len(tail_ids), self.max_length):
                continue          # its answer does not fit: _tokenise_split refuses or cuts it
            fitted = self.fit(row, over, len(tail_ids))
            if fitted is None:
                continue
            head, heads[j], cut = fitted
            rendered[j] = (head, rendered[j][1], rendered[j][2])
            cuts.update(cut)
            self.fitted += 1
        return heads, dict(cuts)

    def fit(self, row: dict, over: int, n_tail: int):
        text = {f: row[f] if isinstance(row[f], str) else str(row[f]) for f in self.fields}
        ids = dict(zip(self.fields, encode_texts(self.tok, [text[f] for f in self.fields])))
        budget = self.max_length - n_tail - len(self.prefix)
        for _ in range(4):                     # re-tokenising at the cut may add a token or two
            keep = _water_fill({f: len(x) for f, x in ids.items()}, over)
            if keep is None:
                return None
            cut = {f: len(ids[f]) - keep[f] for f in self.fields if keep[f] < len(ids[f])}
            # (control-token text of the data decodes as such: escaped again, as it was)
            values = {**row, **{f: self._escaped(self.tok.decode(ids[f][:keep[f]])) for f in cut}}
            prompt, response, system = render(values, self.tmpl)
            head, _ = to_prompt_completion(prompt, response, system, chat=bool(self.tmpl["chat"]),
                                           **self.chat)
            head_ids = encode_texts(self.tok, [head])[0]
            if len(head_ids) <= budget:
                return head, head_ids, {f: 1 for f in cut}
            over += len(head_ids) - budget
        return None


    def _escaped(self, text: str) -> str:
        return escape_controls(text, self.controls)[0] if self.controls else text


def _water_fill(lengths: dict[str, int], excess: int) -> dict[str, int] | None:
    """New lengths that remove at least `excess` tokens, cutting the longest fields first down to a
    common cap; None when even empty fields would not do."""
    if excess > sum(lengths.values()):
        return None
    ordered = sorted(lengths.values(), reverse=True) + [0]
    for k in range(1, len(ordered)):
        # with the k longest fields capped at ordered[k], this much is removed
        removed = sum(ordered[:k]) - k * ordered[k]
        if removed >= excess:
            cap = ordered[k] + (removed - excess) // k
            return {f: min(n, cap) for f, n in lengths.items()}
    return None


def _render(splits: dict, tmpl: dict, **chat) -> dict[str, list[tuple[str, str, str]]]:
    """(prompt part, supervised part, response text) per row, split by split."""
    out = {}
    for name, rows in splits.items():
        out[name] = []
        for row in rows:
            prompt, response, system = render(row, tmpl)
            head, tail = to_prompt_completion(prompt, response, system, chat=bool(tmpl.get("chat")),
                                              **chat)
            out[name].append((head, tail, response))
    return out


def _tokenise_split(rendered, heads, tails, tokenizer, *, max_length: int, overlength: str,
                    name: str = "train") -> dict:
    """One split's (or chunk's) examples after the over-length policy, as the cache's arrays
    (`arrays`), with what the stats need (but the lengths as written, which the caller knows
    before any cut). Only the rows over max_length or with no answer are looked at one by one;
    the rest go into the arrays in bulk."""
    counts = dict.fromkeys(COUNTS, 0)
    n = len(heads)
    heads, tails = list(heads), list(tails)
    p_len = np.fromiter(map(len, heads), dtype=np.int64, count=n)
    s_len = np.fromiter(map(len, tails), dtype=np.int64, count=n)
    keep = np.ones(n, dtype=bool)
    answer_cuts, cut = [], set()            # (row, answer tokens) of answers that do not fit
    for j in np.flatnonzero((s_len == 0) | (p_len + s_len > max_length)).tolist():
        p_ids, s_ids = heads[j], tails[j]
        if not s_ids:
            counts["no_supervised"] += 1
            keep[j] = False
            continue
        if overlength == "drop":
            counts["dropped_too_long"] += 1
            keep[j] = False
            continue
        if cuts_answer(len(p_ids), len(s_ids), max_length):
            answer_cuts.append((j, len(s_ids)))
            counts["answers_cut"] += 1
            if overlength != "truncate_answer":
                keep[j] = False
                continue                    # refused once every split is counted
        heads[j], tails[j] = truncate(p_ids, s_ids, max_length)
        counts["truncated"] += 1
        cut.add(j)
    rows = np.flatnonzero(keep).tolist()
    kept_heads, kept_tails = [heads[j] for j in rows], [tails[j] for j in rows]
    plens, supervised = [len(h) for h in kept_heads], [len(t) for t in kept_tails]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.asarray(plens, dtype=np.int64) + np.asarray(supervised, dtype=np.int64),
              out=offsets[1:])
    ids = np.fromiter(chain.from_iterable(chain.from_iterable(zip(kept_heads, kept_tails))),
                      dtype=np.int32, count=int(offsets[-1]))
    once: dict[int, tuple] = {}             # encode_unique gives equal answers one list
    answer_ids = [once.get(id(t)) or once.setdefault(id(t), tuple(t)) for t in kept_tails]
    responses = [unescape(rendered[j][2]) for j in rows]
    shown = []
    for j in rows[:2]:
        head, tail, _ = rendered[j]
        shown.append(mark_example(tokenizer.decode(heads[j], skip_special_tokens=False),
                                  tokenizer.decode(tails[j], skip_special_tokens=False))
                     if j in cut else mark_example(unescape(head), unescape(tail)))
    return {"arrays": {f"{name}_ids": ids, f"{name}_offsets": offsets,
                       f"{name}_prompt_lens": np.asarray(plens, dtype=np.int32)},
            "plens": plens, "supervised": supervised,
            "responses": responses, "answer_ids": answer_ids, "shown": shown, "counts": counts,
            "answer_cuts": answer_cuts}


def _pack_arrays(name: str, seqs: list[list[int]], plens: list[int], masks=None
                 ) -> dict[str, np.ndarray]:
    """A split as flat ids + offsets + prompt lengths (the cache's layout), and per-token
    supervision masks when an example's supervised tokens are not simply all after its prompt."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    out = {f"{name}_ids": np.fromiter(chain.from_iterable(seqs), dtype=np.int32,
                                      count=int(offsets[-1])),
           f"{name}_offsets": offsets,
           f"{name}_prompt_lens": np.asarray(plens, dtype=np.int32)}
    if masks is not None:
        out[f"{name}_mask"] = (np.concatenate(masks) if masks else np.zeros(0)).astype(np.uint8)
    return out


def cuts_answer(n_prompt: int, n_answer: int, max_length: int) -> bool:
    """Whether fitting an example into max_length tokens cuts its answer: it keeps at least one
    prompt token when it has one (see the module docstring)."""
    return n_answer > max_length - min(n_prompt, 1)


def _answer_cuts(splits: dict, out: dict) -> list[tuple]:
    """The rows whose answer does not fit (each split's `answer_cuts`, taken out of `out`), once
    each, in file order: (sort key, origin or None, split, index in the split, answer tokens)."""
    found: dict = {}
    files: dict = {}                            # file (or split) → its rank: train's file first
    for name in SPLITS:
        cuts = out[name].pop("answer_cuts", None) or []
        if name == "test_plain":                # its rows are test's
            continue
        for j, n in cuts:
            where = origin(splits[name][j])
            file, index = (where.file, where.index) if where else (name, j)
            key = (files.setdefault(file, len(files)), index)
            if key not in found or found[key][-1] < n:      # KTO: a pair gives two rows
                found[key] = (key, where, name, j, n)
    return [found[k] for k in sorted(found)]


def _places(rows: list[tuple], more: int = 0) -> str:
    """Rows named by file, each file once: `a.jsonl lines 7, 30; b.jsonl line 4 and 3 more`.
    rows: (origin or None, split, index in the split)."""
    groups: dict[str, list[str]] = {}
    for where, name, j in rows:
        file, at = (where.file, where.where) if where else (f"{name} split", f"row {j + 1}")
        groups.setdefault(file, []).append(at)
    parts = []
    for file, ats in groups.items():
        if all(a.startswith("line ") for a in ats) and len(ats) > 1:
            ats = ["lines " + ", ".join(a.removeprefix("line ") for a in ats)]
        parts.append(f"{file} {', '.join(ats)}")
    return "; ".join(parts) + (f" and {more} more" if more > 0 else "")


def cut_answer_places(splits: dict, refs: list, total: int) -> str:
    """The rows the stats' `answers_cut_rows` names (of `total`), by file and line."""
    rows = []
    for name, j in refs:
        split = splits.get(name) or []
        rows.append((origin(split[j]) if j < len(split) else None, name, j))
    return _places(rows, total - len(rows))


# kind → (one, several, what does not fit)
_CUT_TEXT = {"examples": ("example", "examples", "an answer"),
             "conversations": ("conversation", "conversations",
                               "an assistant turn it must keep (its first)"),
             "pairs": ("pair (KTO: row)", "pairs (KTO: rows)", "a reply")}


class AnswersCut(PlanError):
    """The refusal of answers that do not fit (overlength=truncate); `longest`: the longest of
    them in tokens, end token included."""

    def __init__(self, *args, longest: int, **kw):
        super().__init__(*args, **kw)
        self.longest = longest


def _refuse_cut_answers(cuts: list[tuple], max_length: int, kind: str) -> AnswersCut:
    """overlength=truncate cuts prompts only: the rows whose answer does not fit, named."""
    one, several, what = _CUT_TEXT[kind]
    n, longest = len(cuts), max(c[-1] for c in cuts)
    places = _places([(where, name, j) for _, where, name, j, _ in cuts[:SHOWN_CUTS]],
                     n - SHOWN_CUTS)
    first = cuts[0][1]
    return AnswersCut(
        "data.max_length", f"{n} {one if n == 1 else several} {'has' if n == 1 else 'have'} "
        f"{what} longer than the {max_length - 1} tokens data.max_length={max_length} leaves it "
        f"after one prompt token: {places}. The longest is {longest} tokens (its end token "
        "included). data.overlength=truncate cuts prompts, never answers.",
        file=first.file if first else None, line=first.line if first else None,
        hint=f"raise data.max_length to {longest + 1}, or set data.overlength=drop (they are "
             "dropped, counted in the plan), or data.overlength=truncate_answer (their answers "
             "are cut at the end, at your own risk; counted in the plan).", longest=longest)


def truncate(p_ids: list[int], s_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + supervised ids into max_length tokens (see the module docstring for the rule):
    the prompt is cut from its start; with overlength=truncate_answer the answer (cuts_answer)
    from its end."""
    if len(s_ids) < max_length:                  # the whole answer fits with ≥ 1 prompt token
        return p_ids[len(p_ids) - (max_length - len(s_ids)):], s_ids
    keep = min(len(p_ids), 1)
    return p_ids[len(p_ids) - keep:], s_ids[:max_length - keep]


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
    used = [tmpl["messages"]] if tmpl.get("messages") is not None else []
    if tmpl.get("preference") is not None:
        used += ["prompt", "chosen", "rejected", "completion", "label"]
    for part in ("prompt", "response", "system"):
        if tmpl.get(part) is not None:
            used += [f for f in placeholders(tmpl[part], key=f"template.{part}") if f not in used]
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "material": key_material, "template": tmpl,
                         "chat_template": chat_template, "tokenizer": tokenizer_hash, "eos": eos_token,
                         "bos": bos_token, "max_length": max_length, "overlength": overlength,
                         "fields": used}, sort_keys=True, default=str).encode())
    for name in SPLITS:
        h.update(f"\n{name}:".encode())
        split = splits[name]
        for lo in range(0, len(split), CHUNK):      # in chunks: no copy of every row's text at once
            rows = [[r.get(f) if isinstance(r.get(f), str) else
                     json.dumps(r.get(f), ensure_ascii=False, sort_keys=True, default=str)
                     for f in used] for r in split[lo:lo + CHUNK]]
            h.update(json.dumps(rows, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]
