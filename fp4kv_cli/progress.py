"""The ``rich`` progress bar every long-running command shows, readable in logs too.

In a terminal it is rich's live bar. When output is not a terminal (a log file, CI) rich draws
only the bar's final state, so a ten-minute phase would print nothing; there the bar also prints
a plain line per task at each tenth of its total and at least every :data:`LOG_SECONDS`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Longest silence, in seconds, between plain progress lines when output is not a terminal.
LOG_SECONDS = 30.0
#: A plain line is also printed each time a task passes another this fraction of its total.
LOG_FRACTION = 0.1


class LoggedProgress(Progress):
    """A rich :class:`~rich.progress.Progress` that prints plain progress lines when its
    console is not a terminal (see the module docstring); ``unit`` names what is counted."""

    def __init__(
        self,
        *columns: str | ProgressColumn,
        console: Console,
        unit: str = "",
        log_seconds: float = LOG_SECONDS,
        log_fraction: float = LOG_FRACTION,
        **kwargs: Any,
    ) -> None:
        super().__init__(*columns, console=console, **kwargs)
        self.plain_lines = not console.is_terminal
        self.unit = unit
        self.log_seconds = log_seconds
        self.log_fraction = log_fraction
        self._logged: dict[TaskID, tuple[float, int]] = {}  # last line's time and tenth

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        """As rich's ``update``, then a plain line if one is due."""
        super().update(task_id, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        """As rich's ``advance``, then a plain line if one is due."""
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def _maybe_log(self, task_id: TaskID) -> None:
        if not self.plain_lines:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        last_time, last_step = self._logged.get(task_id, (now, 0))
        step = int(task.completed / task.total / self.log_fraction) if task.total else 0
        if step > last_step or now - last_time >= self.log_seconds:
            self._logged[task_id] = (now, step)
            self.console.print(self.plain_line(task_id), highlight=False, markup=False, soft_wrap=True)
        elif task_id not in self._logged:
            self._logged[task_id] = (now, step)

    def plain_line(self, task_id: TaskID) -> str:
        """``description: done/total (pct), elapsed m:ss, ~m:ss left`` of a task."""
        task = self._tasks[task_id]
        unit = f" {self.unit}" if self.unit else ""
        if task.total:
            text = f"{task.completed:,.0f}/{task.total:,.0f}{unit} ({task.completed / task.total:.0%})"
        else:
            text = f"{task.completed:,.0f}{unit}"
        text += f", elapsed {_clock(task.elapsed or 0.0)}"
        if task.total and not task.finished and task.time_remaining is not None:
            text += f", ~{_clock(task.time_remaining)} left"
        return f"{task.description}: {text}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def count_progress(console: Console, remaining: bool = False) -> LoggedProgress:
    """A bar of ``description | bar | done/total | elapsed`` (``| remaining`` when ``remaining``)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    return LoggedProgress(*columns, console=console)


@contextmanager
def status(console: Console, text: str) -> Iterator[None]:
    """rich's spinner with ``text`` in a terminal; elsewhere one plain line (a spinner shows
    nothing in a log), then ``text: done in N s``."""
    if console.is_terminal:
        with console.status(text):
            yield
        return
    console.print(f"{text} ...", highlight=False, markup=False, soft_wrap=True)
    start = time.monotonic()
    yield
    console.print(
        f"{text}: done in {time.monotonic() - start:.1f} s", highlight=False, markup=False, soft_wrap=True
    )
