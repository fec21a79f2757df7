"""Held-out preference pairs scored: the share the model ranks right, base against tuned.

The test pairs (prompt + chosen, prompt + rejected: the token cache's test units) are packed into
rows as in training, the two replies of a pair side by side, each sequence attending to itself. A
model's score of a reply is the objective's own measure of it: the reply's log-probability — its
sum for dpo and kto, its mean per token for ipo, orpo and simpo, which normalise by length.
`preference_accuracy` is the share of pairs whose chosen reply scores higher than the rejected
one; `mean_margin` the mean difference. Tuned under an objective with a reference model (dpo, ipo,
kto), the implicit reward β·(log π − log π_ref) is reported too: `reward_accuracy` (TRL's
rewards/accuracies on held-out pairs) and `reward_margin`.
The "base" entry is the model training started from: the base model, or init.run's adapter.

A few test prompts are answered by both models, side by side (`samples` in the tuned entry).
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.packing import example_slots, pack_rows
from core.plan import LENGTH_NORMALISED, WITH_REFERENCE, Plan
from core.token_cache import load_examples
from core.tokenizer import load_tokenizer
from runtime import build
from runtime.batching import FIELDS, fill_row
from runtime.preference import token_logps, unit_sums

METRIC = "preference_accuracy"
SAMPLES = 4                     # test prompts answered by base and tuned, side by side


class Pairs:
    """The test pairs one evaluation scores (eval.limit of them, drawn with the seed)."""

    def __init__(self, plan: Plan, limit=None):
        from runtime.metrics import sample_rows

        ex = load_examples(plan.data.cache)
        ids, plens = ex.split("test")
        n = len(ids) // 2
        self.rows = sample_rows(n, plan.eval.limit if limit is None else limit, plan.schedule.seed)
        self.chosen = [np.asarray(ids[2 * i], np.int32) for i in self.rows]
        self.rejected = [np.asarray(ids[2 * i + 1], np.int32) for i in self.rows]
        self.prompt_lens = [int(plens[2 * i]) for i in self.rows]
        self.data_key = plan.data.key

    def __len__(self):
        return len(self.rows)

    def prompts(self) -> list[list[int]]:
        return [c[:p].tolist() for c, p in zip(self.chosen, self.prompt_lens)]


@functools.lru_cache(maxsize=4)
def _scorer(graphdef, chunk: int):
    """sums(state, batch) → per unit slot (row · U + k: the k-th pair of a row) the chosen and
    rejected replies' log-probability sums and token counts. One compiled program for base and
    tuned alike."""

    @jax.jit
    def sums(state, b):
        m = nnx.merge(graphdef, state)
        hidden = m(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"])
        B, T = b["tokens"].shape
        lp, idx, valid = token_logps(hidden, m.lm_head(), b["targets"], b["loss_mask"],
                                     capacity=B * T, chunk=chunk, softcap=m.cfg.final_softcap)
        return unit_sums(lp, idx, valid, b["segment_ids"])

    return sums


def score(plan: Plan, model, pairs: Pairs) -> dict:
    """Per pair: log-probability sums and token counts of the chosen and rejected replies. Pairs
    are packed into rows as in training (several short pairs a row; each sequence attends to
    itself only), so scoring runs over as few rows as hold them."""
    seq_len, batch = plan.schedule.seq_len, plan.eval.batch_size
    graphdef, state = nnx.split(model)
    sums = _scorer(graphdef, plan.runtime.ce_chunk)
    U = seq_len // 2 + 1
    slots = [example_slots(len(c)) + example_slots(len(r))
             for c, r in zip(pairs.chosen, pairs.rejected)]
    rows = sorted(pack_rows(slots, seq_len, np.random.default_rng(0)))
    keys = ("chosen", "rejected", "n_chosen", "n_rejected")
    out = {k: np.zeros(len(pairs), np.float64) for k in keys}
    for start in range(0, len(rows), batch):
        arrays = {k: np.zeros((batch, seq_len), np.int32) for k in FIELDS}
        where = []                                  # (unit slot, pair)
        for r, row in enumerate(rows[start:start + batch]):
            members = []
            for k, i in enumerate(row):
                p = pairs.prompt_lens[i]
                members += [(pairs.chosen[i], p), (pairs.rejected[i], p)]
                where.append((r * U + k, i))
            fill_row(arrays, r, members)
        got = jax.device_get(sums(state, {k: jnp.asarray(v) for k, v in arrays.items()}))
        for key, values in zip(keys, got):
            values = np.asarray(values)
            for slot, i in where:
                out[key][i] = values[slot]
    return out


def result(plan: Plan, scores: dict, *, which: str, reference: dict | None = None,
           seconds: float | None = None, pairs: Pairs) -> dict:
    """The eval.json entry of one model's scores (and, tuned, its implicit rewards against the
    reference's scores)."""
    o = plan.objective
    averaged = o.kind in LENGTH_NORMALISED
    c, r = scores["chosen"], scores["rejected"]
    if averaged:
        c, r = c / np.maximum(scores["n_chosen"], 1), r / np.maximum(scores["n_rejected"], 1)
    margin = c - r
    out = {"model": which, "metric": METRIC, "value": float(np.mean(margin > 0)) if len(c) else 0.0,
           "n": int(len(c)), "mode": "preference", "limit": plan.eval.limit,
           "data_key": pairs.data_key, "seconds": seconds, "objective": o.kind,
           "score": "mean log-probability per token" if averaged else "log-probability",
           "mean_margin": float(np.mean(margin)) if len(c) else 0.0,
           "logps_chosen": float(np.mean(scores["chosen"])) if len(c) else 0.0,
           "logps_rejected": float(np.mean(scores["rejected"])) if len(c) else 0.0,
           "rows": pairs.rows}
    if reference is not None and o.kind in WITH_REFERENCE:
        rc = o.beta * (scores["chosen"] - reference["chosen"])
        rr = o.beta * (scores["rejected"] - reference["rejected"])
        out.update(reward_accuracy=float(np.mean(rc > rr)), reward_margin=float(np.mean(rc - rr)),
                   rewards_chosen=float(np.mean(rc)), rewards_rejected=float(np.mean(rr)))
    return out


def start_model(plan: Plan, adapter_dir):
    """The model training started from, built with the adapter's shape: the base model (LoRA B = 0),
    or init.run's adapter loaded."""
    from runtime.peft import load_peft_adapter

    start = None
    if plan.objective.init_run is not None and plan.objective.reference != "none":
        start = build.trained_dir(plan, plan.objective.init_run)
    if plan.adapter.kind == "full":
        return build.scoring_model(plan, start)
    model = build.scoring_model(plan, adapter_dir, adapter_weights=False)
    if start is not None:
        load_peft_adapter(model, start)
    return model


def evaluate_pairs(plan: Plan, adapter_dir=None, *, limit=None, samples: int = SAMPLES
                   ) -> dict[str, dict]:
    """{"base": ..., "tuned": ...} (tuned only with an adapter): both models on the same test pairs,
    and a few prompts answered by each."""
    from runtime.decode import greedy_generate
    from runtime.peft import load_peft_adapter
    from runtime.progress import log

    pairs = Pairs(plan, limit)
    if not len(pairs):
        raise ValueError("there are no test pairs to score: set data.test_path (held-out "
                         "prompt/chosen/rejected rows)")
    tokenizer = load_tokenizer(plan.model.dir)
    dec = build.decoding(plan, tokenizer)
    model = start_model(plan, adapter_dir) if adapter_dir is not None else \
        build.scoring_model(plan)
    log(f"eval: {len(pairs)} test pairs, {METRIC} ({plan.objective.kind}'s score)")
    shown = pairs.prompts()[:samples]
    t0 = time.perf_counter()
    base_scores = score(plan, model, pairs)
    base_text = greedy_generate(model, shown, max_new_tokens=plan.eval.max_new_tokens, **dec)
    results = {"base": result(plan, base_scores, which="base", pairs=pairs,
                              seconds=time.perf_counter() - t0)}
    if adapter_dir is None:
        return results
    if plan.adapter.kind == "full":
        model = build.scoring_model(plan, adapter_dir)
    else:
        load_peft_adapter(model, adapter_dir)
    t0 = time.perf_counter()
    tuned_scores = score(plan, model, pairs)
    tuned_text = greedy_generate(model, shown, max_new_tokens=plan.eval.max_new_tokens, **dec)
    tuned = result(plan, tuned_scores, which="tuned", reference=base_scores, pairs=pairs,
                   seconds=time.perf_counter() - t0)
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True).strip()  # noqa: E731
    tuned["adapter"] = str(adapter_dir)
    tuned["samples"] = [
        {"prompt": decode(p), "chosen": decode(pairs.chosen[i][pairs.prompt_lens[i]:]),
         "rejected": decode(pairs.rejected[i][pairs.prompt_lens[i]:]), "base": decode(b),
         "tuned": decode(t)}
        for i, (p, b, t) in enumerate(zip(shown, base_text, tuned_text))]
    results["tuned"] = tuned
    return results
