"""What changed between two resolutions, in lines a reviewer reads in ten seconds."""

from __future__ import annotations

from dataclasses import dataclass

from gl_nvidia.catalog.lock import Resolved, ResolvedOSVersion

# Kinds, in the order a changelog lists them.
KINDS = (
    "gl-major-added", "gl-patch", "gl-minor-dropped", "gl-eol",
    "branch-added", "driver-patch", "branch-dropped",
    "kernel",
)


@dataclass(frozen=True)
class Change:
    kind: str
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "text": self.text}


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def _by_major(versions: list[ResolvedOSVersion]) -> dict[str, list[ResolvedOSVersion]]:
    out: dict[str, list[ResolvedOSVersion]] = {}
    for v in versions:
        out.setdefault(_major(v.version), []).append(v)
    return out


def _names(versions: list[ResolvedOSVersion]) -> str:
    return ", ".join(v.version for v in versions)


def _gets(versions: list[ResolvedOSVersion]) -> str:
    return "gets" if len(versions) == 1 else "get"


def diff(old: Resolved | None, new: Resolved, branches: int, os_name: str = "GL") -> list[Change]:
    """Changes from `old` (None: never resolved) to `new`; empty when nothing that matters changed."""
    out: list[Change] = []
    old_gl = _by_major(old.os_versions if old else [])
    new_gl = _by_major(new.os_versions)
    for major, versions in new_gl.items():
        if major not in old_gl:
            out.append(Change("gl-major-added", f"{os_name} {major} enters maintenance with {_names(versions)}"))
            continue
        had, has = {v.version for v in old_gl[major]}, {v.version for v in versions}
        added = [v for v in versions if v.version not in had]
        gone = [v for v in old_gl[major] if v.version not in has]
        was = f" (was {gone[0].version})" if len(added) == 1 and len(gone) == 1 else ""
        out += [Change("gl-patch", f"new {os_name} patch release {v.version}{was}") for v in added]
        if gone and not was:
            out.append(Change("gl-minor-dropped", f"{os_name} {_names(gone)} {_gets(gone)} no new images (policy)"))
    for major, versions in old_gl.items():
        if major not in new_gl:
            eol = f" (eol {versions[-1].eol})" if versions[-1].eol else ""
            out.append(Change("gl-eol", f"{os_name} {major} reached end of maintenance{eol}: "
                                        f"{_names(versions)} {_gets(versions)} no new images"))

    # a branch per OS version where each reads its own suites (Debian 12 and 13 both package 535)
    old_drv = {(d.os_version, d.branch): d for d in (old.drivers if old else [])}
    new_drv = {(d.os_version, d.branch): d for d in new.drivers}
    for (_, branch), d in new_drv.items():
        if (d.os_version, branch) not in old_drv:
            out.append(Change("branch-added", f"driver branch {branch} ({d.type}) enters the top {branches}: {d.version}"))
        elif old_drv[d.os_version, branch].version != d.version:
            out.append(Change("driver-patch",
                              f"new driver patch release {d.version} (was {old_drv[d.os_version, branch].version})"))
    for (_, branch), d in old_drv.items():
        if (d.os_version, branch) not in new_drv:
            out.append(Change("branch-dropped", f"driver branch {branch} drops out (last {d.version})"))

    old_k = {(k.os_version, k.flavour, k.arch): k.kernel for k in (old.kernels if old else [])}
    for k in new.kernels:
        before = old_k.get((k.os_version, k.flavour, k.arch))
        if before is not None and before != k.kernel:
            out.append(Change("kernel", f"kernel of {k.os_version} {k.flavour}/{k.arch}: {k.kernel} (was {before})"))
    return sorted(out, key=lambda c: KINDS.index(c.kind))
