"""A versioned release's assets: which branch each OS version's values name, the version's form, and the
options refused before anything is built. The assets of a real release are checked in test_release."""

from __future__ import annotations

from pathlib import Path

import pytest

from gl_nvidia.catalog.model import BuildUnit, Cell, Exclusion, Matrix
from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.release.assets import check_version, values_branches

LOCK = Path(__file__).parent / "data" / "deploy" / "release-debian-lock.yaml"


def _unit(kernel: str, version: str, arch: str, os_versions: tuple[str, ...]) -> BuildUnit:
    return BuildUnit(kernel, version, version.split(".")[0], arch, "cloud", "gardenlinux", os_versions)


def test_each_os_version_gets_the_newest_branch_published_for_every_one_of_its_kernels() -> None:
    # 1877.3: both arches; 580 has no arm64 image (its unit failed), 570 has both.
    # 1877.4: amd64 only, 580 published. 1592.9: 580's cell was excluded outright, 570's unit failed.
    units = [_unit("6.12.72-cloud-amd64", "580.95.05", "amd64", ("1877.3",)),
             _unit("6.12.72-cloud-arm64", "580.95.05", "arm64", ("1877.3",)),
             _unit("6.12.72-cloud-amd64", "570.195.03", "amd64", ("1877.3",)),
             _unit("6.12.72-cloud-arm64", "570.195.03", "arm64", ("1877.3",)),
             _unit("6.12.80-cloud-amd64", "580.95.05", "amd64", ("1877.4",)),
             _unit("6.6.60-cloud-amd64", "570.195.03", "amd64", ("1592.9",))]
    excluded = Exclusion(Cell("gardenlinux", "1592.9", "cloud", "amd64", "6.6.60-cloud-amd64", "580.95.05", "580"),
                         "does not compile on 6.6")
    cells = tuple(c for u in units for c in u.cells())
    matrix = Matrix(cells, (excluded,), tuple(units))
    published = [u for u in units if (u.arch, u.driver_branch) != ("arm64", "580") and u.kernel != "6.6.60-cloud-amd64"]
    assert values_branches(matrix, ["1592.9", "1877.3", "1877.4"], published) == {
        "1592.9": None, "1877.3": "570", "1877.4": "580"}
    assert values_branches(matrix, ["1877.3"], units) == {"1877.3": "580"}  # every image there: the newest


@pytest.mark.parametrize("version", ["1.4.0", "0.1.0-rc.1", "2.0.0+build.7"])
def test_semantic_versions_are_taken(version: str) -> None:
    assert check_version(version) == version


@pytest.mark.parametrize("version", ["v1.4.0", "1.4", "01.4.0", "1.4.0-", "1.4.0 ", "latest"])
def test_other_versions_are_refused(version: str) -> None:
    with pytest.raises(UserError, match="is not a semantic version"):
        check_version(version)


@pytest.mark.parametrize(("args", "error"), [
    (["--version", "v1.4.0", "--registry", "localhost:5000/gl"], "--version 'v1.4.0' is not a semantic version"),
    (["--version", "1.4.0"], "--version writes a release's assets from the published images"),
    (["--version", "1.4.0", "--registry", "localhost:5000/gl", "--plan"], "--version writes a release's assets"),
    (["--since", str(LOCK)], "--since is read only with --version"),
])
def test_a_versioned_release_with_bad_options_builds_nothing(args: list[str], error: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["release", "--profile", str(LOCK), "--out", str(out), *args]) == 2
    assert error in capsys.readouterr().err
    assert not out.exists()


def test_the_previous_release_must_be_a_lock_of_the_same_os(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "versions.yaml"
    other.write_text(LOCK.read_text().replace("id: debian", "id: gardenlinux"))
    out = tmp_path / "out"
    assert main(["release", "--profile", str(LOCK), "--out", str(out), "--registry", "localhost:5000/gl",
                 "--version", "1.4.0", "--since", str(other)]) == 2
    assert f"--since {other} is a lock of gardenlinux, not of debian" in capsys.readouterr().err
    assert not out.exists()
