"""What a person watching the run sees: progress (step/total, loss, tokens/s, elapsed, ETA) and a
few messages. On a terminal the progress is one live bar; elsewhere (a log file, nohup, SLURM, CI)
it is a plain line at the first update, then at least every runtime.progress_every seconds, and at
the end. TUNE_QUIET=1 silences both. Everything a program needs is in metrics.jsonl, not here."""
from __future__ import annotations

import os
import sys
import time

import jax


def quiet() -> bool:
    return os.environ.get("TUNE_QUIET", "") not in ("", "0", "false", "False")


def log(message: str) -> None:
    """A line on stderr (process 0 only), unless TUNE_QUIET=1."""
    if quiet() or jax.process_index() != 0:
        return
    print(f"tune: {message}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Context manager; update() after every step (or row). `every`: seconds between the plain
    lines written where there is no terminal (the plan's runtime.progress_every)."""

    def __init__(self, total: int, *, every: float, start: int = 0, description: str = "train"):
        self.total, self.start, self.description, self.every = total, start, description, every
        shown = not quiet() and jax.process_index() == 0
        self.enabled = shown and sys.stderr.isatty()
        self.plain = shown and not self.enabled
        self._bar = None
        self._t0 = self._last = self._printed = self._origin = self._previous = None
        self._state = (start, None, None)           # step, loss, tokens/s: the latest known

    def __enter__(self):
        if self.plain:
            self._t0 = time.monotonic()
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            console=Console(file=sys.stderr), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.start,
                                            loss="-", tps="-")
        return self

    def update(self, step: int, *, loss: float | None = None, tokens_per_s: float | None = None,
               note: str | None = None) -> None:
        if self.plain:
            self._line(step, loss, tokens_per_s)
        if self._bar is None:
            return
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if tokens_per_s is not None:
            fields["tps"] = f"{tokens_per_s:,.0f}"
        desc = f"{self.description} ({note})" if note else self.description
        self._bar.update(self._task, completed=step, description=desc, **fields)

    def print(self, message: str) -> None:
        """A message above the bar (or on stderr without one)."""
        if self._bar is not None:
            self._bar.console.print(f"tune: {message}", markup=False, highlight=False)
        else:
            log(message)

    def _line(self, step: int, loss, tokens_per_s, *, final: bool = False) -> None:
        now = time.monotonic()
        if self._origin is None:        # the rate is measured from the first update (after compiling)
            self._origin = (now, step)
        gap = now - (self._previous if self._previous is not None else now)
        self._previous = now
        self._state = (step, loss if loss is not None else self._state[1],
                       tokens_per_s if tokens_per_s is not None else self._state[2])
        # print now when waiting for the next update (about `gap` away) would overrun `every`
        if not final and self._last is not None and now - self._last + gap < self.every:
            return
        self._last = now
        step, loss, tps = self._state
        self._printed = step
        elapsed = now - self._t0
        t1, step1 = self._origin
        parts = [f"{self.description} {step}/{self.total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tps is not None:
            parts.append(f"{tps:,.0f} tok/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if step > step1 and step < self.total:
            parts.append(f"eta {_clock((now - t1) / (step - step1) * (self.total - step))}")
        print("tune: " + ", ".join(parts), file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.plain and self._origin is not None and self._state[0] != self._printed:
            self._line(self._state[0], None, None, final=True)     # where it ended
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
