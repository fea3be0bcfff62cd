"""The build matrix: cells from the resolved lock, exclusions applied, cells sharing a build merged.

`load_matrix` is what the build and release stages call.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import date
from importlib import resources
from pathlib import Path

from gl_nvidia.catalog.feeds import version_key
from gl_nvidia.catalog.kernels import compare_kernels
from gl_nvidia.catalog.lock import (
    ExclusionRule,
    Lock,
    Resolved,
    ResolvedDriver,
    parse_lock_text,
    read_lock,
)
from gl_nvidia.catalog.model import MODULE_TYPES, BuildUnit, Cell, Exclusion, Matrix
from gl_nvidia.catalog.refresh import SourceOverrides, driver_feed, refresh

PROFILES = ("debian", "gardenlinux")
_OPS: dict[str, Callable[[int, int], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne,
}


def _cmp_versions(a: str, b: str) -> int:
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


def in_range(value: str, spec: str, compare: Callable[[str, str], int]) -> bool:
    """Whether `value` satisfies every clause of `spec` (">=2150.8,<2200"; a bare value means ==)."""
    for clause in spec.split(","):
        clause = clause.strip()
        op = next((o for o in (">=", "<=", "==", "!=", ">", "<") if clause.startswith(o)), "==")
        operand = clause.removeprefix(op).strip() if clause.startswith(op) else clause
        if not _OPS[op](compare(value, operand), 0):
            return False
    return True


def rule_matches(rule: ExclusionRule, cell: Cell) -> bool:
    checks: list[tuple[str | None, str, Callable[[str, str], int]]] = [
        (rule.os_version, cell.os_version, _cmp_versions),
        (rule.kernel, cell.kernel, compare_kernels),
        (rule.driver_branch, cell.driver_branch, _cmp_versions),
        (rule.driver_version, cell.driver_version, _cmp_versions),
    ]
    if rule.flavour is not None and rule.flavour != cell.flavour:
        return False
    if rule.arch is not None and rule.arch != cell.arch:
        return False
    return all(spec is None or in_range(value, spec, cmp) for spec, value, cmp in checks)


def version_mismatch(driver: ResolvedDriver) -> str | None:
    """Why a driver's open modules cannot ship with it, when their source is of another version.

    The node refuses a module set whose version differs from the image's userspace (NVML: "Driver/library
    version mismatch"), so compiling it would only make a layer nobody can load.
    """
    if driver.open_modules is False:
        return f"no open module source of driver {driver.version} is packaged beside its {driver.type}"
    if driver.open_version is None or driver.open_version == driver.version:
        return None
    return (f"open module source {driver.open_version} differs from driver {driver.version}: "
            "the node refuses modules of another version than its userspace")


def build_matrix(os_id: str, resolved: Resolved, exclusions: list[ExclusionRule]) -> Matrix:
    """Every (kernel, driver) cell; rules drop cells or module types; units are built once per
    (kernel, driver, arch) and compile the module types any of their cells still needs."""
    cells: list[Cell] = []
    excluded: list[Exclusion] = []
    allowed: dict[Cell, tuple[str, ...]] = {}
    for k in resolved.kernels:
        # A driver read from one OS version's suites serves only that version's kernels.
        for d in (d for d in resolved.drivers if d.os_version in (None, k.os_version)):
            cell = Cell(os_id=os_id, os_version=k.os_version, flavour=k.flavour, arch=k.arch,
                        kernel=k.kernel, driver_version=d.version, driver_branch=d.branch)
            if d.arches is not None and k.arch not in d.arches:
                excluded.append(Exclusion(cell, f"driver {d.version} ({d.type}) has no module source for "
                                                f"{k.arch} in the suites of {os_id} {k.os_version}"))
                continue
            types = list(MODULE_TYPES)
            mismatch = version_mismatch(d)
            if mismatch is not None:
                excluded.append(Exclusion(cell, mismatch, ("open",)))
                types.remove("open")
            for rule in exclusions:
                hit = [t for t in rule.module_types if t in types]
                if hit and rule_matches(rule, cell):
                    excluded.append(Exclusion(cell, rule.reason, tuple(hit)))
                    types = [t for t in types if t not in hit]
            if types:
                cells.append(cell)
                allowed[cell] = tuple(types)
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.kernel, cell.driver_version, cell.arch), []).append(cell)
    units = []
    for (kernel, version, arch), members in groups.items():
        first = members[0]
        unit_types = tuple(t for t in MODULE_TYPES if any(t in allowed[c] for c in members))
        os_versions = tuple(sorted({c.os_version for c in members}, key=version_key))
        units.append(BuildUnit(kernel=kernel, driver_version=version, driver_branch=first.driver_branch,
                               arch=arch, flavour=first.flavour, os_id=os_id, os_versions=os_versions,
                               module_types=unit_types))
    return Matrix(cells=tuple(sorted(cells)), excluded=tuple(excluded), units=tuple(sorted(units)))


def profile_text(name: str) -> str:
    return resources.files("gl_nvidia.catalog").joinpath("profiles", f"{name}.yaml").read_text()


def lock_path(profile_or_lock_path: str | Path) -> Path | None:
    """The lock file a profile name stands for: "gardenlinux" is ./versions.yaml, a path is itself, the
    embedded "debian" has none."""
    if profile_or_lock_path == "debian":
        return None
    return Path("versions.yaml") if profile_or_lock_path == "gardenlinux" else Path(profile_or_lock_path)


def load_lock(profile_or_lock_path: str | Path) -> Lock:
    """An embedded profile by name ("debian"), "gardenlinux" (./versions.yaml), or a lock file path."""
    path = lock_path(profile_or_lock_path)
    lock = parse_lock_text(profile_text("debian"), "embedded profile debian")[0] if path is None else read_lock(path)[0]
    driver_feed(lock.sources.nvidia)  # a driver source gl-nvidia has no row for is refused where it enters
    return lock


def load_matrix(
    profile_or_lock_path: str | Path,
    today: date | None = None,
    overrides: SourceOverrides | None = None,
) -> Matrix:
    """The matrix of a profile or lock file, for `matrix`, `build` and `release`.

    A lock with a `resolved` section (written by `gl-nvidia update`) is used as it is, offline. A
    profile without one (the embedded `debian`) is resolved now from its sources; `today` (default: the
    current date) decides which releases are in maintenance.
    """
    return lock_matrix(load_lock(profile_or_lock_path), today, overrides)


def lock_matrix(lock: Lock, today: date | None = None, overrides: SourceOverrides | None = None) -> Matrix:
    """`load_matrix` of a lock already read."""
    return build_matrix(lock.os.id, lock_resolved(lock, today, overrides), lock.policy.exclusions)


def lock_resolved(lock: Lock, today: date | None = None, overrides: SourceOverrides | None = None) -> Resolved:
    """The lock's `resolved` section, or (a profile without one) its sources resolved now."""
    return lock.resolved or refresh(lock, today or date.today(), overrides)
