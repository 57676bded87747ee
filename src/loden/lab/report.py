"""Progress output for ``loden lab`` (rich): a live list of steps on a terminal, lines otherwise.

Steps may run in parallel threads (nodes are built concurrently); each step shows a
spinner while it runs and a tick with its duration when done. When stdout is not a
terminal (tests, CI logs) every finished step is printed as one line right away, so a
killed ``up`` still leaves a readable trail.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Step:
    """A running step; set :attr:`text` to change what is shown when it finishes."""

    def __init__(self, text: str) -> None:
        self.text = text


class Reporter:
    """Thread-safe step reporter; use as a context manager around the whole command."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self.timings: dict[str, float] = {}

    def __enter__(self) -> Reporter:
        if self.console.is_terminal:
            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓[/]"),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[Step]:
        """Show ``text`` while the block runs; a tick (or a cross) and the time after."""
        began = time.monotonic()
        task = None
        if self._progress is not None:
            task = self._progress.add_task(text, total=1)
        current = Step(text)
        try:
            yield current
        except BaseException:
            self._finish(task, current.text, began, ok=False)
            raise
        self._finish(task, current.text, began, ok=True)

    def _finish(self, task: object, text: str, began: float, *, ok: bool) -> None:
        elapsed = time.monotonic() - began
        with self._lock:
            self.timings[text] = elapsed
        mark = "[green]✓[/]" if ok else "[red]✗[/]"
        if self._progress is not None and task is not None:
            from rich.progress import TaskID

            assert isinstance(task, int)
            self._progress.update(
                TaskID(task),
                completed=1,
                description=text if ok else f"[red]{text} (failed)[/]",
            )
            return
        with self._lock:
            self.console.print(f"{mark} {text} [dim]({elapsed:.1f}s)[/]", highlight=False)

    def info(self, text: str) -> None:
        with self._lock:
            self.console.print(text, highlight=False)
