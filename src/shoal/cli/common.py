"""Helpers shared by CLI commands: opening the store, JSON output, progress bars, human sizes."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator

import click

from shoal.progress import NULL, Sink
from shoal.store import Store


def open_store(ctx: click.Context) -> Store:
    return Store.open(ctx.obj.get("store") if ctx.obj else None)


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, sort_keys=True))


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def show_path(p: bytes) -> str:
    """A path for humans: undecodable bytes come out as \\x escapes."""
    return p.decode("utf-8", errors="backslashreplace") if p else "/"


class RichSink:
    """Progress bars on stderr, one per task."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("{task.description:>8}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=True)
        self.tasks: dict[str, Any] = {}

    def start(self, task: str, total: int | None, unit: str = "B") -> None:
        self.tasks[task] = self.progress.add_task(task, total=total)

    def advance(self, task: str, amount: int) -> None:
        t = self.tasks.get(task)
        if t is not None:
            self.progress.advance(t, amount)

    def finish(self, task: str) -> None:
        t = self.tasks.pop(task, None)
        if t is not None:
            self.progress.remove_task(t)


class progress_sink:
    """Context manager: a RichSink when stderr is a TTY, else the silent sink."""

    def __init__(self, quiet: bool = False) -> None:
        self.rich: RichSink | None = None if quiet or not sys.stderr.isatty() else RichSink()

    def __enter__(self) -> Sink:
        if self.rich is None:
            return NULL
        self.rich.progress.start()
        return self.rich

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.progress.stop()


def lines(items: Iterator[str]) -> None:
    for s in items:
        click.echo(s)
