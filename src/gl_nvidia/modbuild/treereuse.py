"""Reuse of a whole built tree: a kernel whose headers differ from another's only where they name the release.

Consecutive ABIs of one series are often the same kernel rebuilt (a security or packaging upload): their
headers differ only in the lines that name the release (`UTS_RELEASE`, `CONFIG_BUILD_SALT`, Debian's
package id; `RELEASE_NAMES`). Their `identity` (a digest over every file the build's view presents, with
those lines' values blanked) is then the same, and the module tree built for the first one (kept in the
cache as it was in the view, modbuild.reuse) is the starting point for the second: kbuild rebuilds only the
targets whose recorded inputs (the `deps_` of their `.cmd` files) use a name whose value changed, which are
modpost's `.mod.o` (vermagic, build salt), the objects that print the release, and the links above them.

NVIDIA's conftest results are kept as they are: no conftest test can tell two kernels apart that differ
only in these strings (the preprocessor cannot compare strings). Its `conftest/uts_release`, which names
the release and makes every conftest header regenerate when it changes, is rewritten for the new kernel.
kbuild decides by file times, so the restored tree is moved forward in time as a whole (newer than any
header), and what must be rebuilt is deleted rather than left to times. Behind modbuild.reuse's gate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gl_nvidia.fs import atomic_write_text, cache_dir, cache_fill, cache_hit

# Names whose definitions only name the kernel release, in the forms kbuild and Debian write them:
# `#define NAME value` (generated headers), `NAME=value` (.config, auto.conf), `--cfg=NAME=value`
# (rustc_cfg), `override NAME = value` (Debian's .kernelvariables).
RELEASE_NAMES = ("UTS_RELEASE", "UTS_VERSION", "LINUX_PACKAGE_ID", "CONFIG_BUILD_SALT", "CONFIG_VERSION_SIGNATURE",
                 "KERNELRELEASE")
_NAMES = "|".join(RELEASE_NAMES)
_DEFINITION = re.compile(rf"^(#define |--cfg=|override )?({_NAMES})( = |=| )([^$]*)$")  # a value, no expansion
_USE = re.compile(rf"\b({_NAMES})\b")
_WILDCARD = re.compile(r"^\$\(wildcard (.+)\)$")
# NVIDIA's Kbuild writes the kernel's UTS_RELEASE here and regenerates every conftest header when it changes.
CONFTEST_RELEASE = "conftest/uts_release"


@dataclass(frozen=True)
class Identity:
    digest: str  # over the view's files, release-naming values blanked
    release: dict[str, str]  # "<file>:<name>" -> the value it names


def normalise(text: str) -> tuple[str, dict[str, str]]:
    """`text` with the values of its release-naming definitions blanked, and those values by name."""
    lines, values = [], {}
    for line in text.split("\n"):
        m = _DEFINITION.match(line)
        if m:
            values[m.group(2)] = m.group(4)
            line = f"{m.group(1) or ''}{m.group(2)}{m.group(3)}<release>"
        lines.append(line)
    return "\n".join(lines), values


def identity(roots: Mapping[str, Path], skip: Iterable[str] = ()) -> Identity:
    """The identity of the trees `roots` (a label each, as the build's view presents them; `skip`: files the
    view replaces). Files are read as bytes; only those naming a release name are read as text."""
    h = hashlib.sha256()
    release: dict[str, str] = {}
    skipped = set(skip)
    for label, root in sorted(roots.items()):
        for top, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names + [d for d in dirs if os.path.islink(os.path.join(top, d))]):
                path = os.path.join(top, name)
                rel = f"{label}/{os.path.relpath(path, root)}"
                if rel in skipped:
                    continue
                if os.path.islink(path):
                    h.update(f"{rel}\0link\0{os.readlink(path)}\0".encode())
                    continue
                data = Path(path).read_bytes()
                if any(n.encode() in data for n in RELEASE_NAMES):
                    text, values = normalise(data.decode("utf-8", "surrogateescape"))
                    data = text.encode("utf-8", "surrogateescape")
                    release.update({f"{rel}:{n}": v for n, v in values.items()})
                h.update(f"{rel}\0file\0{hashlib.sha256(data).hexdigest()}\0".encode())
    return Identity(h.hexdigest(), release)


def changed_names(old: Mapping[str, str], new: Mapping[str, str]) -> set[str]:
    """The release names whose value differs between two identities' `release` (of the same digest)."""
    return {key.rpartition(":")[2] for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


def deps(cmd_text: str) -> list[str]:
    """The inputs kbuild recorded in a `.cmd` file (`source_<target> := ...`, `deps_<target> := ...`), as written
    there."""
    out: list[str] = []
    inside = False
    for line in cmd_text.splitlines():
        if line.startswith("source_"):
            out.append(line.partition(":=")[2].strip())
            continue
        if line.startswith("deps_"):
            inside = True
            line = line.partition(":=")[2]
        elif not inside:
            continue
        item = line.strip().removesuffix("\\").strip()
        if item:
            m = _WILDCARD.match(item)
            out.append(m.group(1) if m else item)
        if not line.rstrip().endswith("\\"):
            inside = False
    return out


def uses(text: str, names: set[str]) -> bool:
    """Whether `text` uses one of `names` anywhere but in the lines that define them."""
    if not any(n in text for n in names):  # most headers: read once, no line looked at
        return False
    return any(m.group(1) in names for line in text.splitlines() if not _DEFINITION.match(line)
               for m in _USE.finditer(line))


def stale(tree: Path, names: set[str], outside: Callable[[str], Path]) -> list[Path]:
    """The kbuild targets in `tree` whose recorded inputs use one of `names`: an input file that uses one,
    or kbuild's `include/config/<SYMBOL>` stand-in for a CONFIG_ name. `outside`: a recorded input's path
    (absolute in the build's view, or relative to the kernel's build headers) as this process reads it."""
    config = {n.removeprefix("CONFIG_") for n in names if n.startswith("CONFIG_")}
    memo: dict[str, bool] = {}

    def used(dep: str) -> bool:
        if dep.startswith("include/config/"):
            return dep.removeprefix("include/config/") in config
        if dep not in memo:
            try:
                memo[dep] = uses(outside(dep).read_text(errors="replace"), names)
            except OSError:
                memo[dep] = True  # an input that is gone: rebuild
        return memo[dep]

    found = []
    for cmd in sorted(tree.rglob(".*.cmd")):
        target = cmd.with_name(cmd.name.removeprefix(".").removesuffix(".cmd"))
        if target.exists() and any(used(d) for d in deps(cmd.read_text(errors="replace"))):
            found.append(target)
    return found


def entry(case: str, ident: Identity) -> Path:
    return cache_dir("build", "trees") / hashlib.sha256(f"{case}\0{ident.digest}".encode()).hexdigest()


def keep(at: Path, tree: Path, ident: Identity, kernel: str) -> None:
    """Keep `tree` (as it was in the view, right after a successful build) for kernels of `ident`'s digest."""
    if cache_hit(at):
        return
    with cache_fill(at) as tmp:
        # Without the modules: kbuild links them again from what is kept (a third of the tree's size).
        shutil.copytree(tree, tmp / "tree", symlinks=True, ignore=shutil.ignore_patterns("*.ko"))
        atomic_write_text(tmp / "built.json", json.dumps({"kernel": kernel, "release": ident.release}, indent=2,
                                                         sort_keys=True))


def restore(at: Path, tree: Path, ident: Identity, outside: Callable[[str], Path]) -> dict[str, object] | None:
    """Put the tree kept at `at` in `tree` for the kernel of `ident`, with what it must rebuild deleted;
    what was done (None: there is no usable tree; `tree` is then left absent)."""
    if not cache_hit(at):
        return None
    built = json.loads((at / "built.json").read_text())
    names = changed_names(built["release"], ident.release)
    shutil.copytree(at / "tree", tree, symlinks=True)
    uts = tree / CONFTEST_RELEASE
    if uts.is_file() and "UTS_RELEASE" in names:
        old, new = _uts_release(built["release"]), _uts_release(ident.release)
        text = uts.read_text()
        if old is None or new is None or old not in text:
            shutil.rmtree(tree)
            return None
        st = uts.stat()
        uts.write_text(text.replace(old, new))
        os.utime(uts, ns=(st.st_atime_ns, st.st_mtime_ns))
    _forward(tree)
    gone = stale(tree, names, outside)
    for target in gone:
        target.unlink()
    return {"from": built["kernel"], "changed": sorted(names), "rebuilt": [str(t.relative_to(tree)) for t in gone]}


def _uts_release(release: Mapping[str, str]) -> str | None:
    found = {v for k, v in release.items() if k.endswith("/utsrelease.h:UTS_RELEASE")}
    return found.pop() if len(found) == 1 else None


def _forward(tree: Path) -> None:
    """Move every file's time forward by one amount, the newest to now: kbuild's order among them is kept, and
    every header (unpacked with its package's times) is older than all of them."""
    files = [p for p in tree.rglob("*") if not p.is_symlink()]
    newest = max(p.stat().st_mtime_ns for p in files)
    shift = time.time_ns() - 1_000_000_000 - newest
    for p in files:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns + shift, st.st_mtime_ns + shift))
