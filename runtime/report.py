"""The run report: one self-contained HTML page that shows what was trained and whether it worked.

`write_report(run_dir)` reads what a run leaves behind — plan.json, metrics.jsonl, train_summary.json,
eval.json — and writes run_dir/report.html with its plots embedded as base64 PNGs (the same PNGs
are kept in run_dir/plots/ for slides and chats). Every section degrades to a short "not ..."
line when its input is missing, so a report can be written for a run that is still going.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path

# No pyplot: a Figure with the Agg canvas needs no global backend and no display.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core.errors import PlanError
from core.plan import Plan
from core.records import EvalFile, SweepFile, SweepRun, TrainSummary

_BLUE, _ORANGE, _GREEN, _GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#9a9a9a"


# --- reading a run directory ------------------------------------------------------------------

def read_metrics(path) -> list[dict]:
    """metrics.jsonl as a list of dicts; unreadable lines (a run killed mid-write) are skipped."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows, key):
    """(steps, values) for rows that have both a step and a finite numeric `key`."""
    xs, ys = [], []
    for r in rows:
        v, s = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                and isinstance(s, (int, float)):
            xs.append(s)
            ys.append(float(v))
    return xs, ys


# --- plots ------------------------------------------------------------------------------------

def _figure(width=7.0, height=3.6, rows: int = 1):
    """(figure, axes): one plot, or `rows` of them sharing the x axis (a tuple of axes)."""
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, (axes[0] if rows == 1 else tuple(axes))


def _smooth(values):
    """Centred moving average (window ~1/25 of the run): unlike an EMA it does not lag the curve."""
    half = max(1, len(values) // 50)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_loss(rows, ylabel: str = "cross-entropy (nats / token)") -> bytes | None:
    steps, loss = _series(rows, "loss")
    vsteps, vloss = _series(rows, "val_loss")
    if not steps and not vsteps:
        return None
    fig, ax = _figure()
    if steps:
        if len(loss) >= 20:
            ax.plot(steps, loss, color=_BLUE, alpha=0.25, linewidth=1)
            ax.plot(steps, _smooth(loss), color=_BLUE, linewidth=2, label="train loss (smoothed)")
        else:
            ax.plot(steps, loss, color=_BLUE, linewidth=2, marker="." if len(loss) < 50 else None,
                    label="train loss")
    if vsteps:
        ax.plot(vsteps, vloss, color=_ORANGE, linewidth=2, marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title("Loss")
    ax.legend(frameon=False)
    return _png(fig)


def plot_rewards(rows) -> bytes | None:
    """A preference objective's rewards per step (TRL's names): chosen, rejected and their margin,
    and the share of pairs ranked right."""
    steps, chosen = _series(rows, "rewards/chosen")
    if not steps:
        return None
    _, rejected = _series(rows, "rewards/rejected")
    fig, (ax, acc_ax) = _figure(7.0, 5.2, rows=2)
    for values, color, label in ((chosen, _GREEN, "rewards/chosen"),
                                 (rejected, _ORANGE, "rewards/rejected")):
        if len(values) == len(steps):
            smooth = _smooth(values) if len(values) >= 20 else values
            if len(values) >= 20:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
            ax.plot(steps, smooth, color=color, linewidth=2, label=label)
    msteps, margins = _series(rows, "rewards/margins")
    if msteps:
        ax.plot(msteps, _smooth(margins) if len(margins) >= 20 else margins, color=_BLUE,
                linewidth=2, label="rewards/margins")
    ax.axhline(0, color=_GREY, linewidth=0.8)
    ax.set_ylabel("reward")
    ax.set_title("Rewards (β · log-ratio to the reference; smoothed)")
    ax.legend(frameon=False)
    asteps, acc = _series(rows, "rewards/accuracies")
    if asteps:
        acc_ax.plot(asteps, _smooth(acc) if len(acc) >= 20 else acc, color=_BLUE, linewidth=2)
        acc_ax.set_ylim(-0.02, 1.02)
    acc_ax.set_xlabel("step")
    acc_ax.set_ylabel("rewards/accuracies")
    return _png(fig)


def plot_lr(rows) -> bytes | None:
    steps, lr = _series(rows, "lr")
    if not steps:
        return None
    fig, ax = _figure(7.0, 2.8)
    ax.plot(steps, lr, color=_GREEN, linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_ylim(bottom=0)
    return _png(fig)


def plot_throughput(rows, mean) -> bytes | None:
    steps, tps = _series(rows, "tokens_per_s")
    if not steps:
        return None
    fig, ax = _figure(7.0, 2.8)
    ax.plot(steps, tps, color=_BLUE, linewidth=1.5, marker="." if len(tps) < 50 else None)
    if mean:
        ax.axhline(mean, color=_GREY, linestyle="--", linewidth=1, label=f"mean {mean:,.0f} tokens/s")
        ax.legend(frameon=False, loc="lower right")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.set_title("Training throughput")
    ax.set_ylim(bottom=0)
    return _png(fig)


def plot_confusion(ev: EvalFile) -> bytes | None:
    """The tuned model's (else the only model's) confusion matrix: reference rows, predicted
    columns, counts in the cells."""
    r = ev.headline
    conf = r.get("confusion")
    if not conf or not conf.get("labels") or len(conf["labels"]) > 40:
        return None
    import numpy as np

    m = np.asarray(conf["matrix"])
    labels = [_short(x, 24) for x in conf["labels"]] + ["(other)"]
    keep_rows = [i for i in range(len(labels)) if i < len(labels) - 1 or m[i].sum()]
    keep_cols = [j for j in range(len(labels)) if j < len(labels) - 1 or m[:, j].sum()]
    m = m[np.ix_(keep_rows, keep_cols)]
    size = 2.5 + 0.42 * max(len(keep_rows), len(keep_cols))
    fig, ax = _figure(min(size + 1.5, 14), min(size, 12))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(len(keep_cols)), [labels[j] for j in keep_cols], rotation=45, ha="right")
    ax.set_yticks(range(len(keep_rows)), [labels[i] for i in keep_rows])
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(f"Confusion matrix ({r.model})")
    ax.grid(False)
    return _png(fig)


def plot_per_class(ev: EvalFile) -> bytes | None:
    """Horizontal bars of per-class F1, base next to tuned where both were evaluated."""
    runs = _compared(ev, "model")
    runs = [(name, r.get("per_class")) for name, r in runs if r.get("per_class")]
    if not runs:
        return None
    classes = sorted({c for _, pc in runs for c in pc},
                     key=lambda c: -max(pc.get(c, {}).get("support", 0) for _, pc in runs))[:40]
    height = 1.0 + 0.28 * len(classes) * max(1, len(runs))
    fig, ax = _figure(7.0, min(max(height, 2.5), 16))
    bar = 0.8 / len(runs)
    colors = {"base": _GREY, "tuned": _BLUE, "model": _BLUE}
    for k, (name, pc) in enumerate(runs):
        ys = [i + (k - (len(runs) - 1) / 2) * bar for i in range(len(classes))]
        ax.barh(ys, [pc.get(c, {}).get("f1", 0.0) for c in classes], height=bar,
                color=colors[name], label=name)
    ax.set_yticks(range(len(classes)), [_short(c, 32) for c in classes])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title("Per-class F1 (classes by support)")
    if len(runs) > 1:
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


# --- html -------------------------------------------------------------------------------------

def _short(text, n):
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _esc(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:,.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) > 12:
            return ", ".join(_fmt(x) for x in v[:12]) + f", … ({len(v)} items)"
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _flatten(d, prefix="", skip=()):
    out = []
    for k, v in d.items():
        if k in skip:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, key + ".", skip))
        else:
            out.append((key, v))
    return out


def _value(key: str, v) -> str:
    # Byte counts (memory estimates) read better in GiB.
    if "memory" in key and isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 20:
        return f"{v / (1 << 30):.2f} GiB"
    return _fmt(v)


def _kv_table(d, skip=()) -> str:
    rows = _flatten(d, skip=skip) if isinstance(d, dict) else []
    if not rows:
        return '<p class="muted">not recorded</p>'
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_short(_value(k, v), 160))}</td></tr>"
                   for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _img(png: bytes | None, alt: str, missing: str) -> str:
    if png is None:
        return f'<p class="muted">{_esc(missing)}</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _metric_value(r) -> str:
    v = r.get("value")
    return f"{v:.4f}" if isinstance(v, (int, float)) else "—"


def _classification_rows(runs, metric) -> list[str]:
    """Accuracy and macro-F1 (whichever is not the headline), the majority-class baseline, and what
    free generation scores on the same rows (constrained decoding's results are the headline)."""
    def row(label, values, fmt="{:.4f}"):
        if all(v is None for v in values):
            return []
        cells = "".join(f"<td>{fmt.format(v) if isinstance(v, (int, float)) else '—'}</td>"
                        for v in values)
        return [f"<tr><th>{_esc(label)}</th>{cells}</tr>"]

    out = []
    for key in ("accuracy", "macro_f1"):
        if key != metric:
            out += row(key, [r.get(key) for _, r in runs])
    free = [r.get("free") or {} for _, r in runs]
    out += row("free generation: accuracy", [f.get("accuracy") for f in free])
    out += row("free generation: not a label", [f.get("invalid_rate") for f in free], "{:.1%}")
    baseline = next((r.get("majority_baseline") for _, r in runs if r.get("majority_baseline")
                     is not None), None)
    if baseline is not None:
        out.append(f'<tr><th>majority-class baseline (accuracy)</th><td colspan="{len(runs)}">'
                   f"{baseline:.4f}</td></tr>")
    return out


def _generation_rows(runs, metric) -> list[str]:
    """Free generation's other metric (exact_match beside a ROUGE-L headline, and the reverse)."""
    out = []
    for key in ("exact_match", "rouge_l"):
        values = [r.get(key) for _, r in runs]
        if key != metric and any(isinstance(v, (int, float)) for v in values):
            out.append(f"<tr><th>{_esc(key)}</th>" + "".join(
                f"<td>{v:.4f}</td>" if isinstance(v, (int, float)) else "<td>—</td>"
                for v in values) + "</tr>")
    return out


def _samples_table(runs) -> str:
    """Generate mode: the first test rows, prompt and reference beside each model's answer (and
    its ROUGE-L), the models' samples lined up by test row."""
    if not runs or runs[-1][1].get("mode") != "generate":
        return ""
    by_model = [(name, {x.get("index"): x for x in r.get("samples") or []}) for name, r in runs]
    rows = list(dict.fromkeys(i for _, samples in by_model for i in samples))
    if not rows:
        return ""

    def answer(x) -> str:
        if x is None:
            return "<td>—</td>"
        score = x.get("rouge_l")
        return (f"<td class=\"pre\">{_esc(_short(x.get('prediction', ''), 400))}"
                + (f'<br><span class="muted">ROUGE-L {score:.3f}</span>'
                   if isinstance(score, (int, float)) else "") + "</td>")

    body = []
    for i in rows:
        first = next(samples[i] for _, samples in by_model if i in samples)
        body.append(f"<tr><td class=\"pre\">{_esc(first.get('prompt', ''))}</td>"
                    f"<td class=\"pre\">{_esc(_short(first.get('reference', ''), 400))}</td>"
                    + "".join(answer(samples.get(i)) for _, samples in by_model) + "</tr>")
    head = "<tr><th>prompt</th><th>reference</th>" + "".join(
        f"<th>{_esc(name)} answer</th>" for name, _ in by_model) + "</tr>"
    return ("<h3>Answers side by side</h3><table class=\"grid wide\">"
            f"{head}{''.join(body)}</table>")


def _per_class_table(runs) -> str:
    """Per class: support, then F1, precision and recall of each model."""
    pcs = [(n, r.get("per_class")) for n, r in runs if r.get("per_class")]
    if not pcs:
        return ""
    classes = sorted({c for _, pc in pcs for c in pc},
                     key=lambda c: (-max(pc.get(c, {}).get("support", 0) for _, pc in pcs), c))
    head = "<tr><th>class</th><th>support</th>" + "".join(
        f"<th>F1 {_esc(n)}</th><th>P {_esc(n)}</th><th>R {_esc(n)}</th>" for n, _ in pcs) + "</tr>"
    body = []
    for c in classes:
        support = max(pc.get(c, {}).get("support", 0) for _, pc in pcs)
        cells = "".join("".join(f"<td>{pc[c][k]:.3f}</td>" if c in pc else "<td>—</td>"
                                for k in ("f1", "precision", "recall")) for _, pc in pcs)
        body.append(f"<tr><th>{_esc(_short(c, 48))}</th><td>{support}</td>{cells}</tr>")
    return f'<h3>Per class</h3><table class="grid">{head}{"".join(body)}</table>'


def _four_way(ev: EvalFile, metric: str) -> str:
    """Fine-tuning vs retrieval, and both: the same test rows scored four ways."""
    four = ev.four_way
    best = max(v for v in four.values() if isinstance(v, (int, float)))
    cell = {k: f"<td>{'<b>' if v == best else ''}{_fmt(v)}{'</b>' if v == best else ''}</td>"
            for k, v in four.items()}
    return (f"<h3>With and without retrieval</h3><table class=\"grid\"><tr><th>{_esc(metric)}</th>"
            "<th>without retrieval</th><th>with retrieval</th></tr>"
            f"<tr><th>base</th>{cell['base']}{cell['base + retrieval']}</tr>"
            f"<tr><th>tuned</th>{cell['tuned']}{cell['tuned + retrieval']}</tr></table>"
            '<p class="muted">the same test rows; without retrieval the prompt holds no passages '
            "(the adapter was trained with them)</p>")


def _compared(ev: EvalFile, single: str | None = None) -> list:
    """(name, EvalResult) of base and tuned where they were scored, else the one model scored
    (named `single`, or by its own name)."""
    runs = [(name, ev.entries[name]) for name in ("base", "tuned") if name in ev.entries]
    return runs or [(single or ev.headline.model, ev.headline)]


def _eval_section(ev: EvalFile | None) -> str:
    if ev is None:
        return '<p class="muted">not evaluated (set data.test_path, or run <code>tune eval run=DIR</code>)</p>'
    metric = ev.headline.metric
    rag = " + retrieval" if ev.headline.retrieval else ""      # the plan's prompts hold passages
    runs = _compared(ev)
    head = "<tr><th></th>" + "".join(f"<th>{_esc(n + rag)}</th>" for n, _ in runs)
    vals = "<tr><th>" + _esc(metric) + "</th>" + "".join(
        f"<td><b>{_metric_value(r)}</b></td>" for _, r in runs)
    ns = "<tr><th>examples scored</th>" + "".join(f"<td>{_fmt(r.get('n'))}</td>" for _, r in runs)
    if len(runs) == 2 and ev.delta is not None:
        delta = ev.delta
        head += "<th>change</th>"
        cls = "good" if delta > 0 else "bad" if delta < 0 else ""
        vals += f'<td class="{cls}"><b>{delta:+.4f}</b></td>'
        ns += "<td></td>"
    rows = [head + "</tr>", vals + "</tr>"] + _classification_rows(runs, metric) + \
        _generation_rows(runs, metric) + [ns + "</tr>"]
    parts = [f'<table class="grid">{"".join(rows)}</table>']
    if ev.four_way:
        parts.append(_four_way(ev, metric))
    how = []
    for name, r in runs:
        bits = [f"mode {r.mode}"] if r.mode else []
        if r.get("mode") == "constrained":
            bits.append("greedy within the label set; free generation beside it: up to "
                        f"{r.get('max_new_tokens')} new tokens")
        elif r.get("mode") == "head":
            bits.append("the argmax of the trained classification head, one forward pass per row")
        elif r.max_new_tokens:
            bits.append(f"up to {r.max_new_tokens} new tokens, greedy")
        if isinstance(r.seconds, (int, float)):
            bits.append(f"{r.seconds:.1f} s")
        if bits:
            how.append(f"{name}: " + ", ".join(bits))
    if how:
        parts.append(f'<p class="muted">{_esc(" · ".join(how))}</p>')

    parts.append(_per_class_table(runs))
    parts.append(_preference_table(runs))
    parts.append(_samples_table(runs))

    # where the tuned model (or the only one) goes wrong
    _, last = runs[-1]
    worst = last.get("worst") or []
    if worst:
        rows = "".join(
            f"<tr><td class=\"pre\">{_esc(w.get('prompt_tail', ''))}</td>"
            f"<td class=\"pre\">{_esc(_short(w.get('reference', ''), 400))}</td>"
            f"<td class=\"pre\">{_esc(_short(w.get('prediction', ''), 400))}</td></tr>"
            for w in worst)
        parts.append(f"<h3>Examples it gets wrong ({_esc(runs[-1][0])})</h3>"
                     "<table class=\"grid wide\"><tr><th>prompt (tail)</th><th>reference</th>"
                     f"<th>prediction</th></tr>{rows}</table>")
    return "\n".join(parts)


def _preference_table(runs) -> str:
    """Held-out pairs: each model's mean margin and log-probabilities, the tuned model's implicit
    reward against the reference, and a few prompts answered by both models side by side."""
    if not runs or runs[-1][1].get("mode") != "preference":
        return ""
    keys = (("mean_margin", "mean margin (chosen − rejected score)"),
            ("logps_chosen", "log p chosen (mean)"), ("logps_rejected", "log p rejected (mean)"),
            ("reward_accuracy", "reward accuracy (β·log-ratio to the reference)"),
            ("reward_margin", "reward margin"))
    rows = ["<tr><th></th>" + "".join(f"<th>{_esc(n)}</th>" for n, _ in runs) + "</tr>"]
    for key, label in keys:
        values = [r.get(key) for _, r in runs]
        if any(isinstance(v, (int, float)) for v in values):
            rows.append(f"<tr><th>{_esc(label)}</th>" + "".join(
                f"<td>{v:+.4f}</td>" if isinstance(v, (int, float)) else "<td>—</td>"
                for v in values) + "</tr>")
    score = runs[-1][1].get("score")
    out = [f'<table class="grid">{"".join(rows)}</table>',
           f'<p class="muted">a reply\'s score: its {_esc(score)} under the model; '
           "accuracy: the share of pairs whose chosen reply scores higher</p>" if score else ""]
    samples = runs[-1][1].get("samples") or []
    if samples:
        body = "".join(
            f"<tr><td class=\"pre\">{_esc(_short(x.get('prompt', ''), 400))}</td>"
            f"<td class=\"pre\">{_esc(_short(x.get('chosen', ''), 300))}</td>"
            f"<td class=\"pre\">{_esc(_short(x.get('rejected', ''), 300))}</td>"
            f"<td class=\"pre\">{_esc(_short(x.get('base', ''), 400))}</td>"
            f"<td class=\"pre\">{_esc(_short(x.get('tuned', ''), 400))}</td></tr>"
            for x in samples)
        out.append("<h3>Answers side by side</h3><table class=\"grid wide\"><tr><th>prompt</th>"
                   "<th>chosen</th><th>rejected</th><th>base</th><th>tuned</th></tr>"
                   f"{body}</table>")
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
     max-width:980px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.1em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.muted{color:#888} code{background:#f4f4f4;padding:0 .25em;border-radius:3px}
table{border-collapse:collapse;margin:.5em 0 1em} th,td{padding:.25em .7em;text-align:left;
      vertical-align:top;font-size:.92em} table.kv th{color:#555;font-weight:500}
table.grid td,table.grid th{border:1px solid #e2e2e2} table.grid tr:first-child th{background:#f7f7f7}
.cols{display:flex;flex-wrap:wrap;gap:1.5em} .cols>div{flex:1 1 420px}
.good{color:#1a7f37} .bad{color:#c62828} .pre{white-space:pre-wrap;font-family:monospace;font-size:.85em}
table.wide{width:100%} img{max-width:100%} .stats span{margin-right:2em}
.box{background:#f7f7f7;border:1px solid #e2e2e2;padding:.5em .8em;border-radius:4px}
.warn{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.3em 0}
"""


def write_report(run_dir) -> Path:
    """Write run_dir/report.html (and run_dir/plots/*.png); return the report's path."""
    run_dir = Path(run_dir)
    plan = _load_plan(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    summary = TrainSummary.read(run_dir)
    ev = EvalFile.read(run_dir)

    # Throughput: the first logged interval includes compilation, so it is left out of the mean.
    _, tps = _series(rows, "tokens_per_s")
    steady = tps[1:] if len(tps) > 1 else tps
    mean_tps = summary.tokens_per_s_mean if summary is not None else None
    if not isinstance(mean_tps, (int, float)):
        mean_tps = sum(steady) / len(steady) if steady else None
    plots = {
        "loss": plot_loss(rows, *(() if plan is None or not plan.objective.preference else
                                  (f"{plan.objective.kind.upper()} loss (mean per pair)",))),
        "lr": plot_lr(rows),
        "throughput": plot_throughput(rows, mean_tps),
        "per_class_f1": plot_per_class(ev) if ev is not None else None,
        "confusion": plot_confusion(ev) if ev is not None else None,
        "rewards": plot_rewards(rows),
    }
    for name, png in plots.items():
        if png is not None:
            (run_dir / "plots").mkdir(parents=True, exist_ok=True)
            (run_dir / "plots" / f"{name}.png").write_bytes(png)

    title = (plan.recipe.name if plan is not None and plan.recipe else None) or run_dir.resolve().name
    _, vlosses = _series(rows, "val_loss")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tune report — {_esc(title)}</title>
<style>{_CSS}</style></head><body>
<h1>tune report — {_esc(title)}</h1>
<p class="muted">run directory <code>{_esc(run_dir.resolve())}</code> · plan {_esc((plan.hash if plan is not None else '—')[:16])}
 · written {_esc(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}{_sweep_link(run_dir)}</p>

<h2>Evaluation</h2>
{_eval_section(ev)}
{_img(plots['per_class_f1'], 'per-class F1', '') if plots['per_class_f1'] else ''}
{_img(plots['confusion'], 'confusion matrix', '') if plots['confusion'] else ''}

<h2>Training</h2>
<p class="stats">{_training_facts(plan, rows) or '<span class="muted">no training steps logged</span>'}</p>
{_img(plots['loss'], 'loss curve', 'no loss logged')}
{'' if vlosses else '<p class="muted">validation loss: not evaluated</p>'}
{_img(plots['rewards'], 'rewards', '') if plots['rewards'] else ''}
{_img(plots['lr'], 'learning rate', 'no learning rate logged')}

<h2>Throughput</h2>
<p class="stats">{_throughput_facts(summary, rows, mean_tps) or '<span class="muted">not recorded</span>'}</p>
{_img(plots['throughput'], 'throughput', 'no throughput logged')}

<h2>Plan</h2>
{_plan_section(plan) if plan is not None else '<p class="muted">no plan.json</p>'}
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(doc, encoding="utf-8")
    return out


def _sweep_link(run_dir: Path) -> str:
    """A link back to the sweep this run belongs to (its parent holds sweep.json), if any."""
    if (run_dir.parent / SweepFile.FILE).is_file() or (run_dir.parent / "multirun.yaml").is_file():
        return ' · part of <a href="../sweep.html">a sweep</a>'
    return ""


def _load_plan(run_dir: Path) -> Plan | None:
    try:
        return Plan.load(run_dir / "plan.json")
    except (OSError, ValueError, TypeError, KeyError, PlanError):
        return None


def _training_facts(plan: Plan | None, rows: list[dict]) -> str:
    _, losses = _series(rows, "loss")
    _, vlosses = _series(rows, "val_loss")
    steps_done = max((r["step"] for r in rows if isinstance(r.get("step"), (int, float))), default=None)
    facts = []
    if losses:
        facts.append(f"<span>train loss <b>{losses[0]:.4f}</b> → <b>{losses[-1]:.4f}</b></span>")
    if vlosses:
        facts.append(f"<span>validation loss <b>{vlosses[0]:.4f}</b> → <b>{vlosses[-1]:.4f}</b> "
                     f"(best {min(vlosses):.4f})</span>")
    if steps_done is not None:
        total = plan.schedule.total_steps if plan is not None else None
        facts.append(f"<span>steps <b>{_fmt(steps_done)}</b>"
                     + (f" / {_fmt(total)}" if total else "") + "</span>")
    return "".join(facts)


def _throughput_facts(summary: TrainSummary | None, rows: list[dict], mean_tps) -> str:
    compile_s = summary.compile_s if summary is not None else None
    if not isinstance(compile_s, (int, float)):
        compile_s = next((r["compile_s"] for r in rows if isinstance(r.get("compile_s"), (int, float))),
                         None)
    facts = []
    if mean_tps is not None:
        facts.append(f"<span>mean <b>{mean_tps:,.0f}</b> tokens/s (first logged interval excluded)</span>")
    if compile_s is not None:
        facts.append(f"<span>compile <b>{compile_s:.1f}</b> s</span>")
    if summary is not None:
        facts.append(f"<span>wall time <b>{summary.wall_s:.1f}</b> s</span>")
    return "".join(facts)


def _plan_section(typed: Plan) -> str:
    """The plan's sections as tables: what was trained, on what, how."""
    plan = typed.to_dict()
    model = plan.get("model") or {}
    model_summary = {k: model.get(k) for k in ("name", "source", "architecture", "params", "dir")
                     if model.get(k) is not None}
    config = model.get("config") or {}
    model_summary.update({k: config.get(k) for k in ("family", "num_layers", "hidden_size",
                                                     "num_heads", "num_kv_heads", "vocab_size")
                          if k in config})
    data = {k: v for k, v in (plan.get("data") or {}).items()
            if k not in ("cache", "key", "per_split")}
    for split in ("train", "test"):
        if isinstance(data.get(split), dict):
            data[split] = {k: v for k, v in data[split].items() if k not in ("sha256", "fields")}
    template = plan.get("template") or {}
    shown = {k: template.get(k) for k in ("prompt", "response", "system", "chat")}
    runtime = {k: v for k, v in (plan.get("runtime") or {}).items() if k != "devices"}
    devices = (plan.get("runtime") or {}).get("devices") or {}
    runtime["devices"] = f"{devices.get('count')} × {devices.get('kind')}" if devices else None
    warnings = plan.get("warnings") or []
    return f"""{''.join(f'<div class="warn">{_esc(w)}</div>' for w in warnings)}
<div class="cols">
<div><h3>Model</h3>{_kv_table(model_summary)}</div>
<div><h3>Adapter</h3>{_kv_table(plan.get("adapter") or {})}</div>
<div><h3>Schedule</h3>{_kv_table(plan.get("schedule") or {})}</div>
<div><h3>Runtime</h3>{_kv_table(runtime)}</div>
<div><h3>Estimates</h3>{_kv_table(plan.get("estimates") or {})}</div>
<div><h3>Evaluation</h3>{_kv_table(plan.get("eval") or {})}</div>
</div>
<h3>Data</h3>{_kv_table(data, skip=("examples",))}
<h3>Template</h3>{_kv_table(shown)}
{''.join(f'<p class="muted">rendered example (supervised part between ⟦ ⟧)</p><div class="pre box">{_esc(x)}</div>' for x in (template.get("examples") or [])[:1])}"""


# --- a sweep's report (tune -m) ---------------------------------------------------------------

SWEEP_HTML = "sweep.html"


def write_sweep_report(sweep_dir, jobs: list[dict]) -> Path:
    """sweep.json and sweep.html in sweep_dir: one row per run (the overrides that differ between
    runs, final train and validation loss, the task metric, wall time, status), the best run by
    the sweep's criterion (sweep.metric), and every run's loss curve in one plot. `jobs`: the runs
    as tune/compose.py records them ({"dir", "overrides", "status", "error", "wall_s",
    "criterion"})."""
    import dataclasses

    from core.files import write_atomic

    sweep_dir = Path(sweep_dir)
    rows = [_sweep_row(j) for j in jobs]
    varying = _varying(rows)
    rows = [dataclasses.replace(r, differs={k: v for k, v in r.overrides.items() if k in varying})
            for r in rows]
    criterion = next((j.get("criterion") for j in jobs if j.get("criterion")), "val_loss")
    best = _best(rows, criterion)
    SweepFile(criterion=criterion, best=best.run if best else None, runs=tuple(rows)).write(sweep_dir)
    for r in rows:                       # each run's report now links back to the sweep
        if (sweep_dir / r.run / "report.html").is_file():
            write_report(sweep_dir / r.run)
    curves = plot_sweep(rows)
    head = "".join(f"<th>{_esc(k)}</th>" for k in varying)
    body = []
    for r in rows:
        cells = "".join(f"<td>{_esc(r.differs.get(k, ''))}</td>" for k in varying)
        status = r.status + (f": {_short(r.error, 120)}" if r.error else "")
        link = f'<a href="{_esc(r.run)}/report.html">{_esc(r.run)}</a>' \
            if (sweep_dir / r.run / "report.html").is_file() else _esc(r.run)
        mark = " ★" if best is r else ""
        nums = "".join(f"<td>{'—' if v is None else _fmt(v)}</td>"
                       for v in (r.loss, r.val_loss, r.metric_value, r.wall_s))
        body.append(f"<tr><td>{link}{mark}</td>{cells}{nums}"
                    f"<td class=\"{'bad' if r.status != 'ok' else ''}\">{_esc(status)}</td></tr>")
    metric = next((r.metric for r in rows if r.metric), "metric")
    html_doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tune sweep — {_esc(sweep_dir.name)}</title>
<style>{_CSS}</style></head><body>
<h1>tune sweep — {_esc(sweep_dir.name)}</h1>
<p class="muted">{len(rows)} runs in <code>{_esc(sweep_dir.resolve())}</code>; ★ best by
<code>sweep.metric={_esc(criterion)}</code> · written {_esc(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}</p>
<table class="grid"><tr><th>run</th>{head}<th>final loss</th><th>final val loss</th>
<th>{_esc(metric)}</th><th>wall s</th><th>status</th></tr>{''.join(body)}</table>
{_img(curves, 'loss curves', 'no loss logged')}
</body></html>
"""
    return write_atomic(sweep_dir / SWEEP_HTML, html_doc)


def _sweep_row(job: dict) -> SweepRun:
    run_dir = Path(job["dir"])
    summary = TrainSummary.read(run_dir)
    ev = EvalFile.read(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps, losses = _series(metrics, "loss")
    _, vlosses = _series(metrics, "val_loss")
    overrides = dict(o.split("=", 1) for o in job.get("overrides") or [] if "=" in o)
    return SweepRun(run=run_dir.name, overrides=overrides, status=job.get("status", "ok"),
                    error=job.get("error"), wall_s=job.get("wall_s"),
                    loss=losses[-1] if losses else None, val_loss=vlosses[-1] if vlosses else None,
                    metric=ev.headline.metric if ev else None,
                    metric_value=ev.headline.value if ev else None,
                    steps=summary.steps if summary else None,
                    curve=[[s, v] for s, v in zip(steps, losses)])


def sweep_objective(job: dict) -> float:
    """What a sweeper plugin (Optuna) optimises for one finished job: its sweep.metric — val_loss or
    loss (lower is better) or metric, the task metric (set hydra.sweeper.direction=maximize) — and
    the worst value there is for a run that failed or diverged (+inf for a loss, -inf for a
    metric), so a search steers away from it and goes on."""
    criterion = job.get("criterion") or "val_loss"
    row = _sweep_row(job)
    value = row.score(criterion)
    if row.status == "ok" and isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return float("-inf") if criterion == "metric" else float("inf")


def _varying(rows: list[SweepRun]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r.overrides))
    return [k for k in keys if len({r.overrides.get(k) for r in rows}) > 1] or keys[:1]


def _best(rows: list[SweepRun], criterion: str) -> SweepRun | None:
    ok = [r for r in rows if r.status == "ok" and isinstance(r.score(criterion), (int, float))]
    if not ok:
        return None
    pick = max if criterion == "metric" else min
    return pick(ok, key=lambda r: r.score(criterion))


def plot_sweep(rows: list[SweepRun]) -> bytes | None:
    """Every run's training loss against the step, one line per run, labelled by what differs."""
    runs = [r for r in rows if r.curve]
    if not runs:
        return None
    fig, ax = _figure(7.5, 4.0)
    for r in runs:
        steps, values = zip(*r.curve)
        label = ", ".join(f"{k}={v}" for k, v in r.differs.items()) or r.run
        ax.plot(steps, values, lw=1.4, label=_short(label + (f" ({r.status})" if r.status != "ok"
                                                             else ""), 60))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("Training loss of every run")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)
