"""The ``rich`` progress bar every long-running command shows."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def count_progress(console: Console, remaining: bool = False) -> Progress:
    """A bar of ``description | bar | done/total | elapsed`` (``| remaining`` when ``remaining``)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console)
