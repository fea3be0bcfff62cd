"""Before an OS upgrade: does every driver image the GPU Operator will ask for exist?

Two views: the fleet plan (every tracked branch x flavour x arch of an OS version, from the lock) and
the live cluster (each GPU node's labels and the ClusterPolicy, now and after the upgrade). Gardener's
documents give the plan its OS versions: every Garden Linux version a CloudProfile offers, or the version
and arch of each GPU worker pool of a Shoot.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gl_nvidia.catalog.kernels import resolve_kernel
from gl_nvidia.catalog.lock import Lock, Resolved
from gl_nvidia.catalog.matrix import rule_matches
from gl_nvidia.catalog.model import MODULE_TYPES, Cell
from gl_nvidia.catalog.refresh import policy_leaves_out
from gl_nvidia.deploy.gardener import IMAGE_NAME, CloudProfile, Shoot, flavour_of
from gl_nvidia.deploy.imagecheck import ImageChecker
from gl_nvidia.deploy.nodes import NodeFacts
from gl_nvidia.deploy.pins import generated_values
from gl_nvidia.deploy.resolve import DriverSpec, NodeOS, resolve
from gl_nvidia.deploy.values import DEFAULT_IMAGE
from gl_nvidia.errors import CheckFailed, UserError
from gl_nvidia.image.tags import node_version_id, tag_kernel
from gl_nvidia.osprofile import os_profile

log = logging.getLogger(__name__)

_GL_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")


@dataclass(frozen=True)
class Target:
    """One image the operator will ask for after the upgrade, for one driver, flavour and arch."""

    driver_version: str  # what driver.version says: a branch or a full version
    driver_branch: str
    flavour: str
    arch: str
    node: NodeOS
    excluded: str | None = None  # the lock's reason when this cell is known not to build


@dataclass(frozen=True)
class CheckResult:
    subject: str  # "590 cloud/amd64" or a node name
    reference: str | None
    digest: str | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.digest is not None

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        return self.problem or "MISSING"

    def as_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "reference": self.reference, "digest": self.digest,
                "ok": self.ok, "status": self.status}


def kernels_for(
    lock: Lock, resolved: Resolved, os_version: str,
    resolve_kernel_fn: Callable[[str, str, str, str], str] | None = None,
) -> dict[tuple[str, str], str]:
    """(flavour, arch) -> kernel of an OS version: from the lock when resolved there, else its apt repository."""
    distro = os_profile(lock.os.id)

    def from_repository(spec: str, version: str, flavour: str, arch: str) -> str:
        return resolve_kernel(spec, version, flavour, arch, distro, lock.os.codename_of(version))
    known: dict[tuple[str, str], str] = {(k.flavour, k.arch): k.kernel for k in resolved.kernels if k.os_version == os_version}
    if known:
        return known
    if lock.os.fixed:
        tracked = ", ".join(v.version for v in lock.os.fixed)
        raise UserError(
            f"unknown {lock.os.id} version {os_version!r}: this lock tracks only {tracked}",
            f"pass --gl-version {lock.os.fixed[-1].version}",
        )
    if not _GL_VERSION.match(os_version):
        raise UserError(f"invalid Garden Linux version {os_version!r}", "write MAJOR.MINOR (1877.3) or MAJOR.MINOR.PATCH")
    out: dict[tuple[str, str], str] = {}
    for flavour in lock.policy.flavours:
        for arch in lock.policy.arches:
            try:
                out[(flavour, arch)] = (resolve_kernel_fn or from_repository)(lock.sources.apt, os_version, flavour, arch)
            except UserError as exc:
                raise UserError(
                    f"unknown Garden Linux version {os_version}: no {flavour}/{arch} kernel found ({exc.message})",
                    "check the version (gl-nvidia preflight --gl-version MAJOR.MINOR[.PATCH]) and the apt source",
                ) from exc
    return out


def plan_targets(lock: Lock, resolved: Resolved, os_version: str, kernels: dict[tuple[str, str], str]) -> list[Target]:
    """Every (driver.version form, flavour, arch) the tracked branches need on this OS version."""
    version_id = node_version_id(lock.os.id, os_version)
    left_out = policy_leaves_out(lock.policy, os_version) if not lock.os.fixed else None
    targets = []
    drivers = [d for d in resolved.drivers if d.os_version in (None, os_version)]  # its own suites' drivers
    for driver in sorted(drivers, key=lambda d: int(d.branch), reverse=True):
        for (flavour, arch), kernel in sorted(kernels.items()):
            cell = Cell(lock.os.id, os_version, flavour, arch, kernel, driver.version, driver.branch)
            reasons = [left_out] if left_out else []
            reasons += [r.reason for r in lock.policy.exclusions
                        if set(r.module_types) == set(MODULE_TYPES) and rule_matches(r, cell)]
            for form in (driver.branch, driver.version):
                targets.append(Target(form, driver.branch, flavour, arch, NodeOS(lock.os.id, version_id, kernel),
                                      reasons[0] if reasons else None))
    return targets


def check_targets(targets: list[Target], repository: str, image: str, checker: ImageChecker) -> list[CheckResult]:
    return [check_image(f"{t.driver_version} {t.flavour}/{t.arch}", DriverSpec(repository, image, t.driver_version, True),
                        t.node, checker, t.excluded) for t in targets]


def check_image(subject: str, spec: DriverSpec, node: NodeOS, checker: ImageChecker,
                excluded: str | None = None) -> CheckResult:
    """The image the operator asks for on `node`, looked up under the tag gl-nvidia publishes for it."""
    asked = resolve(spec, node).reference
    # Debian's `+` kernels: the operator asks for a tag no registry can hold; ours carry `_` instead.
    ref = resolve(spec, replace(node, kernel=tag_kernel(node.kernel))).reference
    digest = checker.digest(ref)
    problem = None if digest else (f"MISSING (excluded: {excluded})" if excluded else "MISSING")
    if digest and ref != asked:
        problem = (f"the GPU Operator asks for {asked.rpartition(':')[2]!r}, which is no valid tag: "
                   "its precompiled path cannot pull this image")
    return CheckResult(subject, ref, digest, problem)


def cluster_spec(policies: list[dict[str, Any]], lock: Lock, registry: str | None) -> DriverSpec:
    """The driver the operator deploys: the cluster's ClusterPolicy, else the values gl-nvidia generates;
    `registry` checks a mirror instead of its driver.repository."""
    if policies:
        values = policies[0].get("spec") or {}
        if not isinstance(values, dict):
            raise UserError("the cluster's ClusterPolicy has a spec that is not an object",
                            "check it with `kubectl get clusterpolicies -o yaml`")
    else:
        log.warning("no ClusterPolicy in the cluster: checking the values gl-nvidia generates")
        values = generated_values(lock)
    spec = DriverSpec.from_values(values)
    return DriverSpec(registry, spec.image, spec.version, spec.use_precompiled) if registry else spec


def check_nodes(
    nodes: list[NodeFacts],
    spec: DriverSpec,
    checker: ImageChecker,
    upgrade: tuple[str, dict[tuple[str, str], str]] | None = None,
) -> list[CheckResult]:
    """Per GPU node: the image it needs now and, with `upgrade` (OS version, kernels), after upgrading."""
    results = []
    for node in nodes:
        if not node.has_nfd_labels:
            results.append(CheckResult(node.name, None, None,
                                       "no NFD kernel/os_release labels: the operator cannot choose an image"))
            continue
        now = node.node_os()
        subjects = [(node.name, now)]
        if upgrade is not None:
            os_version, kernels = upgrade
            kernel = kernels.get((node.flavour, node.arch))
            if kernel is None:
                results.append(CheckResult(f"{node.name} after upgrade", None, None,
                                           f"{os_version} has no {node.flavour}/{node.arch} kernel in the lock"))
            else:
                version_id = "0" if now.version_id == "0" else os_version
                subjects.append((f"{node.name} after upgrade to {os_version}", NodeOS(now.os_id, version_id, kernel)))
        for subject, node_os in subjects:
            try:
                resolve(spec, node_os)
            except UserError as exc:
                results.append(CheckResult(subject, None, None, exc.message))
                continue
            results.append(check_image(subject, spec, node_os, checker))
    return results


def raise_if_missing(results: list[CheckResult]) -> None:
    bad = [r for r in results if not r.ok]
    if bad:
        refs = ", ".join(r.reference or f"{r.subject} ({r.status})" for r in bad[:3])
        refs += f" and {len(bad) - 3} more (see the table)" if len(bad) > 3 else ""
        raise CheckFailed(
            f"{len(bad)} of {len(results)} driver images are missing: {refs}",
            "build and publish them (gl-nvidia release) before upgrading these nodes",
        )


KernelsFn = Callable[[Lock, Resolved, str], dict[tuple[str, str], str]]


def _numbers(version: str) -> tuple[int, ...] | None:
    parts = version.split(".")
    if not all(p.isdigit() for p in parts):
        return None
    nums = [int(p) for p in parts]
    while len(nums) > 1 and nums[-1] == 0:
        nums.pop()
    return tuple(nums)


def lock_version(version: str, known: Collection[str]) -> str:
    """The lock's spelling of a Gardener machine image version: CloudProfiles write Garden Linux 1877.3
    as the semantic version 1877.3.0."""
    nums = _numbers(version)
    return next((k for k in known if nums is not None and _numbers(k) == nums), version)


@dataclass(frozen=True)
class Wanted:
    """Which images a Gardener check asks for: driver.repository and driver.image, and driver.version (None:
    every tracked branch, by branch and by full version, as a release publishes them)."""

    repository: str
    image: str = DEFAULT_IMAGE
    driver_version: str | None = None


def _version_results(prefix: str, version: str, arches: Sequence[str], flavour: str, lock: Lock, resolved: Resolved,
                     wanted: Wanted, checker: ImageChecker, kernels_fn: KernelsFn) -> list[CheckResult]:
    """The images nodes of one Garden Linux version, flavour and these arches need."""
    os_version = lock_version(version, [v.version for v in resolved.os_versions])
    try:
        kernels = kernels_fn(lock, resolved, os_version)
    except UserError as exc:  # the version is unknown here: such nodes cannot be said to find a driver
        return [CheckResult(f"{prefix} {flavour}/{arch}", None, None, exc.message) for arch in arches]
    results = [CheckResult(f"{prefix} {flavour}/{arch}", None, None,
                           f"no {flavour}/{arch} kernel of {lock.os.id} {os_version} in the lock (policy.flavours, "
                           "policy.arches)")
               for arch in arches if (flavour, arch) not in kernels]
    found = {(flavour, arch): kernels[(flavour, arch)] for arch in arches if (flavour, arch) in kernels}
    targets = [t for t in plan_targets(lock, resolved, os_version, found)
               if wanted.driver_version in (None, t.driver_version)]
    if found and not targets:
        return [CheckResult(f"{prefix} {wanted.driver_version}", None, None,
                            f"driver.version {wanted.driver_version} is not a driver the lock tracks")]
    checked = check_targets(targets, wanted.repository, wanted.image, checker)
    return results + [replace(r, subject=f"{prefix} {r.subject}") for r in checked]


def check_gardenlinux(lock: Lock) -> None:
    if lock.os.id != IMAGE_NAME:
        raise UserError(f"Gardener's documents name Garden Linux versions; the lock is of {lock.os.id}",
                        "pass --lock gardenlinux (./versions.yaml) or a Garden Linux lock")


def cloudprofile_results(profile: CloudProfile, lock: Lock, resolved: Resolved, wanted: Wanted,
                         checker: ImageChecker, kernels_fn: KernelsFn = kernels_for) -> list[CheckResult]:
    """Every Garden Linux version the landscape offers (preview, supported, deprecated; not expired or
    unavailable), on each arch it offers the version for."""
    check_gardenlinux(lock)
    flavour = flavour_of(profile.provider)
    offered = [v for v in profile.versions if v.offered]
    if not offered:
        raise UserError(f"CloudProfile {profile.name} offers no {IMAGE_NAME} version that has not expired",
                        f"check spec.machineImages[name={IMAGE_NAME}]")
    for v in profile.versions:
        if not v.offered:
            log.info("%s %s is %s: not checked", IMAGE_NAME, v.version, v.classification)
    return [r for v in offered for r in _version_results(f"{v.version} ({v.classification})", v.version,
                                                          v.architectures, flavour, lock, resolved, wanted,
                                                          checker, kernels_fn)]


def shoot_results(shoot: Shoot, profile: CloudProfile | None, lock: Lock, resolved: Resolved, wanted: Wanted,
                  checker: ImageChecker, kernels_fn: KernelsFn = kernels_for) -> list[CheckResult]:
    """Each GPU worker pool running Garden Linux, on its version and arch. GPU pools are those whose machine
    type the CloudProfile lists with GPUs; without a CloudProfile every Garden Linux pool counts."""
    check_gardenlinux(lock)
    if profile is not None and shoot.cloud_profile and profile.name and shoot.cloud_profile != profile.name:
        raise UserError(f"Shoot {shoot.name} uses CloudProfile {shoot.cloud_profile}, not {profile.name}",
                        "pass the CloudProfile the Shoot names")
    pools = [p for p in shoot.pools if p.image == IMAGE_NAME]
    if profile is None:
        log.warning("no --cloudprofile: which machine types have GPUs is unknown, every %s pool is checked",
                    IMAGE_NAME)
    else:
        pools = [p for p in pools if p.machine_type in profile.gpu_machine_types]
    if not pools:
        log.warning("Shoot %s has no GPU worker pool running %s: nothing to check", shoot.name, IMAGE_NAME)
    states = {v.version: v.classification for v in profile.versions} if profile is not None else {}
    results = []
    for p in pools:
        if p.version is None:
            raise UserError(f"Shoot {shoot.name}: worker pool {p.name} names no machine image version",
                            "pass the Shoot as the API serves it (kubectl get shoot NAME -o yaml), where "
                            "Gardener has filled it in")
        state = f", {states[p.version]}" if p.version in states else ""
        results += _version_results(f"pool {p.name} ({p.version}{state})", p.version, (p.arch,),
                                    flavour_of(shoot.provider), lock, resolved, wanted, checker, kernels_fn)
    return results
