"""A versioned release's assets: the GPU Operator values of each OS version and the changelog.

Written only after a release whose every unit is in the registry (pushed now, or found there from the same
inputs), so a values file names only images that exist. The release version is not written into the
images: an image is the same bytes whichever release finds it published (same inputs, same digest), so
`release` keeps skipping what an earlier version published, and the changelog names each image's digest
instead. `org.opencontainers.image.version` stays the driver version, the software the image packages.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gl_nvidia import ui
from gl_nvidia.catalog.changelog import Change, diff
from gl_nvidia.catalog.model import BuildUnit, Matrix
from gl_nvidia.deploy.values import ValuesSettings, helm_values, to_yaml
from gl_nvidia.errors import UserError
from gl_nvidia.fs import atomic_dir
from gl_nvidia.osprofile import os_profile

# semver.org's own expression (2.0.0): MAJOR.MINOR.PATCH, an optional pre-release and build metadata.
_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?")
if TYPE_CHECKING:
    from gl_nvidia.catalog.lock import Lock
    from gl_nvidia.release.conductor import ReleaseResult

CHANGELOG = "CHANGELOG.md"


def check_version(version: str) -> str:
    if not _SEMVER.fullmatch(version):
        raise UserError(f"--version {version!r} is not a semantic version",
                        "pass MAJOR.MINOR.PATCH, e.g. 1.4.0 (the tag v1.4.0 without its v)")
    return version


def values_name(os_id: str, os_version: str) -> str:
    return f"gpu-operator-values-{os_id}-{os_version}.yaml"


def values_branches(matrix: Matrix, os_versions: Sequence[str], published: Collection[BuildUnit]
                    ) -> dict[str, str | None]:
    """OS version -> driver.version of its values: the newest branch with a published image for every
    kernel (each flavour and arch) of that OS version; None when no branch has. A cell the matrix excluded
    outright counts as missing: the operator would pull its image on such a node all the same."""
    cells = [*matrix.cells, *(e.cell for e in matrix.excluded)]
    have = {(u.kernel, u.arch, u.driver_branch, v) for u in published for v in u.os_versions}
    out: dict[str, str | None] = {}
    for version in os_versions:
        needed: dict[str, set[tuple[str, str, str, str]]] = {}
        for c in cells:
            if c.os_version == version:
                needed.setdefault(c.driver_branch, set()).add((c.kernel, c.arch, c.driver_branch, version))
        complete = [b for b, wanted in needed.items() if wanted <= have]
        out[version] = max(complete, key=int) if complete else None
    return out


@dataclass(frozen=True)
class PublishedImage:
    tags: tuple[str, ...]
    digest: str
    state: str  # "pushed" or "exists" (published before, from the same inputs)


def changelog_text(version: str, changes: Sequence[Change], first: bool, os_id: str,
                   branches: Mapping[str, str | None], repository: str, images: Sequence[PublishedImage]) -> str:
    """The release notes: what `gl-nvidia update` printed since the previous release, the values of each
    OS version, and every image with its digest."""
    lines = [f"# gl-nvidia driver images {version}", "",
             "## Catalog (no previous release: everything is new)" if first else "## Changes since the previous release",
             ""]
    lines += [f"- {c.text}" for c in changes] or ["- no catalog changes"]
    lines += ["", "## GPU Operator values", ""]
    for os_version, branch in branches.items():
        lines.append(f"- {os_id} {os_version}: driver.version {branch} (`{values_name(os_id, os_version)}`)"
                     if branch else f"- {os_id} {os_version}: no values: no driver branch has an image for "
                                    "every kernel of it")
    lines += ["", f"## Images in {repository}/driver", ""]
    for img in images:
        how = "published now" if img.state == "pushed" else "published before, same inputs"
        lines.append(f"- `{img.digest}` ({how}): " + ", ".join(f"`{t}`" for t in img.tags))
    return "\n".join(lines) + "\n"


def write_assets(dest: Path, version: str, os_id: str, branches: Mapping[str, str | None], repository: str,
                 changelog: str, component: str | None = None) -> list[Path]:
    """The values files, CHANGELOG.md and the OCM component descriptor (`component`, YAML) into `dest`, replaced
    as a whole (nothing half-written)."""
    from gl_nvidia.release.ocm import DESCRIPTOR_FILE

    names = [CHANGELOG]
    with atomic_dir(dest) as tmp:
        (tmp / CHANGELOG).write_text(changelog)
        if component is not None:
            (tmp / DESCRIPTOR_FILE).write_text(component)
            names.append(DESCRIPTOR_FILE)
        for os_version, branch in branches.items():
            if branch is None:
                continue
            name = values_name(os_id, os_version)
            header = f"# gl-nvidia {version}: GPU Operator values for {os_id} {os_version}\n"
            (tmp / name).write_text(header + to_yaml(helm_values(ValuesSettings(branch, repository=repository))))
            names.append(name)
    return [dest / n for n in names]


def release_assets(result: ReleaseResult, version: str, previous: Lock | None, dest: Path, *,
                   force: bool = False) -> list[Path]:
    """The assets of release `version` from a release that published every unit; `previous`: the lock of
    the release before, whose catalog the changelog starts from (None: the first release).

    The release is also one OCM component version, pushed to the registry last: its descriptor is made (every
    image it lists checked in the registry) before anything is written, and pushed once the assets are."""
    from gl_nvidia.reference import Reference
    from gl_nvidia.registry.transfer import ClientOptions
    from gl_nvidia.release.ocm import (
        describe_release,
        descriptor_repository,
        descriptor_text,
        push_descriptor,
    )

    if result.repository is None or not result.ok:
        raise UserError("release assets name published images only", "release with --registry, every unit ok")
    lock = result.lock
    published = [u for u in result.units if u.push in ("pushed", "exists") and u.digest is not None]
    branches = values_branches(result.matrix, [v.version for v in result.resolved.os_versions],
                               [u.unit for u in published])
    changes = diff(previous.resolved if previous else None, result.resolved, lock.policy.branches,
                   os_profile(lock.os.id).name)
    images = [PublishedImage(u.tags, u.digest, u.push) for u in published if u.digest is not None]
    text = changelog_text(version, changes, previous is None, lock.os.id, branches, result.repository, images)
    with ClientOptions(retries=2).client(Reference.parse(f"{result.repository}/x").host) as client:
        descriptor = describe_release(client, result, version)
        paths = write_assets(dest, version, lock.os.id, branches, result.repository, text, descriptor_text(descriptor))
        push_descriptor(client, result.repository, descriptor, force=force)
    ui.log.info("OCM component %s:%s in %s", descriptor.component.name, version,
                descriptor_repository(result.repository, descriptor.component.name))
    return paths
