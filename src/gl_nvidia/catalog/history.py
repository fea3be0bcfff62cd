"""The support history beside the lock: every (OS version, driver version) that was ever in the matrix.

`gl-nvidia update` appends to it; `gl-nvidia versions` prints it as the support table.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from gl_nvidia import yamldoc
from gl_nvidia.catalog.feeds import version_key
from gl_nvidia.catalog.lock import describe_validation_error, dump
from gl_nvidia.catalog.model import Matrix
from gl_nvidia.errors import UserError

HEADER = "# Every (OS version, driver version) ever in the matrix, appended by `gl-nvidia update`.\n"


class HistoryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    os_version: str
    driver_version: str
    first_seen: date


class History(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: list[HistoryEntry] = Field(default_factory=list)


def history_path(lock_path: Path) -> Path:
    return lock_path.with_name(f"{lock_path.stem}-history.yaml")


def read_history(path: Path) -> History:
    if not path.exists():
        return History()
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                        "fix or restore the history file") from exc
    data = yamldoc.load(YAML(typ="safe"), text, str(path))
    try:
        return History.model_validate(data or {})
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}", "fix or restore the history file") from exc


def record(history: History, matrix: Matrix, today: date) -> History:
    """The history with every pair of the matrix's cells added (first sighting kept)."""
    seen = {(e.os_version, e.driver_version) for e in history.entries}
    added = sorted({(c.os_version, c.driver_version) for c in matrix.cells} - seen)
    entries = history.entries + [HistoryEntry(os_version=o, driver_version=d, first_seen=today) for o, d in added]
    return History(entries=entries)


def history_text(history: History) -> str:
    seq = CommentedSeq()
    for e in history.entries:
        row = CommentedMap(os_version=e.os_version, driver_version=e.driver_version, first_seen=e.first_seen)
        row.fa.set_flow_style()
        seq.append(row)
    return HEADER + dump(CommentedMap(entries=seq))


def support_table(history: History) -> list[tuple[str, list[str]]]:
    """OS version -> driver versions (newest first), newest OS version first."""
    table: dict[str, list[str]] = {}
    for e in history.entries:
        table.setdefault(e.os_version, []).append(e.driver_version)
    return [(os_version, sorted(table[os_version], key=version_key, reverse=True))
            for os_version in sorted(table, key=version_key, reverse=True)]
