"""The OS record: every stage reads it instead of comparing OS ids, and the node's copy agrees with it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gl_nvidia.errors import UserError
from gl_nvidia.image.tags import image_tags
from gl_nvidia.node import decide
from gl_nvidia.osprofile import DEBIAN, GARDENLINUX, PROFILES, os_profile

SRC = Path(__file__).resolve().parent.parent / "src" / "gl_nvidia"


@pytest.mark.parametrize("os_id", sorted(PROFILES))
def test_the_nodes_copy_of_the_version_id_rule_agrees_with_the_record(os_id: str) -> None:
    p = os_profile(os_id)
    assert p in (DEBIAN, GARDENLINUX)
    fixed = decide.FIXED_VERSION_IDS.get(p.id)
    assert (fixed[1] if fixed else None) == p.version_id
    assert (fixed[0] if fixed else None) == p.version_id_key
    for version in ("12", "1877.3"):
        release = {"ID": p.id, "VERSION_ID": version}
        assert decide.os_tag(release) == p.os_tag(p.node_version_id(version))
        # The tag the node names is one the image stage publishes.
        tags = image_tags("535.309.01", "535", "6.1.0-47-cloud-amd64", p.id, (version,))
        assert f"535-6.1.0-47-cloud-amd64-{decide.os_tag(release)}" in tags
    if p.version_id_key:  # the values' NFD rule matches on the key, whatever the ID says
        assert decide.os_tag({"ID": "other", p.version_id_key: "1877.3"}) == p.os_tag(str(p.version_id))


def test_kernel_names_per_flavour_and_arch() -> None:
    for p in PROFILES.values():
        assert p.kernel_suffix("cloud", "arm64") == "-cloud-arm64"
        assert p.headers_meta_package("metal", "amd64") == "linux-headers-amd64"
        assert p.kernel_flavour("6.1.0-56-amd64") == "metal"
        assert p.kernel_flavour("6.12.117+deb12-cloud-arm64") == "cloud"
        assert p.kernel_version("6.12.117+deb12-cloud-arm64") == "6.12.117+deb12"
        assert p.kernel_version("6.1.0-56-arm64") == "6.1.0-56"


def test_an_os_without_a_record_is_refused_not_guessed_to_be_debian() -> None:
    """Issue 20: an unknown id was a Debian clone under its own name, so a typo built and tagged images."""
    for ask in (lambda: os_profile("ubuntu"),
                lambda: image_tags("535.309.01", "535", "6.8.0-1-generic", "ubuntu", ("24.04",))):
        with pytest.raises(UserError, match="no OS profile for 'ubuntu'") as exc:
            ask()
        assert exc.value.hint == "use debian or gardenlinux"


def _os_id_comparisons(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            names = [n for n in (node.left, *node.comparators) if isinstance(n, (ast.Name, ast.Attribute))]
            consts = [n.value for n in (node.left, *node.comparators) if isinstance(n, ast.Constant)]
            ids = {ast.unparse(n) for n in names}
            if consts and set(consts) & set(PROFILES) and any(i.endswith(("os_id", "os.id", ".id")) for i in ids):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_stage_compares_os_ids_outside_the_records() -> None:
    """Every OS-specific rule is a field of the record; the node's copy is keyed by the id, not compared."""
    found = [hit for p in sorted(SRC.rglob("*.py")) for hit in _os_id_comparisons(p)]
    assert found == [], found
