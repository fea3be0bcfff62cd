"""From sources and policy to the resolved OS versions, drivers and kernels (what `update` writes).

The decisions are pure functions over parsed sources; `refresh` is the one place that reads them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from pydantic import ValidationError

from gl_nvidia import ui
from gl_nvidia.apt import AptRepo
from gl_nvidia.catalog.feeds import (
    DriverBranch,
    DriverRelease,
    GLMajor,
    GLRelease,
    fetch,
    parse_glrd,
    parse_nvidia,
    version_key,
)
from gl_nvidia.catalog.kernels import apt_sources, resolve_kernels
from gl_nvidia.catalog.lock import (
    KernelEntry,
    Lock,
    Policy,
    Resolved,
    ResolvedDriver,
    ResolvedFrom,
    ResolvedOSVersion,
    describe_validation_error,
)
from gl_nvidia.errors import UserError
from gl_nvidia.osprofile import os_profile
from gl_nvidia.table import Table

log = logging.getLogger(__name__)


def select_os_versions(majors: list[GLMajor], today: date, policy: Policy) -> list[ResolvedOSVersion]:
    """Every released minor of every major in maintenance from the policy's min_minor on, plus the
    policy's keep_minors; oldest first. Nodes move between minors one by one, so each needs its images."""
    known = {r.version: (m, r) for m in majors for r in m.releases}
    for v in (*policy.min_minor, *policy.keep_minors):
        if v not in known:
            raise UserError(f"policy names GL {v}, which the GLRD data does not list",
                            "fix the version in policy.min_minor / keep_minors")
    chosen: dict[str, tuple[GLMajor, GLRelease]] = {}
    for major in majors:
        if not major.in_maintenance(today):
            continue
        floor = policy.floor(major.major)
        released = [r for r in major.releases if r.released <= today
                    and (floor is None or r.key >= known[floor][1].key)]
        if not released:
            log.warning("GL %d is in maintenance but has no minor release%s yet", major.major,
                        f" from {floor} on" if floor else "")
        chosen.update((r.version, (major, r)) for r in released)
    for v in policy.keep_minors:
        major, release = known[v]
        if release.released > today:
            raise UserError(f"policy.keep_minors names GL {v}, which is not released until {release.released}",
                            "keep only released minors")
        chosen[v] = (major, release)
    if not chosen:
        raise UserError(f"no Garden Linux major is in maintenance on {today}", "check the GLRD source and --today")
    return [ResolvedOSVersion(version=r.version, major=m.major, released=r.released, eol=m.eol)
            for m, r in sorted(chosen.values(), key=lambda mr: mr[1].key)]


def policy_leaves_out(policy: Policy, os_version: str) -> str | None:
    """Why the policy gives an OS version no images, when min_minor alone decides it (no sources read)."""
    floor = policy.floor(int(os_version.split(".", 1)[0])) if os_version.split(".", 1)[0].isdigit() else None
    if floor is None or os_version in policy.keep_minors or version_key(os_version) >= version_key(floor):
        return None
    return f"policy.min_minor builds GL {floor.split('.', 1)[0]} from {floor} on"


def select_drivers(branches: list[DriverBranch], policy: Policy) -> list[ResolvedDriver]:
    """The newest release of the top `policy.branches` branches of the allowed types, plus pinned ones."""
    by_branch = {b.branch: b for b in branches}
    held: dict[str, DriverRelease] = {}
    for pin in policy.pins:
        owner = next((b for b in branches if any(r.version == pin for r in b.releases)), None)
        if owner is None:
            raise UserError(f"pinned driver {pin} is in no branch of NVIDIA's releases.json",
                            "fix or remove the pin in policy.pins")
        held[owner.branch] = next(r for r in owner.releases if r.version == pin)
    eligible = [b for b in branches if b.type in policy.branch_types and b.releases]
    top = sorted(eligible, key=lambda b: b.number, reverse=True)[: policy.branches]
    chosen = {b.branch for b in top} | set(held)
    out = []
    for name in sorted(chosen, key=int, reverse=True):
        branch = by_branch[name]
        release = held.get(name, branch.releases[0])
        out.append(ResolvedDriver(branch=name, type=branch.type, version=release.version,
                                  release_date=release.release_date))
    return out


def _upstream(debian_version: str) -> str:
    return re.sub(r"^\d+:", "", debian_version).split("-", 1)[0]


def drivers_from_package(repo: AptRepo, package: str) -> list[ResolvedDriver]:
    """A distribution's driver: the upstream version of its kernel-module source package, and the
    version of its open sibling (Debian: `nvidia-open-kernel-source` beside `nvidia-kernel-source`),
    the newest of the same branch, as the build stage takes it."""
    pkg = repo.find(package)
    upstream = _upstream(pkg.version)
    if not re.fullmatch(r"\d+(\.\d+)+", upstream):
        raise UserError(f"{package} {pkg.version} is not an NVIDIA driver version")
    branch = upstream.split(".", 1)[0]
    open_package = package.replace("kernel-source", "open-kernel-source")
    open_versions = [v for v in (_upstream(p.version) for p in repo.versions(open_package)) if v.split(".", 1)[0] == branch]
    open_version = open_versions[0] if open_versions else None
    return [ResolvedDriver(branch=branch, type=f"package {package}", version=upstream,
                           open_version=open_version if open_version != upstream else None,
                           open_modules=None if open_versions else False)]


def suite_drivers(repos: Mapping[str, AptRepo], packages: Sequence[str], branches: int,
                  os_version: str) -> list[ResolvedDriver]:
    """One OS version's drivers, read from its suites per arch: of every kernel-module source package
    named (`nvidia-kernel-source`, `nvidia-tesla-535-kernel-source`) the newest version of each branch,
    the `branches` newest branches, each with the arches whose index carries exactly that version."""
    found: dict[str, tuple[ResolvedDriver, list[str]]] = {}
    for arch, repo in repos.items():
        for package in packages:
            if repo.versions(package):
                (driver,) = drivers_from_package(repo, package)
                found.setdefault(driver.version, (driver, []))[1].append(arch)
    if not found:
        where = "; ".join(repo.describe() for repo in repos.values())
        raise UserError(f"OS version {os_version}: no driver package ({', '.join(packages)}) in {where}",
                        "check sources.nvidia and the OS version's suites (contrib, non-free)")
    newest: dict[str, tuple[ResolvedDriver, list[str]]] = {}
    for version in sorted(found, key=version_key, reverse=True):
        newest.setdefault(found[version][0].branch, found[version])
    chosen = sorted(newest.values(), key=lambda da: int(da[0].branch), reverse=True)[:branches]
    return [d.model_copy(update={"os_version": os_version,
                                 "arches": None if set(arches) == set(repos) else sorted(arches)})
            for d, arches in chosen]


def apply_kernel_policy(resolved: list[KernelEntry], policy: Policy, os_versions: list[str]) -> list[KernelEntry]:
    """Overrides replace the repository's answer; pins are kernels built besides it."""
    def wanted(k: KernelEntry) -> bool:
        return k.os_version in os_versions and k.flavour in policy.flavours and k.arch in policy.arches

    overridden = {(k.os_version, k.flavour, k.arch) for k in policy.kernel_overrides}
    out = [k for k in resolved if (k.os_version, k.flavour, k.arch) not in overridden]
    out += [k for k in policy.kernel_overrides if wanted(k)]
    out += [k for k in policy.kernel_pins if wanted(k) and k not in out]
    return sorted(out, key=lambda k: (k.os_version, k.flavour, k.arch, k.kernel))


def _suite_releases(packages: str, lock: Lock, apt: str, os_versions: Sequence[ResolvedOSVersion]
                    ) -> list[ResolvedDriver]:
    """`apt:<package>[,<package>]`: the packages of each OS version's own suites."""
    distro = os_profile(lock.os.id)
    drivers = []
    for v in os_versions:
        suites = apt_sources(apt, v.version, distro, lock.os.codename_of(v.version))
        repos: dict[str, AptRepo] = {arch: AptRepo(suites, arch=arch) for arch in lock.policy.arches}
        drivers += suite_drivers(repos, packages.split(","), lock.policy.branches, v.version)
    return drivers


def _nvidia_releases(location: str, lock: Lock, apt: str, os_versions: Sequence[ResolvedOSVersion]
                     ) -> list[ResolvedDriver]:
    """NVIDIA's releases.json (a URL or file): the same drivers for every OS version."""
    return select_drivers(parse_nvidia(fetch(location, "NVIDIA releases.json"), location), lock.policy)


@dataclass(frozen=True)
class DriverFeed:
    """How a lock's `sources.nvidia` names a driver source, and where the catalog lists its releases."""

    prefix: str  # "apt:"; "" for the one named by a location (a URL or file)
    form: str  # how to write it, for the hint
    releases: Callable[[str, Lock, str, Sequence[ResolvedOSVersion]], list[ResolvedDriver]]


# Keyed by the driver source's name, as modbuild/strategy.py `DRIVER_SOURCES` builds it.
DRIVER_FEEDS = Table("driver source", {
    "debian": DriverFeed("apt:", "apt:<package>[,<package>]", _suite_releases),
    "nvidia": DriverFeed("", "NVIDIA's releases.json (a URL or file)", _nvidia_releases),
})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_LOCATIONS = ("http:", "https:", "file:")


def driver_feed(spec: str) -> tuple[str, str]:
    """The driver source a lock's `sources.nvidia` names and what it says of it (the packages, the
    location). Another `<name>:` than the table's is refused, not read as a file of that name."""
    for name, feed in DRIVER_FEEDS.items():
        if feed.prefix and spec.startswith(feed.prefix):
            return name, spec.removeprefix(feed.prefix)
    scheme = _SCHEME.match(spec)
    if scheme is not None and scheme[0].lower() not in _LOCATIONS:
        raise UserError(f"sources.nvidia {spec[:80]!r} names no driver source gl-nvidia has ({scheme[0]!r})",
                        f"use {' or '.join(f.form for f in DRIVER_FEEDS.values())}")
    return next(name for name, feed in DRIVER_FEEDS.items() if not feed.prefix), spec


@dataclass(frozen=True)
class SourceOverrides:
    """Command-line replacements for the lock's sources (offline snapshots, tests)."""

    glrd: tuple[str, ...] = ()
    nvidia: str | None = None
    apt: str | None = None


def refresh(lock: Lock, today: date, overrides: SourceOverrides | None = None) -> Resolved:
    """Read every source and apply the policy: the new `resolved` section."""
    try:
        return _refresh(lock, today, overrides or SourceOverrides())
    except ValidationError as exc:  # a source named a kernel or driver version the lock would refuse
        raise UserError(f"a source names an unusable {describe_validation_error(exc)}",
                        "check the lock's sources") from exc


def _refresh(lock: Lock, today: date, overrides: SourceOverrides) -> Resolved:
    sources = lock.sources
    glrd = list(overrides.glrd) or sources.glrd
    nvidia = overrides.nvidia or sources.nvidia
    apt = overrides.apt or sources.apt
    policy = lock.policy
    distro = os_profile(lock.os.id)
    source, spec = driver_feed(nvidia)  # a source gl-nvidia has no row for is refused before any read

    with ui.progress() as prog:
        if lock.os.fixed:
            os_versions = [ResolvedOSVersion(version=v.version) for v in lock.os.fixed]
            known = {v.version for v in lock.os.fixed}
        else:
            if not glrd:
                raise UserError("the lock names no GLRD source and no fixed distro.version", "set sources.glrd")
            with ui.task(prog, "read Garden Linux releases (GLRD)"):
                majors = parse_glrd([(loc, fetch(loc, "GLRD data")) for loc in glrd])
            os_versions = select_os_versions(majors, today, policy)
            known = {r.version for m in majors for r in m.releases}
        named: list[tuple[str, str]] = [(k.os_version, f" (kernel {k.kernel})")
                                        for k in (*policy.kernel_overrides, *policy.kernel_pins)]
        for os_version, what in [*named, *((k.os_version, "") for k in policy.previous_kernels)]:
            if os_version not in known:
                raise UserError(f"policy names OS version {os_version}{what}, which the sources do not know",
                                "fix the version in policy.kernel_overrides / kernel_pins / previous_kernels")

        with ui.task(prog, "read NVIDIA driver releases"):
            drivers = DRIVER_FEEDS.lookup(source).releases(spec, lock, apt, os_versions)

        combos = [(v.version, f, a) for v in os_versions for f in policy.flavours for a in policy.arches]
        overridden = {(k.os_version, k.flavour, k.arch) for k in policy.kernel_overrides}
        widened = {(k.os_version, k.flavour, k.arch) for k in policy.previous_kernels}
        kernels = []
        with ui.task(prog, "resolve kernels from apt repositories", total=len(combos)) as t:
            for os_version, flavour, arch in combos:
                if (os_version, flavour, arch) not in overridden:
                    kernels += [KernelEntry(os_version=os_version, flavour=flavour, arch=arch, kernel=kernel)
                                for kernel in resolve_kernels(apt, os_version, flavour, arch, distro,
                                                              lock.os.codename_of(os_version),
                                                              previous=(os_version, flavour, arch) in widened)]
                t.advance(1)
    kernels = apply_kernel_policy(kernels, policy, [v.version for v in os_versions])
    return Resolved(today=today, os_versions=os_versions, drivers=drivers, kernels=kernels,
                    sources=ResolvedFrom(glrd=glrd, nvidia=nvidia, apt=apt))
