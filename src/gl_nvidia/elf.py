"""What the dynamic loader reads of an ELF file, shared by the stages that lay out libraries (build) and
index them (image): a file's machine, DT_SONAME and DT_NEEDED (an arch's names for its code: arches.py)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile


@dataclass(frozen=True)
class Dynamic:
    """What the loader reads of an ELF64 file's PT_DYNAMIC."""

    machine: str  # e_machine, e.g. "EM_X86_64"
    soname: str | None
    needed: tuple[str, ...]


def dynamic(path: Path) -> Dynamic | None:
    """`path`'s dynamic section as the loader sees it (PT_DYNAMIC: section headers may be stripped), or None
    when it is no ELF64 file with one."""
    try:
        with path.open("rb") as fh:
            elf = ELFFile(fh)
            if elf.elfclass != 64:
                return None
            segment = next((s for s in elf.iter_segments() if isinstance(s, DynamicSegment)), None)
            if segment is None:
                return None
            tags = list(segment.iter_tags())
            sonames = [str(t.soname) for t in tags if t.entry.d_tag == "DT_SONAME"]  # type: ignore[attr-defined]
            return Dynamic(str(elf["e_machine"]), sonames[0] if sonames else None,
                           tuple(str(t.needed) for t in tags if t.entry.d_tag == "DT_NEEDED"))  # type: ignore[attr-defined]
    except (ELFError, OSError, ValueError, struct.error):
        return None
