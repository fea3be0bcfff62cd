"""Kernel build environments: where a kernel's headers and compiler come from, and how `make` runs.

`apt` unpacks the headers packages into a private tree (no root, no container); `dir` uses headers
already on disk; `kmodbuild` runs Garden Linux's developer container with podman or docker.

A kernel of another architecture than this machine's is cross-compiled, never emulated: kbuild gets
`ARCH` and `CROSS_COMPILE` (`aarch64-linux-gnu-` for arm64 on amd64), and its host programs (`fixdep`,
`modpost`) come from this machine's own `linux-kbuild` package, which reads any architecture's objects.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gl_nvidia import apt
from gl_nvidia.arches import ARCHES, BUILD, by_machine, of_kernel
from gl_nvidia.errors import UserError
from gl_nvidia.fs import atomic_write_text, cache_dir, cache_fill, cache_hit, sha256_file
from gl_nvidia.modbuild import toolroot
from gl_nvidia.run import output

log = logging.getLogger(__name__)

_INCLUDE = re.compile(r"^include\s+(\S+)/Makefile\s*$", re.M)


def host_arch() -> str:
    """This machine's Debian architecture."""
    machine = platform.machine()
    known = by_machine(machine)
    return known.debian if known else machine


def cross_prefix(arch: str, host: str) -> str:
    """CROSS_COMPILE for building `arch` code on a `host` machine ("" when they are the same)."""
    return "" if arch == host else f"{ARCHES[arch].triplet}-"


@dataclass(frozen=True)
class KernelHeaders:
    kernel: str  # uname -r
    syssrc: Path  # the kernel source (common) headers: kbuild's srctree
    sysout: Path  # the kernel's build output headers: .config, Module.symvers, generated/
    digest: str  # sha256 over the headers' packages or files
    kernel_compiler: str  # CONFIG_CC_VERSION_TEXT: the compiler the kernel was built with
    arch: str  # the kernel's Debian architecture, from its .config: "amd64" | "arm64"

    @property
    def cross_compile(self) -> str:
        """kbuild's CROSS_COMPILE on this machine: "" for a kernel of its own architecture."""
        return cross_prefix(self.arch, host_arch())

    @property
    def kernel_cc(self) -> str:
        """The compiler command the kernel names (NVIDIA's Makefile picks the same one)."""
        return self.kernel_compiler.split()[0] if self.kernel_compiler else "cc"

    @property
    def cc(self) -> str:
        """The kernel's compiler as this machine runs it: the cross one for another architecture's kernel."""
        if not self.cross_compile:
            return self.kernel_cc
        cc = self.kernel_cc if self.kernel_compiler else "gcc"  # there is no aarch64-linux-gnu-cc
        return cc if cc.startswith(self.cross_compile) else self.cross_compile + cc

    def tool(self, name: str) -> str:
        """A binutils program for the kernel's architecture (`strip`, `ld`): the cross one when needed."""
        return self.cross_compile + name


class KernelEnv(Protocol):
    name: str

    def headers(self, kernel: str, arch: str) -> KernelHeaders: ...

    def make_argv(self, hdrs: KernelHeaders, tree: Path, jobs: int) -> list[str]: ...

    def toolchain(self, hdrs: KernelHeaders) -> str:
        """First line of the compiler's --version, as this environment runs it."""
        ...

    def runner(self, hdrs: KernelHeaders) -> list[str]:
        """The argv prefix that runs the kernel's build tools (make, binutils, its objtool) where `make_argv`
        runs make: the kernel's toolchain root (modbuild.toolroot); empty: this machine."""
        ...


def make_argv(hdrs: KernelHeaders, tree: Path, jobs: int) -> list[str]:
    """The recipe DESIGN.md records as working: SYSSRC = the common dir, SYSOUT = the arch dir; for another
    architecture's kernel also ARCH and CROSS_COMPILE (NVIDIA's Makefile would take `uname -m` and the
    host's gcc-12 otherwise)."""
    cross = [f"ARCH={ARCHES[hdrs.arch].kbuild}", f"CROSS_COMPILE={hdrs.cross_compile}", f"CC={hdrs.cc}"] \
        if hdrs.cross_compile else []
    return ["make", f"-j{jobs}", "-C", str(tree), f"SYSSRC={hdrs.syssrc}", f"SYSOUT={hdrs.sysout}", *cross, "modules"]


def read_config(sysout: Path) -> dict[str, str]:
    config = sysout / ".config"
    if not config.is_file():
        raise UserError(f"{sysout} holds no kernel .config", "point at a kernel's build headers directory")
    values: dict[str, str] = {}
    for line in config.read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            values[key] = value.strip('"')
    return values


def kernel_release(sysout: Path) -> str:
    """uname -r of the kernel these headers belong to (Debian's include/config/kernel.release lies)."""
    uts = sysout / "include/generated/utsrelease.h"
    m = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text()) if uts.is_file() else None
    if not m:
        raise UserError(f"{sysout} has no include/generated/utsrelease.h", "point at a kernel's build headers")
    return m.group(1)


def config_arch(config: dict[str, str], where: Path) -> str:
    """The Debian architecture of the kernel a .config belongs to."""
    found = [a.debian for a in ARCHES.values() if config.get(a.kconfig) == "y"]
    if len(found) != 1:
        known = [f"{a.machine} ({a.debian})" for a in ARCHES.values()]
        raise UserError(f"the kernel .config in {where} is for neither {' nor '.join(ARCHES)}",
                        f"gl-nvidia builds for {' and '.join(known)} kernels")
    return found[0]


def compiler_mismatch(toolchain: str, kernel_compiler: str, cross_compile: str = "") -> str | None:
    """A warning when modules would be built with another compiler than the kernel was (None: same).

    `cross_compile`: the prefix this machine's compiler has and the kernel's did not (a kernel built
    natively on arm64 says "gcc-12 (Debian ...)", its cross compiler here "aarch64-linux-gnu-gcc-12 (Debian ...)").
    """
    if not kernel_compiler or toolchain == kernel_compiler:
        return None
    if cross_compile and toolchain.removeprefix(cross_compile) == kernel_compiler:
        return None
    return (f"building with {toolchain!r}, but the kernel was built with {kernel_compiler!r}; "
            "modules may differ in ABI-relevant code generation (retpolines, structure layout plugins)")


def host_compiler(cc: str) -> str | None:
    """First line of `cc --version` on this machine (None: not installed)."""
    return output([cc, "--version"]).splitlines()[0].strip() if shutil.which(cc) else None


def host_toolchain(cc: str) -> str:
    line = host_compiler(cc)
    if line is None:
        raise UserError(f"the kernel was built with {cc}, which is not installed",
                        f"install {cc} (scripts/bootstrap) so modules match the kernel's compiler")
    return line


def dir_headers(sysout: Path, syssrc: Path | None = None) -> KernelHeaders:
    """Headers on disk: `sysout` is the arch dir; `syssrc` defaults to what its Makefile includes."""
    if syssrc is None:
        makefile = sysout / "Makefile"
        m = _INCLUDE.search(makefile.read_text()) if makefile.is_file() else None
        syssrc = Path(m.group(1)) if m and Path(m.group(1)).is_dir() else sysout
    h = hashlib.sha256()
    for name in (".config", "Module.symvers", "include/generated/utsrelease.h"):
        if (sysout / name).is_file():
            h.update(sha256_file(sysout / name).encode())
    config = read_config(sysout)
    return KernelHeaders(kernel_release(sysout), syssrc, sysout, h.hexdigest(),
                         config.get("CONFIG_CC_VERSION_TEXT", ""), config_arch(config, sysout))


class DirEnv:
    """Headers already on disk, compiled with this machine's compiler."""

    name = "dir"

    def __init__(self, sysout: Path, syssrc: Path | None = None) -> None:
        self.sysout, self.syssrc = sysout, syssrc

    def headers(self, kernel: str, arch: str) -> KernelHeaders:
        hdrs = dir_headers(self.sysout, self.syssrc)
        if kernel and hdrs.kernel != kernel:
            raise UserError(f"headers in {self.sysout} are for {hdrs.kernel}, not {kernel}")
        return hdrs

    def make_argv(self, hdrs: KernelHeaders, tree: Path, jobs: int) -> list[str]:
        return make_argv(hdrs, tree, jobs)

    def toolchain(self, hdrs: KernelHeaders) -> str:
        return host_toolchain(hdrs.cc)

    def runner(self, hdrs: KernelHeaders) -> list[str]:
        return []


class AptEnv:
    """linux-headers-<kernel>, its -common and linux-kbuild packages, unpacked into a private tree; compiled
    with this machine's compiler, or in the kernel's own toolchain root where this machine has none of the
    kernel's compiler version (modbuild.toolroot)."""

    name = "apt"

    def __init__(self, sources: list[apt.AptSource] | None = None) -> None:
        """`sources`: the OS version's apt repository (default: this machine's, i.e. Debian's archive)."""
        self._sources = sources
        self._repos: dict[str, apt.AptRepo] = {}
        self._kbuild: dict[str, str] = {}  # kernel -> its linux-kbuild package's Depends
        self._roots: dict[str, toolroot.ToolRoot | None] = {}  # kernel -> its toolchain root (None: this machine)

    def repo(self, arch: str) -> apt.AptRepo:
        if arch not in self._repos:
            self._repos[arch] = apt.AptRepo(self._sources or apt.system_sources(), arch=arch)
        return self._repos[arch]

    def headers(self, kernel: str, arch: str) -> KernelHeaders:
        repo = self.repo(arch)
        name = f"linux-headers-{kernel}"
        if not repo.versions(name):
            raise UserError(f"no kernel headers package {name} in {repo.describe()}",
                            "check the kernel release (uname -r) and the apt repository of its OS version")
        pkg = repo.find(name)
        # kbuild's host programs run here: linux-kbuild of this machine's architecture, never installed.
        kbuild = self.repo(host_arch())
        pkgs = [pkg, *((kbuild if dep.startswith("linux-kbuild-") else repo).find(dep)
                       for dep in _header_deps(pkg.depends))]
        self._kbuild[kernel] = ", ".join(p.depends for p in pkgs if p.name.startswith("linux-kbuild-"))
        digest = hashlib.sha256("".join(sorted(p.sha256 for p in pkgs)).encode()).hexdigest()
        tree = cache_dir("build", "headers") / f"{kernel}-{digest[:16]}"
        if not cache_hit(tree):
            debs = [repo.download(p) for p in pkgs]
            with cache_fill(tree) as tmp:
                for deb in debs:
                    apt.extract(deb, tmp)
                _relocate(tmp, tree, kernel)
        sysout = tree / "usr/src" / name
        hdrs = dir_headers(sysout)
        return KernelHeaders(kernel, hdrs.syssrc, sysout, digest, hdrs.kernel_compiler, hdrs.arch)

    def make_argv(self, hdrs: KernelHeaders, tree: Path, jobs: int) -> list[str]:
        return [*self.runner(hdrs), *make_argv(hdrs, tree, jobs)]

    def toolchain(self, hdrs: KernelHeaders) -> str:
        root = self.toolroot(hdrs)
        if root is None:
            return host_toolchain(hdrs.cc)
        return output(root.argv([hdrs.cc, "--version"])).splitlines()[0].strip()

    def runner(self, hdrs: KernelHeaders) -> list[str]:
        root = self.toolroot(hdrs)
        return [] if root is None else root.argv([])

    def toolroot(self, hdrs: KernelHeaders) -> toolroot.ToolRoot | None:
        """The kernel's own toolchain root (made once, cached), when this machine has no compiler of the
        kernel's version; None: it builds with this machine's."""
        if hdrs.kernel not in self._roots:
            self._roots[hdrs.kernel] = None
            if toolroot.needs_root(hdrs.kernel_compiler, host_compiler(hdrs.cc)):
                if hdrs.kernel not in self._kbuild:
                    self.headers(hdrs.kernel, hdrs.arch)
                packages = (*toolroot.compiler_packages(hdrs.cc), *toolroot.BASE_PACKAGES,
                            *toolroot.kbuild_depends(self._kbuild[hdrs.kernel]))
                spec = toolroot.root_spec(self.repo(host_arch()), packages)
                # one root per spec, made once while concurrent builds wait (build_all's units, CI jobs)
                with (cache_dir("build", "locks") / f"toolroot-{spec.key()}").open("w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    root = toolroot.make_root(spec)
                if root.seconds:
                    log.info("%s: made its toolchain root (%s, %s) in %.0f s: %s", hdrs.kernel, spec.suite,
                             " ".join(packages), root.seconds, root.root)
                self._roots[hdrs.kernel] = root
        return self._roots[hdrs.kernel]


def _header_deps(depends: str) -> list[str]:
    """The -common headers and linux-kbuild packages a linux-headers package depends on."""
    return [n for n in apt.depends_names(depends) if n.startswith(("linux-headers-", "linux-kbuild-"))]


def _relocate(tmp: Path, final: Path, kernel: str) -> None:
    """Point the arch dir's one-line Makefile at the private common dir (it names /usr/src/...)."""
    makefile = tmp / "usr/src" / f"linux-headers-{kernel}" / "Makefile"
    if not makefile.is_file():
        raise UserError(f"linux-headers-{kernel} has no usr/src/linux-headers-{kernel}/Makefile")
    text = makefile.read_text()
    m = _INCLUDE.search(text)
    if not m:
        raise UserError(f"unexpected {makefile.name} in linux-headers-{kernel}: no include of the common dir")
    common = final / m.group(1).lstrip("/")
    atomic_write_text(makefile, text[: m.start(1)] + str(common) + text[m.end(1):])


# --- kmodbuild ----------------------------------------------------------------------------------

KMODBUILD_IMAGE = "ghcr.io/gardenlinux/gardenlinux/kmodbuild"


def container_engine() -> str:
    for engine in ("podman", "docker"):
        if shutil.which(engine):
            return engine
    raise UserError("the kmodbuild environment needs podman or docker, and neither is installed",
                    "install podman, or use --env apt")


def kmodbuild_image(arch: str, gl_version: str) -> str:
    return f"{KMODBUILD_IMAGE}:{arch}-{gl_version}"


def kmodbuild_argv(engine: str, image: str, tree: Path, argv: list[str]) -> list[str]:
    """Run `argv` in the kmodbuild container with `tree` mounted read-write at the same path."""
    return [engine, "run", "--rm", "--network=none", "-v", f"{tree}:{tree}:rw", "-w", str(tree), image, *argv]


class KmodbuildEnv:
    """Garden Linux's developer container: its headers and compiler, run with podman or docker."""

    name = "kmodbuild"

    def __init__(self, gl_version: str, engine: str | None = None) -> None:
        self.gl_version = gl_version
        self._engine = engine

    @property
    def engine(self) -> str:
        if self._engine is None:
            self._engine = container_engine()
        return self._engine

    def image(self, arch: str) -> str:
        return kmodbuild_image(arch, self.gl_version)

    def headers(self, kernel: str, arch: str) -> KernelHeaders:
        # The gate reads .config and Module.symvers on this side: copy the headers out once.
        tree = cache_dir("build", "kmodbuild") / f"{self.gl_version}-{arch}-{kernel}"
        if not cache_hit(tree):
            with cache_fill(tree) as tmp:
                output(kmodbuild_argv(self.engine, self.image(arch), tmp,
                                      ["sh", "-c", f"cp -a /usr/src/. {tmp}/"]))
        return dir_headers(tree / f"linux-headers-{kernel}")

    def make_argv(self, hdrs: KernelHeaders, tree: Path, jobs: int) -> list[str]:
        inner = ["make", f"-j{jobs}", "-C", str(tree), f"KERNEL_UNAME={hdrs.kernel}", "modules"]
        return kmodbuild_argv(self.engine, self.image(_arch_of(hdrs.kernel)), tree, inner)

    def toolchain(self, hdrs: KernelHeaders) -> str:
        # The container is of the kernel's architecture: its compiler has no cross prefix.
        argv = kmodbuild_argv(self.engine, self.image(_arch_of(hdrs.kernel)), Path("/tmp"), [hdrs.kernel_cc, "--version"])
        return output(argv).splitlines()[0].strip()

    def runner(self, hdrs: KernelHeaders) -> list[str]:
        return []  # the modules' tools run here, as they always have for this environment


def _arch_of(kernel: str) -> str:
    return (of_kernel(kernel) or BUILD).debian
