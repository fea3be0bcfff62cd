"""Driver sources: where the kernel-module trees, userspace and firmware of one driver version come from.

Every source ends in the same `DriverInputs`: one unpacked module tree per module type, a root-relative
userspace tree and a firmware tree, plus the digests of what they were made from. Unpacked inputs are
cached by those digests, so a second build never downloads or unpacks again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from debian.debian_support import Version

from gl_nvidia import apt, elf
from gl_nvidia.arches import ARCHES
from gl_nvidia.bundle import SourceFix
from gl_nvidia.errors import IntegrityError, UserError
from gl_nvidia.fs import cache_dir, cache_fill, cache_hit, copy_from_tree
from gl_nvidia.modbuild import capabilities, runmanifest
from gl_nvidia.run import run

# What the image carries beside the driver's own files: NVIDIA's redist tree has them (nvidia source).
EXTRA_COMPONENTS = ("fabricmanager", "imex", "nvlsm", "libnvidia_nscq", "libnvsdm")


@dataclass(frozen=True)
class ModuleSource:
    """An unpacked kernel-module tree (the directory holding NVIDIA's top-level Makefile and Kbuild)."""

    module_type: str  # "open" | "proprietary"
    version: str  # version of this tree, which may differ from the userspace version
    tree: Path
    digest: str  # sha256 of what the tree was unpacked from (and of the fixes applied to it)
    fixes: tuple[SourceFix, ...] = ()  # gl-nvidia's compatibility fixes in `tree` (modbuild/compat.py)


@dataclass(frozen=True)
class DriverInputs:
    driver_version: str
    branch: str
    arch: str
    source: str  # "debian" | "nvidia" | "dir"
    digests: dict[str, str]  # input file name -> sha256
    userspace: Path  # root-relative tree: usr/bin/..., usr/lib/<triplet>/...
    firmware: Path  # holds nvidia/<version>/gsp_*.bin
    module_sources: dict[str, ModuleSource] = field(default_factory=dict)  # keyed by module type
    # a component the source has no copy of, and why: {"fabricmanager": "no fabric manager for ... in Debian"}
    left_out: dict[str, str] = field(default_factory=dict)
    # each name of the container toolkit's capability lists the userspace lacks, and why: the build reports
    # them; the bundle does not record them (its manifest is in every per-kernel layer)
    lacks: dict[str, str] = field(default_factory=dict)


class DriverSource(Protocol):
    name: str

    def prepare(self, driver_version: str, arch: str) -> DriverInputs:
        """Fetch and unpack (or reuse from the cache) everything of `driver_version` for `arch`."""
        ...

    def checksums(self, driver_version: str, arch: str) -> dict[str, str]:
        """What `prepare` would build from (file name -> sha256, or the URL that names it), known without
        downloading or unpacking: release decides from it whether a unit must be built at all."""
        ...


def branch_of(version: str) -> str:
    return version.split(".", 1)[0]


def _upstream(deb_version: str) -> str:
    """Debian version "535.309.01-0+deb12u1" -> NVIDIA version "535.309.01"."""
    return Version(deb_version).upstream_version or deb_version


# The layout's own revision, part of each unpacked tree's cache key: a new layout is never read from an old entry.
_LAYOUT = {"layout": "2: NVIDIA's .manifest, sonames from DT_SONAME"}


def _digest_key(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


# --- debian -------------------------------------------------------------------------------------

# Debian's packages for a headless GPU node; all must carry exactly the requested driver version. Names
# are those of the main driver; a Tesla branch's packages carry its variant (`variant_name`).
DEBIAN_USERSPACE = ("nvidia-smi", "libcuda1", "libnvidia-ml1", "libnvidia-ptxjitcompiler1", "firmware-nvidia-gsp")
# What NVIDIA's driver container has for the toolkit's capabilities beyond those: each taken when the
# archive has it in exactly the driver's version (a package the version lacks is a name the capability
# report lists as missing).
DEBIAN_CAPABILITIES = {
    "compute": ("libcudadebugger1", "libnvidia-nvvm4", "nvidia-opencl-icd", "nvidia-opencl-common",
                "libnvidia-allocator1", "libnvidia-pkcs11-openssl3", "nvidia-cuda-mps"),
    "utility": ("nvidia-driver-bin",),  # nvidia-debugdump, nvidia-bug-report.sh
    "video": ("libnvcuvid1", "libnvidia-encode1", "libnvidia-opticalflow1", "nvidia-vdpau-driver"),
    "graphics": ("libnvidia-glcore", "libnvidia-eglcore", "libglx-nvidia0", "libegl-nvidia0", "libgles-nvidia1",
                 "libgles-nvidia2", "libnvidia-glvkspirv", "nvidia-vulkan-common", "nvidia-egl-common",
                 "libnvidia-rtcore", "libnvoptix1", "libnvidia-fbc1", "libnvidia-api1"),
    "ngx": ("libnvidia-ngx1",),
}
# Shipped when the archive has them, in whatever version it has (Debian versions them separately; trixie
# packages nvidia-modprobe and nvidia-persistenced from their own sources, one for every driver).
DEBIAN_OPTIONAL = ("nvidia-persistenced", "libnvidia-cfg1", "nvidia-modprobe")
DEBIAN_TOOLS = ("nvidia-persistenced", "nvidia-modprobe")  # never of a variant
DEBIAN_MODULE_SOURCES = {"proprietary": "nvidia-kernel-source", "open": "nvidia-open-kernel-source"}
# The proprietary module source of the main driver and of each Tesla branch (`nvidia-tesla-535-kernel-source`).
_DEBIAN_KERNEL_SOURCE = re.compile(r"nvidia(?:-(tesla-\d+))?-kernel-source")
# Fabric manager must be of exactly the driver's version (it refuses to run against another).
DEBIAN_FABRICMANAGER = "nvidia-fabricmanager"
DEBIAN_NVIDIA_FS = "nvidia-fs-dkms"  # GPUDirect Storage's module source, of its own version


def variant_name(name: str, variant: str) -> str:
    """Debian's name of a driver package in a variant's packaging: `nvidia-smi` -> `nvidia-tesla-535-smi`,
    `libglx-nvidia0` -> `libglx-nvidia-tesla-535-0`, `libcuda1` -> `libnvidia-tesla-535-cuda1`."""
    if not variant:
        return name
    m = re.match(r"(.*?nvidia)(?:-|(?=\d))(.*)", name)
    if m:
        return f"{m.group(1)}-{variant}-{m.group(2)}"
    return f"libnvidia-{variant}-{name.removeprefix('lib')}"


class DebianSource:
    """Debian's non-free NVIDIA packages, downloaded and unpacked without installing them."""

    name = "debian"

    def __init__(self, repo: apt.AptRepo | None = None, sources: list[apt.AptSource] | None = None) -> None:
        """`sources`: the OS version's suites (default: this machine's archive)."""
        # One repository view per architecture: a release builds amd64 and arm64 units side by side.
        self._repos = {repo.arch: repo} if repo else {}
        self._sources = sources

    def repo(self, arch: str) -> apt.AptRepo:
        if arch not in self._repos:
            self._repos[arch] = apt.AptRepo(self._sources or apt.system_sources(), arch=arch)
        return self._repos[arch]

    def variant(self, driver_version: str, arch: str) -> str:
        """Which packaging carries the driver: "" the main one (`nvidia-kernel-source`), or a Tesla
        branch's ("tesla-535": trixie packages 535 beside its main 550)."""
        repo = self.repo(arch)
        found = [m.group(1) or "" for n in repo.names() if (m := _DEBIAN_KERNEL_SOURCE.fullmatch(n))
                 and any(_upstream(p.version) == driver_version for p in repo.versions(n))]
        return min(found, key=bool) if found else ""  # the main packaging where both have it

    def available_versions(self, arch: str) -> list[str]:
        return [_upstream(p.version) for p in self.repo(arch).versions("nvidia-smi")]

    def checksums(self, driver_version: str, arch: str) -> dict[str, str]:
        # nvidia-fs-dkms too (modbuild/nvfs.py builds GDS's module from it): a new upload rebuilds the unit
        nvfs = self.repo(arch).versions(DEBIAN_NVIDIA_FS)[:1]
        return {p.deb_name: p.sha256 for p in (*self._packages(driver_version, arch), *nvfs)}

    def _packages(self, driver_version: str, arch: str) -> list[apt.AptPackage]:
        repo = self.repo(arch)
        variant = self.variant(driver_version, arch)
        pkgs: list[apt.AptPackage] = []
        for name in (variant_name(n, variant) for n in (*DEBIAN_USERSPACE, DEBIAN_MODULE_SOURCES["proprietary"])):
            match = [p for p in repo.versions(name) if _upstream(p.version) == driver_version]
            if not match:
                have = ", ".join(sorted({_upstream(p.version) for p in repo.versions(name)})) or "none"
                raise UserError(
                    f"driver {driver_version} is not in the Debian archive ({name} has: {have})",
                    "pick a driver version the archive serves, or use --source nvidia",
                )
            pkgs.append(match[0])
        for names in DEBIAN_CAPABILITIES.values():
            for name in names:
                pkgs += [p for p in repo.versions(variant_name(name, variant)) if _upstream(p.version) == driver_version][:1]
        for name in (n if n in DEBIAN_TOOLS else variant_name(n, variant) for n in DEBIAN_OPTIONAL):
            if repo.versions(name):
                pkgs.append(repo.find(name))
        pkgs += [p for p in repo.versions(DEBIAN_FABRICMANAGER) if _upstream(p.version) == driver_version][:1]
        # Debian ships the open tree on its own schedule: take the newest of the same branch.
        open_pkgs = [p for p in repo.versions(variant_name(DEBIAN_MODULE_SOURCES["open"], variant))
                     if branch_of(_upstream(p.version)) == branch_of(driver_version)]
        if open_pkgs:
            pkgs.append(open_pkgs[0])
        return pkgs

    def prepare(self, driver_version: str, arch: str) -> DriverInputs:
        repo = self.repo(arch)
        pkgs = self._packages(driver_version, arch)
        variant = self.variant(driver_version, arch)
        debs = {p.name: repo.download(p) for p in pkgs}
        digests = {p.deb_name: p.sha256 for p in pkgs}
        versions = {p.name: _upstream(p.version) for p in pkgs}
        root = cache_dir("build", "driver") / f"debian-{driver_version}-{arch}-{_digest_key({**digests, **_LAYOUT})[:16]}"
        if not cache_hit(root):
            with cache_fill(root) as tmp:
                _unpack_debian(debs, tmp, arch, variant)
        module_sources = {
            mtype: ModuleSource(mtype, versions[pkg], root / f"kernel-{mtype}",
                                next(p.sha256 for p in pkgs if p.name == pkg))
            for mtype, pkg in ((t, variant_name(n, variant)) for t, n in DEBIAN_MODULE_SOURCES.items()) if pkg in debs
        }
        gaps = capabilities.missing(root / "userspace", ARCHES[arch].triplet,
                                    f"no Debian package of driver {driver_version} carries it")
        return DriverInputs(driver_version, branch_of(driver_version), arch, self.name, digests,
                            root / "userspace", root / "firmware", module_sources,
                            self._left_out(driver_version, arch, versions), gaps)

    def _left_out(self, driver_version: str, arch: str, versions: dict[str, str]) -> dict[str, str]:
        """Debian packages neither IMEX nor nvlsm; its fabric manager, where there is one, is rarely of the
        driver's version."""
        why = {c: f"Debian packages no {c} (NVIDIA's redist tree has it: --source nvidia)"
               for c in ("imex", "nvlsm", "libnvidia_nscq", "libnvsdm")}
        if DEBIAN_FABRICMANAGER not in versions:
            have = sorted({_upstream(p.version) for p in self.repo(arch).versions(DEBIAN_FABRICMANAGER)})
            why["fabricmanager"] = (f"no fabric manager for {driver_version} in Debian (the archive's "
                                    f"{DEBIAN_FABRICMANAGER}: {', '.join(have) or 'no such package'})")
        return why


def _unpack_debian(debs: dict[str, Path], dest: Path, arch: str, variant: str = "") -> None:
    raw = dest / "raw"
    for deb in debs.values():
        apt.extract(deb, raw)
    triplet = ARCHES[arch].triplet
    # nvidia-alternative normally links these into place on install; the bundle ships them in place.
    alt_bin = raw / "usr/lib/nvidia" / (variant or "current")
    alt_lib = raw / f"usr/lib/{triplet}/nvidia" / (variant or "current")
    userspace, firmware = dest / "userspace", dest / "firmware"
    lib = userspace / f"usr/lib/{triplet}"
    moves: list[tuple[Path, Path]] = []
    if alt_bin.is_dir():
        moves += [(p, userspace / "usr/bin" / p.name) for p in alt_bin.iterdir()
                  if p.is_file() and os.access(p, os.X_OK)]
    if alt_lib.is_dir():
        # GBM's backend link is a display's. Where NVIDIA installs them: OptiX's data in /usr/share/nvidia,
        # the VDPAU driver in the directory libvdpau loads drivers from.
        moves += [(p, userspace / "usr/share/nvidia" / p.name if p.name == "nvoptix.bin" else
                   lib / "vdpau" / p.name if p.name.startswith("libvdpau_nvidia.") else lib / p.name)
                  for p in alt_lib.iterdir() if not p.is_dir() and p.name != "nvidia-drm_gbm.so"]
    for sub in ("usr/bin", f"usr/lib/{triplet}"):
        d = raw / sub
        if d.is_dir():
            moves += [(p, userspace / sub / p.name) for p in d.iterdir() if not p.is_dir()]
    moves += [(p, userspace / "usr/bin" / p.name) for p in raw.glob("usr/sbin/*")]  # nvidia-cuda-mps-server
    moves += [(p, userspace / p.relative_to(raw)) for p in raw.glob("usr/share/doc/*/copyright")]
    moves += [(p, userspace / p.relative_to(raw)) for p in raw.glob("usr/share/nvidia/nvswitch/*")]
    # The ICD files where NVIDIA's installer puts them (Debian keeps Vulkan's under /usr/share).
    moves += [(p, userspace / p.relative_to(raw)) for p in raw.glob("etc/OpenCL/vendors/*")]
    moves += [(p, userspace / "etc/vulkan" / p.relative_to(raw / "usr/share/vulkan")) for p in raw.glob("usr/share/vulkan/*/*")]
    moves += [(p, userspace / p.relative_to(raw)) for p in raw.glob("usr/share/glvnd/egl_vendor.d/*")]
    moves += [(p, userspace / p.relative_to(raw)) for p in raw.glob("usr/share/egl/egl_external_platform.d/*")]
    # bookworm's packages put firmware in /lib, trixie's (merged /usr) in /usr/lib
    moves += [(p, firmware / p.relative_to(raw / lib_dir / "firmware"))
              for lib_dir in ("lib", "usr/lib") for p in raw.glob(f"{lib_dir}/firmware/nvidia/*/*")]
    what = f"the unpacked .debs ({', '.join(sorted(debs))})"
    for src, dst in moves:
        copy_from_tree(raw, src, dst, what)
    for d in (lib, lib / "vdpau"):
        check_sonames(d, arch, what)
    for mtype, pkg in ((t, variant_name(n, variant)) for t, n in DEBIAN_MODULE_SOURCES.items()):
        tar = next((raw / "usr/src").glob(f"{pkg.removesuffix('-source')}.tar.*"), None)
        if pkg not in debs or tar is None:
            continue
        unpacked = dest / f"unpack-{mtype}"
        unpacked.mkdir()
        run(["tar", "-xf", tar, "-C", unpacked])
        trees = [p.parent for p in unpacked.glob("modules/*/Kbuild")]
        if len(trees) != 1:
            raise UserError(f"unexpected layout in {pkg}: expected one modules/*/Kbuild")
        os.replace(trees[0], dest / f"kernel-{mtype}")
        shutil.rmtree(unpacked)
    shutil.rmtree(raw)


def check_sonames(libdir: Path, arch: str, what: str) -> None:
    """Every library in `libdir` is found under its DT_SONAME there: the name the loader and ldconfig look up."""
    machine = ARCHES[arch].elf_machine
    for p in sorted(libdir.iterdir()) if libdir.is_dir() else []:
        if p.is_symlink() or not p.is_file() or (dyn := elf.dynamic(p)) is None or dyn.machine != machine:
            continue
        if dyn.soname and (libdir / dyn.soname).resolve() != p.resolve():
            raise IntegrityError(f"{what}: {p.name} has DT_SONAME {dyn.soname}, which does not name it in {libdir.name}",
                                 "nothing of it was used")


# --- an unpacked NVIDIA installer (dir) and the installer itself (nvidia) ------------------------

def run_tree_inputs(tree: Path, arch: str, source: str, digests: dict[str, str], *,
                    components: Mapping[str, Path] | None = None,
                    left_out: Mapping[str, str] | None = None) -> DriverInputs:
    """Map an unpacked `NVIDIA-Linux-*.run` tree (kernel/, kernel-open/, flat userspace) to DriverInputs;
    `components`: NVIDIA's unpacked redist archives of the release (fabric manager, ...), laid out beside it."""
    manifest_file = tree / ".manifest"
    if not manifest_file.is_file() or not (tree / "kernel").is_dir():
        raise UserError(f"{tree} is not an unpacked NVIDIA driver (no .manifest or kernel/)",
                        "unpack the installer with: sh NVIDIA-Linux-*.run --extract-only --target DIR")
    manifest = runmanifest.parse(manifest_file.read_text(errors="replace"), str(manifest_file))
    version = manifest.version
    layout = cache_dir("build", "driver") / f"run-{version}-{arch}-{_digest_key({**digests, **_LAYOUT})[:16]}"
    if not cache_hit(layout):
        placements = runmanifest.plan(manifest, tree, arch)  # every check before anything is written
        with cache_fill(layout) as tmp:
            _layout_run_tree(tree, tmp, version, placements)
            for component, unpacked in sorted((components or {}).items()):
                lay_out(component, unpacked, tmp / "userspace", arch)
    tree_digest = _digest_key(digests)
    module_sources = {
        mtype: ModuleSource(mtype, version, tree / sub, tree_digest)
        for mtype, sub in (("proprietary", "kernel"), ("open", "kernel-open")) if (tree / sub).is_dir()
    }
    gaps = capabilities.missing(layout / "userspace", ARCHES[arch].triplet, f"driver {version}'s .manifest lists no such file")
    return DriverInputs(version, branch_of(version), arch, source, digests,
                        layout / "userspace", layout / "firmware", module_sources, dict(left_out or {}), gaps)


def _layout_run_tree(tree: Path, dest: Path, version: str, placements: list[runmanifest.Placement]) -> None:
    """What the installer's .manifest installs (`placements`), plus its license and GPU list."""
    what = f"the unpacked driver {version}"
    firmware = PurePosixPath("lib/firmware")
    for p in placements:
        at = dest / ("firmware" / p.dest.relative_to(firmware) if p.dest.is_relative_to(firmware)
                     else "userspace" / p.dest)
        if p.link is not None:
            at.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(at):
                at.unlink()
            at.symlink_to(p.link)
        else:
            assert p.source is not None
            copy_from_tree(tree, tree / p.source, at, what)
            at.chmod(p.mode)
    usr = dest / "userspace/usr"
    if (tree / "LICENSE").is_file():
        copy_from_tree(tree, tree / "LICENSE", usr / "share/doc/nvidia/LICENSE", what)
    gpus = tree / "supported-gpus/supported-gpus.json"
    if gpus.is_file():
        copy_from_tree(tree, gpus, usr / "share/nvidia/supported-gpus.json", what)
    (dest / "firmware/nvidia" / version).mkdir(parents=True, exist_ok=True)


# --- NVIDIA's redist archives in the image: where NVIDIA's packages install them ------------------

def lay_out(component: str, tree: Path, root: Path, arch: str) -> None:
    """Copy one unpacked component archive into the image's userspace tree `root` (usr/, opt/)."""
    {"fabricmanager": _fabricmanager, "imex": _imex, "nvlsm": _nvlsm, "libnvidia_nscq": _nscq,
     "libnvsdm": _nvsdm}[component](tree, root, arch)


def _need(tree: Path, rel: str, what: str) -> None:
    if not (tree / rel).is_file():
        raise UserError(f"{tree.name} has no {rel}", f"is it NVIDIA's {what} archive?")


def _copy(tree: Path, src: Path, dest: Path) -> None:
    """`src` of the archive unpacked at `tree` (its one top directory, named like the archive)."""
    copy_from_tree(tree, src, dest, tree.name)


def _fabricmanager(tree: Path, root: Path, arch: str) -> None:
    """The daemon, its start script, libnvfm, NVIDIA's config and the NVSwitch topologies (share/nvidia/nvswitch)."""
    _need(tree, "bin/nv-fabricmanager", "fabric manager")
    usr = root / "usr"
    for tool in ("nv-fabricmanager", "nvswitch-audit", "nvidia-fabricmanager-start.sh"):
        if (tree / "bin" / tool).is_file():
            _copy(tree, tree / "bin" / tool, usr / "bin" / tool)
    for lib in (tree / "lib").glob("libnvfm.so*"):
        _copy(tree, lib, usr / "lib" / ARCHES[arch].triplet / lib.name)
    nvswitch = usr / "share/nvidia/nvswitch"
    if (tree / "share/nvidia/nvswitch").is_dir():
        _copy(tree, tree / "share/nvidia/nvswitch", nvswitch)
    for cfg in (tree / "etc").glob("fabricmanager*.cfg"):
        _copy(tree, cfg, nvswitch / cfg.name)
    _license(tree, usr, "nvidia-fabricmanager")


def _imex(tree: Path, root: Path, arch: str) -> None:
    """nvidia-imex and nvidia-imex-ctl where the DRA driver's compute domains run them from (the driver root's
    /usr/bin), and NVIDIA's default config for hosts that run IMEX themselves."""
    _need(tree, "bin/nvidia-imex", "IMEX")
    usr = root / "usr"
    for tool in ("nvidia-imex", "nvidia-imex-ctl"):
        if (tree / "bin" / tool).is_file():
            _copy(tree, tree / "bin" / tool, usr / "bin" / tool)
    for cfg in sorted((tree / "etc").rglob("*.cfg")):
        _copy(tree, cfg, usr / "share/nvidia/imex" / cfg.name)
    _license(tree, usr, "nvidia-imex")


def _nvlsm(tree: Path, root: Path, arch: str) -> None:
    """nvlsm and its libraries under /opt/nvidia/nvlsm (its binary's RUNPATH), its configs where
    nvidia-fabricmanager-start.sh reads them (/usr/share/nvidia/nvlsm)."""
    _need(tree, "sbin/nvlsm", "NVLink subnet manager")
    opt = root / "opt/nvidia/nvlsm"
    _copy(tree, tree / "sbin/nvlsm", opt / "sbin/nvlsm")
    for lib in sorted((tree / "lib").glob("*.so*")):
        _copy(tree, lib, opt / "lib" / lib.name)
    for cfg in sorted((tree / "share/nvidia/nvlsm").glob("*")):
        if cfg.is_file():
            _copy(tree, cfg, root / "usr/share/nvidia/nvlsm" / cfg.name)
    _license(tree, root / "usr", "nvlsm")


def _nscq(tree: Path, root: Path, arch: str) -> None:
    """libnvidia-nscq, which DCGM opens by its SONAME to read the NVSwitches."""
    _libraries(tree, root, arch, "libnvidia-nscq")


def _nvsdm(tree: Path, root: Path, arch: str) -> None:
    """libnvsdm, DCGM's view of NVLink5 switch trays."""
    _libraries(tree, root, arch, "libnvsdm")


def _libraries(tree: Path, root: Path, arch: str, package: str) -> None:
    """The archive's lib/<package>.so* where NVIDIA's package installs them (the multiarch directory), its
    links as they are and each library's SONAME link (ldconfig makes it on install; the image's
    ld.so.cache lists a library only under its SONAME)."""
    members = sorted((tree / "lib").glob(f"{package}.so*")) if (tree / "lib").is_dir() else []
    if not any(m.is_file() and not m.is_symlink() for m in members):
        raise UserError(f"{tree.name} has no lib/{package}.so*", f"is it NVIDIA's {package} archive?")
    libdir = root / "usr/lib" / ARCHES[arch].triplet
    for member in members:
        _copy(tree, member, libdir / member.name)
    for member in members:
        dyn = None if member.is_symlink() else elf.dynamic(member)
        if not member.is_symlink() and dyn is None:
            raise IntegrityError(f"{tree.name}: {member.name} is not an ELF shared object", "nothing of it was used")
        soname = dyn.soname if dyn else None
        if soname and soname != member.name and not (libdir / soname).is_symlink():
            if "/" in soname or not soname.startswith(package):
                raise IntegrityError(f"{tree.name}: {member.name} names itself {soname!r}",
                                     f"NVIDIA's {package} has a SONAME of its own name")
            (libdir / soname).symlink_to(member.name)
    _license(tree, root / "usr", package)


def _license(tree: Path, usr: Path, package: str) -> None:
    for name in ("LICENSE", "LICENSE.txt", "third-party-notices.txt"):
        if (tree / name).is_file():
            _copy(tree, tree / name, usr / "share/doc" / package / name)


class DirSource:
    """An already-unpacked driver tree on disk (kernel/, kernel-open/, userspace, firmware/)."""

    name = "dir"

    def __init__(self, tree: Path) -> None:
        self.tree = tree

    def checksums(self, driver_version: str, arch: str) -> dict[str, str]:
        return {self.tree.name: _tree_digest(self.tree)}

    def prepare(self, driver_version: str, arch: str) -> DriverInputs:
        digest = _tree_digest(self.tree)
        inputs = run_tree_inputs(self.tree, arch, self.name, {self.tree.name: digest}, left_out={
            c: f"the dir source is an unpacked .run, which has no {c} (use --source nvidia)" for c in EXTRA_COMPONENTS})
        if driver_version and inputs.driver_version != driver_version:
            raise UserError(f"{self.tree} holds driver {inputs.driver_version}, not {driver_version}")
        return inputs


def _tree_digest(tree: Path) -> str:
    """Digest over the names, sizes and modes of every file: cheap, and changes when the tree does."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(files):
            st = os.lstat(os.path.join(root, name))
            rel = os.path.relpath(os.path.join(root, name), tree)
            h.update(f"{rel}\0{st.st_size}\0{stat.S_IMODE(st.st_mode)}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()
