"""Shared rich console (stderr) and progress bars, so library code and the CLI report the same way."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


def progress_bar(enabled: bool = True) -> Progress:
    """A progress bar on stderr; hidden when disabled or when stderr is not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
        disable=not enabled or not sys.stderr.isatty(),
    )
