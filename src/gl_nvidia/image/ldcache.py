"""/etc/ld.so.cache for an image's root filesystem, for any architecture, without running its ldconfig.

The build machine's ldconfig only understands its own architecture (glibc's x86 ldconfig skips an
aarch64 library as "for unknown machine 183") and the image's own ldconfig cannot run on another
architecture without emulation. So the cache is written here, in glibc's format (`glibc-ld.so.cache1.1`,
the only one glibc >= 2.32 writes and the one the NVIDIA container toolkit parses), following ldconfig's
rules (elf/ldconfig.c, glibc 2.36) for what it lists:

- directories: those of /etc/ld.so.conf (`include` globs in sorted order), then the loader's own:
  /lib/<triplet>, /usr/lib/<triplet>, /lib, /usr/lib; missing ones are skipped and a directory reached twice (/lib is /usr/lib on
  merged-/usr roots) counts once, under the name it was first given;
- in each: files and symlinks named `lib*.so*` or `ld-*.so*` that are ELF shared objects of the
  image's machine, keyed by their SONAME and listed as `<dir>/<SONAME>`; a symlink whose name is its
  target's SONAME or the `.so` development link to it keeps its own name; of two files with one SONAME
  the newer name (glibc's version order) wins;
- entries sorted as the loader's binary search expects: keys descending in glibc's version order.

glibc-hwcaps subdirectories are not searched (Debian's libraries and NVIDIA's have none). Tests compare
the result with the real ldconfig: the build machine's for amd64, the image's own in a booted arm64 guest.
"""

from __future__ import annotations

import fnmatch
import functools
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gl_nvidia import elf
from gl_nvidia.arches import ARCHES
from gl_nvidia.image import unpack

MAGIC = b"glibc-ld.so.cache1.1"
_ENDIAN_LITTLE = 2  # cache_file_new_flags_endian_little
_EXTENSION_MAGIC = 0xEAA42174
_TAG_GENERATOR = 0
GENERATOR = b"gl-nvidia"
_HEADER = struct.Struct("<20sIIB3xI12x")
_ENTRY = struct.Struct("<iIIIQ")
_CONF = PurePosixPath("/etc/ld.so.conf")


@dataclass(frozen=True)
class CacheEntry:
    soname: str  # the key the loader looks up
    path: str  # the file it loads, absolute inside the image
    flags: int


_DIGITS = frozenset("0123456789")


def libcmp(a: str, b: str) -> int:
    """glibc's _dl_cache_libcmp: runs of digits compare as numbers, so libfoo.so.10 > libfoo.so.9."""
    i = j = 0
    while i < len(a):
        if a[i] in _DIGITS:
            if j >= len(b) or b[j] not in _DIGITS:
                return 1
            si, sj = i, j
            while i < len(a) and a[i] in _DIGITS:
                i += 1
            while j < len(b) and b[j] in _DIGITS:
                j += 1
            if int(a[si:i]) != int(b[sj:j]):
                return int(a[si:i]) - int(b[sj:j])
        elif j < len(b) and b[j] in _DIGITS:
            return -1
        elif j >= len(b) or a[i] != b[j]:
            return ord(a[i]) - (ord(b[j]) if j < len(b) else 0)
        else:
            i += 1
            j += 1
    return -(ord(b[j]) if j < len(b) else 0)


def search_dirs(root: Path, arch: str) -> list[PurePosixPath]:
    """The directories ldconfig searches in the image at `root`, in its order, each directory once."""
    triplet = ARCHES[arch].triplet
    builtin = (f"/lib/{triplet}", f"/usr/lib/{triplet}", "/lib", "/usr/lib")  # Debian's glibc, after the conf
    named = [*_conf_dirs(root, _CONF, 0), *map(PurePosixPath, builtin)]
    seen: set[PurePosixPath] = set()
    dirs = []
    for d in named:
        real = unpack.resolve_in_root(root, d, follow=True)
        if real not in seen and unpack.host_path(root, real).is_dir():
            seen.add(real)
            dirs.append(d)
    return dirs


def _conf_dirs(root: Path, conf: PurePosixPath, depth: int) -> list[PurePosixPath]:
    host = unpack.host_path(root, unpack.resolve_in_root(root, conf, follow=True))
    if depth > 8 or not host.is_file():
        return []
    dirs: list[PurePosixPath] = []
    for raw in host.read_text(errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include") and line[7:8].isspace():
            for pattern in line[8:].split():
                for inc in _glob(root, conf.parent / pattern):
                    dirs += _conf_dirs(root, inc, depth + 1)
        elif not (line[:5].lower() == "hwcap" and line[5:6].isspace()):
            dirs.append(PurePosixPath(line.split("=", 1)[0].rstrip("/") or "/"))
    return dirs


def _glob(root: Path, pattern: PurePosixPath) -> list[PurePosixPath]:
    """An `include` glob (wildcards in the file name only, as in Debian's conf) inside the image."""
    parent = unpack.host_path(root, unpack.resolve_in_root(root, pattern.parent, follow=True))
    if not parent.is_dir():
        return []
    return [pattern.parent / n for n in sorted(p.name for p in parent.iterdir()) if fnmatch.fnmatchcase(n, pattern.name)]


def _is_dso(name: str) -> bool:
    return (name.startswith(("lib", "ld-")) and ".so" in name) or \
        (name.startswith("ld.so.") and "." not in name[6:]) or (name.startswith("ld64.so.") and "." not in name[8:])


def _soname(path: Path, machine: str) -> tuple[bool, str | None]:
    """(whether `path` is an ELF shared object of `machine`, its DT_SONAME)."""
    dyn = elf.dynamic(path)
    if dyn is None or dyn.machine != machine:
        return False, None
    return True, dyn.soname


@dataclass
class _Lib:
    name: str
    soname: str
    is_link: bool


def _scan_dir(root: Path, d: PurePosixPath, machine: str) -> list[_Lib]:
    host_dir = unpack.host_path(root, unpack.resolve_in_root(root, d, follow=True))
    libs: dict[str, _Lib] = {}
    for name in sorted(p.name for p in host_dir.iterdir()):
        if not _is_dso(name):
            continue
        entry = host_dir / name
        is_link = entry.is_symlink()
        target = unpack.host_path(root, unpack.resolve_in_root(root, d / name, follow=True)) if is_link else entry
        if not target.is_file():
            continue  # dangling, a directory (hwcap subdirectories are not searched), a device
        ok, soname = _soname(target, machine)
        if not ok:
            continue
        soname = soname or name
        if is_link and name != soname and not (name.endswith(".so") and soname.startswith(name)):
            is_link = False  # not the SONAME link nor the .so link: a library file under another name
        if is_link:
            soname = name
        have = libs.get(soname)
        if have is None:
            libs[soname] = _Lib(name, soname, is_link)
        elif (not is_link and have.is_link) or (is_link == have.is_link and libcmp(have.name, name) < 0):
            have.name, have.is_link = name, is_link
    return list(libs.values())


def entries(root: Path, arch: str) -> list[CacheEntry]:
    """What ldconfig would list for the image at `root`, in the cache's order."""
    machine, flags = ARCHES[arch].elf_machine, ARCHES[arch].ldconfig_flags
    found = [CacheEntry(lib.soname, f"{str(d).rstrip('/')}/{lib.soname}", flags)
             for d in search_dirs(root, arch) for lib in _scan_dir(root, d, machine)]
    # Stable: of equal keys (one SONAME in two directories) the first directory's comes first, as in ldconfig.
    return sorted(found, key=functools.cmp_to_key(_cache_order))


def _cache_order(a: CacheEntry, b: CacheEntry) -> int:
    return libcmp(b.soname, a.soname) or b.flags - a.flags


def encode(listed: Iterable[CacheEntry]) -> bytes:
    """The cache file: header, entries, string table, the generator extension."""
    listed = list(listed)
    strings = bytearray()
    offsets: dict[str, int] = {}
    base = _HEADER.size + _ENTRY.size * len(listed)

    def offset(s: str) -> int:
        if s not in offsets:
            offsets[s] = base + len(strings)
            strings.extend(s.encode() + b"\0")
        return offsets[s]

    table = b"".join(_ENTRY.pack(e.flags, offset(e.soname), offset(e.path), 0, 0) for e in listed)
    ext_at = base + len(strings)
    ext_at += -ext_at % 4
    ext_data = ext_at + 8 + 16
    header = _HEADER.pack(MAGIC, len(listed), len(strings), _ENDIAN_LITTLE, ext_at)
    extension = struct.pack("<IIIIII", _EXTENSION_MAGIC, 1, _TAG_GENERATOR, 0, ext_data, len(GENERATOR))
    return header + table + bytes(strings) + b"\0" * (ext_at - base - len(strings)) + extension + GENERATOR


def build(root: Path, arch: str) -> bytes:
    """/etc/ld.so.cache's bytes for the image at `root` (same tree, same bytes)."""
    return encode(entries(root, arch))
