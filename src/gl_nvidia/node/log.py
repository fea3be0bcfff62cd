"""Structured log lines: `ts=<UTC RFC 3339> level=<level> msg="..." key=value ...`, one event per line.

The container's stdout goes to the node's container log; a line must make sense on its own at 3 a.m.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TextIO


def _value(v: object) -> str:
    s = str(v)
    if s and all(c.isalnum() or c in "._-/:,+@" for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Log:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.lines: list[str] = []  # kept for tests and for `--dry-run` summaries

    def _emit(self, level: str, msg: str, fields: dict[str, object]) -> None:
        ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts = [f"ts={ts}", f"level={level}", f"msg={_value(msg)}"]
        parts += [f"{k}={_value(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        self.lines.append(line)
        stream = self.stream or sys.stdout
        print(line, file=stream, flush=True)

    def info(self, msg: str, **fields: object) -> None:
        self._emit("info", msg, fields)

    def warn(self, msg: str, **fields: object) -> None:
        self._emit("warn", msg, fields)

    def error(self, msg: str, **fields: object) -> None:
        self._emit("error", msg, fields)
