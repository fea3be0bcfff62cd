"""Reuse across kernels: one compile serves every kernel whose headers give a file the same preprocessed text.

Every compile runs in a private mount namespace (`unshare -rm`) that presents the kernel's headers and the
module tree at one constant path (`View`), so neither the compiler's command line nor its output names the
per-kernel headers directory or the temp work tree; the compiler runs through Debian's `ccache`, keyed by
content. Consecutive ABIs of one series mostly preprocess to the same text: their objects come from the
cache, only the few files whose headers changed, modpost's `.mod.c` and the links run again.

A kernel whose headers differ from an earlier one's only where they name the release goes further: it
starts from that kernel's whole built tree (modbuild.treereuse), and only what uses the release is built again.

The nvidia and nvidia-modeset cores (`nv-kernel.o_binary`, `nv-modeset-kernel.o_binary`) need no compile
here at all: both Debian's and NVIDIA's module trees (open and proprietary) ship them prebuilt.

The gate: the first build of a case (driver source, module type, compiler, kernel series) that took any
of the module's objects from the compiler cache, and the first that started from another kernel's tree, is
repeated without either, and every module's sha256 (kbuild's, debug info included) compared; each verdict
is kept in the sealed cache. A mismatch of either turns all reuse off for that case, with the reason in the
log. The view's path is constant for one cache (it lies under it): modules built in caches at other paths
differ in the strings that name it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from gl_nvidia.fs import atomic_write_text, cache_dir, cache_fill, cache_hit
from gl_nvidia.modbuild import treereuse
from gl_nvidia.modbuild.kenv import KernelHeaders
from gl_nvidia.run import run

log = logging.getLogger(__name__)

# Inside the view: kbuild's srctree and objtree, the module tree, and linux-kbuild where Debian's
# headers' relative `scripts` and `tools` links look for it (../../lib/linux-kbuild-<series>).
_SRC, _OUT, _TREE, _LIB, _BIN = "usr/src/linux-headers-src", "usr/src/linux-headers-out", "usr/src/tree", "usr/lib", "bin"
# The namespace's set-up: a tmpfs over the view (private to this build: concurrent builds each have their own),
# the bind mounts, the arch dir's one-line Makefile naming the view's common dir (Debian's names the real one),
# the compiler's name pointing at ccache (which runs the real one further down PATH).
_SETUP = r"""set -e
v=$1 src=$2 out=$3 lib=$4 tree=$5 ccache=$6 cc=$7; shift 7
mount -t tmpfs gl-nvidia-view "$v"
mkdir -p "$v/usr/src/linux-headers-src" "$v/usr/src/linux-headers-out" "$v/usr/src/tree" "$v/usr/lib" "$v/bin"
mount --bind "$src" "$v/usr/src/linux-headers-src"
mount --bind "$out" "$v/usr/src/linux-headers-out"
if [ -d "$lib" ]; then mount --bind "$lib" "$v/usr/lib"; fi
mount --bind "$tree" "$v/usr/src/tree"
if [ -f "$out/Makefile" ]; then
  echo "include $v/usr/src/linux-headers-src/Makefile" > "$v/Makefile"
  mount --bind "$v/Makefile" "$v/usr/src/linux-headers-out/Makefile"
fi
ln -s "$ccache" "$v/bin/$cc"
export PATH="$v/bin:$PATH"
cd /
exec "$@"
"""
# ccache's stats log: a "# <input file>" line per compiler call, then that call's counters, one a line.
_HITS = {"direct_cache_hit", "preprocessed_cache_hit"}


@dataclass(frozen=True)
class View:
    root: Path  # constant for one cache: what every build's compiler sees

    @property
    def tree(self) -> Path:
        return self.root / _TREE

    def headers(self, hdrs: KernelHeaders) -> KernelHeaders:
        """`hdrs` as the build inside the view sees them."""
        return replace(hdrs, syssrc=self.root / _SRC, sysout=self.root / _OUT)

    def back(self, text: str, hdrs: KernelHeaders, tree: Path) -> str:
        """`text` (kbuild's saved commands, a log line) with the view's paths as they are outside it."""
        for inside, outside in ((_TREE, tree), (_SRC, hdrs.syssrc), (_OUT, hdrs.sysout), (_LIB, _lib(hdrs))):
            text = text.replace(f"{self.root / inside}", str(outside))
        return text

    def outside(self, recorded: str, hdrs: KernelHeaders, tree: Path) -> Path:
        """A path kbuild recorded in the view (absolute, or relative to the build headers it ran in) as it
        is outside it."""
        inside = recorded if recorded.startswith("/") else f"{self.root / _OUT}/{recorded}"
        return Path(self.back(inside, hdrs, tree))


def view() -> View:
    return View(cache_dir("build", "view"))


def _lib(hdrs: KernelHeaders) -> Path:
    return hdrs.sysout.resolve().parent.parent / "lib"


@functools.cache  # headers are sealed cache entries: one walk per process serves every module type
def identity(hdrs: KernelHeaders) -> treereuse.Identity:
    """treereuse's identity of what the view presents of `hdrs` (the arch dir's Makefile is the view's own)."""
    return treereuse.identity({_SRC: hdrs.syssrc, _OUT: hdrs.sysout, _LIB: _lib(hdrs)}, skip=[f"{_OUT}/Makefile"])


def unavailable(hdrs: KernelHeaders, env_name: str) -> str | None:
    """Why this build cannot reuse other kernels' compiles (None: it can)."""
    if env_name not in ("apt", "dir"):
        return f"the {env_name} environment compiles in its own container"
    if shutil.which("ccache") is None:
        return "ccache is not installed (scripts/bootstrap installs it)"
    if hdrs.syssrc.resolve().parent != hdrs.sysout.resolve().parent:
        return f"the headers in {hdrs.sysout} are not laid out as Debian's (common and arch dirs side by side)"
    return _namespace_problem(view().root)


@functools.cache
def _namespace_problem(root: Path) -> str | None:
    proc = run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs gl-nvidia-view "$1"', "sh", root], check=False)
    if proc.returncode == 0:
        return None
    why = (proc.stdout or b"").decode(errors="replace").strip().splitlines()
    return f"this user cannot make a mount namespace (unshare -rm: {why[-1] if why else proc.returncode})"


def make_argv(v: View, hdrs: KernelHeaders, tree: Path, inner: list[str]) -> list[str]:
    """`inner` (make, as the kernel environment builds it for `v.headers(hdrs)` and `v.tree`) run in the view."""
    ccache = shutil.which("ccache")
    assert ccache is not None
    return ["unshare", "-rm", "sh", "-c", _SETUP, "sh", str(v.root), str(hdrs.syssrc), str(hdrs.sysout),
            str(_lib(hdrs)), str(tree), ccache, hdrs.cc, *inner]


def ccache_env(stats_log: Path, source_digest: str, *, cold: bool) -> dict[str, str]:
    """ccache's settings for one build: the cache in ours, compilers told apart by content, counters of
    this build alone in `stats_log`; `cold`: compile everything (the gate's reference build).

    Each driver source reuses only its own compiles (a namespace per source digest): another source (the
    other module type, another driver version) shares a tenth of its objects at most, and any hit makes the
    first build of a case pay the gate's cold build (more than it saved); the next kernels of the source
    are what reuse is for."""
    env = {"CCACHE_DIR": str(cache_dir("build", "ccache")), "CCACHE_COMPILERCHECK": "content",
           "CCACHE_STATSLOG": str(stats_log), "CCACHE_NOHARDLINK": "1", "CCACHE_NAMESPACE": source_digest}
    return {**env, "CCACHE_DISABLE": "1"} if cold else env


def cache_hits(stats_log: Path, tree: Path) -> tuple[int, int]:
    """(objects of the module tree `tree` taken from the compiler cache, objects of it compiled) in one build.

    kbuild's compiler probes and NVIDIA's conftest programs are left out: they hit within one build too."""
    text = stats_log.read_text(errors="replace") if stats_log.is_file() else ""
    calls = [block.splitlines() for block in re.split(r"^# ", text, flags=re.M)[1:]]
    own = [set(c[1:]) for c in calls if c and c[0].startswith(f"{tree}/") and not Path(c[0]).name.startswith("conftest")]
    return sum(bool(c & _HITS) for c in own), len(own)


def series(kernel: str) -> str:
    m = re.match(r"\d+\.\d+", kernel)
    return m.group(0) if m else kernel


def case_key(recipe: int, source_digest: str, module_type: str, toolchain: str, hdrs: KernelHeaders,
             mode: str) -> str:
    """What one gate verdict covers: one driver source and module type, one compiler, one kernel series, one
    way of reusing ("objects": other kernels' compiles, "tree": another kernel's built tree)."""
    inputs = {"recipe": recipe, "source": source_digest, "type": module_type, "toolchain": toolchain,
              "arch": hdrs.arch, "series": series(hdrs.kernel), "mode": mode}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    why: str  # what was compared, or how it differed


def verdict(case: str) -> Verdict | None:
    """The gate's verdict on `case`; None when there is none yet (or its entry is damaged: decided again)."""
    entry = cache_dir("build", "reuse") / case
    if not cache_hit(entry):
        return None
    d = json.loads((entry / "verdict.json").read_text())
    return Verdict(bool(d["ok"]), str(d["why"]))


def keep_verdict(case: str, v: Verdict, record: dict[str, object]) -> None:
    with cache_fill(cache_dir("build", "reuse") / case) as tmp:
        atomic_write_text(tmp / "verdict.json", json.dumps({"ok": v.ok, "why": v.why, **record}, indent=2,
                                                           sort_keys=True))


def compare(warm: dict[str, str], cold: dict[str, str]) -> Verdict:
    """The gate: every module built warm has the sha256 of the same module built cold."""
    if warm.keys() != cold.keys():
        return Verdict(False, f"warm built {sorted(warm)}, cold {sorted(cold)}")
    for name in sorted(warm):
        if warm[name] != cold[name]:
            return Verdict(False, f"{name} built warm (sha256 {warm[name][:16]}) differs from cold "
                                  f"({cold[name][:16]})")
    return Verdict(True, f"{len(warm)} module(s) byte-identical warm and cold")
