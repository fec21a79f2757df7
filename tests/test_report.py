"""The run report: a synthetic run directory in, a self-contained report.html out."""
import base64
import json
import math
import re

from core.records import TrainSummary
from runtime.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan(model_dir):
    """A Plan as the compiler writes one, with the sections the report shows filled in."""
    import dataclasses

    from conftest import make_plan
    from core.plan import Recipe

    plan = make_plan(model_dir, template=dict(prompt="Clause: {text}\nCategory:",
                                              examples=("Clause: x ⟦Indemnification⟧",)),
                     adapter=dict(rank=16, targets=("q_proj", "v_proj")),
                     evaluation=dict(metric="macro_f1"))
    return dataclasses.replace(
        plan, hash="abc123def4567890", recipe=Recipe(name="legal", path="/r/legal.yaml", description="Legal", chain=(),
                            data_sources={}),
        estimates=dataclasses.replace(plan.estimates, memory={"total": 1825361100},
                                      step_time_s=0.4),
        warnings=("only 900 usable rows",))


def _metrics(with_val=True):
    rows = []
    for step in range(1, 61):
        rows.append({"step": step, "loss": 2.5 * math.exp(-step / 20) + 0.3,
                     "lr": 2e-4 * min(1, step / 6) * (0.5 + 0.5 * math.cos(math.pi * step / 60)),
                     "tokens": 2048 * step, "tokens_per_s": 300.0 if step == 1 else 5000 + step})
        if with_val and step % 20 == 0:
            rows.append({"step": step, "val_loss": 1.0 + 1 / step})
    return rows


def _write_run(tmp_path, model_dir, *, with_eval=True, with_val=True):
    _plan(model_dir).write(tmp_path / "plan.json")
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for r in _metrics(with_val):
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 61, "loss": 0.')  # a run killed mid-line must not break the report
    TrainSummary(steps=60, total_steps=60, steps_per_epoch=60, first_loss=2.67, final_loss=0.42,
                 final_val_loss=1.02, tokens_seen=122880, tokens_per_s_mean=None,
                 step_time_s_mean=0.4, compile_s=12.5, wall_s=40.0, resumed_from=None, devices=1,
                 backend="cpu", dtype="float32", plan_hash="abc123def4567890").write(tmp_path)
    if with_eval:
        base = {"metric": "macro_f1", "value": 0.1234, "n": 40, "worst": [],
                "per_class": {"indemnification": {"precision": .2, "recall": .1, "f1": .1333,
                                                  "support": 25},
                              "governing law": {"precision": .5, "recall": .2, "f1": .2857,
                                                "support": 15}}}
        tuned = {"metric": "macro_f1", "value": 0.8765, "n": 40,
                 "worst": [{"index": 3, "prompt_tail": "Clause: <b>x</b>", "reference": "Indemnification",
                            "prediction": "Governing Law", "score": 0.0}],
                 "per_class": {"indemnification": {"precision": .9, "recall": .85, "f1": .8743,
                                                   "support": 25},
                               "governing law": {"precision": .8, "recall": .9, "f1": .8471,
                                                 "support": 15}}}
        (tmp_path / "eval.json").write_text(json.dumps({**tuned, "base": base, "tuned": tuned}))


def _embedded_pngs(doc):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', doc)]


def test_report_full(tmp_path, tiny_chat_dir):
    _write_run(tmp_path, tiny_chat_dir)
    out = write_report(tmp_path)
    assert out == tmp_path / "report.html"
    doc = out.read_text()
    from core.plan import Plan

    devices = Plan.load(tmp_path / "plan.json").runtime.devices
    for text in ("0.8765", "0.1234", "+0.7531", "macro_f1", "indemnification", "governing law",
                 "0.874", "12.5", "legal", "rank", "only 900 usable rows", "q_proj, v_proj",
                 f"1 × {devices.kind}", "1.70 GiB", "LlamaForCausalLM", "⟦Indemnification⟧"):
        assert text in doc, text
    assert "&lt;b&gt;x&lt;/b&gt;" in doc               # examples are escaped, not injected
    assert "not evaluated" not in doc
    pngs = _embedded_pngs(doc)
    assert len(pngs) == 4 and all(p.startswith(PNG_MAGIC) for p in pngs)
    files = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert files == ["loss.png", "lr.png", "per_class_f1.png", "throughput.png"]
    for name in files:
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_MAGIC)
    # the mean leaves out the first (compiling) interval: mean of 5000+step for step 2..60 = 5031
    assert "5,031" in doc


def test_report_without_eval_or_validation(tmp_path, tiny_chat_dir):
    _write_run(tmp_path, tiny_chat_dir, with_eval=False, with_val=False)
    doc = write_report(tmp_path).read_text()
    assert "not evaluated" in doc and "validation loss: not evaluated" in doc
    assert len(_embedded_pngs(doc)) == 3
    assert not (tmp_path / "plots" / "per_class_f1.png").exists()


def test_report_empty_run_dir(tmp_path):
    doc = write_report(tmp_path).read_text()
    assert "not evaluated" in doc and "no loss logged" in doc
    assert _embedded_pngs(doc) == []


def test_report_single_eval(tmp_path, tiny_chat_dir):
    _write_run(tmp_path, tiny_chat_dir, with_eval=False)
    (tmp_path / "eval.json").write_text(json.dumps(
        {"metric": "rouge_l", "value": 0.4321, "n": 7, "worst": [], "model": "tuned"}))
    doc = write_report(tmp_path).read_text()
    assert "0.4321" in doc and "rouge_l" in doc and "not evaluated" not in doc
