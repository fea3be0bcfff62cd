"""The operator's image rule (contract 2): branch and full versions, digests, custom images, the NFD rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gl_nvidia.deploy.resolve import DriverSpec, NodeOS, node_os, parse_os_release, resolve
from gl_nvidia.deploy.values import ValuesSettings, helm_values
from gl_nvidia.errors import UserError
from gl_nvidia.image.tags import image_tags

DATA = Path(__file__).parent / "data" / "deploy"
KERNEL = "6.12.72-cloud-amd64"
GL_VALUES = helm_values(ValuesSettings("590"))


def _gl_node(values: dict[str, object] = GL_VALUES) -> NodeOS:
    release = parse_os_release((DATA / "os-release-gardenlinux-1877.3").read_text())
    return node_os(release, KERNEL, values)


def test_garden_linux_node_reports_version_id_zero_under_our_values() -> None:
    node = _gl_node()
    assert (node.os_id, node.version_id, node.os_tag) == ("gardenlinux", "0", "gardenlinux0")


def test_without_the_nfd_rule_the_node_reports_its_real_version() -> None:
    values = {k: v for k, v in GL_VALUES.items() if k != "node-feature-discovery"}
    assert _gl_node(values).os_tag == "gardenlinux1877.3"


def test_debian_node_keeps_its_version_id() -> None:
    release = parse_os_release((DATA / "os-release-debian-12").read_text())
    assert release["VERSION_ID"] == "12"  # quotes stripped, as NFD does
    assert node_os(release, "6.1.0-47-cloud-amd64", GL_VALUES).os_tag == "debian12"


def test_branch_and_full_version_precompiled() -> None:
    node = _gl_node()
    repo = "ghcr.io/gardenlinux/gardenlinux-nvidia-installer"
    branch = resolve(DriverSpec(repo, "driver", "590", True), node)
    assert branch.reference == f"{repo}/driver:590-{KERNEL}-gardenlinux0"
    assert (branch.repository, branch.tag, branch.digest) == (f"{repo}/driver", f"590-{KERNEL}-gardenlinux0", None)
    full = resolve(DriverSpec(repo, "driver", "590.48.01", True), node)
    assert full.reference == f"{repo}/driver:590.48.01-{KERNEL}-gardenlinux0"


def test_every_pulled_tag_is_one_the_image_stage_publishes() -> None:
    published = image_tags("590.48.01", "590", KERNEL, "gardenlinux", ("1877.3",))
    for version in ("590", "590.48.01"):
        assert resolve(DriverSpec("r.example/gl", "driver", version, True), _gl_node()).tag in published


def test_custom_image_name_and_fully_qualified_image() -> None:
    node = _gl_node()
    named = resolve(DriverSpec("registry.example:5000/mirror", "gl-driver", "590", True), node)
    assert named.reference == f"registry.example:5000/mirror/gl-driver:590-{KERNEL}-gardenlinux0"
    # Empty repository and version: the operator takes driver.image as the whole reference.
    qualified = resolve(DriverSpec("", "registry.example:5000/mirror/driver:590", "", True), node)
    assert qualified.reference == f"registry.example:5000/mirror/driver:590-{KERNEL}-gardenlinux0"
    assert qualified.repository == "registry.example:5000/mirror/driver"


def test_digest_is_refused_with_precompiled_and_used_as_is_without() -> None:
    digest = "sha256:" + "ab" * 32
    with pytest.raises(UserError, match=r"digest.*usePrecompiled"):
        resolve(DriverSpec("r.example/gl", "driver", digest, True), _gl_node())
    pinned = resolve(DriverSpec("r.example/gl", "driver", digest, False), _gl_node())
    assert pinned.reference == f"r.example/gl/driver@{digest}"
    assert (pinned.repository, pinned.tag, pinned.digest) == ("r.example/gl/driver", None, digest)


def test_compile_mode_pulls_the_os_tag_only() -> None:
    res = resolve(DriverSpec("r.example/gl", "driver", "590.48.01", False), _gl_node())
    assert res.reference == "r.example/gl/driver:590.48.01-gardenlinux0"


def test_values_and_clusterpolicy_spec_read_the_same() -> None:
    spec = DriverSpec.from_values(GL_VALUES)
    assert spec == DriverSpec("ghcr.io/gardenlinux/gardenlinux-nvidia-installer", "driver", "590", True)
    assert DriverSpec.from_values({}).image == "driver"  # the chart's default image name


def test_os_release_without_id_is_rejected() -> None:
    with pytest.raises(UserError, match="no ID="):
        node_os(parse_os_release("NAME=x\n"), KERNEL, GL_VALUES)


def test_binary_os_release_or_values_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gl_nvidia.cli import main

    binary = tmp_path / "os-release"
    binary.write_bytes(b"ID=\xff\x00\n")
    assert main(["resolve", "--os-release", str(binary), "--kernel", KERNEL]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    text = DATA / "os-release-gardenlinux-1877.3"
    assert main(["resolve", "--os-release", str(text), "--kernel", KERNEL, "--values", str(binary)]) == 2
    assert "values file" in capsys.readouterr().err


@pytest.mark.parametrize(("driver", "words"), [
    ({"repository": "registry.example/UPPER", "version": "590", "usePrecompiled": True}, "invalid image reference"),
    ({"repository": "gl", "version": "590", "usePrecompiled": True}, "invalid image reference"),  # no registry host
    ([1], "driver in the Helm values"),
], ids=["upper-case", "no-host", "driver-not-a-mapping"])
def test_resolve_prints_nothing_on_stdout_for_a_reference_it_refuses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], driver: object, words: str) -> None:
    """`ref=$(gl-nvidia resolve ...)` must never capture a reference the command then refuses."""
    from gl_nvidia.cli import main

    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({"driver": driver}))
    text = DATA / "os-release-gardenlinux-1877.3"
    for extra in ([], ["--json"]):
        assert main(["resolve", "--os-release", str(text), "--kernel", KERNEL, "--values", str(values), *extra]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert words in captured.err and captured.err.count("gl-nvidia: error:") == 1
