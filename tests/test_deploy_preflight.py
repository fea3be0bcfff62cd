"""preflight's plan for a Garden Linux version: which images, which kernels, known exclusions, bad versions."""

from __future__ import annotations

import pytest

from gl_nvidia.catalog.lock import parse_lock_text
from gl_nvidia.deploy.preflight import (
    CheckResult,
    kernels_for,
    plan_targets,
    raise_if_missing,
)
from gl_nvidia.deploy.resolve import DriverSpec, resolve
from gl_nvidia.errors import CheckFailed, UserError

GL_LOCK = """\
schema: 1
os: {id: gardenlinux}
policy:
  arches: [amd64, arm64]
  flavours: [cloud]
  exclusions:
    - {reason: "nv-pci.c: too few arguments to function 'pci_resize_resource'", driver_branch: '570', os_version: '>=2150.8'}
sources:
  glrd: [glrd.json]
  nvidia: releases.json
  apt: file:///nonexistent
resolved:
  today: 2026-11-22
  os_versions: [{version: '1877.3'}, {version: '2150.8.0'}]
  drivers:
    - {branch: '590', type: new feature branch, version: 590.48.01}
    - {branch: '570', type: production branch, version: 570.195.03}
  kernels:
    - {os_version: '1877.3', flavour: cloud, arch: amd64, kernel: 6.12.72-cloud-amd64}
    - {os_version: '1877.3', flavour: cloud, arch: arm64, kernel: 6.12.72-cloud-arm64}
    - {os_version: '2150.8.0', flavour: cloud, arch: amd64, kernel: 6.18.3-cloud-amd64}
    - {os_version: '2150.8.0', flavour: cloud, arch: arm64, kernel: 6.18.3-cloud-arm64}
"""
LOCK = parse_lock_text(GL_LOCK, "test lock")[0]
assert LOCK.resolved is not None
RESOLVED = LOCK.resolved


def test_plan_covers_every_branch_form_flavour_and_arch() -> None:
    kernels = kernels_for(LOCK, RESOLVED, "1877.3")
    assert kernels == {("cloud", "amd64"): "6.12.72-cloud-amd64", ("cloud", "arm64"): "6.12.72-cloud-arm64"}
    targets = plan_targets(LOCK, RESOLVED, "1877.3", kernels)
    refs = [resolve(DriverSpec("r.example/gl", "driver", t.driver_version, True), t.node).reference for t in targets]
    assert len(refs) == 2 * 2 * 2  # branches x (branch, full) x arches
    assert "r.example/gl/driver:590-6.12.72-cloud-amd64-gardenlinux0" in refs
    assert "r.example/gl/driver:570.195.03-6.12.72-cloud-arm64-gardenlinux0" in refs
    assert all(t.excluded is None for t in targets)


def test_plan_names_the_known_incompatibility() -> None:
    targets = plan_targets(LOCK, RESOLVED, "2150.8.0", kernels_for(LOCK, RESOLVED, "2150.8.0"))
    excluded = {t.driver_branch for t in targets if t.excluded}
    assert excluded == {"570"}
    assert all("pci_resize_resource" in (t.excluded or "") for t in targets if t.driver_branch == "570")


def test_unlisted_version_is_read_from_its_apt_repository() -> None:
    seen = []

    def fake_apt(spec: str, version: str, flavour: str, arch: str) -> str:
        seen.append((spec, version, flavour, arch))
        return f"6.12.80-{flavour}-{arch}"

    kernels = kernels_for(LOCK, RESOLVED, "1877.9", resolve_kernel_fn=fake_apt)
    assert kernels[("cloud", "arm64")] == "6.12.80-cloud-arm64"
    assert seen[0] == ("file:///nonexistent", "1877.9", "cloud", "amd64")


def test_unknown_and_malformed_versions_are_clear_errors() -> None:
    def no_repo(spec: str, version: str, flavour: str, arch: str) -> str:
        raise UserError(f"cannot read {spec}/dists/{version}/main/binary-{arch}/Packages: HTTP 404")

    with pytest.raises(UserError, match=r"unknown Garden Linux version 9999\.1: .*HTTP 404"):
        kernels_for(LOCK, RESOLVED, "9999.1", resolve_kernel_fn=no_repo)
    with pytest.raises(UserError, match="invalid Garden Linux version 'latest'"):
        kernels_for(LOCK, RESOLVED, "latest", resolve_kernel_fn=no_repo)


def test_missing_images_exit_one_and_list_the_references() -> None:
    results = [CheckResult("590 cloud/amd64", "r.example/gl/driver:590-k-gardenlinux0", "sha256:" + "a" * 64),
               CheckResult("570 cloud/amd64", "r.example/gl/driver:570-k-gardenlinux0", None, "MISSING")]
    with pytest.raises(CheckFailed, match=r"1 of 2 driver images are missing: r\.example/gl/driver:570-k") as exc:
        raise_if_missing(results)
    assert exc.value.exit_code == 1
    raise_if_missing(results[:1])


def test_a_minor_the_policy_leaves_out_is_named_as_such() -> None:
    lock = parse_lock_text(GL_LOCK.replace("  flavours: [cloud]\n", "  flavours: [cloud]\n  min_minor: ['2150.8.0']\n"),
                           "test lock")[0]
    assert lock.resolved is not None
    kernels = kernels_for(lock, lock.resolved, "2150.0.0", resolve_kernel_fn=lambda *a: f"6.12.64-cloud-{a[3]}")
    targets = plan_targets(lock, lock.resolved, "2150.0.0", kernels)
    assert {t.excluded for t in targets} == {"policy.min_minor builds GL 2150 from 2150.8.0 on"}
    built = plan_targets(lock, lock.resolved, "2150.8.0", kernels_for(lock, lock.resolved, "2150.8.0"))
    assert {t.excluded for t in built if t.driver_branch == "590"} == {None}
