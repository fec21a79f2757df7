"""Retrieval: a BM25 index over a corpus of passages fills the template's {retrieved} placeholder.

`retrieval.corpus` names a file of passages (JSONL, JSON, CSV or Parquet; `retrieval.id_field` and
`retrieval.text_field`). The compiler cleans the passages as it cleans the data, cuts each to
`retrieval.passage_tokens` tokens (counted), and builds a BM25 index over them with `bm25s`, cached
under $TUNE_HOME/cache/retrieval/<key> by the corpus's content and these settings, like the token
cache. Every training, validation and test row then gets the top `retrieval.k` passages for its query
(`retrieval.query`, a format string over the row's fields) as its `retrieved` field; where the data
names each row's gold passage (`retrieval.gold`), the plan reports recall@k. The test rows are also
written without passages (PLAIN), so that evaluation can compare base and tuned with and without
retrieval on the same rows. `tune generate` loads the same index and retrieves for each prompt.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compiler import data as data_mod
from core.errors import PlanError
from core.files import sha256_file, tune_home
from core.prompting import TextPolicy
from core.retrieval import _STOPWORDS, INDEX_VERSION, PLACEHOLDER, PLAIN, Index, Passages, query_text
from core.templates import placeholders

def query_format(r: dict, prompt: str | None) -> str:
    """retrieval.query, or by default every field template.prompt reads (but the passages)."""
    if r["query"] is not None:
        return r["query"]
    fields = [f for f in placeholders(prompt or "", key="template.prompt") if f != PLACEHOLDER]
    return " ".join("{" + f + "}" for f in fields)


def check_template(r: dict, t: dict) -> None:
    """The template and the retrieval section agree: {retrieved} is placed iff there is a corpus."""
    used = {part: placeholders(t[part], key=f"template.{part}")
            for part in ("prompt", "system") if t.get(part) is not None}
    placed = any(PLACEHOLDER in fields for fields in used.values())
    if r["corpus"] is None:
        if placed:
            part = next(p for p, fields in used.items() if PLACEHOLDER in fields)
            raise PlanError(f"template.{part}", "places {retrieved}, but retrieval.corpus is not "
                            "set: there is nothing to retrieve from.",
                            hint="set retrieval.corpus=FILE (passages with an id and a text field), "
                                 "or remove {retrieved} from the template.")
        return
    if t.get("messages") is not None:
        raise PlanError("retrieval.corpus", "retrieval is for single-turn templates "
                        "(template.prompt); conversations (template.messages) do not place "
                        "{retrieved}.", hint="set retrieval.corpus=null, or use a prompt template.")
    if not placed:
        raise PlanError("retrieval.corpus", "is set, but the template has no {retrieved} "
                        "placeholder: the passages would be retrieved and never shown.",
                        hint='place them in template.prompt, e.g. "Context:\\n{retrieved}\\n\\n'
                             'Question: {question}".')


def check_query(fmt: str, fields: list[str], *, file: str) -> None:
    names = placeholders(fmt, key="retrieval.query")
    if not names:
        raise PlanError("retrieval.query", "names no field: every row would retrieve the same "
                        "passages.", hint="e.g. retrieval.query='{question}'.")
    missing = [n for n in names if n not in fields]
    if missing:
        raise PlanError("retrieval.query", f"reads `{missing[0]}`: `{missing[0]}` is not a field "
                        "of the data.", file=file, hint=f"the fields are: {', '.join(fields)}.")


def load_corpus(path: Path, r: dict, policy: TextPolicy, tokenizer, *, fmt: str = "auto",
                max_mb: float = 1024) -> tuple[Passages, dict]:
    """The corpus's passages (cleaned, cut) and its stats for the plan. PlanError for a corpus that
    is empty, lacks the id or text field, repeats an id, or has fewer passages than retrieval.k."""
    rows = data_mod.read_table(path, key="retrieval.corpus", fmt=fmt, max_mb=max_mb)
    if not rows:
        raise PlanError("retrieval.corpus", "has no passages.", file=str(path),
                        hint="one passage per row, with an id and a text field.")
    locate = data_mod.row_locator(path, fmt=fmt)
    fields = list(dict.fromkeys(str(k) for row in rows[:1000] for k in row))
    for key in ("id_field", "text_field"):
        if r[key] not in fields:
            raise PlanError(f"retrieval.{key}", f"`{r[key]}` is not a field of the corpus.",
                            file=str(path), hint=f"its fields are: {', '.join(fields)}.")
    rows, cleaning = data_mod.prepare_rows(
        rows, fields=[r["id_field"], r["text_field"]], messages=None, policy=policy,
        key="retrieval.corpus", file=str(path), locate=locate)
    ids, texts, seen, empty = [], [], {}, 0
    for i, row in enumerate(rows):
        pid, text = row.get(r["id_field"]), row.get(r["text_field"])
        if pid is None or str(pid) == "" or not text:
            empty += 1
            continue
        pid = str(pid)
        if pid in seen:
            line, where = locate(i)
            raise PlanError("retrieval.corpus", f"{where} repeats the id `{pid}` of an earlier "
                            "passage: a retrieved passage could not be told apart.",
                            file=str(path), line=line, hint=f"give every passage its own "
                                                            f"{r['id_field']}.")
        seen[pid] = i
        ids.append(pid)
        texts.append(text)
    if not ids:
        raise PlanError("retrieval.corpus", f"has no usable passages: all {len(rows)} rows lack "
                        f"`{r['id_field']}` or `{r['text_field']}`.", file=str(path))
    if r["k"] > len(ids):
        raise PlanError("retrieval.k", f"is {r['k']}, but the corpus has {len(ids)} passages.",
                        file=str(path), hint=f"set retrieval.k to at most {len(ids)}.")
    texts, cut = _cut(texts, tokenizer, r["passage_tokens"])
    stats = {"file": str(path), "sha256": sha256_file(path), "passages": len(ids),
             "empty": empty, "cut": cut, "cleaning": cleaning}
    return Passages(ids, texts), stats


def _cut(texts: list[str], tokenizer, limit: int) -> tuple[list[str], int]:
    """Each text cut after `limit` tokens (at a token boundary, never inside an escaped control
    token); how many were cut."""
    from core.tokenizer import ESC_CLOSE, ESC_OPEN

    out, cut = [], 0
    for enc, text in zip(tokenizer.encode_batch(texts, add_special_tokens=False), texts):
        if len(enc.ids) <= limit:
            out.append(text)
            continue
        short = text[:enc.offsets[limit - 1][1]]
        if short.count(ESC_OPEN) > short.count(ESC_CLOSE):
            short = short[:short.rindex(ESC_OPEN)]
        out.append(short.rstrip() + " …")
        cut += 1
    return out, cut


def index_key(stats: dict, r: dict, policy: TextPolicy, tokenizer_hash: str) -> str:
    import bm25s

    material = {"version": INDEX_VERSION, "bm25s": bm25s.__version__, "sha256": stats["sha256"],
                "fields": [r["id_field"], r["text_field"]], "passage_tokens": r["passage_tokens"],
                "text": [policy.normalize, policy.whitespace, policy.control_tokens],
                "tokenizer": tokenizer_hash, "stopwords": _STOPWORDS}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    return tune_home() / "cache" / "retrieval"


# ------------------------------------------------------------------------------ rows

def fill(rows: list[dict], index: Index, *, query: str, k: int, gold: str | None
         ) -> tuple[list[dict], dict]:
    """The rows with {retrieved} filled, and what retrieval did for them: rows, queries that matched
    nothing, and recall@k where the rows name their gold passage."""
    queries = [query_text(row, query) for row in rows]
    hits, no_match = index.search(queries, k)
    out = [{**row, PLACEHOLDER: index.text(h)} for row, h in zip(rows, hits)]
    stats: dict = {"rows": len(rows), "no_match": no_match}
    if gold is not None:
        named = [(row.get(gold), h) for row, h in zip(rows, hits) if row.get(gold) is not None]
        if named:
            found = sum(str(g) in {index.passages.ids[j] for j in h} for g, h in named)
            stats.update(gold_rows=len(named), recall=round(found / len(named), 4))
    return out, stats


def plain(rows: list[dict]) -> list[dict]:
    """The rows without retrieval: {retrieved} says there are no passages."""
    return [{**row, PLACEHOLDER: PLAIN} for row in rows]
