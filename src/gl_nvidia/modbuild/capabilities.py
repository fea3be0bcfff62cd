"""What a driver userspace has and lacks of the files the NVIDIA Container Toolkit gives a workload per
capability (toolkit-capabilities.json: its per-capability lists, Apache-2.0, with their source).

A library counts as present when usr/lib/<triplet> (or its vdpau/ subdirectory, where VDPAU drivers live)
holds a file or link whose name starts with the listed name (`libcuda.so` finds libcuda.so.1), a binary
when usr/bin holds it.
"""

from __future__ import annotations

import json
from pathlib import Path

_LIST = Path(__file__).with_name("toolkit-capabilities.json")


def toolkit_lists() -> dict[str, dict[str, list[str]]]:
    """capability -> {"libraries": [...], "binaries": [...]}."""
    caps: dict[str, dict[str, list[str]]] = json.loads(_LIST.read_text())["capabilities"]
    return caps


def missing(userspace: Path, triplet: str, why: str) -> dict[str, str]:
    """`"<capability>: <name>" -> why` for each name of the toolkit's lists `userspace` lacks (sorted)."""
    lib = userspace / "usr/lib" / triplet
    names = [p.name for d in (lib, lib / "vdpau") if d.is_dir() for p in d.iterdir()]
    bins = userspace / "usr/bin"
    gaps: dict[str, str] = {}
    for cap, lists in sorted(toolkit_lists().items()):
        for name in lists["libraries"]:
            if not any(n == name or n.startswith(name + ".") for n in names):
                gaps[f"{cap}: {name}"] = why
        for name in lists["binaries"]:
            if not (bins / name).is_file():
                gaps[f"{cap}: {name}"] = why
    return gaps
