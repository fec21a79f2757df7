"""`tune lr-find`: the learning-rate range test and its suggestion."""
from __future__ import annotations

import json

import numpy as np
import pytest


def test_suggestion_is_a_tenth_of_the_minimum_with_the_steepest_descent_beside_it():
    from runtime.lr_find import suggest

    lrs = list(np.logspace(-7, 0, 50))
    x = np.log10(lrs)
    # flat, then falling fastest around 1e-4, bottoming out near 1e-2, then exploding
    loss = 3.0 - 2.0 / (1 + np.exp(-(x + 4) * 3)) + np.where(x > -2, (x + 2) ** 2 * 5, 0.0)
    out = suggest(lrs, list(loss))
    low = lrs[int(np.argmin(loss))]
    assert out["suggested_lr"] == out["min_lr_tenth"] == pytest.approx(low / 10)
    assert "a tenth" in out["rule"]
    assert 3e-5 < out["steepest_lr"] < 3e-4
    assert suggest(lrs[:4], list(loss[:4]))["suggested_lr"] is None


@pytest.mark.slow
def test_lr_find_on_a_recipe(tune_cli, tmp_path):
    rc, out, err = tune_cli("lr-find", "+recipe=legal", "lr_find.steps=7", "lr_find.start_lr=1e-5",
                            "lr_find.end_lr=0.1", "schedule.batch_size=2", "hydra.run.dir=lr")
    assert rc == 0, err
    doc = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert len(doc["lrs"]) == len(doc["losses"]) == 7 and doc["lrs"][0] == pytest.approx(1e-5)
    assert doc["lrs"][-1] == pytest.approx(0.1, rel=1e-4)
    assert all(a < b for a, b in zip(doc["lrs"], doc["lrs"][1:]))
    assert 1e-5 <= doc["suggested_lr"] <= 0.1 and "suggested schedule.lr=" in " ".join(err.split())
    assert (tmp_path / "lr" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "lr" / "adapter").exists()            # nothing trained is kept
