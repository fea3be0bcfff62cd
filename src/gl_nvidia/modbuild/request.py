"""What a build is asked for, made concrete: the units, each unit's driver source and kernel environment
(chosen from modbuild/strategy.py's tables), from a profile's matrix or one kernel; and the failures recorded
as the lock's exclusions.

The rules live here, in the build stage; `gl-nvidia build` only parses options, calls these and prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gl_nvidia.catalog.lock import exclude_failures
from gl_nvidia.catalog.matrix import load_lock, lock_matrix, lock_path
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.errors import UserError
from gl_nvidia.modbuild.kenv import KernelEnv
from gl_nvidia.modbuild.sources import DriverSource, branch_of
from gl_nvidia.modbuild.strategy import DRIVER_SOURCES, ChosenSource, EnvOptions, kernel_envs
from gl_nvidia.modbuild.unit import UnitResult
from gl_nvidia.osprofile import os_profile


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


def matrix_request(profile: str, source: ChosenSource, env: str | None, headers: Path | None) -> BuildRequest:
    """Every unit of a profile's matrix, each in its OS's environment unless `env` names another; a source
    that reads the lock's OS versions (Debian's packages) each unit's own OS version's."""
    lock = load_lock(profile)
    envs = EnvOptions(headers, lock.sources.apt, {v.version: v.codename for v in lock.os.fixed})
    return BuildRequest(lock_matrix(lock).units, kernel_envs(os_profile(lock.os.id), env, envs),
                        source.for_lock(lock))


def kernel_request(kernel: str, driver_version: str | None, arch: str, os_id: str, os_version: str,
                   source: ChosenSource, env: str | None, headers: Path | None) -> BuildRequest:
    """One unit: the flavour is the one the kernel's name says; the driver, unless given, the source's
    newest where it lists them (Debian's archive). One kernel builds with this machine's apt archive unless
    `env` names another."""
    if not driver_version:
        driver_version = source.newest(arch)
        if driver_version is None:
            unlisted = [name for name, kind in DRIVER_SOURCES.items() if kind.newest is None]
            raise UserError(f"--driver is required with --source {' or '.join(unlisted)}")
    distro = os_profile(os_id)
    unit = BuildUnit(kernel, driver_version, branch_of(driver_version), arch, distro.kernel_flavour(kernel), os_id,
                     (os_version,))
    return BuildRequest((unit,), kernel_envs(distro, env or "apt", EnvOptions(headers)), lambda u: source.source)


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
