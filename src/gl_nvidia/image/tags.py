"""The GPU Operator's precompiled tag rule (contract 2 in DESIGN.md), as pure functions."""

from __future__ import annotations

from gl_nvidia.arches import of_kernel
from gl_nvidia.osprofile import os_profile


def kernel_arch(kernel: str) -> str | None:
    """The arch a kernel release names (None: a name without one). The operator's tag carries only the
    kernel, so this suffix is what keeps the amd64 and arm64 images of one version apart."""
    named = of_kernel(kernel)  # Debian's and Garden Linux's end in their arch: 6.12.72-cloud-arm64
    return named.debian if named else None


def os_tag(os_id: str, version_id: str) -> str:
    """NFD's `system-os_release.ID` + `VERSION_ID`: Garden Linux nodes report VERSION_ID=0 via the custom rule."""
    return os_profile(os_id).os_tag(version_id)


def node_version_id(os_id: str, os_version: str) -> str:
    """The VERSION_ID the operator sees on a node of `os_version` (the OS record's rule)."""
    return os_profile(os_id).node_version_id(os_version)


def tag_kernel(kernel: str) -> str:
    """A kernel release as it appears in a tag: `+` (Debian's `6.12.117+deb12-cloud-amd64`) is not valid
    in an OCI tag and becomes `_`, which no Debian or Garden Linux kernel release contains. Names
    without `+` (every Garden Linux kernel) are unchanged: the GPU Operator's rule holds for them.
    The node's copy of this rule is node/decide.py's `tag_kernel`."""
    return kernel.replace("+", "_")


def operator_tag(driver_version: str, kernel: str, os_id: str, version_id: str) -> str:
    """The tag the operator pulls: `<driver.version>-<kernel>-<osTag>` (driver.version: branch or full)."""
    return f"{driver_version}-{tag_kernel(kernel)}-{os_tag(os_id, version_id)}"


def image_tags(
    driver_version: str, driver_branch: str, kernel: str, os_id: str, os_versions: tuple[str, ...]
) -> list[str]:
    """Every tag one (driver, kernel) image is published under.

    Garden Linux nodes report VERSION_ID=0 (the GL values' NFD rule), so the operator asks for
    `...-gardenlinux0`; `...-gardenlinux<GL version>` tags let a human see which GL releases it serves.
    Other OSes (the debian profile) get their real VERSION_ID.
    """
    distro = os_profile(os_id)
    pulled = distro.pulled_version_ids(os_versions)
    tags = [operator_tag(v, kernel, os_id, vid) for vid in pulled for v in (driver_branch, driver_version)]
    if distro.release_tags:
        tags += [operator_tag(driver_branch, kernel, os_id, glv) for glv in sorted(set(os_versions))]
    return list(dict.fromkeys(tags))
