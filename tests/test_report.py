"""The run report: a synthetic run directory in, a self-contained report.html out."""
import base64
import json
import math
import re

from runtime.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan():
    """A plan.json as the compiler writes it (the sections the report shows)."""
    return {
        "version": 4, "hash": "abc123def4567890",
        "config": {"eval": {"metric": "macro_f1", "max_new_tokens": 8}},
        "recipe": {"name": "legal", "path": "/r/legal.yaml", "description": "Legal", "chain": [],
                   "data_sources": {}},
        "model": {"name": "smollm2-135m", "dir": "/m", "architecture": "LlamaForCausalLM",
                  "params": 134515008, "config": {"family": "llama", "hidden_size": 576}},
        "data": {"cache": "/x.npz", "key": "k", "sizes": {"train": 900, "val": 100, "test": 40},
                 "train": {"file": "/d/train.jsonl", "sha256": "s", "fields": ["text", "label"],
                           "read": 1000, "kept": 1000}, "tokens": {"p50": 81, "p95": 120, "max": 200}},
        "template": {"prompt": "Clause: {text}\nCategory:", "examples": ["Clause: x ⟦Indemnification⟧"]},
        "adapter": {"rank": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
        "schedule": {"lr": 2e-4, "total_steps": 60, "warmup_steps": 6, "batch_size": 8},
        "runtime": {"dtype": "float32", "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
                    "devices": {"count": 1, "kind": "cpu"}},
        "estimates": {"memory": {"total": 1825361100}, "step_time_s": 0.4},
        "eval": {"metric": "macro_f1", "mode": "generate"},
        "warnings": ["only 900 usable rows"],
    }


def _metrics(with_val=True):
    rows = []
    for step in range(1, 61):
        rows.append({"step": step, "loss": 2.5 * math.exp(-step / 20) + 0.3,
                     "lr": 2e-4 * min(1, step / 6) * (0.5 + 0.5 * math.cos(math.pi * step / 60)),
                     "tokens": 2048 * step, "tokens_per_s": 300.0 if step == 1 else 5000 + step})
        if with_val and step % 20 == 0:
            rows.append({"step": step, "val_loss": 1.0 + 1 / step})
    return rows


def _write_run(tmp_path, *, with_eval=True, with_val=True):
    (tmp_path / "plan.json").write_text(json.dumps(_plan()))
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for r in _metrics(with_val):
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 61, "loss": 0.')  # a run killed mid-line must not break the report
    (tmp_path / "train_summary.json").write_text(json.dumps({"compile_s": 12.5, "wall_s": 40.0}))
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


def test_report_full(tmp_path):
    _write_run(tmp_path)
    out = write_report(tmp_path)
    assert out == tmp_path / "report.html"
    doc = out.read_text()
    for text in ("0.8765", "0.1234", "+0.7531", "macro_f1", "indemnification", "governing law",
                 "0.874", "12.5", "legal", "rank", "only 900 usable rows", "q_proj, v_proj",
                 "1 × cpu", "1.70 GiB", "LlamaForCausalLM", "⟦Indemnification⟧"):
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


def test_report_without_eval_or_validation(tmp_path):
    _write_run(tmp_path, with_eval=False, with_val=False)
    doc = write_report(tmp_path).read_text()
    assert "not evaluated" in doc and "validation loss: not evaluated" in doc
    assert len(_embedded_pngs(doc)) == 3
    assert not (tmp_path / "plots" / "per_class_f1.png").exists()


def test_report_empty_run_dir(tmp_path):
    doc = write_report(tmp_path).read_text()
    assert "not evaluated" in doc and "no loss logged" in doc
    assert _embedded_pngs(doc) == []


def test_report_single_eval(tmp_path):
    _write_run(tmp_path, with_eval=False)
    (tmp_path / "eval.json").write_text(json.dumps(
        {"metric": "rouge_l", "value": 0.4321, "n": 7, "worst": [], "model": "tuned"}))
    doc = write_report(tmp_path).read_text()
    assert "0.4321" in doc and "rouge_l" in doc and "not evaluated" not in doc
