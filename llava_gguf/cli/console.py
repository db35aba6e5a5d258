"""What the CLI shows on stderr besides answers: the console, sizes, progress bars."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

err_console = Console(stderr=True)


def human(n: float) -> str:
    """A byte count with a binary unit: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def transfer_progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )


def conversion_progress(progress: Progress) -> Callable[[str, int, int], None]:
    """A bar per stage for `convert_checkpoint`'s ``progress(description, done, total)``."""
    tasks: dict[str, Any] = {}

    def on_progress(description: str, done: int, total: int) -> None:
        stage = description.split(" ")[0] if not description.startswith("quantizing") else description
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return on_progress


class TileProgress:
    """``on_tile(done, total)`` as a bar per image on stderr; ``stop()`` before the answer prints."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task: Any = None
        self.images = 0
        self.last = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("tiles"), TimeElapsedColumn(), console=err_console)
            self.progress.start()
        if self.task is None or done <= self.last:
            self.images += 1
            self.task = self.progress.add_task(f"encoding image {self.images}", total=total)
        self.progress.update(self.task, completed=done, total=total)
        self.last = done

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task, self.last = None, 0
