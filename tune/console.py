"""How `tune` prints: rich consoles, errors as one red paragraph."""
from __future__ import annotations

from core.errors import PlanError


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True, highlight=False)


def print_error(err: PlanError) -> None:
    from rich.text import Text

    console(stderr=True).print(Text("error: " + err.render(), style="bold red"))


def print_failure(message: str) -> None:
    from rich.text import Text

    console(stderr=True).print(Text(message, style="red"))
