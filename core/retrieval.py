"""The retrieval index, shared by the compiler (which builds it and fills the training rows) and the
runtime (which loads it to retrieve for each prompt at generation time): a BM25 index over passages
(`bm25s`), stored whole under $TUNE_HOME/cache/retrieval/<key>, and the query text of a row.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.templates import placeholders, render

PLACEHOLDER = "retrieved"               # the template's placeholder the passages fill
PLAIN = "(no passages retrieved)"       # what it holds in the test rows scored without retrieval
INDEX_VERSION = 1
_STOPWORDS = "en"


@dataclass(frozen=True)
class Passages:
    ids: list[str]
    texts: list[str]                    # cleaned, cut to passage_tokens


class Index:
    """A BM25 index over passages, and the passages; `search(queries)` → the top-k per query."""

    def __init__(self, bm25, passages: Passages, path: Path):
        self.bm25, self.passages, self.path = bm25, passages, path

    @classmethod
    def build(cls, passages: Passages, *, key: str, cache_dir: Path) -> "Index":
        import bm25s

        path = Path(cache_dir) / key
        if (path / "passages.json").is_file():
            return cls.load(path)
        bm25 = bm25s.BM25()
        bm25.index(bm25s.tokenize(passages.texts, stopwords=_STOPWORDS, show_progress=False),
                   show_progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=path.parent))
        try:
            bm25.save(str(tmp), show_progress=False)
            (tmp / "passages.json").write_text(json.dumps(
                {"version": INDEX_VERSION, "ids": passages.ids, "texts": passages.texts},
                ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, path)            # a directory appears whole, or not at all
        except OSError:
            if not (path / "passages.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(bm25, passages, path)

    @classmethod
    def load(cls, path: str | Path) -> "Index":
        import bm25s

        path = Path(path)
        try:
            doc = json.loads((path / "passages.json").read_text(encoding="utf-8"))
            bm25 = bm25s.BM25.load(str(path), show_progress=False)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"the retrieval index {path} cannot be read ({e}); compile the "
                                    "plan again to rebuild it") from None
        return cls(bm25, Passages(doc["ids"], doc["texts"]), path)

    def search(self, queries: list[str], k: int) -> tuple[list[list[int]], int]:
        """Passage indices, best first, of each query's top k; and how many queries matched no
        passage at all (their k passages are arbitrary)."""
        import bm25s

        if not queries:
            return [], 0
        tokens = bm25s.tokenize(queries, stopwords=_STOPWORDS, show_progress=False,
                                return_ids=False)
        docs, scores = self.bm25.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return docs.tolist(), int((scores.max(axis=1) <= 0).sum())

    def text(self, hits: list[int]) -> str:
        """The {retrieved} text of some passages: each as [id] text, a blank line between."""
        return "\n\n".join(f"[{self.passages.ids[j]}] {self.passages.texts[j]}" for j in hits)


def query_text(values: dict, fmt: str) -> str:
    """The search text of one row (or of a prompt's fields at generation time: a field the query
    reads that the prompt did not give is searched for as the prompt's own text)."""
    needed = placeholders(fmt, key="retrieval.query")
    if any(f not in values for f in needed):
        return " ".join(str(v) for k, v in values.items() if k != PLACEHOLDER)
    return render(values, {"prompt": fmt, "response": "", "system": None})[0]
