"""Progress where there is no terminal: a plain line at the first update, then at least every
runtime.progress_every seconds, and one where it ended — step/total, loss, tokens/s, elapsed, ETA."""
from __future__ import annotations

import re

from runtime import progress as P


def lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("tune: ")]


def test_plain_lines_off_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("TUNE_QUIET", raising=False)
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    with P.Progress(10, every=3.0) as bar:
        assert bar.plain and not bar.enabled           # pytest's stderr is not a terminal
        for step in range(1, 11):
            bar.update(step, loss=2.0 / step, tokens_per_s=1000.0 * step)
    out = lines(capsys.readouterr().err)
    # started at t = 0; the first update at t = 1, then a line before 3 s pass without one (the
    # updates come a second apart, so every 2 s), and the last step where it ended
    steps = [int(re.search(r"train (\d+)/10", x).group(1)) for x in out]
    assert steps == [1, 3, 5, 7, 9, 10]
    assert out[0] == "tune: train 1/10, loss 2.0000, 1,000 tok/s, elapsed 0:01"   # no rate yet
    # the rate from the first update on (one step a second: it leaves compiling out): 7 steps left
    assert "loss 0.6667, 3,000 tok/s, elapsed 0:03, eta 0:07" in out[1]
    assert "eta" not in out[-1]


def test_the_end_is_always_shown(capsys, monkeypatch):
    monkeypatch.delenv("TUNE_QUIET", raising=False)
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    with P.Progress(5, every=1000.0, description="eval base") as bar:
        for row in range(1, 5):
            bar.update(row)
    out = lines(capsys.readouterr().err)
    assert [x.split(",")[0] for x in out] == ["tune: eval base 1/5", "tune: eval base 4/5"]


def test_quiet_is_quiet(capsys, monkeypatch):
    monkeypatch.setenv("TUNE_QUIET", "1")
    with P.Progress(3, every=0.0) as bar:
        bar.update(1)
    assert lines(capsys.readouterr().err) == []


def test_tokenising_a_large_file_says_so(tiny_chat_dir, tmp_path, capsys, monkeypatch):
    """The compiler's slow first steps report too: tokenising a large file (here any file) into
    the token cache says how many rows and how long; a second compile reads the cache, silently."""
    from compiler import examples
    from conftest import tiny_plan

    monkeypatch.delenv("TUNE_QUIET", raising=False)
    monkeypatch.setenv("TUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(examples, "LARGE_SPLITS", 10)
    tiny_plan(tiny_chat_dir, tmp_path, n_train=40, n_val=8)
    out = lines(capsys.readouterr().err)
    assert out[0] == "tune: tokenising 48 rows (once: the token cache keeps them) ..."
    assert re.fullmatch(r"tune: tokenised in \d+\.\d s", out[1])
    tiny_plan(tiny_chat_dir, tmp_path, n_train=40, n_val=8)
    assert not lines(capsys.readouterr().err)
