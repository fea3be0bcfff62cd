"""Human and machine output: tables and progress on a terminal, plain log lines otherwise, JSON on request."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

# What we print is data (key ids, digests, compiler errors), never rich markup: ":AB:" in a certificate serial
# must not become an emoji, "[foo]" in a compiler line must not vanish as a style tag.
console = Console(stderr=True, markup=False, emoji=False, highlight=False)
stdout = Console(markup=False, emoji=False, highlight=False)
log = logging.getLogger("gl_nvidia")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )
    # Also the switch for tracebacks of unexpected errors (cli.main), even where logging was set up before.
    log.setLevel(logging.DEBUG if verbose else logging.NOTSET)
    # Library chatter (HTTP connection pools) is noise at INFO.
    for noisy in ("httpx", "httpcore", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, show_lines=False)
    for col in columns:
        # Fold, never truncate: a tag or digest cut to "535-6.1.0-47-clou…" in a CI log is useless.
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    stdout.print(table)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


class Task:
    """One progress line: a bar on a terminal, start/finish log lines otherwise."""

    def __init__(self, progress: Progress | None, description: str, total: float | None) -> None:
        self._progress = progress
        self._description = description
        self._id = progress.add_task(description, total=total) if progress else None
        self._done = 0.0
        self._total = total
        self._last_logged = -1

    def advance(self, amount: float) -> None:
        self._done += amount
        if self._progress is not None and self._id is not None:
            self._progress.update(self._id, advance=amount)
        elif self._total:
            # Log at most every 25% so non-terminal logs stay readable.
            step = int(self._done * 4 // self._total)
            if step != self._last_logged and step < 4:
                self._last_logged = step
                log.info("%s: %d%%", self._description, step * 25)


_active: list[Progress] = []  # the display in use, shared by nested progress() calls


@contextmanager
def progress(transfer: bool = False) -> Iterator[Progress | None]:
    """A shared progress display when stderr is a terminal; None (plain logging) otherwise."""
    if not console.is_terminal:
        yield None
        return
    if _active:
        # Nested (release drives build, image, push): one display; rich allows only one live display.
        yield _active[-1]
        return
    columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TransferSpeedColumn()] if transfer else []
    columns.append(TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as prog:
        _active.append(prog)
        try:
            yield prog
        finally:
            _active.remove(prog)


@contextmanager
def task(prog: Progress | None, description: str, total: float | None = None) -> Iterator[Task]:
    if prog is None:
        log.info("%s ...", description)
    t = Task(prog, description, total)
    yield t
    if prog is None:
        log.info("%s: done", description)
