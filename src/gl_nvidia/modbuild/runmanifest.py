"""NVIDIA's `.manifest`: what an unpacked `NVIDIA-Linux-*.run` installs where, read the way nvidia-installer
reads it, and the userspace the image carries from it.

The format (nvidia-installer's parse_manifest): line 1 a description, line 2 the driver version, lines 3-8
kernel-module metadata, then one file entry per line up to the first empty line:

    FILE MODE TYPE [NATIVE|COMPAT32] [PATH | INHERIT_PATH_DEPTH:N] [TARGET]

Which fields follow TYPE depends on the type: an architecture for libraries and their links, a path for
some types (a subdirectory of the library directory, or an absolute directory), an inherited path for
files that keep part of their place in the tree (firmware), a target for symlinks. Installed here: the
native (64-bit) libraries and links of the container toolkit's capabilities (compute, utility, video,
graphics, ngx) in /usr/lib/<triplet>, the tools in /usr/bin, the ICD files where their loaders look
(OpenCL, Vulkan, the GLVND EGL vendor, EGL external platforms), OptiX's data and the GSP firmware.
X server modules, 32-bit compat libraries, GBM and Wine files, kernel sources, systemd units, man pages
and the installer itself are a desktop's or the installer's, not a container's.

Before anything is written, every entry is checked: its file inside the tree, its destination inside
the root, a symlink's target inside the root, and each library's DT_SONAME (read from the ELF, never
guessed from its name) either its own name or a link the manifest declares to it.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gl_nvidia import elf
from gl_nvidia.arches import ARCHES
from gl_nvidia.errors import IntegrityError, UserError

# Types whose entries carry an architecture, a path, an inherited path, a symlink target (nvidia-installer's
# file-type table), and which of them are shared libraries.
_ARCH = frozenset({
    "OPENGL_LIB", "WINE_LIB", "CUDA_LIB", "OPENCL_LIB", "OPENCL_WRAPPER_LIB", "OPENCL_LIB_SYMLINK",
    "OPENCL_WRAPPER_SYMLINK", "TLS_LIB", "UTILITY_LIB", "GBM_BACKEND_LIB", "OPENGL_SYMLINK", "CUDA_SYMLINK",
    "UTILITY_LIB_SYMLINK", "GBM_BACKEND_LIB_SYMLINK", "VDPAU_LIB", "VDPAU_SYMLINK", "NVCUVID_LIB",
    "NVCUVID_LIB_SYMLINK", "ENCODEAPI_LIB", "ENCODEAPI_LIB_SYMLINK", "GLVND_LIB", "GLVND_SYMLINK",
    "GLX_CLIENT_LIB", "GLX_CLIENT_SYMLINK", "EGL_CLIENT_LIB", "EGL_CLIENT_SYMLINK", "INTERNAL_UTILITY_BINARY",
    "INTERNAL_UTILITY_LIB"})
_PATH = frozenset({
    "CUDA_LIB", "OPENCL_LIB", "OPENCL_WRAPPER_LIB", "OPENCL_LIB_SYMLINK", "OPENCL_WRAPPER_SYMLINK", "TLS_LIB",
    "DOCUMENTATION", "APPLICATION_PROFILE", "MANPAGE", "EXPLICIT_PATH", "CUDA_SYMLINK", "DOT_DESKTOP", "ICON",
    "XMODULE_SHARED_LIB", "GLX_MODULE_SHARED_LIB", "GLX_MODULE_SYMLINK", "VDPAU_LIB", "VDPAU_SYMLINK",
    "GRID_LIB", "GRID_LIB_SYMLINK", "NVIDIA_MODPROBE", "NVIDIA_MODPROBE_MANPAGE", "VULKAN_ICD_JSON",
    "FLEXERA_LIB", "FLEXERA_LIB_SYMLINK", "SYSTEMD_UNIT_SYMLINK", "OPENGL_DATA", "VULKANSC_ICD_JSON",
    "SANDBOXUTILS_FILELIST_JSON"})
_INHERIT = frozenset({"KERNEL_MODULE_SRC", "DKMS_CONF", "FIRMWARE"})

# What the image installs, by type: the directory (root-relative) and whether the entry's path is a
# subdirectory of it. None: an absolute directory named by the entry's path.
_LIB = "usr/lib/{triplet}"
_INSTALL: dict[str, str | None] = {
    **dict.fromkeys(("CUDA_LIB", "CUDA_SYMLINK", "OPENCL_LIB", "OPENCL_LIB_SYMLINK", "UTILITY_LIB",
                     "UTILITY_LIB_SYMLINK", "OPENGL_LIB", "OPENGL_SYMLINK", "TLS_LIB", "VDPAU_LIB",
                     "VDPAU_SYMLINK", "NVCUVID_LIB", "NVCUVID_LIB_SYMLINK", "ENCODEAPI_LIB",
                     "ENCODEAPI_LIB_SYMLINK", "GLX_CLIENT_LIB", "GLX_CLIENT_SYMLINK", "EGL_CLIENT_LIB",
                     "EGL_CLIENT_SYMLINK"), _LIB),
    "UTILITY_BINARY": "usr/bin",
    "UTILITY_BIN_SYMLINK": "usr/bin",
    "NVIDIA_MODPROBE": None,
    "OPENGL_DATA": None,
    "APPLICATION_PROFILE": "usr/share/nvidia",
    "CUDA_ICD": "etc/OpenCL/vendors",
    "VULKAN_ICD_JSON": "etc/vulkan",
    "GLVND_EGL_ICD_JSON": "usr/share/glvnd/egl_vendor.d",
    "EGL_EXTERNAL_PLATFORM_JSON": "usr/share/egl/egl_external_platform.d",
    "FIRMWARE": "lib/firmware/nvidia/{version}",
}
_SHARED_LIB = frozenset(t for t in _INSTALL if t.endswith("_LIB"))
# Types whose PATH names a subdirectory of the type's directory (the others' PATH is where they go).
_SUBDIR = frozenset({"CUDA_LIB", "CUDA_SYMLINK", "OPENCL_LIB", "OPENCL_LIB_SYMLINK", "TLS_LIB", "VDPAU_LIB",
                     "VDPAU_SYMLINK", "VULKAN_ICD_JSON"})


@dataclass(frozen=True)
class Entry:
    file: str  # relative to the unpacked tree
    mode: int
    type: str
    arch: str | None  # "NATIVE" | "COMPAT32" for types with an architecture
    path: str | None  # the PATH field, or the inherited part of FILE's directory
    target: str | None  # a symlink's target

    @property
    def name(self) -> str:
        return posixpath.basename(self.file)


@dataclass(frozen=True)
class Manifest:
    description: str
    version: str
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Placement:
    """One file or link of the layout: `dest` root-relative (usr/..., etc/..., lib/firmware/...)."""

    dest: PurePosixPath
    source: str | None  # the entry's FILE (a regular file), else a link
    mode: int
    link: str | None


def parse(text: str, where: str) -> Manifest:
    """The manifest at `where` (for messages): any line nvidia-installer would refuse is a UserError."""
    lines = text.splitlines()
    if len(lines) < 2 or not re.fullmatch(r"\d+\.\d+(\.\d+)?", lines[1].strip()):
        raise UserError(f"cannot read the driver version from {where}",
                        "is it the .manifest of an unpacked NVIDIA-Linux-*.run?")
    entries: list[Entry] = []
    for n, line in enumerate(lines[8:], start=9):
        if not line.strip():
            break
        entries.append(_entry(line.split(), f"{where} line {n}"))
    return Manifest(lines[0].strip(), lines[1].strip(), tuple(entries))


def _entry(words: list[str], at: str) -> Entry:
    if len(words) < 3 or not re.fullmatch(r"[0-7]{3,4}", words[1]):
        raise UserError(f"{at}: not a file entry (FILE MODE TYPE ...)", "the installer is damaged; download it again")
    file, mode, typ = words[0], int(words[1], 8), words[2]
    rest = iter(words[3:])
    arch = path = target = None
    try:
        if typ in _ARCH:
            arch = next(rest)
            if arch not in ("NATIVE", "COMPAT32"):
                raise UserError(f"{at}: {typ} entry {file} has architecture {arch!r}, not NATIVE or COMPAT32")
        if typ in _PATH:
            path = next(rest)
        elif typ in _INHERIT:
            depth = next(rest)
            if not re.fullmatch(r"INHERIT_PATH_DEPTH:\d+", depth):
                raise UserError(f"{at}: {typ} entry {file} has no INHERIT_PATH_DEPTH:N")
            parts = file.split("/")[:-1]
            path = "/".join(parts[int(depth.split(":")[1]):])
        if typ.endswith("SYMLINK"):
            target = next(rest)
    except StopIteration:
        raise UserError(f"{at}: {typ} entry {file} lacks a field", "the installer is damaged; download it again") from None
    return Entry(file, mode, typ, arch, path, target)


def _inside(rel: str) -> bool:
    """Whether `rel` is a relative path that stays where it starts."""
    return bool(rel) and not rel.startswith("/") and ".." not in PurePosixPath(rel).parts


def plan(manifest: Manifest, tree: Path, arch: str) -> list[Placement]:
    """What to write where, for the image of `arch`: every check done, nothing written."""
    where = f"{tree.name}/.manifest"
    triplet = ARCHES[arch].triplet
    placed: list[tuple[Entry, PurePosixPath]] = []
    for e in manifest.entries:
        if e.type not in _INSTALL or e.arch == "COMPAT32":
            continue
        base = _INSTALL[e.type]
        if not _inside(e.file):
            raise IntegrityError(f"{where}: {e.file} is outside the unpacked installer",
                                 "a .manifest names files inside its own tree; nothing was written")
        src = tree / e.file
        if e.target is None and (src.is_symlink() or not src.is_file()
                                 or not src.resolve().is_relative_to(tree.resolve())):
            raise IntegrityError(f"{where}: {e.file} is not a regular file inside the unpacked installer",
                                 "nothing was written")
        if base is None:  # an absolute directory: the entry's own path
            if not e.path or not e.path.startswith("/") or not _inside(e.path.lstrip("/") or "."):
                raise IntegrityError(f"{where}: {e.file} goes to {e.path!r}, outside the image's root",
                                     "nothing was written")
            d = PurePosixPath(e.path.lstrip("/"))
        else:
            d = PurePosixPath(base.format(triplet=triplet, version=manifest.version))
            sub = e.path if e.type in _SUBDIR or e.type == "FIRMWARE" else None
            if sub and sub.strip("/"):
                if not _inside(sub.strip("/")):
                    raise IntegrityError(f"{where}: {e.file} goes to {e.path!r}, outside {d}", "nothing was written")
                d /= sub.strip("/")
        if e.target is not None:
            leaves = e.target.startswith("/") or posixpath.normpath(posixpath.join(str(d), e.target)).split("/")[0] == ".."
            if leaves:
                raise IntegrityError(f"{where}: the link {d / e.name} points to {e.target!r}, out of the image's root",
                                     "nothing was written")
        placed.append((e, d / e.name))
    _check_sonames(placed, tree, arch, where)
    return [Placement(dest, None if e.target else e.file, e.mode, e.target) for e, dest in placed]


def _check_sonames(placed: list[tuple[Entry, PurePosixPath]], tree: Path, arch: str, where: str) -> None:
    """Each library's DT_SONAME is its own name or a link the manifest declares to it: what the loader looks
    up is then what the image has, and nothing is linked by a naming rule."""
    links = {dest: posixpath.normpath(posixpath.join(str(dest.parent), e.target))
             for e, dest in placed if e.target is not None}
    machine = ARCHES[arch].elf_machine
    for e, dest in placed:
        if e.type not in _SHARED_LIB:
            continue
        dyn = elf.dynamic(tree / e.file)
        if dyn is None or dyn.machine != machine:
            raise IntegrityError(f"{where}: {e.file} is listed as {e.type} but is no {arch} ELF shared library",
                                 "nothing was written")
        if dyn.soname is None or dyn.soname == e.name:
            continue
        link = dest.parent / dyn.soname
        seen: set[PurePosixPath] = set()
        while link in links and link not in seen:
            seen.add(link)
            link = PurePosixPath(links[link])
        if link != dest:
            raise IntegrityError(f"{where}: {e.file} has DT_SONAME {dyn.soname}, but the manifest declares no "
                                 f"link {dyn.soname} to it", "nothing was written")
