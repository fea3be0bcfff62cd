"""What a build is asked for, made concrete: the units, the driver source and each unit's kernel
environment, from a profile's matrix or one kernel; and the failures recorded as the lock's exclusions.

The rules live here, in the build stage; `gl-nvidia build` only parses options, calls these and prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gl_nvidia.build.kenv import AptEnv, DirEnv, KernelEnv, KmodbuildEnv, container_engine
from gl_nvidia.build.sources import DebianSource, DirSource, DriverSource, branch_of
from gl_nvidia.build.unit import UnitResult
from gl_nvidia.catalog.kernels import apt_sources
from gl_nvidia.catalog.lock import Lock, exclude_failures
from gl_nvidia.catalog.matrix import load_lock, lock_matrix, lock_path
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.errors import UserError
from gl_nvidia.osprofile import OSProfile, os_profile


def driver_source(kind: str, path: str | None, sha256: str | None, redist: str | None = None) -> DriverSource:
    """`debian` (the archive's packages), `nvidia` (a .run: `path` a file or URL template, NVIDIA's
    site by default, `sha256` its checksum, `redist` the redist tree of its fabric manager, IMEX and
    nvlsm) or `dir` (an unpacked tree at `path`)."""
    # An option the chosen source would not read is a mistake, not something to drop silently.
    if kind == "debian" and (path or sha256):
        raise UserError("--source-path and --sha256 are read only with --source nvidia or dir",
                        "pass --source nvidia (a .run) or --source dir (an unpacked tree)")
    if kind != "nvidia" and (sha256 or redist):
        raise UserError("--sha256 and --redist are read only with --source nvidia",
                        f"leave them out for --source {kind}")
    if kind == "debian":
        return DebianSource()
    if kind == "dir":
        if not path:
            raise UserError("--source dir needs --source-path DIR", "an unpacked driver (sh NVIDIA-*.run --extract-only)")
        return DirSource(Path(path))
    from gl_nvidia.build.nvidia import (  # only this source needs its downloader
        NVIDIA_URL,
        NvidiaRunSource,
    )

    return NvidiaRunSource(path or NVIDIA_URL, sha256=sha256, redist=redist)


def kernel_envs(
    distro: OSProfile,
    kind: str | None = None,
    *,
    apt: str | None = None,
    codenames: Mapping[str, str | None] | None = None,
    headers: Path | None = None,
) -> Callable[[BuildUnit], KernelEnv]:
    """The environment of each unit, one per OS version, so each apt index is read once.

    `kind`: "apt", "dir" (`headers`) or "kmodbuild"; None: the OS's own (Garden Linux's production
    path is its kmodbuild container of the newest GL version using the kernel; Debian's headers come
    from apt). `apt`: the lock's `sources.apt` for the apt environment (None: this machine's archive),
    `codenames` its fixed OS versions' release codenames (12: bookworm, 13: trixie).
    """
    kind = kind or distro.build_env
    if headers is not None and kind != "dir":
        raise UserError("--kernel-headers is read only with --env dir", "pass --env dir --kernel-headers DIR")
    if kind == "dir":
        if headers is None:
            raise UserError("--env dir needs --kernel-headers DIR", "the kernel's build headers directory")
        dir_env = DirEnv(headers)
        return lambda unit: dir_env
    engine: str | None = None
    if kind == "kmodbuild":
        if distro.build_env != "kmodbuild":
            raise UserError(f"--env kmodbuild builds Garden Linux kernels only, not {distro.id}", "use --env apt")
        engine = container_engine()  # no engine: one clear error now, not one per unit later
    envs: dict[str, KernelEnv] = {}

    def env_for(unit: BuildUnit) -> KernelEnv:
        version = unit.os_versions[-1] if unit.os_versions else ""
        if version not in envs:
            if engine is not None:
                envs[version] = KmodbuildEnv(version, engine)
            else:
                envs[version] = AptEnv(None if apt is None else
                                       apt_sources(apt, version, distro, (codenames or {}).get(version)))
        return envs[version]

    return env_for


def os_version_of(unit: BuildUnit) -> str:
    """The OS version a unit is built for: its newest (a Garden Linux unit serves several alike)."""
    return unit.os_versions[-1] if unit.os_versions else ""


def debian_sources(lock: Lock) -> Callable[[BuildUnit], DriverSource]:
    """Each unit's Debian packages from its own OS version's suites (12: bookworm's, 13: trixie's)."""
    sources: dict[str, DriverSource] = {}

    def of(unit: BuildUnit) -> DriverSource:
        version = os_version_of(unit)
        if version not in sources:
            suites = apt_sources(lock.sources.apt, version, os_profile(lock.os.id), lock.os.codename_of(version)) \
                if lock.os.fixed else None
            sources[version] = DebianSource(sources=suites)
        return sources[version]

    return of


@dataclass(frozen=True)
class BuildRequest:
    units: tuple[BuildUnit, ...]
    env_for: Callable[[BuildUnit], KernelEnv]
    source_for: Callable[[BuildUnit], DriverSource]

    def by_source(self) -> list[tuple[DriverSource, list[BuildUnit]]]:
        """The units grouped by driver source (one per OS version), in order."""
        groups: dict[int, tuple[DriverSource, list[BuildUnit]]] = {}
        for unit in self.units:
            source = self.source_for(unit)
            groups.setdefault(id(source), (source, []))[1].append(unit)
        return list(groups.values())


def matrix_request(profile: str, source: DriverSource, env: str | None, headers: Path | None) -> BuildRequest:
    """Every unit of a profile's matrix, each in its OS's environment unless `env` names another; Debian's
    packages of each unit's own OS version."""
    lock = load_lock(profile)
    return BuildRequest(lock_matrix(lock).units,
                        kernel_envs(os_profile(lock.os.id), env, apt=lock.sources.apt,
                                    codenames={v.version: v.codename for v in lock.os.fixed}, headers=headers),
                        debian_sources(lock) if isinstance(source, DebianSource) else lambda unit: source)


def kernel_request(kernel: str, driver_version: str | None, arch: str, os_id: str, os_version: str,
                   source: DriverSource, env: str | None, headers: Path | None) -> BuildRequest:
    """One unit: the flavour is the one the kernel's name says; the driver, unless given, the Debian
    archive's newest. One kernel builds with this machine's apt archive unless `env` names another."""
    if not driver_version:
        if not isinstance(source, DebianSource):
            raise UserError("--driver is required with --source nvidia or dir")
        driver_version = source.available_versions(arch)[0]
    distro = os_profile(os_id)
    unit = BuildUnit(kernel, driver_version, branch_of(driver_version), arch, distro.kernel_flavour(kernel), os_id,
                     (os_version,))
    return BuildRequest((unit,), kernel_envs(distro, env or "apt", headers=headers), lambda u: source)


def failures_lock(profile: str) -> Path:
    """The lock file `--exclude-failed` writes: the profile's own (the embedded one has none)."""
    path = lock_path(profile)
    if path is None:
        raise UserError("--exclude-failed needs a lock file to write", "pass --profile PATH (or gardenlinux)")
    return path


def exclude_failed(lock_file: Path, results: Sequence[UnitResult]) -> int:
    """Record every failed module type of every unit as the lock's exclusions; how many were added."""
    failures: list[tuple[BuildUnit, Mapping[str, str]]] = [
        (r.unit, {o.module_type: o.error or "build failed" for o in r.outcomes.values() if o.status != "ok"})
        for r in results if not r.ok]
    return sum(exclude_failures(lock_file, unit, failed) for unit, failed in failures)
