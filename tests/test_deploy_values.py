"""GPU Operator values: valid for the real ClusterPolicy CRD, only the chart's own keys, only images that are built."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

from gl_nvidia.cli import main
from gl_nvidia.deploy.resolve import DriverSpec, node_os, resolve
from gl_nvidia.deploy.values import (
    NFD_RULE,
    ValuesSettings,
    helm_values,
    load_yaml,
    to_yaml,
)
from gl_nvidia.errors import UserError
from gl_nvidia.image.tags import image_tags

# NVIDIA's ClusterPolicy CRD and chart values.yaml, kept in the repository so every clone runs these checks.
REFERENCE = Path(__file__).resolve().parent / "data" / "deploy" / "gpu-operator"

# The chart passes `node-feature-discovery.worker.config` to nfd-worker verbatim; below `sources` the
# keys are NFD's feature source names, not chart keys.
NFD_SOURCES_PATH = ("node-feature-discovery", "worker", "config", "sources")
NFD_SOURCES = {"cpu", "custom", "kernel", "local", "memory", "network", "pci", "storage", "system", "usb"}
NFD_MATCH_OPS = {"In", "NotIn", "InRegexp", "Exists", "DoesNotExist", "Gt", "Lt", "GtLt", "IsTrue", "IsFalse"}

ALL_SETTINGS = [
    ValuesSettings("590"),
    ValuesSettings("590.48.01"),
    ValuesSettings("570.172.08", repository="registry.example:5000/gl/nvidia"),
]


def _load(name: str) -> Any:
    return YAML(typ="safe").load((REFERENCE / name).read_text())


@pytest.fixture(scope="module")
def spec_schema() -> dict[str, Any]:
    crd = _load("nvidia.com_clusterpolicies.yaml")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


@pytest.fixture(scope="module")
def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = _load("values.yaml")
    return values


def _strict(schema: Any) -> Any:
    """The schema with unknown keys rejected: the API server would silently prune them."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _helm_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing: maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _helm_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _paths(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in data.items():
        path = (*prefix, key)
        out.append(path)
        if isinstance(value, dict) and path != NFD_SOURCES_PATH:
            out += _paths(value, path)
    return out


def _has_path(data: Any, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=lambda s: s.driver_version)
def test_values_validate_against_clusterpolicy_spec(
    settings: ValuesSettings, spec_schema: dict[str, Any], chart_values: dict[str, Any]
) -> None:
    ours = helm_values(settings)
    # What the chart renders into the ClusterPolicy: its defaults overlaid with ours, for spec keys.
    merged = _helm_merge(chart_values, ours)
    spec = {k: v for k, v in merged.items() if k in spec_schema["properties"]}
    jsonschema.validate(spec, spec_schema)
    # Every key we set for the ClusterPolicy is one the CRD knows (none silently pruned).
    jsonschema.validate({k: v for k, v in ours.items() if k in spec_schema["properties"]}, _strict(
        {k: v for k, v in spec_schema.items() if k != "required"}))


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=lambda s: s.driver_version)
def test_values_use_only_chart_keys(settings: ValuesSettings, chart_values: dict[str, Any]) -> None:
    ours = helm_values(settings)
    for path in _paths(ours):
        assert _has_path(chart_values, path), f"{'.'.join(path)} is not a key of the chart's values.yaml"
    sources = ours["node-feature-discovery"]["worker"]["config"]["sources"]
    assert set(sources) <= NFD_SOURCES
    assert _has_path(chart_values, NFD_SOURCES_PATH)


def test_a_bad_key_is_caught(spec_schema: dict[str, Any], chart_values: dict[str, Any]) -> None:
    """The two checks above fail on a typo (they are not vacuous)."""
    bad = helm_values(ValuesSettings("590"))
    bad["driver"]["usePrecompiledDrivers"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"driver": bad["driver"]}, _strict({"properties": spec_schema["properties"]}))
    assert not _has_path(chart_values, ("driver", "usePrecompiledDrivers"))
    wrong_type = _helm_merge(chart_values, {"driver": {"usePrecompiled": "yes"}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in wrong_type.items() if k in spec_schema["properties"]}, spec_schema)


def test_precompiled_values_follow_the_seed() -> None:
    v = helm_values(ValuesSettings("590"))
    assert v["cdi"] == {"enabled": True}
    assert v["toolkit"] == {"installDir": "/opt/nvidia"}
    assert v["driver"] == {
        "usePrecompiled": True,
        "repository": "ghcr.io/gardenlinux/gardenlinux-nvidia-installer",
        "image": "driver",
        "version": "590",
        "imagePullPolicy": "Always",  # a branch tag moves with each release of the branch
    }
    assert helm_values(ValuesSettings("590.48.01"))["driver"]["imagePullPolicy"] == "IfNotPresent"


def test_nfd_rule_sets_version_id_zero_for_garden_linux() -> None:
    (rule,) = helm_values(ValuesSettings("590"))["node-feature-discovery"]["worker"]["config"]["sources"]["custom"]
    assert rule == NFD_RULE
    assert rule["labels"] == {"system-os_release.VERSION_ID": "0"}
    (match,) = rule["matchFeatures"]
    assert match["feature"] == "system.osrelease"
    assert match["matchExpressions"] == {"GARDENLINUX_VERSION": {"op": "Exists"}}
    assert all(e["op"] in NFD_MATCH_OPS for e in match["matchExpressions"].values())


def test_bad_version_and_repository_are_rejected() -> None:
    with pytest.raises(UserError, match="invalid driver version"):
        helm_values(ValuesSettings("latest"))
    with pytest.raises(UserError, match="invalid repository"):
        helm_values(ValuesSettings("590", repository="registry.example/"))
    for bad in ("", "Bad Repo!", "registry.example/GPU", "registry.example/gpu:590", "registry.example//gpu"):
        with pytest.raises(UserError, match="invalid repository"):
            helm_values(ValuesSettings("590", repository=bad))
    for good in ("nvcr.io/nvidia", "registry.example:5000/gl/nvidia", "localhost:5000/gpu", "[::1]:5000/gpu",
                 "Registry.Example/gpu-drivers/nv_x", "registry.example:5000"):
        assert helm_values(ValuesSettings("590", repository=good))["driver"]["repository"] == good


def test_yaml_round_trips() -> None:
    v = helm_values(ValuesSettings("590"))
    assert load_yaml(to_yaml(v), "x") == v
    with pytest.raises(UserError, match="malformed YAML"):
        load_yaml("driver: [", "values.yaml")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_yaml("- a", "values.yaml")


LOCK = """\
schema: 1
os: {id: gardenlinux}
policy:
  arches: [amd64]
  flavours: [cloud]
sources:
  glrd: [glrd.json]
  nvidia: releases.json
  apt: file:///nonexistent
resolved:
  today: 2026-11-22
  os_versions: [{version: "1877.3"}]
  drivers:
    - {branch: "590", type: new feature branch, version: 590.48.01}
    - {branch: "580", type: production branch, version: 580.105.08}
  kernels: [{os_version: "1877.3", flavour: cloud, arch: amd64, kernel: 6.12.72-cloud-amd64}]
"""


def test_cli_writes_values_from_the_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "versions.yaml"
    lock.write_text(LOCK)
    out = tmp_path / "values.yaml"
    assert main(["values", "--lock", str(lock), "--out", str(out)]) == 0
    assert load_yaml(out.read_text(), "out")["driver"]["version"] == "590"


def test_no_shoot_snippet_for_an_extension_nobody_built(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No Gardener extension reads an `nvidia-gpu-extension` entry: values writes Helm values only."""
    lock = tmp_path / "versions.yaml"
    lock.write_text(LOCK)
    assert main(["values", "--lock", str(lock), "--format", "shoot"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--format" in captured.err


@pytest.mark.parametrize("args", [[], ["--driver-branch", "590"], ["--driver-branch", "590.48.01"],
                                  ["--driver-branch", "580.105.08"]])
def test_every_values_option_pulls_an_image_the_image_stage_builds(
        args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The operator's reference for a Garden Linux node of the lock is one of the tags `image` writes for it."""
    lock = tmp_path / "versions.yaml"
    lock.write_text(LOCK)
    assert main(["values", "--lock", str(lock), "--repository", "registry.example:5000/gl", *args]) == 0
    values = load_yaml(capsys.readouterr().out, "stdout")
    spec = DriverSpec.from_values(values)
    assert spec.use_precompiled
    kernel = "6.12.72-cloud-amd64"
    node = node_os({"ID": "gardenlinux", "GARDENLINUX_VERSION": "1877.3"}, kernel, helm_values(ValuesSettings("590")))
    ref = resolve(spec, node).reference
    built = {f"registry.example:5000/gl/driver:{t}" for full, branch in (("590.48.01", "590"), ("580.105.08", "580"))
             for t in image_tags(full, branch, kernel, "gardenlinux", ("1877.3",))}
    assert ref in built


@pytest.mark.parametrize("variant", ["compile", "gvisor"])
def test_the_variants_nothing_builds_images_for_are_gone(variant: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "versions.yaml"
    lock.write_text(LOCK)
    assert main(["values", "--lock", str(lock), "--variant", variant]) == 2
    assert "No such option '--variant'" in capsys.readouterr().err


def test_cli_without_a_lock_is_a_clear_error(tmp_path: Path) -> None:
    assert main(["values", "--lock", str(tmp_path / "missing.yaml")]) == 2
