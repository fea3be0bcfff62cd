"""What changed between two resolutions, in lines a reviewer reads in ten seconds."""

from __future__ import annotations

from dataclasses import dataclass

from gl_nvidia.catalog.lock import Resolved

# Kinds, in the order a changelog lists them.
KINDS = (
    "gl-major-added", "gl-patch", "gl-eol",
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


def diff(old: Resolved | None, new: Resolved, branches: int, os_name: str = "GL") -> list[Change]:
    """Changes from `old` (None: never resolved) to `new`; empty when nothing that matters changed."""
    out: list[Change] = []
    old_gl = {_major(v.version): v for v in (old.os_versions if old else [])}
    new_gl = {_major(v.version): v for v in new.os_versions}
    for major, v in new_gl.items():
        if major not in old_gl:
            out.append(Change("gl-major-added", f"{os_name} {major} enters maintenance with {v.version}"))
        elif old_gl[major].version != v.version:
            out.append(Change("gl-patch", f"new {os_name} patch release {v.version} (was {old_gl[major].version})"))
    for major, v in old_gl.items():
        if major not in new_gl:
            eol = f" (eol {v.eol})" if v.eol else ""
            out.append(Change("gl-eol", f"{os_name} {major} reached end of maintenance{eol}: {v.version} gets no new images"))

    old_drv = {d.branch: d for d in (old.drivers if old else [])}
    new_drv = {d.branch: d for d in new.drivers}
    for branch, d in new_drv.items():
        if branch not in old_drv:
            out.append(Change("branch-added", f"driver branch {branch} ({d.type}) enters the top {branches}: {d.version}"))
        elif old_drv[branch].version != d.version:
            out.append(Change("driver-patch", f"new driver patch release {d.version} (was {old_drv[branch].version})"))
    for branch, d in old_drv.items():
        if branch not in new_drv:
            out.append(Change("branch-dropped", f"driver branch {branch} drops out (last {d.version})"))

    old_k = {(k.os_version, k.flavour, k.arch): k.kernel for k in (old.kernels if old else [])}
    for k in new.kernels:
        before = old_k.get((k.os_version, k.flavour, k.arch))
        if before is not None and before != k.kernel:
            out.append(Change("kernel", f"kernel of {k.os_version} {k.flavour}/{k.arch}: {k.kernel} (was {before})"))
    return sorted(out, key=lambda c: KINDS.index(c.kind))
