"""A kernel's own toolchain root: its release's compiler where this machine has none of its version.

Trixie's kernels are built with gcc-14 and pass it flags bookworm's gcc-12 refuses
(`-fmin-function-alignment`), and trixie's kbuild programs (fixdep, modpost, objtool) need trixie's glibc.
When the kernel's compiler (CONFIG_CC_VERSION_TEXT) is missing here or of another major version, the apt
environment makes, once, an mmdebstrap root of the kernel's own suites (the verified sources its headers
come from; nothing is installed on this machine) holding that compiler, make, binutils, libc6-dev, ccache
and what the kernel's linux-kbuild depends on (its programs' libraries, pahole for the modules' BTF),
cached by the digests of those packages. `make`, the compiler's `--version` and the tools that take the
modules apart (ld, strip, the kernel's objtool) then run in it: unprivileged (`unshare` of user, mount and
network namespaces, `chroot`), with this machine's /dev and /proc, a private /tmp, and the cache at its own
path inside, where the headers, the module trees, ccache and modbuild.reuse's view all live (reuse's
namespace runs this one nested: its view is part of the cache it binds).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gl_nvidia import apt
from gl_nvidia.errors import UserError
from gl_nvidia.fs import cache_dir, cache_fill, cache_hit
from gl_nvidia.run import run

# Every root has these besides the compiler: kbuild's make, binutils by their plain names (kbuild runs `as`,
# `ld`, `nm` unprefixed for a kernel of this machine's architecture), the C library's headers (NVIDIA's
# conftest compiles against them), ccache (modbuild.reuse runs the compiler through the root's own).
BASE_PACKAGES = ("make", "binutils", "libc6-dev", "ccache")
# In the namespace: this machine's devices and processes, a private /tmp, the cache at its own path
# (mount points made in the root when it was made), then the command in the root.
_ENTER = r"""set -e
root=$1 cache=$2; shift 2
mount --rbind /dev "$root/dev"
mount --rbind /proc "$root/proc"
mount -t tmpfs gl-nvidia-tmp "$root/tmp"
mount --rbind "$cache" "$root$cache"
export TMPDIR=/tmp
exec chroot "$root" "$@"
"""
_COMPILER = re.compile(r"(?:(?P<triplet>[a-z0-9_]+-linux-gnu)-)?gcc(?:-(?P<major>\d+))?")


def major(version_line: str) -> str | None:
    """The major version a compiler's `--version` line (or CONFIG_CC_VERSION_TEXT) ends with:
    "gcc-14 (Debian 14.2.0-19) 14.2.0" -> "14"."""
    m = re.search(r"(\d+)\.\d+(?:\.\d+)?\s*$", version_line)
    return m.group(1) if m else None


def needs_root(kernel_compiler: str, host: str | None) -> bool:
    """Whether a kernel built with `kernel_compiler` needs its own toolchain root on a machine whose
    compiler of that name says `host` (None: not installed). A kernel that names no compiler builds here."""
    if not kernel_compiler:
        return False
    return host is None or major(host) != major(kernel_compiler)


def compiler_packages(cc: str) -> tuple[str, ...]:
    """The Debian packages of the compiler command `cc`: `gcc-14`; for a cross compiler
    (`aarch64-linux-gnu-gcc-14`) the cross gcc and its binutils."""
    m = _COMPILER.fullmatch(cc)
    if not m:
        raise UserError(f"the kernel was built with {cc}, which gl-nvidia cannot install in a toolchain root",
                        "build on a machine with that compiler, or use --env dir with headers it can build")
    gcc = f"gcc-{m['major']}" if m["major"] else "gcc"
    if not m["triplet"]:
        return (gcc,)
    triplet = m["triplet"].replace("_", "-")  # Debian's package names: x86-64-linux-gnu
    return (f"{gcc}-{triplet}", f"binutils-{triplet}")


def kbuild_depends(depends: str) -> tuple[str, ...]:
    """What the kernel's linux-kbuild package depends on (from its Depends): its programs' libraries
    (libelf1t64 for objtool, ...) and pahole, which kbuild runs for each module's BTF (NVIDIA's Makefile
    runs it through awk, which ignores a missing one: the modules would lack BTF). libc6 comes with libc6-dev."""
    return tuple(n for n in apt.depends_names(depends) if n != "libc6")


@dataclass(frozen=True)
class RootSpec:
    """Inputs of a toolchain root: its cache key is a hash of exactly these."""

    suite: str
    mirrors: tuple[str, ...]  # `deb [signed-by=KEYRING] URI SUITE main` lines
    arch: str  # this machine's: the root runs here
    packages: tuple[str, ...]
    digests: tuple[str, ...]  # "name version sha256" of each package asked for, as the verified index has it

    def key(self) -> str:
        blob = json.dumps([self.suite, self.mirrors, self.arch, self.packages, self.digests])
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def root_spec(repo: apt.AptRepo, packages: tuple[str, ...]) -> RootSpec:
    """The root of `packages` from `repo`'s suites (each entry's `main`, verified with its own keyring)."""
    if not repo.sources:
        raise UserError(f"no apt source to make a toolchain root from ({repo.describe()})",
                        "configure the kernel's OS release's suites")
    digests = tuple(f"{p.name} {p.version} {p.sha256}" for p in (repo.find(n) for n in packages))
    mirrors = tuple(f"deb [signed-by={s.keyring}] {s.uri} {s.suite} main" for s in repo.sources)
    return RootSpec(repo.sources[0].suite, mirrors, repo.arch, packages, digests)


def mmdebstrap_argv(spec: RootSpec, out: Path) -> list[str]:
    """mmdebstrap of the root as a tarball (unprivileged where this user is not root), without device
    nodes: /dev is this machine's, bound when the root is entered."""
    return ["mmdebstrap", "--variant=essential", "--mode=auto", f"--architectures={spec.arch}",
            f"--include={','.join(spec.packages)}", "--skip=output/dev", "--quiet", spec.suite, str(out),
            *spec.mirrors]


def enter_argv(root: Path, cache: Path, argv: list[str]) -> list[str]:
    """`argv` run in `root`: unprivileged, no network, the cache at its own path."""
    return ["unshare", "--map-root-user", "--mount", "--net", "sh", "-c", _ENTER, "sh", str(root), str(cache), *argv]


@dataclass(frozen=True)
class ToolRoot:
    root: Path
    spec: RootSpec
    seconds: float  # how long making it took (0.0: it was cached)

    def argv(self, argv: list[str]) -> list[str]:
        return enter_argv(self.root, cache_dir(), argv)


def make_root(spec: RootSpec) -> ToolRoot:
    """The root of `spec`, from the cache when one was made from the same packages."""
    entry = cache_dir("build", "toolroot") / f"{spec.suite}-{spec.arch}-{spec.key()}"
    if cache_hit(entry):
        return ToolRoot(entry, spec, 0.0)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-toolroot-", dir=cache_dir("build", "work")) as tmp:
        tarball, made = Path(tmp, "root.tar"), Path(tmp, "mmdebstrap.log")
        if run(mmdebstrap_argv(spec, tarball), log_file=made, check=False).returncode != 0:
            lines = made.read_text(errors="replace").strip().splitlines()
            raise UserError(f"cannot make the {spec.suite} toolchain root ({' '.join(spec.packages)}): mmdebstrap "
                            f"failed: {lines[-1] if lines else 'no output'}",
                            "check that the kernel's OS release's suites are reachable and hold these packages")
        with cache_fill(entry) as fill:
            run(["tar", "-x", "-f", tarball, "-C", fill])
            # mount points for what the build binds in
            for d in ("dev", "proc", "tmp", str(cache_dir()).lstrip("/")):
                Path(fill, d).mkdir(parents=True, exist_ok=True)
    return ToolRoot(entry, spec, round(time.monotonic() - start, 1))
