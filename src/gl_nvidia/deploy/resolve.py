"""Which driver image the GPU Operator pulls for a node (contract 2), as pure functions.

Mirrors the operator: the image path is `<repository>/<image>:<version>` (`@<version>` for a
`sha256:` digest; `image` alone when repository and version are empty, for fully qualified
references). With precompiled drivers it appends `-<kernel>-<osTag>` and refuses digests; without,
it appends `-<osTag>` unless a digest pins the image. `osTag` is NFD's os_release ID + VERSION_ID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gl_nvidia.deploy.values import DEFAULT_IMAGE, has_version_id_rule
from gl_nvidia.errors import UserError
from gl_nvidia.image.tags import os_tag
from gl_nvidia.osprofile import GARDENLINUX

# NFD's own os-release parser: `KEY=value`, surrounding quotes stripped.
_OS_RELEASE_LINE = re.compile(r"^(\w+)=(.+)")


@dataclass(frozen=True)
class DriverSpec:
    """The ClusterPolicy's `spec.driver` fields that decide the image."""

    repository: str
    image: str
    version: str
    use_precompiled: bool

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> DriverSpec:
        """From Helm values or a ClusterPolicy `spec` (same `driver` shape)."""
        driver = values.get("driver") or {}
        if not isinstance(driver, dict):
            raise UserError("driver in the Helm values (or the ClusterPolicy's spec) is not a mapping",
                            "set driver.repository, driver.image and driver.version")
        return cls(
            repository=str(driver.get("repository") or ""),
            image=str(driver.get("image") or DEFAULT_IMAGE),
            version=str(driver.get("version") or ""),
            use_precompiled=bool(driver.get("usePrecompiled", False)),
        )


@dataclass(frozen=True)
class NodeOS:
    """What NFD labels a node with: os_release ID and VERSION_ID (after custom rules), kernel."""

    os_id: str
    version_id: str
    kernel: str

    @property
    def os_tag(self) -> str:
        return os_tag(self.os_id, self.version_id)


@dataclass(frozen=True)
class Resolution:
    reference: str  # what the operator pulls
    repository: str  # the reference without tag/digest
    tag: str | None
    digest: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "repository": self.repository, "tag": self.tag, "digest": self.digest}


def parse_os_release(text: str) -> dict[str, str]:
    release: dict[str, str] = {}
    for line in text.splitlines():
        if m := _OS_RELEASE_LINE.match(line):
            release[m.group(1)] = m.group(2).strip("\"'")
    return release


def node_os(os_release: dict[str, str], kernel: str, values: dict[str, Any]) -> NodeOS:
    """The labels NFD gives a node with this os-release, under these Helm values' NFD rules."""
    if "ID" not in os_release:
        raise UserError("the os-release file has no ID= line", "pass the node's /etc/os-release")
    version_id = os_release.get("VERSION_ID", "")
    if GARDENLINUX.version_id is not None and GARDENLINUX.version_id_key in os_release and has_version_id_rule(values):
        version_id = GARDENLINUX.version_id
    return NodeOS(os_release["ID"], version_id, kernel)


def image_path(spec: DriverSpec) -> str:
    if not spec.repository and not spec.version:
        if not spec.image:
            raise UserError("driver.repository, driver.image and driver.version are all empty")
        return spec.image  # a fully qualified reference, e.g. `registry/driver@sha256:...`
    if spec.version.startswith("sha256:"):
        return f"{spec.repository}/{spec.image}@{spec.version}"
    return f"{spec.repository}/{spec.image}:{spec.version}"


def resolve(spec: DriverSpec, node: NodeOS) -> Resolution:
    path = image_path(spec)
    if spec.use_precompiled:
        if "sha256:" in path:
            raise UserError(
                f"driver.version {spec.version or path!r} is a digest, which the GPU Operator refuses "
                "with usePrecompiled: true (it needs one image per kernel)",
                "set driver.version to a branch (590) or a full version (590.48.01)",
            )
        reference = f"{path}-{node.kernel}-{node.os_tag}"
    elif "sha256:" in path:
        reference = path
    else:
        reference = f"{path}-{node.os_tag}"
    return split_reference(reference)


def split_reference(reference: str) -> Resolution:
    if "@" in reference:
        repo, digest = reference.split("@", 1)
        return Resolution(reference, repo, None, digest)
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return Resolution(reference, reference[:colon], reference[colon + 1 :], None)
    return Resolution(reference, reference, "latest", None)
