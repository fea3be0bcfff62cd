"""Typed records the catalog hands to every later stage: cells, exclusions, build units, the matrix."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, order=True)
class Cell:
    """One combination that must have a driver image: an OS release's kernel with one driver."""

    os_id: str  # "gardenlinux" or "debian": the NFD os_release.ID of the nodes
    os_version: str  # GL version ("1877.3", "2150.9.0") or Debian's VERSION_ID ("12")
    flavour: str  # "cloud" | "metal"
    arch: str  # "amd64" | "arm64"
    kernel: str  # uname -r, e.g. "6.12.72-cloud-amd64"
    driver_version: str  # "590.48.01"
    driver_branch: str  # "590"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MODULE_TYPES: tuple[str, ...] = ("open", "proprietary")


@dataclass(frozen=True)
class Exclusion:
    """A cell (or only some of its module types) that must not be built, and why."""

    cell: Cell
    reason: str
    module_types: tuple[str, ...] = MODULE_TYPES  # the excluded module types; both = the whole cell

    def as_dict(self) -> dict[str, Any]:
        return {**self.cell.as_dict(), "reason": self.reason, "module_types": list(self.module_types)}


@dataclass(frozen=True, order=True)
class BuildUnit:
    """What is compiled once: every cell sharing (kernel, driver, arch) reuses its modules."""

    kernel: str
    driver_version: str
    driver_branch: str
    arch: str
    flavour: str
    os_id: str
    os_versions: tuple[str, ...] = field(default=())  # every OS release whose cells this unit serves
    module_types: tuple[str, ...] = MODULE_TYPES  # what to compile; an exclusion may drop one type

    @property
    def key(self) -> str:
        return f"{self.driver_version}-{self.kernel}-{self.arch}"

    def cells(self) -> list[Cell]:
        """The cells this unit serves, one per OS release."""
        return [Cell(self.os_id, v, self.flavour, self.arch, self.kernel, self.driver_version, self.driver_branch)
                for v in self.os_versions]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["os_versions"] = list(self.os_versions)
        d["module_types"] = list(self.module_types)
        return d


@dataclass(frozen=True)
class Matrix:
    cells: tuple[Cell, ...]
    excluded: tuple[Exclusion, ...]
    units: tuple[BuildUnit, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "cells": [c.as_dict() for c in self.cells],
            "excluded": [e.as_dict() for e in self.excluded],
            "units": [u.as_dict() for u in self.units],
        }
