"""Errors the user caused, as values with a key path: printed as one paragraph, exit code 2."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class PlanError(ValueError):
    """A config, recipe or data problem found before anything heavy runs (a ValueError: a bad value
    the user gave).

    key:  the config key path (``schedule.lr``) or a short subject (``recipe``) it is about.
    file/line: where in a file the problem sits, when it sits in one.
    hint: what would be right.
    """

    def __init__(self, key: str, message: str, *, hint: str | None = None,
                 file: str | None = None, line: int | None = None):
        self.key, self.message, self.hint, self.file, self.line = key, message, hint, file, line
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        text = f"{where}{self.key}: {self.message}"
        if self.hint:
            text += f" Hint: {self.hint}"
        return text


class Diverged(RuntimeError):
    """Training stopped at a step whose loss or gradient norm was not finite (exit code 3). The run
    directory keeps its last good checkpoint and its metrics up to that step."""
    exit_code = 3

    def __init__(self, step: int, loss: float, grad_norm: float, lr: float):
        self.step, self.loss, self.grad_norm, self.lr = step, loss, grad_norm, lr
        super().__init__(
            f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm} at learning "
            f"rate {lr:.3g}; stopped there, the last good checkpoint and metrics.jsonl are kept. "
            "Hint: lower schedule.lr (for AdamW-based LoRA about 1e-5 to 5e-4 is usual, up to "
            "about 2e-3 for small models), or keep schedule.max_grad_norm set.")


def listing(items: Iterable[str], most: int = 10) -> str:
    """`a, b, c and 4 more` — at most `most` items named; "none" when there are none."""
    items = list(items)
    if not items:
        return "none"
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean `x`?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""
