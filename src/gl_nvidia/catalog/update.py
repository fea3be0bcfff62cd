"""`gl-nvidia update`: refresh the lock from its sources, rewrite it, record the history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from gl_nvidia.catalog.changelog import Change, diff
from gl_nvidia.catalog.history import history_path, history_text, read_history, record
from gl_nvidia.catalog.lock import lock_text, read_lock, resolved_to_yaml
from gl_nvidia.catalog.matrix import build_matrix
from gl_nvidia.catalog.model import Matrix
from gl_nvidia.catalog.refresh import SourceOverrides, refresh
from gl_nvidia.fs import atomic_write_text
from gl_nvidia.osprofile import os_profile


@dataclass(frozen=True)
class UpdateResult:
    changes: list[Change]
    matrix: Matrix
    files: dict[Path, str]  # the new text of each file to rewrite; empty when nothing changed

    def write(self) -> None:
        for path, text in self.files.items():
            atomic_write_text(path, text)


def update(lock_path: Path, today: date, overrides: SourceOverrides | None = None) -> UpdateResult:
    """Resolve again; when anything changed, the new text of the lock (its `resolved` section) and the history.

    Nothing is written here: the caller writes them (`write()`) once whatever goes with them (a pull
    request) succeeded, so a failure leaves both files as they were and a rerun finds the same change.
    """
    lock, doc = read_lock(lock_path)
    hist_path = history_path(lock_path)
    history = read_history(hist_path)
    new = refresh(lock, today, overrides)
    matrix = build_matrix(lock.os.id, new, lock.policy.exclusions)
    changes = diff(lock.resolved, new, lock.policy.branches, os_profile(lock.os.id).name)
    if not changes:
        return UpdateResult([], matrix, {})
    doc["resolved"] = resolved_to_yaml(new)
    return UpdateResult(changes, matrix, {lock_path: lock_text(lock_path, doc),
                                          hist_path: history_text(record(history, matrix, today))})
