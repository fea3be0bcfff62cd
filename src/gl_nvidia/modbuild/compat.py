"""Compatibility fixes to NVIDIA's kernel-module sources, applied before compiling.

A driver's module source knows the kernels of its day; a newer kernel (a stable update changing a
function's arguments) can break its compile. The fixes in compat.toml name the driver versions and module
types they apply to, the exact text each changes and why. `apply` gives the compile a patched copy of the
tree (kept in the cache) whose digest differs from the source's, so no compile of the unpatched tree is
ever taken for it; the fixes go with it into the build log and the bundle. A fix whose text is not found
exactly once in a source of its range fails that build, naming the fix: never a silent skip.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath

from gl_nvidia.bundle import MODULE_TYPES, SourceFix
from gl_nvidia.catalog.feeds import version_key
from gl_nvidia.errors import UserError
from gl_nvidia.fs import cache_dir, cache_fill, cache_hit
from gl_nvidia.modbuild.sources import ModuleSource


@dataclass(frozen=True)
class Change:
    file: str  # relative to the module tree
    find: str  # the exact text, found once
    replace: str


@dataclass(frozen=True)
class Fix:
    id: str
    why: str  # one line for the user
    first: str  # the oldest driver version it applies to
    last: str  # the newest
    module_types: tuple[str, ...]
    changes: tuple[Change, ...]

    def applies_to(self, src: ModuleSource) -> bool:
        return (src.module_type in self.module_types
                and version_key(self.first) <= version_key(src.version) <= version_key(self.last))

    @property
    def record(self) -> SourceFix:
        return SourceFix(self.id, self.why, tuple(dict.fromkeys(c.file for c in self.changes)))


def load(text: str, where: str) -> tuple[Fix, ...]:
    """The fixes of a compat.toml-shaped document; a malformed one is a ValueError naming `where`."""
    try:
        doc = tomllib.loads(text)
        fixes = tuple(Fix(f["id"], f["why"], f["first"], f["last"], tuple(f["module_types"]),
                          tuple(Change(c["file"], c["find"], c["replace"]) for c in f["change"]))
                      for f in doc.get("fix", ()))
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{where}: not a list of fixes ({exc})") from exc
    for fix in fixes:
        path_ok = all(c.file and not PurePosixPath(c.file).is_absolute() and ".." not in PurePosixPath(c.file).parts
                      for c in fix.changes)
        if (not fix.changes or not path_ok or not set(fix.module_types) <= set(MODULE_TYPES)
                or not all(c.find for c in fix.changes) or version_key(fix.first) > version_key(fix.last)):
            raise ValueError(f"{where}: fix {fix.id!r} needs changes of relative files with text to find, "
                             f"module types of {', '.join(MODULE_TYPES)} and first <= last")
    if len({f.id for f in fixes}) != len(fixes):
        raise ValueError(f"{where}: fix ids repeat")
    return fixes


_DATA = Path(__file__).with_name("compat.toml")
FIXES = load(_DATA.read_text(), str(_DATA))


def patched_files(tree: Path, version: str, module_type: str, fixes: Sequence[Fix]) -> dict[str, bytes]:
    """Each file the fixes change, with every change made (in order): its find text replaced where it is
    found exactly once, else a UserError naming the fix."""
    files: dict[str, bytes] = {}
    for fix in fixes:
        for change in fix.changes:
            if change.file not in files:
                path = tree / change.file
                if path.is_symlink() or not path.is_file():
                    raise _refused(fix, version, module_type, f"it has no file {change.file}")
                files[change.file] = path.read_bytes()
            find = change.find.encode()
            found = files[change.file].count(find)
            if found != 1:
                raise _refused(fix, version, module_type,
                               f"{change.file} has the text it changes {found} times, not once")
            files[change.file] = files[change.file].replace(find, change.replace.encode())
    return files


def _refused(fix: Fix, version: str, module_type: str, what: str) -> UserError:
    return UserError(f"compatibility fix {fix.id} does not fit the {module_type} module source {version}: {what}",
                     f"check the fix against this source and correct its text or version range in {_DATA.name}")


def apply(src: ModuleSource, fixes: Sequence[Fix] = FIXES) -> ModuleSource:
    """`src` with the fixes of its version and module type applied: a patched copy of its tree (from the
    cache when made before) and a digest of the source and the fixes; `src` itself when none applies."""
    wanted = [f for f in fixes if f.applies_to(src)]
    if not wanted:
        return src
    digest = hashlib.sha256(json.dumps({"source": src.digest, "fixes": [asdict(f) for f in wanted]},
                                       sort_keys=True).encode()).hexdigest()
    entry = cache_dir("build", "patched") / f"{src.module_type}-{src.version}-{digest[:16]}"
    # one maker per entry: parallel units of one driver wait for it instead of replacing it under a compile
    with (cache_dir("build", "locks") / f"patched-{digest}").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache_hit(entry):
            _make(entry, src, patched_files(src.tree, src.version, src.module_type, wanted))
    return replace(src, tree=entry / "tree", digest=digest, fixes=tuple(f.record for f in wanted))


def _make(entry: Path, src: ModuleSource, files: dict[str, bytes]) -> None:
    """The cache entry of `src`'s tree with `files` in place of its own."""
    with cache_fill(entry) as tmp:
        shutil.copytree(src.tree, tmp / "tree", symlinks=True)
        for rel, data in files.items():
            at = tmp / "tree" / rel
            mode = at.stat().st_mode
            at.unlink()  # a read-only file is replaced all the same
            at.write_bytes(data)
            at.chmod(mode)


def log_lines(fixes: Sequence[SourceFix]) -> str:
    """What a build log says first about the fixes its source was compiled with."""
    return "".join(f"gl-nvidia: compatibility fix {f.id} applied ({', '.join(f.files)}): {f.why}\n" for f in fixes)
