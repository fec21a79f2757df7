"""`tune plan`: the plan as a person reads it — panels for model, data, template, adapter, schedule,
resources and warnings (the JSON is in plan.json)."""
from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from core.packing import attention_blocks, trim_granule

OPEN, CLOSE = "⟦", "⟧"   # core.templates marks the supervised span with these


def print_plan(plan, *, run_dir=None, elapsed: float | None = None, console: Console | None = None
               ) -> None:
    console = console or Console(soft_wrap=False, highlight=False)
    for part in render(plan, run_dir=run_dir, elapsed=elapsed):
        console.print(part)


def render(plan, *, run_dir=None, elapsed: float | None = None) -> list:
    parts = [_header(plan, run_dir, elapsed), _model(plan), _data(plan), _template(plan),
             _retrieval(plan), _adapter(plan), _objective(plan), _schedule(plan), _resources(plan)]
    if plan.warnings:
        parts.append(_warnings(plan))
    return [p for p in parts if p is not None]


# ------------------------------------------------------------------------------ formatting

def _n(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:,.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{int(x):,}"


def _params(n) -> str:
    if not n:
        return "0"
    n = float(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}" if unit == "GiB" else f"{n / div:.0f} {unit}"
    return f"{int(n)} B"


def _duration(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _kv(rows) -> Table:
    t = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        if v is not None:
            t.add_row(k, v if isinstance(v, Text) else str(v))
    return t


def _panel(title: str, body, style: str = "cyan") -> Panel:
    return Panel(body, title=f"[bold]{title}[/bold]", title_align="left", border_style=style,
                 box=box.ROUNDED, expand=True)


# ------------------------------------------------------------------------------ panels

def _header(plan, run_dir, elapsed) -> Text:
    t = Text()
    t.append("plan ", style="bold")
    t.append(plan.hash[:12], style="bold magenta")
    r = plan.recipe
    if r:
        t.append("  recipe ", style="dim")
        t.append(r.name, style="bold cyan")
        chain = [c.name for c in r.chain][:-1]
        if chain:
            t.append(f" (extends {', '.join(chain)})", style="dim")
        t.append(f"\nrecipe file {r.path}  sha256 {r.chain[-1].sha256[:16]}", style="dim")
    if run_dir is not None:
        t.append("\nrun dir ", style="dim")
        t.append(str(Path(run_dir)))
    if elapsed is not None:
        t.append(f"   compiled in {_duration(elapsed)}", style="dim")
    return t


def _model(plan) -> Panel:
    m, c = plan.model, plan.model.config
    mlp = "" if c.num_experts else f"mlp {c.intermediate_size} · "     # experts: their own line
    shape = (f"{c.num_layers} layers · hidden {c.hidden_size} · {mlp}heads "
             f"{c.num_heads}/{c.num_kv_heads} kv · head dim {c.head_dim} · vocab {_n(c.vocab_size)}")
    return _panel("model", _kv([
        ("name", f"{m.name}  ({m.architecture}, {m.source})"),
        ("params", _params(m.params) if not c.num_experts else
         f"{_params(m.params)} total · {_params(c.active_param_count())} active per token"),
        ("shape", shape),
        *(("experts", line) for line in [_experts_line(plan)] if line),
        *(("attention", line) for line in [_attention_line(c)] if line),
        ("dir", m.dir),
        ("chat template", "yes" if m.chat_template else "none"),
    ]))


def _experts_line(plan) -> str:
    """A mixture of experts: its experts, the routing, the experts' share of the weights' memory
    and the load-balancing loss's weight in training."""
    c, o = plan.model.config, plan.objective
    if not c.num_experts:
        return ""
    width = {"float32": 4, "bfloat16": 2}[plan.runtime.param_dtype]
    weights = "renormalised" if c.norm_topk_prob else "as routed"
    aux = (f"load-balancing loss × {o.router_aux_coef:g} in training" if not o.preference
           else "no load-balancing loss (preference objective)")
    return (f"{c.num_experts} per layer (mlp {c.expert_intermediate_size} each) · top "
            f"{c.experts_per_token} per token, weights {weights}, no token dropped · {aux} · "
            f"expert weights {_bytes(c.expert_params() * width)} "
            f"({c.expert_params() / c.param_count():.0%} of the model)")


def _attention_line(c) -> str:
    """What sets the model's attention apart from plain causal attention over the whole context:
    sliding windows (and which layers have them), Gemma 3's second RoPE base, soft-capping."""
    parts = []
    windows = [w for w in c.sliding_windows if w]
    if windows:
        sizes = sorted(set(windows))
        parts.append(f"{len(windows)} of {c.num_layers} layers local (window "
                     f"{'/'.join(f'{w:,}' for w in sizes)} tokens)")
        if c.local_rope_theta is not None:
            parts.append(f"RoPE base {c.local_rope_theta:g} local, {c.rope_theta:g} global")
    if c.attn_softcap is not None:
        parts.append(f"scores soft-capped at {c.attn_softcap:g}")
    if c.final_softcap is not None:
        parts.append(f"logits soft-capped at {c.final_softcap:g}")
    return " · ".join(parts)


def _data(plan) -> Panel:
    d = plan.data
    tr, te = d.train, d.test
    if not tr and not te:
        return _panel("data", Text("no data (generation only)", style="dim"))
    pref = d.unit > 1
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    t.add_column("split", style="bold")
    cols = (("read", "kept", "missing", "empty", "identical", "duplicate", "units") if pref else
            ("rows read", "kept", "missing field", "empty field", "duplicate", "examples"))
    for col in cols:
        t.add_column(col, justify="right")
    if tr:
        dr = tr.dropped
        same = (_n(dr.get("identical", 0)),) if pref else ()
        t.add_row("train", _n(tr.read), _n(tr.kept), _n(dr.get("missing_field", 0)),
                  _n(dr.get("empty_field", 0)), *same, _n(dr.get("duplicate", 0)),
                  _n(d.sizes.get("train")))
        t.add_row("val", "", _n(tr.val), "", "", *(("",) if pref else ()), "",
                  _n(d.sizes.get("val")))
    if te:
        dr = te.dropped
        same = (_n(dr.get("identical", 0)),) if pref else ()
        t.add_row("test", _n(te.read), _n(te.kept), _n(dr.get("missing_field", 0)),
                  _n(dr.get("empty_field", 0)), *same, "–", _n(d.sizes.get("test")))
    tok, sup = d.tokens, d.supervised
    extra = [
        ("train file", _file(tr) if tr else None),
        ("test file", _file(te) if te else None),
        ("validation", _validation(d) if tr else None),
        ("sampled", f"{_n(tr.sampled)} of {_n(tr.kept)} usable rows (data.max_rows={d.max_rows})"
         if tr and d.max_rows else None),
        ("tokens", f"p50 {_n(tok.get('p50'))} · p95 {_n(tok.get('p95'))} · max {_n(tok.get('max'))} "
                   f"per train example (data.max_length={d.max_length})" if tok else None),
        ("length", (d.length_choice or {}).get("text")),
        ("over length", f"{_n(d.truncated)} truncated"
                        + (" (cut inside " + ", ".join(f"{f}: {_n(n)}" for f, n in
                                                       d.truncated_fields.items()) + ")"
                           if d.truncated_fields else "")
                        + (f" (later turns dropped: {_n(d.turns_dropped)} answers)"
                           if d.turns_dropped else "")
                        + f" · {_n(d.dropped_too_long)} dropped (data.overlength={d.overlength})"
                        + (f" · {_n(d.answers_cut)} answers cut at their end"
                           if d.answers_cut else "")
         if tok else None),
        ("clean text", _cleaning(d)),
        ("supervised", f"min {_n(sup.get('min'))} · mean {_n(sup.get('mean'))} tokens per example · "
                       f"{_n(d.no_supervised)} examples without any" if sup else None),
        ("task", _task(d, head=plan.adapter.head != "none") if tok and not pref else None),
        ("answers", plan.eval.max_new_tokens_choice if tok else None),
        ("balance", _balance(d) if d.balance != "none" else None),
        ("pairs", _pairs(d) if pref and tok else None),
        ("token cache", d.cache),
    ]
    return _panel("data", Group(t, _kv(extra)))


def _validation(d) -> str:
    """The rows held out for validation, and whether data.val_rows capped data.val_fraction's
    share (the rows past the cap are trained on)."""
    tr = d.train
    if d.val_rows == 0:
        return "none held out (data.val_rows=0: no validation loss)"
    capped = d.val_rows is not None and d.val_rows == tr.val and \
        round(tr.sampled * d.val_fraction) > d.val_rows
    return (f"{_n(tr.val)} rows held out from the train file (data.val_fraction={d.val_fraction}"
            + (f", capped by data.val_rows={d.val_rows}; the other "
               f"{_n(round(tr.sampled * d.val_fraction) - tr.val)} are trained on" if capped else "")
            + ")")


def _pairs(d) -> str:
    p = d.pairs
    tokens = p.get("pair_tokens") or {}
    labels = (p.get("labels") or {}).get("train")
    return ("units: " + " · ".join(f"{name} {_n(n)}" for name, n in (p.get("units") or {}).items())
            + (f" · tokens per unit (both sides) mean {tokens.get('mean')} · p95 "
               f"{_n(tokens.get('p95'))} · max {_n(tokens.get('max'))}" if tokens else "")
            + (f" · KTO rows: {_n(labels['desirable'])} desirable, {_n(labels['undesirable'])} "
               "undesirable" if labels else "")
            + (" · over length: the prompt is cut, never a reply" if not d.answers_cut else
               f" · over length: the prompt is cut, and {_n(d.answers_cut)} replies at their end "
               "(data.overlength=truncate_answer)"))


OBJECTIVES = {"dpo": "DPO: −log σ(β·(chosen − rejected log-ratio against the reference))",
              "ipo": "IPO: (per-token log-ratio margin − 1/(2β))²",
              "orpo": "ORPO: cross-entropy on the chosen reply − λ·log σ(log odds ratio)",
              "simpo": "SimPO: −log σ(β·(mean log p chosen − mean log p rejected) − γ)",
              "kto": "KTO: 1 − σ(β·(log-ratio − KL)) for desirable, σ-mirrored for undesirable"}


def _objective(plan) -> Panel | None:
    o = plan.objective
    if not o.preference and o.init_run is None:
        return None
    settings = {"dpo": f"β {o.beta:g}" + (f" · label smoothing {o.label_smoothing:g} (robust DPO)"
                                           if o.label_smoothing else ""),
                "ipo": f"β {o.beta:g}", "orpo": f"λ {o.orpo_lambda:g}",
                "simpo": f"β {o.beta:g} · γ {o.gamma:g}"
                         + (f" · label smoothing {o.label_smoothing:g}" if o.label_smoothing else ""),
                "kto": f"β {o.beta:g} · desirable weight {o.desirable_weight:g} · undesirable "
                       f"weight {o.undesirable_weight:g}"}.get(o.kind, "")
    reference = {"base": "the base model (the adapter switched off: no second copy of the "
                         "weights), its forward pass in every step",
                 "init": f"the model of init.run ({o.init_run}), its forward pass in every step",
                 "none": "none (reference-free)"}[o.reference]
    return _panel("objective", _kv([
        ("loss", OBJECTIVES.get(o.kind, "cross-entropy on the supervised tokens")),
        ("settings", settings or None),
        ("reference", reference if o.preference else None),
        ("starts from", f"the adapter of {o.init_run}" if o.init_run else None),
        ("evaluation", "preference accuracy on the test pairs: the share whose chosen reply the "
                       "model scores above the rejected one, base and tuned" if o.preference
         else None),
    ]))


def _file(stats) -> str:
    """A data file's path, or a Hub dataset's id with the split, subset and revision read."""
    h = stats.hub
    if h is None:
        return stats.file
    what = [f"split {h.split}" if h.split else f"file {h.files[0]}"]
    if h.subset:
        what.append(f"subset {h.subset}")
    what.append(f"revision {h.revision or 'main'}"
                + (f" (commit {h.commit})" if h.commit and h.commit != h.revision else ""))
    if len(h.files) > 1:
        what.append(f"{len(h.files)} files")
    return f"{stats.file} · " + " · ".join(what)


def _cleaning(d) -> str | None:
    """Texts the cleaning changed, per file (data.normalize, data.whitespace, data.control_tokens)."""
    parts = []
    for name, stats in (("train", d.train), ("test", d.test)):
        c = stats.cleaning if stats else {}
        if any(c.values()):
            parts.append(f"{name}: " + ", ".join(
                f"{_n(c[k])} {what}" for k, what in (
                    ("normalized", f"{d.normalize}-normalised"),
                    ("whitespace", f"whitespace {d.whitespace}ped" if d.whitespace == "strip"
                     else "whitespace collapsed"),
                    ("control_tokens", "with control tokens escaped")) if c.get(k)))
    if not parts and not (d.train or d.test):
        return None
    return ("; ".join(parts) or "no text changed") + \
        f" (data.normalize={d.normalize}, data.whitespace={d.whitespace}, " \
        f"data.control_tokens={d.control_tokens})"


def _task(d, *, head: bool = False) -> str:
    if d.task != "classification":
        return f"generation ({_n(d.n_labels)} distinct answers): free decoding"
    labels = ", ".join(f"{x.text} {_n(x.count)}" for x in d.labels[:12])
    more = f", … {len(d.labels) - 12} more" if len(d.labels) > 12 else ""
    base = (f"; majority-class baseline {d.majority_baseline:.3f} on the test rows"
            if d.majority_baseline is not None else "")
    answered = ("the tuned model answers by the classification head, the base model is decoded "
                "within the label set") if head else "decoded within the label set"
    return f"classification, {len(d.labels)} labels ({labels}{more}): {answered}{base}"


BALANCE_SHOWN = 3        # classes shown at each end (the largest, the smallest) of a balance


def _balance(d) -> str:
    """data.balance: the class counts before and after oversampling (with each one's factor), or
    each class's loss weight — the largest and the smallest classes."""
    labels = list(d.labels)
    if d.balance == "weighted" and d.class_weights:
        parts = [f"{x.text} {_n(x.count)} × {w:.3g}" for x, w in zip(labels, d.class_weights)]
        head = ("weighted loss: each training example's supervised tokens weigh N / (K · its "
                "class's count), mean 1 per example (the validation loss is unweighted)")
    elif d.balance == "oversample" and d.balanced_counts:
        after = d.balanced_counts
        parts = [f"{x.text} {_n(x.count)} → {_n(n)} (×{n / x.count:.3g})"
                 for x, n in zip(labels, after)]
        head = (f"oversample (data.balance_max_factor={d.balance_max_factor:g}): "
                f"{_n(sum(x.count for x in labels))} → {_n(sum(after))} training examples an "
                "epoch")
    else:
        return d.balance
    k = BALANCE_SHOWN
    shown = parts if len(parts) <= 2 * k + 1 else parts[:k] + [f"… {len(parts) - 2 * k} more"] + \
        parts[-k:]
    return f"{head}; " + " · ".join(shown)


def marked_text(example: str) -> Text:
    """An example with its supervised span (between ⟦ and ⟧) highlighted."""
    out = Text()
    rest = example
    while rest:
        i = rest.find(OPEN)
        if i < 0:
            out.append(rest, style="dim")
            break
        out.append(rest[:i], style="dim")
        j = rest.find(CLOSE, i + 1)
        j = len(rest) if j < 0 else j
        out.append(rest[i + 1:j], style="bold black on green")
        rest = rest[j + 1:]
    return out


def _template(plan) -> Panel:
    t = plan.template
    parts = [_kv([
        ("system", repr(t.system) if t.system is not None else "none"),
        ("conversation", f"the turns in `{t.messages}`, rendered turn by turn; the loss on every "
                         "assistant turn" if t.messages else None),
        ("prompt", repr(t.prompt) if not t.messages else None),
        ("response", repr(t.response) if not t.messages else None),
        ("chat", "the model's chat template" if t.chat else "no (plain text + end token)"),
        ("fields", ", ".join(t.fields)),
    ])]
    for i, ex in enumerate(t.examples, 1):
        parts.append(Text(f"\nexample {i} (supervised part" + ("s" if t.messages else "")
                          + " highlighted):", style="bold"))
        parts.append(marked_text(ex))
    return _panel("template", Group(*parts))


def _retrieval(plan) -> Panel | None:
    r = plan.retrieval
    if r is None:
        return None
    recall = ", ".join(f"{name} {s['recall']:.3f}" for name, s in r.per_split.items()
                       if s.get("recall") is not None)
    unmatched = sum(int(s.get("no_match", 0)) for s in r.per_split.values())
    return _panel("retrieval", _kv([
        ("corpus", f"{r.corpus} · {_n(r.passages)} passages"
                   + (f" ({_n(r.empty)} rows without id or text skipped)" if r.empty else "")),
        ("passages", f"{_n(r.cut)} cut to {r.passage_tokens} tokens (retrieval.passage_tokens)"),
        ("search", f"BM25 top {r.k} for {r.query!r} → {{retrieved}} in every row"
                   + (f"; {_n(unmatched)} queries matched no passage" if unmatched else "")),
        (f"recall@{r.k}", f"{recall} (gold passage in data field `{r.gold}`)" if recall else None),
        ("evaluation", "base and tuned, each with and without retrieval, on the same test rows"),
        ("index", r.index),
    ]))


def _adapter(plan) -> Panel:
    a = plan.adapter
    if a.kind == "full":
        return _panel("adapter", _kv([
            ("full", "every weight trained (no adapter): the run writes model/, a transformers "
                     "checkpoint; AdamW's state for every weight"),
            ("trainable", f"{_n(a.trainable_params)} parameters ({100 * a.share:.2f}% of the "
                          "model)"),
        ]))
    kind = {"lora": "LoRA", "dora": "DoRA"}[a.kind]
    tied = plan.model.config.tie_word_embeddings and {"lm_head", "embed_tokens"} & set(a.train_modules)
    full = ", ".join(f"{m} ({_n(n)})" for m, n in a.full_params.items() if n) + \
        (" — lm_head and embed_tokens are one tied matrix: trained once, exported under both names"
         if tied else "")
    quant = {"int8": "int8, one scale per output channel",
             "nf4": "4-bit NormalFloat, blocks of 64 (QLoRA)"}.get(a.quantize)
    return _panel("adapter", _kv([
        (kind, f"rank {a.rank} · alpha {a.alpha:g} (scale {a.scale:.3g}"
               + (", rank-stabilised" if a.rslora else "") + f") · dropout {a.dropout:g}"
               + (" · a trained magnitude per output row" if a.kind == "dora" else "")),
        ("targets", ", ".join(a.targets)),
        ("trained in full", full or None),
        ("head", _head(plan)),
        ("base weights", f"{_n(a.quantized_params)} stored as {quant}; the adapter in float32"
                         if quant else None),
        ("trainable", f"{_n(a.trainable_params)} parameters ({100 * a.share:.2f}% of the model)"),
    ]))


HEAD_LABELS_SHOWN = 5


def _head(plan) -> str | None:
    """adapter.head=classifier: the layer's size, its learning rate and the labels it scores."""
    a = plan.adapter
    if a.head == "none":
        return None
    labels = [x.text for x in plan.data.labels]
    shown = ", ".join(labels[:HEAD_LABELS_SHOWN]) + (
        f", … {len(labels) - HEAD_LABELS_SHOWN} more" if len(labels) > HEAD_LABELS_SHOWN else "")
    return (f"classifier: {_n(a.head_params)} parameters ({a.head_labels} labels × "
            f"{plan.model.config.hidden_size} hidden, no bias) over the last prompt token's final "
            f"hidden state · lr {a.head_lr:g} · {len(labels)} labels: {shown} · trained by "
            "cross-entropy over the labels, in place of the answer tokens' loss"
            + (f", alone for the first {_n(a.head_probe_steps)} steps (adapter.head_probe), then "
               "beside the adapter" if a.head_probe_steps else "")
            + "; the tuned model answers by its argmax, the base model is decoded within the "
            "label set")


def _schedule(plan) -> Panel:
    s = plan.schedule
    if not s.total_steps:
        return _panel("schedule", Text("no training steps (nothing to train on)", style="dim"))
    return _panel("schedule", _kv([
        ("optimizer", f"AdamW · lr {s.lr:g} · {s.lr_schedule} · weight decay {s.weight_decay:g} · "
                      f"betas {s.beta1:g}/{s.beta2:g} · clip {s.max_grad_norm}"),
        ("batch", (f"about {s.batch_examples} examples (schedule.batch_unit=examples) → "
                   if s.batch_examples else "")
                  + f"{s.batch_size} rows × {s.grad_accum} accumulation = {s.global_batch} per step · "
                  f"rows of {s.seq_len} tokens"
                  + (f" (packed, {s.row_fill:.0%} full)" if plan.runtime.pack else
                     (f" ({s.row_fill:.0%} of a whole row's tokens are not padding; each batch is "
                      f"cut to its longest example, in steps of {trim} tokens)"
                      if (trim := trim_granule(s.seq_len, plan.runtime.attention)) else
                      f" ({s.row_fill:.0%} of the tokens are not padding)"))),
        ("steps", f"{_n(s.steps_per_epoch)} per epoch × {s.epochs:g} epochs → "
                  f"{_n(s.total_steps)} steps"
                  + (f" (capped by schedule.max_steps={s.max_steps})" if s.max_steps else "")
                  + (f" · about {s.examples_per_step:.0f} "
                     f"{'pairs' if plan.data.unit > 1 else 'examples'} a step"
                     + (f" (unpacked: {_n(s.unpacked_total_steps)} steps)"
                        if s.unpacked_total_steps != s.total_steps else "")
                     if plan.runtime.pack and s.examples_per_step else "")),
        ("warmup", f"{_n(s.warmup_steps)} steps (schedule.warmup={s.warmup})"),
        ("seed", s.seed),
    ]))


def _resources(plan) -> Panel:
    rt, est = plan.runtime, plan.estimates
    dev, mem = rt.devices, est.memory
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    t.add_column("memory per device")
    t.add_column("", justify="right")
    for k in ("weights", "adapter_optimizer", "reference", "activations", "attention", "logits"):
        if k in mem:
            t.add_row({"adapter_optimizer": "trained + optimizer" if plan.adapter.kind == "full"
                       else "adapter + optimizer",
                       "reference": "reference (a copy of the trained state)"}.get(k, k),
                      _bytes(mem[k]))
    if "total" in mem:
        share = est.memory_share
        t.add_row(Text("total", style="bold"),
                  Text(_bytes(mem["total"]) + (f" of {_bytes(dev.memory)} ({100 * share:.0f}%)"
                                              if share is not None and dev.memory else ""),
                       style="bold"))
    if est.eval_memory:
        t.add_row(f"evaluation ({plan.eval.batch_size} rows at once)", _bytes(est.eval_memory))
    steps = plan.schedule.total_steps
    rows = _kv([
        ("devices", f"{dev.count} × {dev.kind} ({dev.platform})"
                    + (f" over {dev.processes} processes" if dev.processes > 1 else "")),
        ("mesh", f"data {rt.mesh.data} × fsdp {rt.mesh.fsdp} × tensor {rt.mesh.tensor}"),
        ("dtype", f"compute {rt.dtype} · weights {rt.param_dtype}"
                  + (f" · matmuls {rt.matmul_dtype} → {rt.dtype}" if rt.matmul_dtype != rt.dtype else "")
                  + f" · remat {rt.remat}"),
        ("attention", _attention(rt, plan.schedule.seq_len)),
        ("time", _time(plan) if steps else None),
    ])
    return _panel("resources", Group(rows, t))


def _time(plan) -> str:
    """The time estimate, a line for each part: training, validation, evaluation, total."""
    est, steps = plan.estimates, plan.schedule.total_steps
    training = f"~{_duration(est.step_time_s)} per step × {_n(steps)} steps"
    if est.train_time_s is None:            # a plan written before the parts were estimated
        return f"{training} ≈ {_duration(est.total_time_s)} (rough estimate)"
    val_rows, cap, passes = plan.data.sizes.get("val", 0), plan.data.val_rows, est.validation_passes
    lines = [f"training    {training} ≈ {_duration(est.train_time_s)}"]
    lines.append(f"validation  {passes} pass{'es' if passes != 1 else ''}"
                 f" × {_n(val_rows)} rows (forward only; eval.every={plan.eval.every}, "
                 f"data.val_rows={'null' if cap is None else cap}) ≈ "
                 f"{_duration(est.validation_time_s)}"
                 if passes else "validation  none (no rows held out)")
    if est.eval_rows:
        mode = plan.eval.mode
        ways = 2 if plan.retrieval is not None and not plan.objective.preference else 1
        who = ("base and tuned" if est.eval_models // ways == 2 else "one model") + \
            (", each with and without retrieval" if ways == 2 else "")
        lines.append(f"evaluation  {_n(est.eval_rows)} test rows × {who} ({mode}"
                     + (f", up to {plan.eval.max_new_tokens} new tokens a row"
                        if mode in ("generate", "constrained") else "")
                     + f"; eval.limit={_n(plan.eval.limit) if plan.eval.limit else 'null'}) ≈ "
                     f"{_duration(est.eval_time_s)}")
    else:
        lines.append("evaluation  none (no test rows: data.test_path)")
    lines.append(f"total       ≈ {_duration(est.total_time_s)} (rough estimate)")
    return "\n".join(lines)


def _attention(rt, seq_len: int) -> str:
    if rt.attention == "cudnn":
        return "cuDNN fused kernel"
    blocks = len(attention_blocks(seq_len, rt.attention_block))
    if blocks > 1:
        return (f"xla, causal blocks of {rt.attention_block} query rows ({blocks} a row of "
                f"{seq_len})")
    return "xla, whole rows"


def _warnings(plan) -> Panel:
    body = Group(*[Text(f"• {w}", style="yellow") for w in plan.warnings])
    return _panel(f"warnings ({len(plan.warnings)})", body, style="yellow")
