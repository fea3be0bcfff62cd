"""Reproducible layer tarballs, written with Python's tarfile (no container engine).

Same input, same bytes: entries sorted by path, mtime = SOURCE_DATE_EPOCH (default 0), owner
root:root for files we add, GNU tar headers (no pax timestamps), gzip with mtime 0 and no file name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from gl_nvidia import oci
from gl_nvidia.oci import Descriptor, Layout

GZIP_LEVEL = 6


def source_date_epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def created() -> str:
    """SOURCE_DATE_EPOCH as the RFC 3339 time images and SBOMs say they were made."""
    return datetime.fromtimestamp(source_date_epoch(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Entry:
    """One member of a layer: a regular file (from disk or bytes), a directory or a symlink."""

    path: PurePosixPath  # absolute path inside the image
    mode: int = 0o644
    source: Path | None = None
    data: bytes | None = None
    link: str | None = None
    is_dir: bool = False


@dataclass(frozen=True)
class LayerBlob:
    descriptor: Descriptor  # of the compressed blob
    diff_id: str  # sha256 of the uncompressed tar (the image config's rootfs.diff_ids)
    uncompressed_size: int


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """Add every missing parent directory (0755) so the tar unpacks the same on any runtime."""
    by_path = {e.path: e for e in entries}
    for e in list(by_path.values()):
        for parent in e.path.parents:
            if parent != PurePosixPath("/") and parent not in by_path:
                by_path[parent] = Entry(parent, mode=0o755, is_dir=True)
    return [by_path[p] for p in sorted(by_path, key=lambda p: p.as_posix())]


class _Tee(io.RawIOBase):
    """Hashes and counts the uncompressed tar stream on its way into gzip."""

    def __init__(self, sink: gzip.GzipFile) -> None:
        self.sink = sink
        self.h = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.h.update(b)
        self.size += len(b)
        self.sink.write(b)
        return len(b)


def write_layer(layout: Layout, entries: Iterable[Entry]) -> LayerBlob:
    """Write one gzip layer blob into the layout and return its descriptor and diff_id."""
    mtime = source_date_epoch()
    with layout.blob_writer() as (_fh, hashing):
        gz = gzip.GzipFile(fileobj=hashing, mode="wb", mtime=0, filename="", compresslevel=GZIP_LEVEL)
        tee = _Tee(gz)
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for e in with_parents(entries):
                _add(tar, e, mtime)
        gz.close()
        hashing.flush()
        desc = layout.commit_blob(hashing, oci.LAYER_GZIP)
    return LayerBlob(desc, "sha256:" + tee.h.hexdigest(), tee.size)


def _add(tar: tarfile.TarFile, e: Entry, mtime: int) -> None:
    info = tarfile.TarInfo(e.path.as_posix().lstrip("/") + ("/" if e.is_dir else ""))
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = e.mode
    if e.is_dir:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif e.link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = e.link
        info.mode = 0o777
        tar.addfile(info)
    elif e.data is not None:
        info.size = len(e.data)
        tar.addfile(info, io.BytesIO(e.data))
    else:
        assert e.source is not None
        info.size = e.source.stat().st_size
        with e.source.open("rb") as fh:
            tar.addfile(info, fh)


def repack_rootfs(layout: Layout, rootfs_tar: Path) -> LayerBlob:
    """Normalise a root filesystem tarball (mmdebstrap's) into a reproducible layer.

    Entries are sorted, names made relative, mtimes clamped to SOURCE_DATE_EPOCH; owners are kept
    (a root filesystem has non-root files). Device nodes are dropped: runtimes provide /dev.
    """
    mtime = source_date_epoch()
    with tarfile.open(rootfs_tar, "r:*") as src:
        members = [m for m in src.getmembers() if not (m.ischr() or m.isblk() or m.isfifo())]
        members = [m for m in members if _norm(m.name)]
        members.sort(key=lambda m: _norm(m.name))
        with layout.blob_writer() as (_fh, hashing):
            gz = gzip.GzipFile(fileobj=hashing, mode="wb", mtime=0, filename="", compresslevel=GZIP_LEVEL)
            tee = _Tee(gz)
            with tarfile.open(fileobj=tee, mode="w|", format=tarfile.GNU_FORMAT) as out:
                for m in members:
                    info = tarfile.TarInfo(_norm(m.name) + ("/" if m.isdir() else ""))
                    info.type, info.mode, info.linkname = m.type, m.mode, m.linkname
                    if m.islnk():
                        info.linkname = _norm(m.linkname)
                    info.uid, info.gid, info.uname, info.gname = m.uid, m.gid, m.uname, m.gname
                    info.mtime = min(int(m.mtime), mtime) if mtime else mtime
                    if m.isreg():
                        info.size = m.size
                        out.addfile(info, src.extractfile(m))
                    else:
                        out.addfile(info)
            gz.close()
            hashing.flush()
            desc = layout.commit_blob(hashing, oci.LAYER_GZIP)
    return LayerBlob(desc, "sha256:" + tee.h.hexdigest(), tee.size)


def _norm(name: str) -> str:
    return name.removeprefix("./").strip("/")
