"""GPU Operator Helm values for Garden Linux (contract 3).

No Gardener extension consumes these settings yet (README: Gardener), so no Shoot snippet is written.

Pure functions from typed settings to plain dicts; rendering to YAML is the only formatting step.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from gl_nvidia import yamldoc
from gl_nvidia.errors import UserError
from gl_nvidia.osprofile import GARDENLINUX
from gl_nvidia.reference import check_repository

# Where Garden Linux publishes its driver images (seed documents).
DEFAULT_REPOSITORY = "ghcr.io/gardenlinux/gardenlinux-nvidia-installer"
DEFAULT_IMAGE = "driver"
# The toolkit's install dir must be writable on Garden Linux, whose /usr is read-only.
TOOLKIT_INSTALL_DIR = "/opt/nvidia"

# NFD labels the operator reads to build the precompiled tag (contract 2).
KERNEL_LABEL = "feature.node.kubernetes.io/kernel-version.full"
OS_ID_LABEL = "feature.node.kubernetes.io/system-os_release.ID"
OS_VERSION_LABEL = "feature.node.kubernetes.io/system-os_release.VERSION_ID"

# The NFD rule: every GL release reports VERSION_ID=0, so one image tag serves all GL versions that
# share a kernel. A custom-source label without a namespace gets NFD's `feature.node.kubernetes.io/`
# prefix, and the custom source (priority 10) overrides the system source's label (priority 0).
# `system.osrelease` carries every os-release field, so GARDENLINUX_VERSION can be matched on.
NFD_RULE_NAME = "gardenlinux-version-id-0"
NFD_RULE: dict[str, Any] = {
    "name": NFD_RULE_NAME,
    "labels": {"system-os_release.VERSION_ID": GARDENLINUX.version_id},
    "matchFeatures": [
        {"feature": "system.osrelease", "matchExpressions": {str(GARDENLINUX.version_id_key): {"op": "Exists"}}},
    ],
}

_BRANCH = re.compile(r"^\d{3,4}$")
_FULL = re.compile(r"^\d{3,4}\.\d+(\.\d+)?$")


@dataclass(frozen=True)
class ValuesSettings:
    """What a user chooses; everything else in the values follows from it.

    Only precompiled images exist: nothing builds the on-node compile image (`usePrecompiled: false`
    pulls `<version>-<osTag>`) or gVisor's nvproxy-qualified pins, so neither variant is offered."""

    driver_version: str  # a branch ("590") or a full version ("590.48.01")
    repository: str = DEFAULT_REPOSITORY
    image: str = DEFAULT_IMAGE


def is_branch(driver_version: str) -> bool:
    return bool(_BRANCH.match(driver_version))


def check_settings(settings: ValuesSettings) -> ValuesSettings:
    """Reject settings the operator would turn into an image that cannot exist."""
    v = settings.driver_version
    if not (_BRANCH.match(v) or _FULL.match(v)):
        raise UserError(
            f"invalid driver version {v!r}: expected a branch like 590 or a full version like 590.48.01"
        )
    check_repository(settings.repository, settings.image)
    return settings


def pull_policy(driver_version: str) -> str:
    # A branch tag moves when a new release of the branch is published; a full-version tag never does.
    return "Always" if is_branch(driver_version) else "IfNotPresent"


def driver_settings(settings: ValuesSettings) -> dict[str, Any]:
    """The driver part of the Helm values: what the operator deploys on every GPU node."""
    s = check_settings(settings)
    return {
        "cdi": {"enabled": True},
        "toolkit": {"installDir": TOOLKIT_INSTALL_DIR},
        "driver": {
            "usePrecompiled": True,
            "repository": s.repository,
            "image": s.image,
            "version": s.driver_version,
            "imagePullPolicy": pull_policy(s.driver_version),
        },
    }


def helm_values(settings: ValuesSettings) -> dict[str, Any]:
    """The GPU Operator chart's values for Garden Linux nodes."""
    values = driver_settings(settings)
    values["node-feature-discovery"] = {"worker": {"config": {"sources": {"custom": [NFD_RULE]}}}}
    return values


def has_version_id_rule(values: dict[str, Any]) -> bool:
    """Whether these values carry an NFD custom rule that sets VERSION_ID=0 (so nodes report `gardenlinux0`)."""
    nfd = values.get("node-feature-discovery") or {}
    rules = (((nfd.get("worker") or {}).get("config") or {}).get("sources") or {}).get("custom") or []
    return any(
        isinstance(r, dict) and (r.get("labels") or {}).get("system-os_release.VERSION_ID") == "0" for r in rules
    )


def to_yaml(data: dict[str, Any]) -> str:
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.indent(mapping=2, sequence=4, offset=2)
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def load_yaml(text: str, what: str) -> dict[str, Any]:
    data = yamldoc.load(YAML(typ="safe"), text, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} must be a YAML mapping of Helm values")
    return data


def helm_command(values_file: Path) -> str:
    """The command that installs the GPU Operator with a values file `values` wrote."""
    return (
        "helm upgrade --install -n gpu-operator --create-namespace gpu-operator nvidia/gpu-operator "
        f"--values {values_file}"
    )
