"""Where a build's driver and kernels come from, each strategy one table keyed by name.

`DRIVER_SOURCES`: the driver (`build --source`, a lock's `sources.nvidia` through the catalog's
`DRIVER_FEEDS`); `KERNEL_ENVS`: kernel headers and compiler (`build --env`, an OS profile's `build_env`).
A new one is its module (the class) and a row here: `build`'s choices, its requests and the release
conductor read these tables, and nothing else branches on the names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gl_nvidia.catalog.kernels import apt_sources
from gl_nvidia.catalog.lock import Lock
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.catalog.refresh import driver_feed
from gl_nvidia.errors import UserError
from gl_nvidia.modbuild.kenv import AptEnv, DirEnv, KernelEnv, KmodbuildEnv, container_engine
from gl_nvidia.modbuild.sources import DebianSource, DirSource, DriverSource
from gl_nvidia.osprofile import OSProfile, os_profile
from gl_nvidia.table import Table

SourceFor = Callable[[BuildUnit], DriverSource]
EnvFor = Callable[[BuildUnit], KernelEnv]


def os_version_of(unit: BuildUnit) -> str:
    """The OS version a unit is built for: its newest (a Garden Linux unit serves several alike)."""
    return unit.os_versions[-1] if unit.os_versions else ""


@dataclass(frozen=True)
class SourceOptions:
    """What the command line says of the driver source (`--source-path`, `--sha256`, `--redist`)."""

    path: str | None = None
    sha256: str | None = None
    redist: str | None = None


def _debian(options: SourceOptions) -> DriverSource:
    # An option the chosen source would not read is a mistake, not something to drop silently.
    if options.path or options.sha256:
        raise UserError("--source-path and --sha256 are read only with --source nvidia or dir",
                        "pass --source nvidia (a .run) or --source dir (an unpacked tree)")
    if options.redist:
        raise UserError("--sha256 and --redist are read only with --source nvidia", "leave them out for --source debian")
    return DebianSource()


def _debian_newest(source: DriverSource, arch: str) -> str:
    assert isinstance(source, DebianSource)
    return source.available_versions(arch)[0]


def debian_sources(lock: Lock) -> SourceFor:
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


def _nvidia(options: SourceOptions) -> DriverSource:
    from gl_nvidia.modbuild.nvidia import (  # only this source needs its downloader
        NVIDIA_URL,
        NvidiaRunSource,
    )

    return NvidiaRunSource(options.path or NVIDIA_URL, sha256=options.sha256, redist=options.redist)


def _dir(options: SourceOptions) -> DriverSource:
    if options.sha256 or options.redist:
        raise UserError("--sha256 and --redist are read only with --source nvidia", "leave them out for --source dir")
    if not options.path:
        raise UserError("--source dir needs --source-path DIR", "an unpacked driver (sh NVIDIA-*.run --extract-only)")
    return DirSource(Path(options.path))


@dataclass(frozen=True)
class DriverSourceKind:
    make: Callable[[SourceOptions], DriverSource]  # from the command line's options, which it checks
    # Each unit's source from a lock (its OS versions' own packages); None: the one `make` gives serves all.
    per_lock: Callable[[Lock], SourceFor] | None = None
    # The newest driver version it has for an arch, where it lists them (the default of `build --kernel`).
    newest: Callable[[DriverSource, str], str] | None = None


DRIVER_SOURCES = Table("driver source", {
    "debian": DriverSourceKind(_debian, per_lock=debian_sources, newest=_debian_newest),
    "nvidia": DriverSourceKind(_nvidia),
    "dir": DriverSourceKind(_dir),
})


@dataclass(frozen=True)
class ChosenSource:
    kind: DriverSourceKind
    source: DriverSource  # the one its options make

    def for_lock(self, lock: Lock) -> SourceFor:
        """Each unit's source: from the lock's OS versions where this source reads them (Debian's suites:
        bookworm's for 12, trixie's for 13), else the one its options made."""
        if self.kind.per_lock is not None:
            return self.kind.per_lock(lock)
        return lambda unit: self.source

    def newest(self, arch: str) -> str | None:
        """Its newest driver for `arch`; None where it lists none (a .run, a tree)."""
        return self.kind.newest(self.source, arch) if self.kind.newest is not None else None


def driver_source(name: str, options: SourceOptions = SourceOptions()) -> ChosenSource:
    """The driver source of that name, made from (and checking) the command line's options."""
    kind = DRIVER_SOURCES.lookup(name)
    return ChosenSource(kind, kind.make(options))


def sources_for(lock: Lock) -> SourceFor:
    """Each unit's driver source: the one the lock's `sources.nvidia` names."""
    return driver_source(driver_feed(lock.sources.nvidia)[0]).for_lock(lock)


@dataclass(frozen=True)
class EnvOptions:
    """Where an environment finds what it reads: `headers` (`--kernel-headers`), `apt` the lock's
    `sources.apt` (None: this machine's archive), `codenames` its fixed OS versions' release codenames."""

    headers: Path | None = None
    apt: str | None = None
    codenames: Mapping[str, str | None] = field(default_factory=dict)


def _no_headers(options: EnvOptions) -> None:
    if options.headers is not None:
        raise UserError("--kernel-headers is read only with --env dir", "pass --env dir --kernel-headers DIR")


def _per_os_version(make: Callable[[str], KernelEnv]) -> EnvFor:
    """One environment per OS version, so each apt index is read (and each container started) once."""
    envs: dict[str, KernelEnv] = {}

    def env_for(unit: BuildUnit) -> KernelEnv:
        version = os_version_of(unit)
        if version not in envs:
            envs[version] = make(version)
        return envs[version]

    return env_for


def _apt(distro: OSProfile, options: EnvOptions) -> EnvFor:
    _no_headers(options)
    apt = options.apt
    return _per_os_version(lambda version: AptEnv(
        None if apt is None else apt_sources(apt, version, distro, options.codenames.get(version))))


def _kmodbuild(distro: OSProfile, options: EnvOptions) -> EnvFor:
    _no_headers(options)
    if distro.build_env != "kmodbuild":
        raise UserError(f"--env kmodbuild builds Garden Linux kernels only, not {distro.id}", "use --env apt")
    engine = container_engine()  # no engine: one clear error now, not one per unit later
    return _per_os_version(lambda version: KmodbuildEnv(version, engine))


def _dir_env(distro: OSProfile, options: EnvOptions) -> EnvFor:
    if options.headers is None:
        raise UserError("--env dir needs --kernel-headers DIR", "the kernel's build headers directory")
    env = DirEnv(options.headers)
    return lambda unit: env


# Each makes the environment of every unit of an OS, checking the options it reads and refusing the others.
KERNEL_ENVS: Table[Callable[[OSProfile, EnvOptions], EnvFor]] = Table("kernel environment", {
    "apt": _apt,
    "dir": _dir_env,
    "kmodbuild": _kmodbuild,
})


def kernel_envs(distro: OSProfile, name: str | None = None, options: EnvOptions = EnvOptions()) -> EnvFor:
    """The environment of each unit: `name`'s, or the OS's own (Garden Linux's production path is its
    kmodbuild container of the newest GL version using the kernel; Debian's headers come from apt)."""
    return KERNEL_ENVS.lookup(name or distro.build_env)(distro, options)


def env_for(lock: Lock) -> EnvFor:
    """The OS's build environment; fixed OS versions (Debian's) read headers from their own suites."""
    if lock.os.fixed:
        return kernel_envs(os_profile(lock.os.id), options=EnvOptions(
            apt=lock.sources.apt, codenames={v.version: v.codename for v in lock.os.fixed}))
    return kernel_envs(os_profile(lock.os.id))
