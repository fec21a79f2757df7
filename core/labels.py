"""Labels: what counts as the same answer, and whether a task's answers form a closed set.

Shared by the compiler (which decides, from the training answers, that a task is classification and
records its label set in the plan) and the runtime (which scores and decodes against that set).
Pure Python.

A classification task is one whose training answers are a few distinct labels, each seen several
times: at most MAX_CLASSES distinct answers (normalised), at least MIN_MEAN_COUNT rows per label on
average, none longer than MAX_LABEL_TOKENS tokens. `data.task` can also say so (or the contrary).
"""
from __future__ import annotations

from collections import Counter

MAX_CLASSES = 200
MIN_MEAN_COUNT = 3.0
MAX_LABEL_TOKENS = 32
RARE_CLASS = 5            # fewer training rows than this for a label: a warning

# End-of-turn markers a decoder may leave in the text when special tokens are not skipped.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>",
              "<end_of_turn>", "<eos>")
_TRAILING = ".,;:!?\"'`)]}»“”’ \t"
_LEADING = "\"'`([{«“‘ \t"


def normalise(text: str, *, classification: bool = False) -> str:
    """Strip surrounding whitespace and casefold. For classification also keep only the first
    non-empty line and drop end tokens and surrounding punctuation/quotes — so "Bullish.\\n" and
    "bullish" are the same label."""
    text = "" if text is None else str(text)
    for tok in END_TOKENS:
        text = text.replace(tok, "\n" if classification else "")
    if classification:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        text = lines[0] if lines else ""
        text = text.strip().rstrip(_TRAILING).lstrip(_LEADING)
    return " ".join(text.split()).casefold()


def answer_set(responses: list[str], tails: list[tuple[int, ...]], *, limit: int) -> list[dict]:
    """The distinct training answers, most frequent first: {"key" (normalised), "text" (as written
    most often), "ids" (the supervised tokens training saw most often for it, end token included),
    "count"}. [] when there are more than `limit` distinct answers (an open-ended task)."""
    memo: dict[str, str] = {}                  # data repeats its answers: each normalised once
    seen: set[str] = set()
    for r in responses:
        if r not in memo:
            memo[r] = normalise(r, classification=True)
            seen.add(memo[r])
            if len(seen) > limit:
                return []                      # open-ended: stop before normalising every answer
    keys = [memo[r] for r in responses]
    counts = Counter(keys)
    if len(counts) > limit:
        return []
    texts: dict[str, Counter] = {}
    ids: dict[str, Counter] = {}
    for key, response, tail in zip(keys, responses, tails):
        texts.setdefault(key, Counter())[response.strip()] += 1
        ids.setdefault(key, Counter())[tuple(tail)] += 1
    return [{"key": key, "text": texts[key].most_common(1)[0][0],
             "ids": list(ids[key].most_common(1)[0][0]), "count": n}
            for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def is_classification(answers: list[dict], n_train: int) -> bool:
    """Whether these training answers (answer_set) form a closed label set."""
    return (0 < len(answers) <= MAX_CLASSES and n_train >= MIN_MEAN_COUNT * len(answers)
            and max(len(a["ids"]) for a in answers) <= MAX_LABEL_TOKENS)
