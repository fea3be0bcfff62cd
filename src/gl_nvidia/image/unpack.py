"""Applying image layers to a directory on this machine without ever leaving it.

A base image (`image --base`, a layout or a registry image) is input we did not make. Its layers are
applied the way containerd's archive package (`applyNaive` with `fs.RootPath`) and umoci
(`securejoin.SecureJoin`) apply them, and like both we clamp rather than refuse:

- every path is resolved inside the root as if the root were `/`: `..` stops at the root, a symlink's
  absolute target starts at the root, a symlinked directory is followed only to where it points inside
  the root. So `../../x`, `/x` and `link-to-outside/x` all land under the root;
- the last component of a path is never followed: an existing symlink (or file, or directory that a
  non-directory replaces) is removed and the entry created in its place, never written through;
- whiteouts delete from the resolved path, so a `.wh.x` or an opaque `.wh..wh..opq` below a symlink
  removes only what lies inside the root; whiteouts naming `.`, `..` or the root itself are ignored;
- a hard link's target is resolved the same way (its last component not followed, as containerd's
  `hardlinkRootPath`), and must be an existing non-directory inside the root, else one error;
- device nodes and FIFOs are skipped, owners are not applied and modes lose setuid/setgid and
  group/other write (as tarfile's "tar" filter): the flattened tree is only read (tool checks, ld.so.cache);
- a layer must be the bytes its config's diff_id names (as umoci checks), and the whole base may unpack
  to at most MAX_UNPACKED bytes, sparse files counted at their full size: a small layer never writes GBs.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from gl_nvidia.errors import UserError

ROOT = PurePosixPath("/")
MAX_LINKS = 255  # symlinks followed while resolving one path, as umoci's securejoin
OPAQUE = ".wh..wh..opq"
WHITEOUT = ".wh."
_MALFORMED = "the base image is malformed; use another --base"
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
# What a base may unpack to, all layers together: a driver container's base is 150-400 MB; more is a
# layer that would fill the disk (a 290-byte layer can hold a sparse 4 GiB file).
MAX_UNPACKED = 2 << 30


def resolve_in_root(root: Path, path: PurePosixPath | str, *, follow: bool = False) -> PurePosixPath:
    """`path` as an absolute path inside `root`, every symlink on the way resolved as if `root` were `/`.

    The last component is followed only with `follow`; everything before it is a real directory (or
    missing) in the result, so `host_path` of it never leaves `root`.
    """
    parts = PurePosixPath(posixpath.normpath("/" + str(path).lstrip("/"))).parts[1:]
    todo = list(parts)
    current = ROOT
    links = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        host = root / candidate.relative_to(ROOT)
        if (todo or follow) and host.is_symlink():
            links += 1
            if links > MAX_LINKS:
                raise UserError(f"too many levels of symbolic links resolving {path}", _MALFORMED)
            target = os.readlink(host)
            if target.startswith("/"):
                current = ROOT
            todo = target.split("/") + todo
            continue
        current = candidate
    return current


def host_path(root: Path, path: PurePosixPath) -> Path:
    """Where a path that `resolve_in_root` returned lives on this machine."""
    return root / path.relative_to(ROOT)


def writable(root: Path, path: PurePosixPath | str) -> Path:
    """A host path for writing `path` into the tree: parents resolved inside `root` and created,
    whatever was at the last component removed (so no write goes through a symlink)."""
    dest = host_path(root, resolve_in_root(root, path))
    if dest == root:
        raise UserError(f"cannot write {path}: it is the root directory", _MALFORMED)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove(dest)
    except OSError as exc:  # e.g. the base has a file where the path needs a directory
        raise UserError(f"cannot write {path} into the base image: {exc.strerror or exc}", _MALFORMED) from exc
    return dest


def exists_in_root(root: Path, path: PurePosixPath | str) -> bool:
    """Whether `path` exists in the tree, its symlinks followed inside `root` (never on this machine)."""
    return host_path(root, resolve_in_root(root, path, follow=True)).exists()


def read_in_root(root: Path, path: PurePosixPath | str, what: str, limit: int = 64 << 20) -> bytes | None:
    """The bytes of the regular file `path` in the tree, its symlinks followed inside `root` (never on
    this machine); None when there is none. Anything else there (a FIFO, a device, a directory, more
    than `limit` bytes) is one error naming `what`, never a read that hangs or fills memory."""
    try:
        host = host_path(root, resolve_in_root(root, path, follow=True))
    except UserError as exc:
        raise UserError(f"{what}: {exc.message}", exc.hint) from exc
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"{what}: cannot read {path}: {exc.strerror or exc}", _MALFORMED) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{what}: {path} is not a regular file", _MALFORMED)
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UserError(f"{what}: {path} is larger than {limit >> 20} MiB", _MALFORMED)
    return data


def apply_layer(layer: Path, root: Path, what: str, *, diff_id: str, budget: int = MAX_UNPACKED) -> int:
    """Apply one layer tarball (gzip, bzip2, xz or plain) whose uncompressed digest is `diff_id` to
    `root`, writing at most `budget` bytes; returns the bytes it took. `what` names the layer in errors."""
    try:
        with tarfile.open(layer, "r:*") as tar:
            members = tar.getmembers()
            apparent = sum(m.size for m in members if m.isreg())  # a sparse file's full size
            if apparent > budget:
                raise _too_big(what)
            size = _check_digest(layer, what, diff_id, budget)
            _apply(tar, members, root, what)
    except _READ_ERRORS as exc:
        raise UserError(f"{what}: not a readable layer tarball: {exc}", _MALFORMED) from exc
    return max(size, apparent)


def _check_digest(layer: Path, what: str, diff_id: str, budget: int) -> int:
    """Hash the uncompressed layer (no more than `budget` bytes of it) against its diff_id; its size."""
    h, size = hashlib.sha256(), 0
    with _uncompressed(layer) as stream:
        while chunk := stream.read(1 << 20):
            size += len(chunk)
            if size > budget:
                raise _too_big(what)
            h.update(chunk)
    if f"sha256:{h.hexdigest()}" != diff_id:
        raise UserError(f"{what}: its content is sha256:{h.hexdigest()}, not the {diff_id} its config lists "
                        "(rootfs.diff_ids)", _MALFORMED)
    return size


def _uncompressed(layer: Path) -> io.BufferedIOBase:
    """The layer's tar stream, whichever of tarfile's compressions it has."""
    with layer.open("rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(layer)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(layer)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(layer)
    return layer.open("rb")


def _too_big(what: str) -> UserError:
    return UserError(f"{what}: the base unpacks to more than {MAX_UNPACKED >> 30} GiB (sparse files counted at "
                     "their full size)", _MALFORMED)


def _apply(tar: tarfile.TarFile, members: list[tarfile.TarInfo], root: Path, what: str) -> None:
    # Whiteouts delete from the layers below, never from this one: all of them first.
    for m in members:
        try:
            _whiteout(root, m.name)
        except (OSError, UserError) as exc:
            raise _failed(what, m, exc) from exc
    for m in members:
        try:
            _entry(tar, m, root)
        except (*_READ_ERRORS, UserError) as exc:
            raise _failed(what, m, exc) from exc


def _failed(what: str, m: tarfile.TarInfo, exc: BaseException) -> UserError:
    if isinstance(exc, UserError):
        why = exc.message
    else:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return UserError(f"{what}: cannot apply {m.name}: {why}", _MALFORMED)


def _whiteout(root: Path, name: str) -> None:
    parent, _, leaf = name.rstrip("/").rpartition("/")
    if leaf == OPAQUE:
        d = host_path(root, resolve_in_root(root, parent, follow=True))
        if d.is_dir() and not d.is_symlink():
            for child in d.iterdir():
                _remove(child)
    elif leaf.startswith(WHITEOUT):
        hidden = leaf.removeprefix(WHITEOUT)
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT):
            return  # names no file (or a reserved one): containerd would delete the parent
        target = resolve_in_root(root, f"{parent}/{hidden}")
        if target != ROOT:
            _remove(host_path(root, target))


def _entry(tar: tarfile.TarFile, m: tarfile.TarInfo, root: Path) -> None:
    leaf = m.name.rstrip("/").rpartition("/")[2]
    if leaf.startswith(WHITEOUT) or m.ischr() or m.isblk() or m.isfifo():
        return
    path = resolve_in_root(root, m.name)
    if path == ROOT:
        return  # the root's own entry ("./"): containerd ignores it too
    dest = host_path(root, path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    mode = m.mode & 0o755
    if m.isdir():
        if not (dest.is_dir() and not dest.is_symlink()):
            _remove(dest)
            dest.mkdir()
        # Now, not after the layer as tar does: by then a later entry may have made the path a symlink.
        # The owner keeps write so later entries land in it (the tree is only read).
        os.chmod(dest, mode | 0o700)
        return
    if m.isreg():
        src = tar.extractfile(m)
        assert src is not None  # a regular member always has data
        _remove(dest)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out, src:
            shutil.copyfileobj(src, out)
            os.fchmod(out.fileno(), mode)
    elif m.issym():
        _remove(dest)
        os.symlink(m.linkname, dest)  # the target is only ever resolved inside the root
    elif m.islnk():
        target = host_path(root, resolve_in_root(root, m.linkname))
        try:
            st = target.lstat()
        except FileNotFoundError:
            st = None
        if target == root or st is None or stat.S_ISDIR(st.st_mode):
            raise UserError(f"hard link to {m.linkname}: no such file in the image", _MALFORMED)
        _remove(dest)
        os.link(target, dest, follow_symlinks=False)


def _remove(path: Path) -> None:
    """Remove whatever is at `path` itself (a symlink is removed, never followed)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()
