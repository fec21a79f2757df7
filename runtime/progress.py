"""What a person watching the run sees: one progress bar (step/total, loss, tokens/s, ETA) and a few
messages. The bar shows only on a terminal; TUNE_QUIET=1 silences the messages too. Everything a
program needs is in metrics.jsonl, not here."""
from __future__ import annotations

import os
import sys

import jax


def quiet() -> bool:
    return os.environ.get("TUNE_QUIET", "") not in ("", "0", "false", "False")


def log(message: str) -> None:
    """A line on stderr (process 0 only), unless TUNE_QUIET=1."""
    if quiet() or jax.process_index() != 0:
        return
    print(f"tune: {message}", file=sys.stderr, flush=True)


class Progress:
    """Context manager; update() after every step. A no-op when not on a terminal or when quiet."""

    def __init__(self, total: int, start: int = 0, description: str = "train"):
        self.total, self.start, self.description = total, start, description
        self.enabled = sys.stderr.isatty() and not quiet() and jax.process_index() == 0
        self._bar = None

    def __enter__(self):
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

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
