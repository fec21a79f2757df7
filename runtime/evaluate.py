"""Score a model on the plan's test split: the base model, or base + a trained LoRA adapter.

The test prompts are the token ids the compiler made (the token cache's split "test": the prompt is
ids[:prompt_len], tokenised exactly as in training); the references are the test answers' text.
`eval.limit` scores N test rows drawn with the plan's seed (in file order; the same rows for base
and tuned, with and without retrieval): a test file sorted by answer — PubMedQA's is — would make
its first N rows one class.

Three modes (eval.mode, resolved by the compiler):
- constrained (classification): greedy decoding within the plan's label set (a prefix trie over the
  labels' tokens as training saw them, end token included), so every answer is a label. Free
  greedy decoding runs from the same prefill and is reported beside it ("free": its accuracy and
  how often it is no label at all).
- generate: greedy decoding until an end token or eval.max_new_tokens; the decoded text is scored.
- choices (classification): no generation; every label is scored by its total log-likelihood after
  the prompt, and the most likely one is the prediction.
- head (a run trained with adapter.head=classifier, its tuned model only): no generation; one
  forward pass per prompt, the argmax of the classification head's logits is the prediction
  (runtime/head.py). The base model of such a run has no trained head: it is scored by eval.mode,
  as any base model, so base and tuned are the same rows scored each in its own way.

eval.json (written by `write_eval`, a core.records.EvalFile): the headline result at the top level
({"metric", "value", "n", "per_class", "worst", ...} of the tuned model when there is one, else of
the base model), plus "base" and "tuned" entries with the full results of each model evaluated on
the same rows. In generate mode each entry also has both generation metrics, exact_match and
rouge_l, whichever is the headline, and `samples`: the first rows scored (runtime.metrics.SAMPLES)
with the prompt's end, the reference, the prediction and its ROUGE-L, which the report shows base
beside tuned.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from core.token_cache import load_examples
from core.files import write_atomic
from core.plan import Plan
from core.records import ENTRIES, NO_RETRIEVAL, EvalFile, EvalResult
from core.tokenizer import load_tokenizer
from runtime import metrics as M
from runtime.metrics import sample_rows
from runtime import build
from runtime.decode import LabelTrie, choice_logprobs, classify, greedy_generate

EVAL_FILE = "eval.json"


class TestSet:
    """The rows one evaluation scores: prompt ids, prompt texts and references. split: test (as the
    plan prompts) or test_plain (the same rows without retrieved passages)."""

    def __init__(self, plan: Plan, tokenizer, limit=None, split: str = "test"):
        ex = load_examples(plan.data.cache)
        ids, prompt_lens = ex.split(split)
        self.rows = sample_rows(len(ids), limit, plan.schedule.seed)
        self.prompts = [np.asarray(ids[i][:int(prompt_lens[i])]).tolist() for i in self.rows]
        references = ex.references_of(split)
        self.references = [references[i] for i in self.rows]
        self.tokenizer = tokenizer
        self.data_key = plan.data.key

    def __len__(self):
        return len(self.prompts)

    def prompt_texts(self) -> list[str]:
        return self.tokenizer.decode_batch(self.prompts, skip_special_tokens=True)


def evaluate(plan: Plan, run_dir=None, adapter_dir=None, *, limit=None, model=None, tokenizer=None,
             which: str | None = None, write: bool | None = None, verbose: bool = True,
             retrieval: bool = True) -> dict:
    """Score the base model (adapter_dir None) or base + the LoRA adapter in adapter_dir on the
    plan's test split; returns the result dict (see runtime.metrics.score, plus "model", "mode",
    "seconds", "predictions", ...).

    With run_dir, the result is also written to run_dir/eval.json (merged with the other model's
    entry already there, when it scored the same rows) and printed: what `tune eval` does.
    `model` (an already loaded model) skips loading; `limit` overrides eval.limit. With a retrieval
    plan, retrieval=False scores the same rows without the retrieved passages (entry
    "<which>_no_retrieval")."""
    from runtime.progress import Progress, log

    if plan.eval.mode == "preference":          # held-out pairs: base and tuned together
        from runtime.preference_eval import evaluate_pairs

        results = evaluate_pairs(plan, adapter_dir, limit=limit)
        _keep(run_dir, results, write=write, verbose=verbose)
        return results["tuned" if adapter_dir is not None else "base"]
    metric, mode, max_new = plan.eval.metric, plan.eval.mode, plan.eval.max_new_tokens
    limit = plan.eval.limit if limit is None else limit
    which = which or ("base" if adapter_dir is None else "tuned")
    head = adapter_dir is not None and plan.adapter.head != "none"
    if head:
        mode = "head"
    plain = not retrieval and plan.retrieval is not None
    if plain:
        which += NO_RETRIEVAL
    tokenizer = tokenizer or load_tokenizer(plan.model.dir)
    test = TestSet(plan, tokenizer, limit, split="test_plain" if plain else "test")
    if not len(test):
        raise ValueError("there are no test examples to score: set data.test_path (a held-out file "
                         "with the same fields as data.path)")
    if model is None:
        model = build.scoring_model(plan, adapter_dir)
    if head:
        _check_head(plan, model, adapter_dir)

    t0 = time.perf_counter()
    log(f"eval ({which}): {len(test)} test rows, {metric}, mode {mode}")
    with Progress(len(test), description=f"eval {which}",
                  every=plan.runtime.progress_every) as bar:
        predictions, generated_tokens, free = _predict(plan, model, tokenizer, test, bar.update,
                                                       head=head)
    seconds = time.perf_counter() - t0

    known = [label.text for label in plan.data.labels]
    result = M.score(metric, predictions, test.references, known, prompts=test.prompt_texts())
    if mode == "generate":      # free text: both generation metrics, and the first rows to read
        result.update(M.generation_scores(predictions, test.references))
        shown = test.prompts[:M.SAMPLES]
        result["samples"] = M.samples(tokenizer.decode_batch(shown, skip_special_tokens=True),
                                      test.references, predictions, test.rows)
    if plan.data.task == "classification" and plan.data.labels:
        # always answering the most frequent training label, on the rows scored
        top = M.normalise(plan.data.labels[0].text, classification=True)
        result["majority_baseline"] = sum(M.normalise(r, classification=True) == top
                                          for r in test.references) / max(len(test.references), 1)
    if free is not None:        # constrained decoding: free generation on the same rows, beside it
        valid = {M.normalise(x, classification=True) for x in known}
        result["free"] = {"accuracy": M.accuracy(free, test.references),
                          "invalid_rate": sum(M.normalise(x, classification=True) not in valid
                                              for x in free) / len(free),
                          "max_new_tokens": max_new}
    result.update({
        "model": which,
        "adapter": None if adapter_dir is None else str(adapter_dir),
        "mode": mode,
        "retrieval": None if plan.retrieval is None else not plain,
        "max_new_tokens": max_new if mode not in ("choices", "head") else None,
        "limit": limit,
        "data_key": test.data_key,
        "seconds": seconds,
        "rows_per_s": len(test) / seconds if seconds > 0 else None,
        "generated_tokens": generated_tokens,
        "predictions": predictions,
        "references": test.references,
        "rows": test.rows,
    })
    if free is not None:
        result["free_predictions"] = free
    _keep(run_dir, result, write=write, verbose=verbose)
    return result


def _keep(run_dir, results: dict, *, write: bool | None, verbose: bool) -> None:
    """Write results to run_dir/eval.json (write=None: when there is a run_dir) and print it."""
    if write is None:
        write = run_dir is not None
    if write:
        write_eval(run_dir, results)
        if verbose:
            print_results(EvalFile.read(run_dir))


def _check_head(plan: Plan, model, adapter_dir) -> None:
    """A head run's adapter must carry a head over this plan's label set, in its order."""
    from core.errors import PlanError
    from runtime.head import check_labels

    labels = [x.text for x in plan.data.labels]
    rows = None if model.score is None else model.score.shape[0]
    if rows != len(labels):
        has = "none" if rows is None else f"one of {rows}"
        raise PlanError("run", f"the plan trains a classification head (adapter.head="
                        f"{plan.adapter.head}) over {len(labels)} labels, but the adapter in "
                        f"{adapter_dir} has {has}.",
                        file=str(adapter_dir), hint="score the run with its own config, or train "
                                                    "it again.")
    check_labels(adapter_dir, labels)


def _predict(plan: Plan, model, tokenizer, test: TestSet, progress, *, head: bool = False):
    """(predictions, generated tokens, free-generation predictions or None) of the model on the
    test rows, by eval.mode: constrained decoding within the label set (and free decoding from the
    same prefill, to show beside it), free decoding, or the likeliest label — or, with `head`, the
    argmax of the classification head (one forward pass per row)."""
    ev, labels = plan.eval, plan.data.labels
    dec = build.decoding(plan, tokenizer)
    if head:
        from runtime.head import predict

        scores = predict(model, test.prompts, batch_size=dec["batch_size"], pad_id=dec["pad_id"],
                         progress=progress)
        return [labels[k].text for k in np.argmax(scores, axis=1)], 0, None

    def text(ids_list):
        return [t.strip() for t in tokenizer.decode_batch(ids_list, skip_special_tokens=True)]

    if ev.mode in ("constrained", "choices") and not labels:
        raise ValueError(f"eval.mode={ev.mode} needs the plan's label set (a classification task)")
    if ev.mode == "constrained":
        picked, free = classify(model, test.prompts, LabelTrie.build([x.ids for x in labels]),
                                free_tokens=ev.max_new_tokens, progress=progress, **dec)
        return [labels[k].text for k in picked], sum(len(f) for f in free), text(free)
    if ev.mode == "choices":
        scores = choice_logprobs(model, test.prompts, [list(x.ids) for x in labels],
                                 batch_size=dec["batch_size"], pad_id=dec["pad_id"],
                                 progress=progress)
        return [labels[k].text for k in np.argmax(scores, axis=1)], 0, None
    if ev.mode == "generate":
        out = greedy_generate(model, test.prompts, max_new_tokens=ev.max_new_tokens,
                              progress=progress, **dec)
        return text(out), sum(len(o) for o in out), None
    raise ValueError(f"unknown eval.mode {ev.mode!r}; expected constrained, generate or choices")


def evaluate_before_after(plan: Plan, run_dir, *, limit=None, verbose: bool = True) -> dict | None:
    """Score base and tuned (run_dir/adapter, or run_dir/model after adapter.kind=full) on the same
    test rows; write run_dir/eval.json with both.
    Returns the EvalFile, or None when the plan has no test examples.

    One model is loaded, built with the adapter's LoRA shape: its LoRA B factors start at zero, so
    it first IS the base model; then the adapter is loaded into it in place. Base and tuned thus
    share one compiled decoding program."""
    from runtime.peft import load_peft_adapter
    from runtime.progress import log

    if not plan.data.sizes.get("test"):
        log("no test examples (data.test_path not set): skipping the before/after evaluation")
        return None
    adapter_dir = build.trained_dir(plan, run_dir)
    if plan.eval.mode == "preference":
        evaluate(plan, run_dir, adapter_dir, limit=limit, verbose=verbose)
        return EvalFile.read(run_dir)
    model = build.scoring_model(plan, adapter_dir, adapter_weights=False)
    tokenizer = load_tokenizer(plan.model.dir)
    # with retrieval: each model with and without the passages (fine-tuning vs RAG, and both)
    ways = (True, False) if plan.retrieval is not None else (True,)
    results = {}
    for retrieval in ways:
        r = evaluate(plan, limit=limit, model=model, tokenizer=tokenizer, which="base",
                     write=False, retrieval=retrieval)
        results[r["model"]] = r
    if plan.adapter.kind == "full":         # a whole model: the tuned one is another model
        model = build.scoring_model(plan, adapter_dir)
    else:
        load_peft_adapter(model, adapter_dir)
    for retrieval in ways:
        r = evaluate(plan, adapter_dir=adapter_dir, limit=limit, model=model, tokenizer=tokenizer,
                     which="tuned", write=False, retrieval=retrieval)
        results[r["model"]] = r
    write_eval(run_dir, results)
    out = EvalFile.read(run_dir)
    if verbose:
        print_results(out)
    return out


# --- eval.json --------------------------------------------------------------------------------

_PER_EXAMPLE = ("predictions", "references", "free_predictions", "rows")


def _summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in _PER_EXAMPLE}


def write_eval(run_dir, results: dict) -> Path:
    """Write run_dir/eval.json (an EvalFile) and run_dir/eval_predictions.jsonl.

    `results` is one result of `evaluate` (its "model" says base or tuned, or either _no_retrieval)
    or {"base": ..., "tuned": ..., ...}. A single result is merged with the other entries of an
    existing eval.json that scored the same rows with the same metric (same data key, n and
    metric); otherwise it replaces the file."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    single = not any(k in results for k in ENTRIES)
    full = {results.get("model") or "tuned": results} if single else \
        {k: results[k] for k in ENTRIES if results.get(k)}
    entries = {name: EvalResult.from_dict(_summary(r)) for name, r in full.items()}
    old = EvalFile.read(run_dir) if single else None
    if old is not None:
        new = next(iter(entries.values()))
        for name, prev in old.entries.items():
            if name not in entries and prev.same_rows(new):
                entries[name] = prev
    path = EvalFile({k: entries[k] for k in ENTRIES if k in entries} or entries).write(run_dir)

    # per-example predictions, one line per (model, row), for anyone who wants to look closer
    rows = []
    for name, r in full.items():
        if "predictions" not in r:
            continue
        index = r.get("rows") or range(len(r["predictions"]))
        for i, p, ref in zip(index, r["predictions"], r.get("references") or []):
            rows.append({"model": name, "index": i, "reference": ref, "prediction": p})
    if rows:
        write_atomic(run_dir / "eval_predictions.jsonl",
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def format_results(ev: EvalFile) -> str:
    """eval.json as a few lines of text."""
    rag = " + retrieval" if ev.headline.retrieval else ""     # the plan's prompts hold passages
    entries = [(n + rag, ev.entries[n]) for n in ("base", "tuned") if n in ev.entries] or \
        [(ev.headline.model, ev.headline)]
    metric = entries[-1][1].metric
    delta = ev.delta
    lines = [f"{metric} on {entries[-1][1].n} test rows: " + ", ".join(
        f"{n} {r.value:.4f}" for n, r in entries)
        + (f" (change {delta:+.4f})" if delta is not None else "")]
    for key in ("exact_match", "rouge_l"):      # free generation's other metric, beside
        scored = [(n, r.get(key)) for n, r in entries if isinstance(r.get(key), (int, float))]
        if key != metric and scored:
            lines.append(f"  {key}: " + ", ".join(f"{n} {v:.4f}" for n, v in scored))
    pcs = [(n.removesuffix(rag), r.get("per_class")) for n, r in entries if r.get("per_class")]
    if pcs and len(pcs[-1][1]) <= 30:
        classes = sorted({c for _, pc in pcs for c in pc},
                         key=lambda c: -max(pc.get(c, {}).get("support", 0) for _, pc in pcs))
        width = min(32, max(len(c) for c in classes))
        lines.append(f"  {'class':<{width}}  support  " + "  ".join(f"F1 {n:>5}" for n, _ in pcs))
        for c in classes:
            support = max(pc.get(c, {}).get("support", 0) for _, pc in pcs)
            f1s = "  ".join(f"{pc[c]['f1']:8.3f}" if c in pc else f"{'—':>8}" for _, pc in pcs)
            lines.append(f"  {c[:width]:<{width}}  {support:7d}  {f1s}")
    tuned = ev.entries.get("tuned")
    if tuned is not None and tuned.get("reward_accuracy") is not None:
        lines.append(f"  implicit reward (β·log-ratio to the reference): accuracy "
                     f"{tuned.get('reward_accuracy'):.4f}, mean margin "
                     f"{tuned.get('reward_margin'):+.4f}")
    if ev.four_way:
        lines.append("  with and without retrieval: " + ", ".join(
            f"{label} {value:.4f}" for label, value in ev.four_way.items()))
    return "\n".join(lines)


def print_results(ev: EvalFile) -> None:
    print(format_results(ev), file=sys.stdout, flush=True)
