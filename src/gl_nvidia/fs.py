"""Atomic writes: everything a command produces appears complete under its final name, or not at all.

Cache entries are sealed (every file's sha256 recorded) when made and verified when used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from gl_nvidia.errors import IntegrityError, UserError

log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # no place for the temp file (unwritable dir, parent is a file): nothing written
        raise _as_user_error(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _as_user_error(exc, path) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode(), mode)


@contextlib.contextmanager
def atomic_dir(path: Path, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path` (or, where `keep` accepts the `path`
    found there then, is dropped for it), on any error it is removed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        raise _as_user_error(exc, path) from exc
    try:
        yield tmp
        _rename_in(tmp, path, keep)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _as_user_error(exc, path) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_in(tmp: Path, path: Path, keep: Callable[[Path], bool] | None) -> None:
    """Rename `tmp` to `path`. Another process may rename its own in first at any moment (runs share the
    cache), so what is at `path` is looked at only when the rename finds something there: kept if `keep`
    accepts it, else moved aside under this process's own name and removed."""
    while True:
        try:
            os.rename(tmp, path)  # onto nothing (or an empty directory) only
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        if keep is not None and keep(path):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        with contextlib.suppress(FileNotFoundError):  # gone already: another process moved it aside
            os.rename(path, old)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


class StagedFile:
    """Bytes on their way to `dest`: written to a temp file beside it and hashed as they come."""

    def __init__(self, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        self.dest, self.tmp = dest, Path(name)
        self._fh = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> None:
        """Put the content at `dest` (renamed: a reader never sees it half-written)."""
        self._fh.close()
        os.replace(self.tmp, self.dest)

    def discard(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


@contextlib.contextmanager
def staged_file(dest: Path) -> Iterator[StagedFile]:
    """A `StagedFile` for `dest`: what is not committed when the block ends is removed, so a failed or
    refused download leaves nothing under `dest`."""
    staged = StagedFile(dest)
    try:
        yield staged
    finally:
        staged.discard()  # after commit() there is nothing left to remove


def check_writable_dir(path: Path) -> None:
    """Refuse now a directory that could not be created or written, leaving nothing behind: a long job
    (compiles) must not find out at its end that it has nowhere to put its result."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".gl-nvidia-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _as_user_error(exc, path) from exc


def copy_from_tree(tree: Path, src: Path, dest: Path, what: str) -> None:
    """Copy `src` (a file, symlink or directory under the unpacked archive or tree `tree`) to `dest`,
    reading nothing outside `tree`: the one way files leave an archive for a bundle or an image.

    Directories on the way from `tree` to `src` must be directories, not symlinks; a symlink is copied as
    a symlink, and only when its target is relative and stays inside what is copied (a directory's
    subtree, a file's own directory), so it resolves inside `dest` as it did inside `tree`. Anything
    else (an absolute link, one that climbs out, a FIFO or device) is an IntegrityError naming `what`
    and the member: NVIDIA's and Debian's archives hold none, and a copy that followed it would put a
    build-host file into the image."""
    rel = src.relative_to(tree)
    for i in range(len(rel.parts) - 1):
        _tree_dir(tree, Path(*rel.parts[: i + 1]), what)
    st = src.lstat()
    if stat.S_ISDIR(st.st_mode):
        for top, dirs, names in os.walk(src):
            here = Path(top)
            (dest / here.relative_to(src)).mkdir(parents=True, exist_ok=True)
            for name in sorted(names + dirs):
                member = here / name
                if not member.is_symlink() and member.is_dir():
                    continue  # os.walk goes into it (it never follows a symlinked one)
                _copy_member(tree, member, dest / member.relative_to(src),
                             here.relative_to(src).as_posix(), what)
    else:
        _copy_member(tree, src, dest, ".", what)


def _tree_dir(tree: Path, rel: Path, what: str) -> None:
    if (tree / rel).is_symlink():
        raise IntegrityError(f"{what}: {rel.as_posix()} is a symlink to {os.readlink(tree / rel)!r}, not a directory",
                             "an archive's directories must be directories; nothing of it was used")


def _copy_member(tree: Path, src: Path, dest: Path, at: str, what: str) -> None:
    """One non-directory; `at`: its directory, relative to the top of what is copied (where links must stay)."""
    rel = src.relative_to(tree).as_posix()
    st = src.lstat()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dest) and not dest.is_dir():
        dest.unlink()  # a later member of the same name wins, as a move would
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(src)
        if target.startswith("/") or posixpath.normpath(posixpath.join(at, target)).split("/")[0] == "..":
            raise IntegrityError(f"{what}: {rel} is a symlink to {target!r}, which leaves the files copied from it",
                                 "an archive's links must stay inside it; nothing of it was used")
        os.symlink(target, dest)
    elif stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dest, follow_symlinks=False)
    else:
        raise IntegrityError(f"{what}: {rel} is not a regular file, directory or symlink",
                             "an archive's members must be files, directories or links; nothing of it was used")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir(*parts: str) -> Path:
    """The per-user cache (GL_NVIDIA_CACHE, else XDG_CACHE_HOME/gl-nvidia), shared by CI runs on one machine."""
    root = os.environ.get("GL_NVIDIA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gl-nvidia"
    )
    p = Path(root, *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


# --- cache entries: sealed when made, verified when used ---------------------------------------------

SEAL = ".gl-nvidia-seal.json"  # inside each entry: every file's mode and sha256, every symlink's target
_verified: dict[Path, tuple[tuple[object, ...], ...]] = {}  # entry -> the stat of its files when it matched


@contextlib.contextmanager
def cache_fill(entry: Path) -> Iterator[Path]:
    """`atomic_dir` for a cache entry: what the block leaves in the temp directory is sealed (every
    file's sha256 recorded) before it appears under `entry`. An entry another process put there while this
    one was being made is kept (its readers are not disturbed; an entry's key names its content) and this
    one dropped; the entry that was there when the fill began is replaced: its caller chose to rebuild it."""
    before = _seal_id(entry)
    with atomic_dir(entry, keep=lambda found: _seal_id(found) != before and cache_hit(found)) as tmp:
        yield tmp
        atomic_write_text(tmp / SEAL, json.dumps(_record(tmp, _files(tmp)), indent=0, sort_keys=True))


def _seal_id(entry: Path) -> tuple[int, int] | None:
    try:
        st = (entry / SEAL).lstat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def cache_hit(entry: Path) -> bool:
    """Whether the cache entry `entry` exists and every file in it is exactly what was sealed.

    A damaged entry (a file changed, missing or added, or no seal: made before entries were sealed) is a
    miss, with a warning: the caller builds it again and `cache_fill` renames the new one in, so a reader never
    finds an entry half-written.
    Each entry is hashed once per process; later calls re-hash it only when a file's stat changed.
    """
    if not entry.is_dir():
        return False
    files = _files(entry)
    seal = entry / SEAL
    stats = tuple((rel, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                  for rel, st in [*files, *([(SEAL, seal.lstat())] if os.path.lexists(seal) else [])])
    if _verified.get(entry) == stats:
        return True
    why = _damage(entry, files)
    if why is None:
        _verified[entry] = stats
        return True
    log.warning("cache entry %s fails verification (%s): building it again to replace it", entry, why)
    _verified.pop(entry, None)
    return False


def _files(entry: Path) -> list[tuple[str, os.stat_result]]:
    """Everything under `entry` but directories and the seal, by relative path, not following symlinks."""
    out = []
    for top, dirs, names in os.walk(entry):
        dirs.sort()
        for name in sorted(names + dirs):
            path = os.path.join(top, name)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                out.append((os.path.relpath(path, entry), st))
    return [(rel, st) for rel, st in out if rel != SEAL]


def _record(entry: Path, files: list[tuple[str, os.stat_result]]) -> dict[str, str]:
    out = {}
    for rel, st in files:
        if stat.S_ISLNK(st.st_mode):
            out[rel] = f"link {os.readlink(entry / rel)}"
        elif stat.S_ISREG(st.st_mode):
            out[rel] = f"file {stat.S_IMODE(st.st_mode):o} {sha256_file(entry / rel)}"
        else:
            out[rel] = f"other {stat.S_IFMT(st.st_mode):o}"
    return out


def _damage(entry: Path, files: list[tuple[str, os.stat_result]]) -> str | None:
    """Why `entry` does not match its seal; None when it does."""
    try:
        sealed = json.loads((entry / SEAL).read_text())
    except FileNotFoundError:
        return "no seal: made before cache entries were sealed"
    except (OSError, ValueError):
        sealed = None
    if not isinstance(sealed, dict):
        return "its seal is unreadable"
    actual = _record(entry, files)
    for rel in sorted(sealed.keys() | actual.keys()):
        if rel not in actual:
            return f"{rel} is missing"
        if rel not in sealed:
            return f"{rel} was not there when it was made"
        if sealed[rel] != actual[rel]:
            return f"{rel} is not what was sealed"
    return None


def _as_user_error(exc: OSError, path: Path) -> UserError:
    if exc.errno == errno.ENOSPC:
        return UserError(f"no space left on device while writing {path}", "free space there or choose another --out")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path}: {exc.strerror}", "choose a writable --out")
    return UserError(f"cannot write {path}: {exc.strerror or exc}")
