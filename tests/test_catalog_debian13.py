"""Debian 13 beside 12 in the debian profile: each OS version resolves its own kernels and drivers from its
own suites, the matrix crosses a driver only with its own OS version's kernels, and the build reads each
version's packages, headers and base from its own suites."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest

from gl_nvidia.apt import DEBIAN_KEYRING
from gl_nvidia.catalog.kernels import apt_sources
from gl_nvidia.catalog.lock import parse_lock_text, read_lock
from gl_nvidia.catalog.matrix import load_lock, load_matrix, lock_matrix, profile_text
from gl_nvidia.catalog.refresh import refresh
from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.image.base import base_for, debian_spec
from gl_nvidia.modbuild.sources import DEBIAN_TOOLS, DebianSource, variant_name
from gl_nvidia.modbuild.strategy import env_for, sources_for
from gl_nvidia.osprofile import DEBIAN
from tests.fixtures.aptrepo import SigningKey, sign_repo
from tests.fixtures.debian_suites import debian_lock, write_suites
from tests.fixtures.trixie import newest_trixie_kernel

TODAY = date(2026, 12, 5)


@pytest.fixture()
def two_suites(tmp_path: Path, apt_key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bookworm + trixie fixture archive, signed; the debian profile reading it at tmp/lock.yaml."""
    monkeypatch.setenv("GL_APT_KEYRING", str(apt_key.keyring))
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path / "cache"))
    sign_repo(write_suites(tmp_path / "archive"), apt_key)
    return debian_lock(tmp_path / "lock.yaml", tmp_path / "archive")


def test_each_os_version_resolves_its_own_kernels_and_drivers_and_the_matrix_stays_within_it(two_suites: Path) -> None:
    lock = read_lock(two_suites)[0]
    resolved = refresh(lock, TODAY)
    drivers = {(d.os_version, d.version): d for d in resolved.drivers}
    # 12: one branch (Tesla 535.216.03 is older than 535.309.01 in the same branch); 13: the two newest.
    assert list(drivers) == [("12", "535.309.01"), ("13", "550.163.01"), ("13", "535.274.02")]
    assert drivers["12", "535.309.01"].open_version == "535.261.03"
    assert drivers["13", "550.163.01"].open_version is None and drivers["13", "550.163.01"].open_modules is None
    assert drivers["13", "535.274.02"].type == "package nvidia-tesla-535-kernel-source"
    assert drivers["13", "535.274.02"].open_modules is False  # trixie packages no open source of 535
    kernels = {(k.os_version, k.flavour, k.arch): [] for k in resolved.kernels}
    for k in resolved.kernels:
        kernels[k.os_version, k.flavour, k.arch].append(k.kernel)
    assert kernels["12", "cloud", "amd64"] == ["6.1.0-56-cloud-amd64", "6.1.0-57-cloud-amd64"]
    assert kernels["13", "cloud", "amd64"] == ["6.12.117+deb13-cloud-amd64", "6.12.118+deb13-cloud-amd64"]
    assert kernels["13", "metal", "arm64"] == ["6.12.118+deb13-arm64"]

    matrix = lock_matrix(lock.model_copy(update={"resolved": resolved}))
    series = {"12": "6.1.0-", "13": "6.12."}
    assert {(c.os_version, c.driver_version) for c in matrix.cells} == {
        ("12", "535.309.01"), ("13", "550.163.01"), ("13", "535.274.02")}
    assert all(c.kernel.startswith(series[c.os_version]) for c in matrix.cells)
    assert all(u.os_versions in (("12",), ("13",)) for u in matrix.units)
    types = {(u.driver_version, u.module_types) for u in matrix.units}
    assert types == {("535.309.01", ("proprietary",)), ("550.163.01", ("open", "proprietary")),
                     ("535.274.02", ("proprietary",))}
    assert len([u for u in matrix.units if u.os_versions == ("13",)]) == 2 * 5  # 2 drivers x 5 kernels
    no_open = [e for e in matrix.excluded if e.cell.driver_version == "535.274.02"]
    assert len(no_open) == 5 and all(e.module_types == ("open",) and "no open module source" in e.reason
                                     for e in no_open)


def test_update_writes_each_drivers_os_version_and_the_lock_reads_back_offline(
        two_suites: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The per-OS-version drivers survive the lock's round trip: the matrix of the written lock, read
    without any source, is the one resolved."""
    assert main(["update", "--lock", str(two_suites), "--today", str(TODAY)]) == 0
    assert "driver branch 550" in capsys.readouterr().out
    lock = read_lock(two_suites)[0]
    assert lock.resolved is not None
    assert [(d.os_version, d.branch) for d in lock.resolved.drivers] == [("12", "535"), ("13", "550"), ("13", "535")]
    text = two_suites.read_text()
    assert "open_modules: false" in text and "os_version: '13'" in text
    cells = lock_matrix(lock).cells
    assert {(c.os_version, c.driver_version) for c in cells} == {
        ("12", "535.309.01"), ("13", "550.163.01"), ("13", "535.274.02")}


def test_a_driver_package_missing_for_an_arch_excludes_that_arch_with_the_reason(
        tmp_path: Path, apt_key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GL_APT_KEYRING", str(apt_key.keyring))
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path / "cache"))
    archive = write_suites(tmp_path / "archive", missing={("trixie", "arm64"): ("nvidia-tesla-535-kernel-source",)})
    sign_repo(archive, apt_key)
    lock = read_lock(debian_lock(tmp_path / "lock.yaml", archive))[0]
    resolved = refresh(lock, TODAY)
    tesla = next(d for d in resolved.drivers if d.version == "535.274.02")
    assert tesla.arches == ["amd64"]
    matrix = lock_matrix(lock.model_copy(update={"resolved": resolved}))
    assert not [c for c in matrix.cells if c.driver_version == "535.274.02" and c.arch == "arm64"]
    gone = [e for e in matrix.excluded if e.cell.driver_version == "535.274.02" and e.cell.arch == "arm64"]
    assert len(gone) == 2 and all(
        "has no module source for arm64 in the suites of debian 13" in e.reason and e.module_types == ("open", "proprietary")
        for e in gone)
    assert [c for c in matrix.cells if c.driver_version == "550.163.01" and c.arch == "arm64"]  # the other branch builds


def _unsigned(archive: Path) -> None:
    (archive / "dists/trixie/InRelease").unlink()


def _unreachable(archive: Path) -> None:
    for f in (archive / "dists/trixie").rglob("*"):
        if f.is_file():
            f.unlink()


@pytest.mark.parametrize(("breaker", "message"), [
    (_unsigned, r"apt repository \S+/archive/dists/trixie/ is not signed"),
    (_unreachable, r"no InRelease or Release in apt repository \S+/archive/dists/trixie/"),
])
def test_an_os_version_whose_suite_is_unsigned_or_missing_is_one_line_exit_2_and_nothing_written(
        two_suites: Path, capsys: pytest.CaptureFixture[str], breaker: object, message: str) -> None:
    assert callable(breaker)
    breaker(two_suites.parent / "archive")
    before = two_suites.read_bytes()
    assert main(["update", "--lock", str(two_suites), "--today", str(TODAY)]) == 2
    assert main(["matrix", "--lock", str(two_suites)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gl-nvidia: error:")]
    assert len(err) == 2 and all(re.search(message, line) for line in err), err
    assert two_suites.read_bytes() == before
    assert not list(two_suites.parent.glob("*history*"))


@pytest.mark.parametrize(("os_block", "apt", "message"), [
    ("  version: '12'\n  versions:\n    - {version: '13', codename: trixie}\n", "system",
     r"os: Value error, give os.version \(and codename\) or os.versions, not both"),
    ("  versions:\n    - {version: '12', codename: bookworm}\n    - {version: '13', codename: trixie}\n",
     "system:bookworm", r"sources.apt 'system:bookworm' names one release for 2 OS versions"),
    ("  versions:\n    - {version: '13', codename: trixie}\n    - {version: '13', codename: trixie}\n", "system",
     r"os.versions lists a version twice"),
])
def test_a_lock_with_inconsistent_os_versions_is_refused(os_block: str, apt: str, message: str) -> None:
    text = profile_text("debian")
    text = re.sub(r"(?ms)^os:\n  id: debian\n.*?^policy:", f"os:\n  id: debian\n{os_block}policy:", text)
    text = re.sub(r"(?m)^  apt: system$", f"  apt: {apt}", text)
    with pytest.raises(UserError, match=message):
        parse_lock_text(text, "lock")


def test_system_without_a_codename_is_a_clear_error() -> None:
    with pytest.raises(UserError, match=r"sources.apt `system` needs the codename of OS version 14"):
        apt_sources("system", "14", DEBIAN)


def test_tesla_packages_carry_their_variant_in_every_name() -> None:
    assert [variant_name(n, "tesla-535") for n in ("nvidia-smi", "libcuda1", "libnvidia-ml1", "libglx-nvidia0",
                                                   "firmware-nvidia-gsp", "nvidia-kernel-source")] == [
        "nvidia-tesla-535-smi", "libnvidia-tesla-535-cuda1", "libnvidia-tesla-535-ml1", "libglx-nvidia-tesla-535-0",
        "firmware-nvidia-tesla-535-gsp", "nvidia-tesla-535-kernel-source"]
    assert variant_name("nvidia-smi", "") == "nvidia-smi"


# --- the real archive: trixie's signed index read with this bookworm machine's keyring -----------------

def test_the_debian_profile_resolves_13_from_trixie_beside_12_from_bookworm() -> None:
    """Integration: no ABI or version named; 13's kernels are 6.12 +deb13 (the newest of each flavour and arch:
    the default leaves 13's upgrade pair out for time), its drivers the two branches trixie packages, 550 with
    open modules of its own version."""
    resolved = refresh(load_lock("debian"), date.today())
    by_version = {v: [k for k in resolved.kernels if k.os_version == v] for v in ("12", "13")}
    assert all(re.fullmatch(r"6\.1\.0-\d+-(cloud-)?(amd64|arm64)", k.kernel) for k in by_version["12"])
    assert all(re.fullmatch(r"6\.12\.\d+\+deb13(\.\d+)?-(cloud-)?(amd64|arm64)", k.kernel) for k in by_version["13"])
    assert len(by_version["13"]) == 4 and {(k.flavour, k.arch) for k in by_version["13"]} == {
        (f, a) for f in ("cloud", "metal") for a in ("amd64", "arm64")}
    trixie = {d.branch: d for d in resolved.drivers if d.os_version == "13"}
    assert set(trixie) == {"550", "535"}
    assert trixie["550"].open_version is None and trixie["550"].open_modules is None  # both types can ship
    assert trixie["535"].open_modules is False
    assert {d.branch for d in resolved.drivers if d.os_version == "12"} == {"535"}


def test_a_trixie_unit_reads_trixies_packages_headers_and_base() -> None:
    """Integration (indexes only, nothing downloaded): the release gives a 13 unit trixie's driver
    packages (Tesla 535's own names), trixie's headers suites and an mmdebstrap base of trixie."""
    lock = load_lock("debian")
    lock = lock.model_copy(update={"policy": lock.policy.model_copy(update={"exclusions": []})})
    units = {(u.os_versions, u.driver_branch, u.arch): u for u in lock_matrix(lock).units}
    tesla = units[("13",), "535", "amd64"]
    source = sources_for(lock)(tesla)
    assert isinstance(source, DebianSource) and source.variant(tesla.driver_version, "amd64") == "tesla-535"
    names = [n.split("_", 1)[0] for n in source.checksums(tesla.driver_version, "amd64")]
    assert "nvidia-tesla-535-smi" in names and "libnvidia-tesla-535-cuda1" in names
    assert all("tesla-535" in n for n in names if n not in (*DEBIAN_TOOLS, "nvidia-fs-dkms")), names
    assert sources_for(lock)(units[("12",), "535", "amd64"]).checksums(
        units[("12",), "535", "amd64"].driver_version, "amd64")  # 12's from bookworm, as before
    assert base_for(lock, "amd64", "13").suite == "trixie"
    assert all(" trixie" in m for m in base_for(lock, "arm64", "13").mirrors)
    assert base_for(lock, "amd64", "12") == debian_spec("amd64")  # 12's base unchanged
    env = env_for(lock)(tesla)
    assert {s.suite.split("-")[0] for s in env.repo("amd64").sources} == {"trixie"}  # type: ignore[attr-defined]
    assert all(s.keyring == DEBIAN_KEYRING for s in env.repo("amd64").sources)  # type: ignore[attr-defined]


def test_the_default_profile_builds_todays_12_units_and_13s_newest_cloud_kernel_with_both_module_types() -> None:
    """The main job's budget: 12's units are today's (the cloud amd64 upgrade pair and one current kernel of
    every other flavour and arch); 13 builds Garden Linux's shape on one kernel (550, open and proprietary,
    the newest 6.12 cloud amd64 trixie serves now) and lists its other cells with the reason."""
    m = load_matrix("debian")
    twelve = [u for u in m.units if u.os_versions == ("12",)]
    (thirteen,) = [u for u in m.units if u.os_versions == ("13",)]
    assert len(twelve) == 5 and len(m.units) == 6
    assert thirteen.kernel == newest_trixie_kernel() and thirteen.driver_version.startswith("550.")
    assert set(thirteen.module_types) == {"open", "proprietary"}
    left = [e for e in m.excluded if e.cell.os_version == "13"]
    assert {e.cell.driver_branch for e in left} == {"550", "535"} and {e.cell.arch for e in left} == {"amd64", "arm64"}
    assert all("main job's time" in e.reason or "no open module source" in e.reason for e in left)
