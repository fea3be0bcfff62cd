"""Read a kernel module's `.modinfo` section (vermagic, depends, srcversion) with the standard library."""

from __future__ import annotations

import struct
from pathlib import Path

from .decide import NodeError


def modinfo(ko: Path) -> dict[str, str]:
    """`key=value` pairs of the ELF64 `.modinfo` section (the first value of repeated keys wins)."""
    try:
        return _modinfo(ko)
    except (ValueError, struct.error, IndexError) as exc:
        raise NodeError(f"{ko} is not a readable kernel module ({exc})",
                        "the image is damaged: pull it again, or rebuild it with gl-nvidia image") from exc


def _modinfo(ko: Path) -> dict[str, str]:
    with ko.open("rb") as f:
        ident = f.read(64)
        if ident[:4] != b"\x7fELF" or ident[4] != 2:
            raise ValueError(f"{ko} is not an ELF64 kernel module")
        end = "<" if ident[5] == 1 else ">"
        shoff, = struct.unpack_from(end + "Q", ident, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", ident, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from(end + "IIQQQQ", table, i * shentsize) for i in range(shnum)]
        _, _, _, _, str_off, str_size = sections[shstrndx]
        f.seek(str_off)
        names = f.read(str_size)
        for name_off, _, _, _, off, size in sections:
            if names[name_off : names.index(b"\0", name_off)] == b".modinfo":
                f.seek(off)
                data = f.read(size)
                break
        else:
            raise ValueError(f"{ko} has no .modinfo section")
    info: dict[str, str] = {}
    for entry in data.split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def depends(ko: Path) -> tuple[str, ...]:
    return tuple(d for d in modinfo(ko).get("depends", "").split(",") if d)
