"""Scoring generated answers against references: accuracy, macro F1, exact match, ROUGE-L.

Pure Python (no JAX): the same functions score a run's predictions, a benchmark's, or a test's.

Classification metrics (accuracy, macro_f1) compare *normalised labels*: the first line of the
answer, stripped, casefolded, without trailing punctuation or end tokens — so "Bullish.\n" and
"bullish" are the same answer. Generation metrics (exact_match, rouge_l) keep the whole answer.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from core.labels import END_TOKENS, normalise  # noqa: F401 — what counts as the same label

CLASSIFICATION = ("accuracy", "macro_f1")
METRICS = ("accuracy", "macro_f1", "exact_match", "rouge_l")

# --- classification -----------------------------------------------------------------------------

def accuracy(predictions, references) -> float:
    """Fraction of predictions whose normalised label equals the reference's."""
    pairs = _label_pairs(predictions, references)
    return sum(p == r for p, r in pairs) / len(pairs) if pairs else 0.0


def per_class(predictions, references, labels=()) -> dict[str, dict]:
    """Precision, recall, F1 and support per class of the label set.

    The label set is the union of the (normalised) references and the known labels. A prediction
    outside it is simply wrong: a false negative for its reference's class, a false positive for
    no class. Classes with no support and no predictions have no defined F1 and are left out."""
    pairs = _label_pairs(predictions, references)
    label_set = {normalise(x, classification=True) for x in labels} | {r for _, r in pairs}
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, r in pairs:
        if p == r:
            tp[r] += 1
        else:
            fn[r] += 1
            if p in label_set:
                fp[p] += 1
    out = {}
    for c in sorted(label_set):
        support = tp[c] + fn[c]
        predicted = tp[c] + fp[c]
        if support == 0 and predicted == 0:
            continue
        precision = tp[c] / predicted if predicted else 0.0
        recall = tp[c] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[c] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def macro_f1(predictions, references, labels=()) -> float:
    """Unweighted mean of per-class F1 over the classes of `per_class`."""
    classes = per_class(predictions, references, labels)
    return sum(c["f1"] for c in classes.values()) / len(classes) if classes else 0.0


def _label_pairs(predictions, references):
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [(normalise(p, classification=True), normalise(r, classification=True))
            for p, r in zip(predictions, references)]


# --- generation ---------------------------------------------------------------------------------

def exact_match(predictions, references) -> float:
    """Fraction of predictions equal to the reference after stripping, casefolding and collapsing
    whitespace (the whole answer, not only its first line)."""
    scores = _exact_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


def _exact_scores(predictions, references):
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [float(normalise(p) == normalise(r)) for p, r in zip(predictions, references)]


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)·len(b)) time,
    O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_pair(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta=1) of one prediction: LCS of lowercased whitespace tokens."""
    p = str(prediction).casefold().split()
    r = str(reference).casefold().split()
    if not p and not r:
        return 1.0
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions, references) -> float:
    """Mean ROUGE-L F-measure over examples."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = [rouge_l_pair(p, r) for p, r in zip(predictions, references)]
    return sum(scores) / len(scores) if scores else 0.0


# --- one entry point ----------------------------------------------------------------------------

def score(metric: str, predictions, references, labels=(), *, prompts=None, worst_k: int = 5,
          tail_chars: int = 200) -> dict:
    """Score predictions with `metric`.

    Returns {"metric", "value", "n", "per_class" (classification metrics only), "worst": up to
    `worst_k` examples (prompt tail, reference, prediction, score) the model got most wrong, in
    file order among equally bad ones}."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if metric in CLASSIFICATION:
        pairs = _label_pairs(predictions, references)
        per_example = [float(p == r) for p, r in pairs]
        classes = per_class(predictions, references, labels)
        value = (sum(per_example) / len(per_example) if per_example else 0.0) \
            if metric == "accuracy" else \
            (sum(c["f1"] for c in classes.values()) / len(classes) if classes else 0.0)
    elif metric == "exact_match":
        per_example = _exact_scores(predictions, references)
        value = sum(per_example) / len(per_example) if per_example else 0.0
        classes = None
    else:
        per_example = [rouge_l_pair(p, r) for p, r in zip(predictions, references)]
        value = sum(per_example) / len(per_example) if per_example else 0.0
        classes = None

    order = sorted(range(len(per_example)), key=lambda i: per_example[i])
    worst = []
    for i in order[:worst_k]:
        if per_example[i] >= 1.0:
            break
        prompt = "" if prompts is None else str(prompts[i])
        worst.append({
            "index": i,
            "prompt_tail": ("…" + prompt[-tail_chars:]) if len(prompt) > tail_chars else prompt,
            "reference": references[i],
            "prediction": predictions[i],
            "score": per_example[i],
        })
    out = {"metric": metric, "value": value, "n": len(predictions)}
    if classes is not None:
        out["per_class"] = classes
        out["accuracy"] = sum(per_example) / len(per_example) if per_example else 0.0
        out["macro_f1"] = sum(c["f1"] for c in classes.values()) / len(classes) if classes else 0.0
        if labels:
            out["confusion"] = confusion(predictions, references, labels)
    out["worst"] = worst
    return out


SAMPLES = 8             # generate mode: the rows of prediction beside reference eval.json keeps
SAMPLE_CHARS = 300      # ... each prompt cut to this many characters (its end, where it asks)


def generation_scores(predictions, references) -> dict:
    """Both generation metrics, whichever one is the headline: {"exact_match", "rouge_l"}."""
    return {"exact_match": exact_match(predictions, references),
            "rouge_l": rouge_l(predictions, references)}


def samples(prompts, references, predictions, rows, *, chars: int = SAMPLE_CHARS) -> list[dict]:
    """The first len(prompts) rows scored, to read side by side: {"index" (the test row, so that
    two models' samples line up), "prompt" (its last `chars` characters), "reference",
    "prediction", "rouge_l"}."""
    out = []
    for prompt, ref, pred, row in zip(prompts, references, predictions, rows):
        prompt = str(prompt)
        out.append({"index": int(row),
                    "prompt": ("…" + prompt[-(chars - 1):]) if len(prompt) > chars else prompt,
                    "reference": ref, "prediction": pred, "rouge_l": rouge_l_pair(pred, ref)})
    return out


def confusion(predictions, references, labels) -> dict:
    """Counts of (reference, prediction) label pairs: {"labels": the known labels (normalised, in
    the given order), "matrix": rows = reference, columns = prediction, with a last column
    "(other)" for predictions outside the label set and a last row for references outside it}."""
    keys = list(dict.fromkeys(normalise(x, classification=True) for x in labels))
    index = {k: i for i, k in enumerate(keys)}
    other = len(keys)
    matrix = [[0] * (other + 1) for _ in range(other + 1)]
    for p, r in _label_pairs(predictions, references):
        matrix[index.get(r, other)][index.get(p, other)] += 1
    return {"labels": keys, "matrix": matrix}


def sample_rows(n: int, limit, seed: int) -> list[int]:
    """Which of n test rows eval.limit scores: all of them, or `limit` drawn with the seed, in
    order."""
    if limit is None or int(limit) <= 0 or int(limit) >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[:int(limit)].tolist())
