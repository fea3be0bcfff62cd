"""A strategy's implementations by name: the one place that chooses one (mkosi's distribution registry).

Each axis the project grows along (OS profile, driver source, kernel environment, base source) is one
`Table`; the CLI's choices, the lock's checks and every stage look a name up here, and nothing else
branches on it. A name without a row is refused where it enters, in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from gl_nvidia.errors import UserError

T = TypeVar("T")


class Table(dict[str, T]):
    def __init__(self, what: str, rows: Mapping[str, T]) -> None:
        """`what` completes "gl-nvidia has no ...": "OS profile for", "driver source"."""
        super().__init__(rows)
        self.what = what

    def lookup(self, name: str) -> T:
        """The row of `name`; a name without one is a UserError naming the ones there are."""
        row = self.get(name)
        if row is None:
            raise UserError(self.refusal(name), f"use {self.choices()}")
        return row

    def refusal(self, name: str) -> str:
        return f"gl-nvidia has no {self.what} {str(name)[:80]!r}"

    def choices(self) -> str:
        names = list(self)
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
