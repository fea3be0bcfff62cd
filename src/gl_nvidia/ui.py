"""Human and machine output: tables and progress on a terminal, plain log lines otherwise, JSON on request."""

from __future__ import annotations

import json
import logging
import re
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

# Characters that steer a terminal or a log reader instead of showing: C0/C1 controls (ESC starts ANSI
# sequences, CR/LF forge lines), zero-width and bidi formatting marks, line/paragraph separators.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")
# A table cell longer than this is cut (with a marker): rich lays out a megabyte cell for tens of seconds.
MAX_CELL = 2000
# Tables on a pipe or in a log: rows as wide as they are, never folded to the 80 columns rich assumes.
LOG_WIDTH = 100_000


def printable(text: str) -> str:
    """`text` from outside (a node name, an API message, a file) with every control character escaped as
    Python writes it (`\\x1b`, `\\n`), so it shows as what it is and can neither colour nor forge a line."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class _PrintableFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # Also the switch for tracebacks of unexpected errors (cli.main), even where logging was set up before.
    log.setLevel(logging.DEBUG if verbose else logging.NOTSET)
    # Library chatter (HTTP connection pools) is noise at INFO.
    for noisy in ("httpx", "httpcore", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cell(value: Any) -> str:
    """A cell's text: a list or tuple is its lines; anything else one line. Control characters are escaped;
    past MAX_CELL characters the rest is left out (cut before escaping: a megabyte is never walked)."""
    lines = ["" if v is None else str(v) for v in (value if isinstance(value, list | tuple) else [value])]
    shown: list[str] = []
    room = MAX_CELL
    for line in lines:
        if room <= 0:
            break
        shown.append(line[:room])
        room -= len(shown[-1]) + 1
    left = sum(map(len, lines)) + len(lines) - sum(map(len, shown)) - len(shown)
    return "\n".join(printable(line) for line in shown) + (f"... ({left} more characters)" if left else "")


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table on stdout. Cells are data: a str (or number) is one line, a list or tuple of them its lines."""
    table = Table(title=printable(title) if title else None, show_lines=False)
    for col in columns:
        # Fold, never truncate: a tag or digest cut to "535-6.1.0-47-clou…" in a CI log is useless.
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    (stdout if stdout.is_terminal else Console(markup=False, emoji=False, highlight=False, width=LOG_WIDTH)).print(table)


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
