"""The catalog stage: sources, lifecycle, policy, exclusions, build units, update diffs, bad input."""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from gl_nvidia.apt import DEBIAN_KEYRING, AptRepo
from gl_nvidia.catalog.feeds import parse_glrd, parse_nvidia
from gl_nvidia.catalog.history import history_path, read_history
from gl_nvidia.catalog.kernels import (
    apt_sources,
    compare_kernels,
    kernel_sort_key,
    resolve_kernel,
    resolve_kernels,
)
from gl_nvidia.catalog.lock import ExclusionRule, Policy, add_exclusion, parse_lock_text, read_lock
from gl_nvidia.catalog.matrix import build_matrix, in_range, load_matrix, profile_text, rule_matches
from gl_nvidia.catalog.model import Cell, Exclusion, Matrix
from gl_nvidia.catalog.refresh import (
    drivers_from_package,
    policy_leaves_out,
    refresh,
    select_drivers,
    select_os_versions,
)
from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.osprofile import DEBIAN, GARDENLINUX
from gl_nvidia.run import output
from tests.fixtures.aptrepo import SigningKey, serve, sign_repo

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "catalog"
SNAPSHOT_DAY = "2026-11-20"


def glrd_docs() -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in (DATA / "glrd-releases-major.json", DATA / "glrd-releases-minor.json")]


def nvidia_branches() -> Any:
    return parse_nvidia((DATA / "nvidia-releases.json").read_bytes(), "fixture")


def cli(*argv: str) -> int:
    return main(list(argv))


# --- sources and lifecycle ------------------------------------------------------------------------------


def test_glrd_fixture_parses_majors_with_their_minor_releases() -> None:
    majors = {m.major: m for m in parse_glrd(glrd_docs())}
    assert sorted(majors) == [1592, 1877, 2150]  # "next" and nightlies are not majors
    assert [r.version for r in majors[1877].releases] == ["1877.0", "1877.1", "1877.2", "1877.3"]
    assert [r.version for r in majors[2150].releases] == ["2150.0.0", "2150.8.0", "2150.9.0"]
    assert majors[1877].extended == date(2026, 5, 13)


ALL_MINORS = Policy(arches=["amd64"], flavours=["cloud"])


@pytest.mark.parametrize(
    ("today", "expected"),
    [
        # 1592 is eol, 1877 in extended maintenance: every released minor of both majors
        ("2026-11-20", ["1877.0", "1877.1", "1877.2", "1877.3", "2150.0.0", "2150.8.0", "2150.9.0"]),
        ("2026-11-30", ["2150.0.0", "2150.8.0", "2150.9.0"]),  # eol today: out of maintenance
        ("2026-10-01", ["1877.0", "1877.1", "1877.2", "1877.3", "2150.0.0", "2150.8.0"]),  # 2150.9.0 not yet out
        ("2025-06-01", ["1592.6", "1877.0"]),  # 1592 in extended maintenance, 2150 not yet released
    ],
)
def test_every_released_minor_of_every_major_in_maintenance(today: str, expected: list[str]) -> None:
    got = select_os_versions(parse_glrd(glrd_docs()), date.fromisoformat(today), ALL_MINORS)
    assert [v.version for v in got] == expected


def test_min_minor_drops_older_minors_and_keep_minors_names_older_ones_on_purpose() -> None:
    policy = ALL_MINORS.model_copy(update={"min_minor": ["1877.2", "2150.9.0"], "keep_minors": ["2150.0.0", "1592.6"]})
    got = select_os_versions(parse_glrd(glrd_docs()), date(2026, 11, 20), policy)
    assert [v.version for v in got] == ["1592.6", "1877.2", "1877.3", "2150.0.0", "2150.9.0"]
    assert got[0].eol == date(2025, 8, 12)  # kept past its major's end of maintenance, on purpose
    assert policy_leaves_out(policy, "2150.8.0") == "policy.min_minor builds GL 2150 from 2150.9.0 on"
    assert policy_leaves_out(policy, "2150.0.0") is None  # kept
    assert policy_leaves_out(policy, "2150.10.0") is None and policy_leaves_out(ALL_MINORS, "1877.0") is None


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"min_minor": ["2150.7.0"]}, r"policy names GL 2150\.7\.0, which the GLRD data does not list"),
        ({"keep_minors": ["2222.0.0"]}, r"policy names GL 2222\.0\.0, which the GLRD data does not list"),
    ],
)
def test_policy_naming_a_minor_glrd_does_not_know_is_an_error(update: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        select_os_versions(parse_glrd(glrd_docs()), date(2026, 11, 20), ALL_MINORS.model_copy(update=update))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("min_minor", ["2150.8.0", "2150.9.0"], "more than one min_minor for GL 2150"),
        ("keep_minors", ["latest"], "'latest' is not a Garden Linux version"),
    ],
)
def test_bad_minor_policy_is_rejected(field: str, value: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Policy(arches=["amd64"], flavours=["cloud"], **{field: value})


def test_older_glrd_names_stable_and_patch_with_micro_are_read() -> None:
    doc = {"releases": [
        {"name": "stable-2017", "type": "stable", "version": {"major": 2017},
         "lifecycle": {"released": {"isodate": "2026-01-01", "timestamp": 1767225600},
                       "extended": {"isodate": "2026-07-01", "timestamp": 1782864000},
                       "eol": {"isodate": "2027-01-01", "timestamp": 1798761600}}},
        {"name": "patch-2017.0.1", "type": "patch", "version": {"major": 2017, "minor": 0, "micro": 1},
         "lifecycle": {"released": {"isodate": "2026-02-01", "timestamp": 1769904000},
                       "eol": {"isodate": "2027-01-01", "timestamp": 1798761600}}},
    ]}
    (major,) = parse_glrd([("old", json.dumps(doc).encode())])
    assert [r.version for r in major.releases] == ["2017.0.1"]


def test_nvidia_fixture_branches_and_top_three_of_allowed_types() -> None:
    branches = {b.branch: b for b in nvidia_branches()}
    assert branches["575"].type == "new feature branch"
    assert branches["535"].type == "lts branch"
    assert branches["570"].releases[0].version == "570.195.03"  # newest first

    lock = read_lock(REPO / "versions.yaml")[0]
    chosen = select_drivers(nvidia_branches(), lock.policy)
    assert [(d.branch, d.version) for d in chosen] == [("580", "580.105.08"), ("575", "575.57.08"), ("570", "570.195.03")]

    only_lts_and_production = lock.policy.model_copy(update={"branch_types": ["production branch", "lts branch"]})
    chosen = select_drivers(nvidia_branches(), only_lts_and_production)
    assert [d.branch for d in chosen] == ["580", "570", "550"]


def test_a_pin_holds_its_branch_and_keeps_it_in_the_matrix() -> None:
    policy = read_lock(REPO / "versions.yaml")[0].policy
    pinned = policy.model_copy(update={"pins": ["570.172.08", "535.261.03"]})
    chosen = {d.branch: d.version for d in select_drivers(nvidia_branches(), pinned)}
    assert chosen == {"580": "580.105.08", "575": "575.57.08", "570": "570.172.08", "535": "535.261.03"}


# --- kernels ------------------------------------------------------------------------------------------------


@pytest.fixture()
def served_gl_apt(signed_gl_apt: Path) -> Iterator[str]:
    """The signed fixture Garden Linux apt repository over HTTP on 127.0.0.1, as the real one is reached."""
    with serve(signed_gl_apt) as url:
        yield url


def test_gl_kernel_is_what_the_flavour_meta_package_points_to(
    served_gl_apt: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path))
    monkeypatch.setenv("GL_APT_REPOSITORY", served_gl_apt)
    # The index also holds an older 6.12.40 and the -common package; the meta-package decides.
    assert resolve_kernel("${GL_APT_REPOSITORY}", "1877.3", "cloud", "amd64", GARDENLINUX) == "6.12.44-cloud-amd64"
    assert resolve_kernel("${GL_APT_REPOSITORY}", "2150.9.0", "metal", "arm64", GARDENLINUX) == "6.12.72-arm64"


def test_kernel_from_newest_headers_when_there_is_no_meta_package(
    signed_gl_apt: Path, apt_key: SigningKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path / "cache"))
    index = signed_gl_apt / "dists/1877.3/main/binary-amd64/Packages"
    paragraphs = index.read_text().split("\n\n")
    index.write_text("\n\n".join(p for p in paragraphs if "Package: linux-headers-cloud-amd64\n" not in p))
    sign_repo(signed_gl_apt, apt_key)
    assert resolve_kernel(str(signed_gl_apt), "1877.3", "cloud", "amd64", GARDENLINUX) == "6.12.44-cloud-amd64"


def test_unset_repository_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GL_APT_REPOSITORY", raising=False)
    with pytest.raises(Exception, match="GL_APT_REPOSITORY is not set"):
        apt_sources("${GL_APT_REPOSITORY}", "1877.3", GARDENLINUX)


def test_a_repository_by_url_is_verified_with_the_keyring_gl_apt_keyring_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GL_APT_REPOSITORY", "http://repo.example/gl")
    monkeypatch.delenv("GL_APT_KEYRING", raising=False)
    with pytest.raises(UserError, match=r"GL_APT_KEYRING is not set \(the keyring to verify http://repo\.example/gl with\)"):
        apt_sources("${GL_APT_REPOSITORY}", "1877.3", GARDENLINUX)
    monkeypatch.setenv("GL_APT_KEYRING", str(tmp_path / "gardenlinux.asc"))
    (source,) = apt_sources("${GL_APT_REPOSITORY}", "1877.3", GARDENLINUX)
    assert source.keyring == tmp_path / "gardenlinux.asc"


def test_debian_bookworm_cloud_kernel_from_this_machines_archive() -> None:
    """Integration: the real Debian archive configured in /etc/apt, checked against apt itself."""
    kernel = resolve_kernel("system:bookworm", "12", "cloud", "amd64", DEBIAN)
    assert re.fullmatch(r"6\.1\.0-\d+-cloud-amd64", kernel)
    depends = output(["apt-cache", "show", "--no-all-versions", "linux-headers-cloud-amd64"])
    assert f"linux-headers-{kernel} " in depends


def _headers(name: str, version: str, depends: str) -> str:
    """One paragraph as Debian's binary-amd64 index writes it for a linux-headers package."""
    return (f"Package: {name}\nSource: linux (6.1.0)\nVersion: {version}\nArchitecture: amd64\n"
            f"Maintainer: Debian Kernel Team <debian-kernel@lists.debian.org>\nInstalled-Size: 1\n"
            f"Depends: {depends}\nSection: kernel\nPriority: optional\n"
            f"Filename: pool/main/l/linux/{name}_{version}_amd64.deb\nSize: 1024\nSHA256: {'0' * 64}\n"
            f"Description: Header files for Linux\n")


# Debian's bookworm shape: 6.1 ABIs, the current one behind the flavour's meta-package, 6.12 backports
# beside them (another series) and the rt flavour (another suffix).
BOOKWORM_ABIS = {"6.1.0-47": "6.1.158-1", "6.1.0-53": "6.1.174-1", "6.1.0-56": "6.1.189-1", "6.1.0-57": "6.1.192-3"}


def _bookworm_index(root: Path, abis: dict[str, str]) -> None:
    paragraphs = [_headers(f"linux-headers-{abi}-{flavour}amd64", version, f"linux-kbuild-6.1 (>= {version})")
                  for abi, version in abis.items() for flavour in ("cloud-", "rt-")]
    paragraphs += [_headers("linux-headers-cloud-amd64", "6.1.192-3", "linux-headers-6.1.0-57-cloud-amd64 (= 6.1.192-3)"),
                   _headers("linux-headers-6.12.118+deb12-cloud-amd64", "6.12.118-1~bpo12+1", "linux-kbuild-6.12"),
                   _headers("linux-headers-6.12-cloud-amd64", "6.12.118-1~bpo12+1", "linux-headers-6.12.118+deb12-cloud-amd64"),
                   _headers("nvidia-kernel-source", "535.309.01-1~deb12u1", "make")]
    index = root / "dists/bookworm/main/binary-amd64/Packages"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text("\n".join(paragraphs))


def test_the_previous_kernel_is_read_from_the_index_so_a_rotated_out_abi_never_breaks_the_pair(
    apt_key: SigningKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The profile names no ABI: 'the current one and the one before' resolves from whatever the index
    lists today. When Debian drops the formerly pinned 6.1.0-47 and the then-previous 6.1.0-56 from its
    index, the release still gets a real upgrade pair instead of failing on a missing package."""
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GL_APT_KEYRING", str(apt_key.keyring))
    repo = tmp_path / "archive"
    lock = parse_lock_text(profile_text("debian"), "profile")[0]
    lock = lock.model_copy(update={  # its Debian 12 alone: the fixture archive is bookworm's
        "os": lock.os.model_copy(update={"versions": lock.os.versions[:1]}),
        "policy": lock.policy.model_copy(update={"arches": ["amd64"], "flavours": ["cloud"],
                                                 "previous_kernels": lock.policy.previous_kernels[:1]}),
        "sources": lock.sources.model_copy(update={"apt": str(repo)})})

    def pair() -> list[str]:
        sign_repo(repo, apt_key)
        return sorted(k.kernel for k in refresh(lock, date(2026, 12, 5)).kernels)

    _bookworm_index(repo, BOOKWORM_ABIS)
    assert pair() == ["6.1.0-56-cloud-amd64", "6.1.0-57-cloud-amd64"]
    _bookworm_index(repo, {k: v for k, v in BOOKWORM_ABIS.items() if k not in ("6.1.0-47", "6.1.0-56")})
    assert pair() == ["6.1.0-53-cloud-amd64", "6.1.0-57-cloud-amd64"]
    _bookworm_index(repo, {"6.1.0-57": BOOKWORM_ABIS["6.1.0-57"]})  # a suite with one ABI: no pair to make
    assert pair() == ["6.1.0-57-cloud-amd64"]


def test_the_embedded_profile_names_no_kernel_abi() -> None:
    """A named ABI breaks the main job the day Debian's index drops it: the profile widens a flavour
    to the ABI before the current one instead."""
    text = profile_text("debian")
    assert not re.search(r"\d+\.\d+\.\d+(-\d+|\+deb)", text)
    policy = parse_lock_text(text, "profile")[0].policy
    assert policy.kernel_pins == [] and policy.kernel_overrides == []
    assert [(k.os_version, k.flavour, k.arch) for k in policy.previous_kernels] == [("12", "cloud", "amd64")]


def test_the_debian_profiles_upgrade_pair_is_the_archives_newest_cloud_abi_and_the_one_before() -> None:
    """Integration: the real archive, checked against apt itself (no ABI named here either)."""
    m = load_matrix("debian")
    pair = sorted((u.kernel for u in m.units if u.kernel.endswith("-cloud-amd64") and u.os_versions == ("12",)),
                  key=kernel_sort_key)
    depends = output(["apt-cache", "show", "--no-all-versions", "linux-headers-cloud-amd64"])
    assert len(pair) == 2 and f"linux-headers-{pair[1]} " in depends
    listed = output(["apt-cache", "pkgnames", "linux-headers-6.1.0-"]).split()
    abis = sorted({n.removeprefix("linux-headers-").removesuffix("-cloud-amd64") for n in listed
                   if re.fullmatch(r"linux-headers-6\.1\.0-\d+-cloud-amd64", n)}, key=lambda v: int(v.rsplit("-", 1)[1]))
    assert [f"{a}-cloud-amd64" for a in abis[-2:]] == pair


def test_another_debian_release_is_read_from_the_archive_this_machine_trusts(tmp_path: Path) -> None:
    """`system:trixie` on a bookworm machine: the same entries (URI, components, Signed-By) with trixie in
    place of bookworm; the machine's other vendors' entries are not Debian's and stay out."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://archive.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib non-free non-free-firmware\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://archive.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://vendor.example/apt\nSuites: nodistro\nComponents: main\nSigned-By: /usr/share/keyrings/vendor.gpg\n")
    chosen = apt_sources("system:trixie", "13", DEBIAN, etc_apt=tmp_path)
    assert [(s.uri, s.suite, s.components[-1], s.keyring) for s in chosen] == [
        ("http://archive.example/debian", "trixie", "non-free-firmware", DEBIAN_KEYRING),
        ("http://archive.example/debian", "trixie-updates", "non-free-firmware", DEBIAN_KEYRING),
        ("http://archive.example/debian-security", "trixie-security", "main", DEBIAN_KEYRING)]
    assert [s.suite for s in apt_sources("system:bookworm", "12", DEBIAN, etc_apt=tmp_path)] == [
        "bookworm", "bookworm-updates", "bookworm-security"]
    with pytest.raises(UserError, match=r"'system:\.\./x' does not name a Debian release"):
        apt_sources("system:../x", "13", DEBIAN, etc_apt=tmp_path)


def test_debian_13_kernels_and_driver_branches_from_trixies_signed_index() -> None:
    """Integration: trixie's InRelease verified with this bookworm machine's archive keyring, nothing of
    trixie installed. Its 6.12 cloud kernel and the ABI before it; its two driver branches: 550 with open
    modules of the driver's own version (both types can ship) and the Tesla 535 branch."""
    kernels = resolve_kernels("system:trixie", "13", "cloud", "amd64", DEBIAN, "trixie", previous=True)
    assert len(kernels) == 2 and all(re.fullmatch(r"6\.12\.\d+\+deb13(\.\d+)?-cloud-amd64", k) for k in kernels)
    assert compare_kernels(kernels[0], kernels[1]) > 0
    repo = AptRepo(apt_sources("system:trixie", "13", DEBIAN), arch="arm64")
    (newest,) = drivers_from_package(repo, "nvidia-kernel-source")
    assert newest.branch == "550" and newest.open_version is None  # the open source is the driver's version
    (tesla,) = drivers_from_package(repo, "nvidia-tesla-535-kernel-source")
    assert tesla.branch == "535" and tesla.version.startswith("535.")
    assert "trixie" not in output(["dpkg-query", "-W", "-f", "${Version}\n"])


def test_an_unreachable_debian_release_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("matrix", "--apt-repository", "system:nosuch") == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("gl-nvidia: error:")] == [
        line for line in err.splitlines() if "error" in line]
    assert "/dists/nosuch/" in err and "Traceback" not in err


def test_kernel_order_is_debian_version_order() -> None:
    assert compare_kernels("6.1.0-56-cloud-amd64", "6.1.0-47-cloud-amd64") > 0
    assert compare_kernels("6.1.0-9-cloud-amd64", "6.1.0-10-cloud-amd64") < 0
    assert compare_kernels("6.12.38+deb12-cloud-amd64", "6.12.9+deb12-cloud-amd64") > 0
    assert in_range("6.1.0-56-cloud-amd64", ">=6.1.0-56", compare_kernels)
    assert not in_range("6.1.0-47-cloud-amd64", ">=6.1.0-56", compare_kernels)


# --- exclusions and build units -------------------------------------------------------------------------


def cell(os_version: str = "2150.9.0", kernel: str = "6.12.72-cloud-amd64", driver: str = "570.195.03") -> Cell:
    return Cell("gardenlinux", os_version, "cloud", "amd64", kernel, driver, driver.split(".")[0])


@pytest.mark.parametrize(
    ("rule", "hits"),
    [
        (dict(os_version=">=2150.8", driver_branch="570"), [True, False, False, True]),
        (dict(os_version=">=2150.8,<2150.9"), [False, False, False, True]),
        (dict(driver_branch="<575"), [True, True, False, True]),
        (dict(kernel=">6.12.44"), [True, False, True, True]),
        (dict(driver_version="==570.195.03", os_version="==2150.9.0"), [True, False, False, False]),
        (dict(arch="arm64"), [False, False, False, False]),
    ],
)
def test_exclusion_rules_match_ranges(rule: dict[str, str], hits: list[bool]) -> None:
    cells = [cell(), cell("1877.3", "6.12.44-cloud-amd64"), cell(driver="580.105.08"), cell("2150.8.0", "6.12.68-cloud-amd64")]
    r = ExclusionRule(reason="why", **rule)  # type: ignore[arg-type]
    assert [rule_matches(r, c) for c in cells] == hits


def test_bad_range_in_a_rule_is_rejected() -> None:
    with pytest.raises(ValueError, match="bad range clause"):
        ExclusionRule(reason="x", os_version=">=>2150")


def test_snapshot_matrix_applies_the_570_exclusion_and_dedups_build_units() -> None:
    m = load_matrix(REPO / "versions.yaml")
    assert len(m.cells) == 20  # 2 GL versions x 2 flavours x 2 arches x 3 drivers, minus 4 excluded
    assert {(e.cell.os_version, e.cell.driver_branch) for e in m.excluded} == {("2150.9.0", "570")}
    assert all(e.module_types == ("open", "proprietary") for e in m.excluded)
    assert not any(c.os_version == "2150.9.0" and c.driver_branch == "570" for c in m.cells)
    assert len(m.units) == 20  # every GL version has its own kernel here


def test_cells_sharing_kernel_driver_arch_are_one_build_unit() -> None:
    resolved = read_lock(REPO / "versions.yaml")[0].resolved
    assert resolved is not None
    # Two GL versions on the same kernel (a patch release without a kernel bump).
    same = resolved.model_copy(update={"kernels": [
        k.model_copy(update={"kernel": "6.12.44-cloud-amd64"}) for k in resolved.kernels
        if k.flavour == "cloud" and k.arch == "amd64"
    ]})
    m = build_matrix("gardenlinux", same, [])
    assert len(m.cells) == 6 and len(m.units) == 3
    assert all(u.os_versions == ("1877.3", "2150.9.0") for u in m.units)
    assert len({u.key for u in m.units}) == 3


def _candidate(package: str) -> str:
    found = re.search(r"Candidate: (\S+)", output(["apt-cache", "policy", package]))
    assert found is not None, package
    return found.group(1).split("-")[0]


def test_open_modules_of_another_version_than_the_driver_are_excluded_on_every_kernel() -> None:
    """Debian's open module source lags its driver (535.261.03 beside 535.309.01): the node would refuse
    those modules next to the userspace, so the catalog drops the open type, with the reason, everywhere."""
    whole = load_matrix("debian")  # real: resolved from this machine's Debian archive; its release is 12
    m = Matrix(*(tuple(x for x in xs if (x.cell if isinstance(x, Exclusion) else x).os_version == "12")
                 for xs in (whole.cells, whole.excluded)),
               tuple(u for u in whole.units if u.os_versions == ("12",)))
    driver, open_version = _candidate("nvidia-kernel-source"), _candidate("nvidia-open-kernel-source")
    assert {c.driver_version for c in m.cells} == {driver}
    assert {c.driver_branch for c in m.cells} == {"535"}
    by_kernel = {u.kernel: u for u in m.units}
    assert len([k for k in by_kernel if k.endswith("-cloud-amd64")]) == 2  # the upgrade pair
    if open_version == driver:  # the day Debian's open package catches up, both types build
        assert not m.excluded and all(u.module_types == ("open", "proprietary") for u in m.units)
        return
    assert all(u.module_types == ("proprietary",) for u in m.units)
    assert sorted(e.cell.kernel for e in m.excluded) == sorted(by_kernel)
    assert all(e.module_types == ("open",) and f"open module source {open_version} differs from driver {driver}"
               in e.reason for e in m.excluded)


def test_debian_profile_resolves_cloud_and_metal_on_both_arches_from_the_archive() -> None:
    """Debian's generic kernel stands in for Garden Linux metal: the real archive's binary-amd64 and
    binary-arm64 indexes give one current kernel per flavour and arch, named as the OS record says."""
    m = load_matrix("debian")
    current = {(c.flavour, c.arch): c.kernel for c in sorted(m.cells, key=lambda c: kernel_sort_key(c.kernel))
               if c.os_version == "12"}
    assert set(current) == {("cloud", "amd64"), ("cloud", "arm64"), ("metal", "amd64"), ("metal", "arm64")}
    for (flavour, arch), kernel in current.items():
        infix = "cloud-" if flavour == "cloud" else ""
        assert re.fullmatch(rf"6\.1\.0-\d+-{infix}{arch}", kernel), (flavour, arch, kernel)
    depends = output(["apt-cache", "show", "--no-all-versions", "linux-headers-amd64"])
    assert f"linux-headers-{current[('metal', 'amd64')]} " in depends
    units = {(u.kernel, u.arch, u.flavour) for u in m.units}
    assert {(k, a, f) for (f, a), k in current.items()} <= units


def test_version_mismatch_is_decided_from_the_resolved_driver_alone() -> None:
    from gl_nvidia.catalog.lock import ResolvedDriver
    from gl_nvidia.catalog.matrix import version_mismatch

    same = ResolvedDriver(branch="535", type="debian", version="535.309.01")
    assert version_mismatch(same) is None
    assert version_mismatch(same.model_copy(update={"open_version": "535.309.01"})) is None
    reason = version_mismatch(same.model_copy(update={"open_version": "535.261.03"}))
    assert reason is not None and "535.261.03" in reason and "535.309.01" in reason


def test_add_exclusion_keeps_comments_and_is_idempotent(tmp_path: Path) -> None:
    lock = tmp_path / "versions.yaml"
    shutil.copy(REPO / "versions.yaml", lock)
    before = lock.read_text()
    target = cell("1877.3", "6.12.44-cloud-amd64", "580.105.08")
    assert add_exclusion(lock, target, "nv-pci.c: too few arguments to function\nmore lines", module_type="open")
    assert not add_exclusion(lock, target, "nv-pci.c: too few arguments to function", module_type="open")
    after = lock.read_text()
    for line in before.splitlines():
        if line.lstrip().startswith("#"):
            assert line in after
    m = load_matrix(lock)
    (excl,) = [e for e in m.excluded if e.cell == target]
    assert excl.module_types == ("open",) and excl.reason == "nv-pci.c: too few arguments to function"
    unit = next(u for u in m.units if u.kernel == target.kernel and u.driver_version == target.driver_version)
    assert unit.module_types == ("proprietary",)


# --- update: changelog kinds, history, bad input ---------------------------------------------------------


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, apt_key: SigningKey,
            capsys: pytest.CaptureFixture[str]) -> Path:
    """A copy of the repository's lock and history plus editable copies of the snapshot sources, the apt
    repository signed with a throwaway key that GL_APT_KEYRING names; the lock updated from them."""
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path / "cache"))
    for name in ("versions.yaml", "versions-history.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(DATA, tmp_path / "src")
    sign_repo(tmp_path / "src" / "gl-apt", apt_key)
    monkeypatch.setenv("GL_APT_KEYRING", str(apt_key.keyring))
    monkeypatch.chdir(tmp_path)
    assert run_update(tmp_path) == 0  # the repository's lock predates the snapshot's older minors
    capsys.readouterr()
    return tmp_path


def run_update(workdir: Path, today: str = SNAPSHOT_DAY, *extra: str) -> int:
    s = workdir / "src"
    return cli("update", "--lock", str(workdir / "versions.yaml"), "--today", today,
               "--glrd", str(s / "glrd-releases-major.json"), "--glrd", str(s / "glrd-releases-minor.json"),
               "--nvidia", str(s / "nvidia-releases.json"), "--apt-repository", str(s / "gl-apt"), *extra)


def test_update_records_where_and_when_it_resolved(workdir: Path) -> None:
    """The lock says which sources its `resolved` block came from and on which day; the repository's
    own lock names the live GLRD and NVIDIA URLs that a plain `gl-nvidia update` reads."""
    resolved = read_lock(workdir / "versions.yaml")[0].resolved
    assert resolved is not None and str(resolved.today) == SNAPSHOT_DAY
    s = workdir / "src"
    assert resolved.sources is not None
    assert resolved.sources.model_dump() == {
        "glrd": [str(s / "glrd-releases-major.json"), str(s / "glrd-releases-minor.json")],
        "nvidia": str(s / "nvidia-releases.json"), "apt": str(s / "gl-apt")}
    lock = read_lock(REPO / "versions.yaml")[0]
    assert all(u.startswith("https://gardenlinux-glrd.") for u in lock.sources.glrd)
    assert lock.sources.nvidia == "https://docs.nvidia.com/datacenter/tesla/drivers/releases.json"
    assert lock.resolved is not None and lock.resolved.sources is not None  # the snapshot says it is one
    above = (REPO / "versions.yaml").read_text().split("\nresolved:")[0].splitlines()
    comment = " ".join(line for line in above[-8:] if line.startswith("#"))
    assert "resolved on 2026-11-20" in comment and "tests/data/catalog" in comment and "gl-nvidia update" in comment


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def add_gl_minor(workdir: Path, version: str, released: str, eol: str, like: str) -> None:
    def change(d: dict[str, Any]) -> None:
        template = next(r for r in d["releases"] if r["name"] == f"minor-{like}")
        new = copy.deepcopy(template)
        parts = [int(p) for p in version.split(".")]
        new["name"] = f"minor-{version}"
        new["version"] = dict(zip(("major", "minor", "patch"), parts, strict=False))
        new["lifecycle"] = {"released": {"isodate": released, "timestamp": 0}, "eol": {"isodate": eol, "timestamp": 0}}
        d["releases"].append(new)

    edit_json(workdir / "src" / "glrd-releases-minor.json", change)
    shutil.copytree(workdir / "src" / "gl-apt" / "dists" / like, workdir / "src" / "gl-apt" / "dists" / version)


def test_unchanged_sources_print_no_changes_and_leave_files_alone(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (workdir / "versions.yaml").read_bytes(), (workdir / "versions-history.yaml").read_bytes()
    assert run_update(workdir) == 0
    assert capsys.readouterr().out.strip() == "no changes"
    assert ((workdir / "versions.yaml").read_bytes(), (workdir / "versions-history.yaml").read_bytes()) == before


def test_driver_patch_release_and_gl_patch_release(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_json(workdir / "src" / "nvidia-releases.json", lambda d: d["580"]["driver_info"].insert(
        0, {"release_version": "580.105.10", "release_date": "2026-11-19"}))
    add_gl_minor(workdir, "2150.10.0", "2026-11-18", "2027-02-18", like="2150.9.0")
    assert run_update(workdir) == 0
    out = capsys.readouterr().out
    assert "- new GL patch release 2150.10.0" in out  # beside 2150.9.0: nodes move over one by one
    assert "- new driver patch release 580.105.10 (was 580.105.08)" in out
    assert len(out.strip().splitlines()) == 2
    text = (workdir / "versions.yaml").read_text()
    assert "version: 580.105.10" in text and "2150.10.0" in text
    assert "# Humans edit `policy` and `sources`" in text  # comments survive the rewrite
    history = read_history(history_path(workdir / "versions.yaml"))
    assert ("2150.10.0", "580.105.10") in {(e.os_version, e.driver_version) for e in history.entries}
    assert ("1877.3", "580.105.08") in {(e.os_version, e.driver_version) for e in history.entries}  # kept


def test_every_minor_in_maintenance_gets_images_unless_the_policy_says_otherwise(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = workdir / "versions.yaml"
    lock.write_text((REPO / "versions.yaml").read_text())  # resolved when only each major's newest minor got images
    assert run_update(workdir) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        f"- new GL patch release {v}" for v in ("1877.0", "1877.1", "1877.2", "2150.0.0", "2150.8.0")]
    resolved = read_lock(lock)[0].resolved
    assert resolved is not None
    assert [v.version for v in resolved.os_versions] == [
        "1877.0", "1877.1", "1877.2", "1877.3", "2150.0.0", "2150.8.0", "2150.9.0"]
    m = load_matrix(lock)
    assert (len(m.cells), len(m.units)) == (76, 64)  # 1877.0 and 1877.1 share a kernel: compiled once
    shared = next(u for u in m.units if u.kernel == "6.12.36-cloud-amd64" and u.driver_branch == "580")
    assert shared.os_versions == ("1877.0", "1877.1")
    assert cli("matrix", "--lock", str(lock), "--format", "github") == 0
    assert len(json.loads(capsys.readouterr().out)["include"]) == 64

    lock.write_text(lock.read_text().replace("  min_minor: []", "  min_minor: ['1877.3', '2150.8.0']")
                    .replace("  keep_minors: []", "  keep_minors: ['1877.1']"))
    assert run_update(workdir) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "- GL 1877.0, 1877.2 get no new images (policy)", "- GL 2150.0.0 gets no new images (policy)"]
    assert cli("versions", "--lock", str(lock), "--json") == 0
    current = {row["os_version"]: row["current"] for row in json.loads(capsys.readouterr().out)}
    assert current == {"1877.0": False, "1877.1": True, "1877.2": False, "1877.3": True,
                       "2150.0.0": False, "2150.8.0": True, "2150.9.0": True}


def test_new_branch_enters_the_top_three_and_the_oldest_drops_out(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_json(workdir / "src" / "nvidia-releases.json", lambda d: d.update({"590": {
        "type": "new feature branch", "driver_info": [{"release_version": "590.44.01", "release_date": "2026-11-18"}]}}))
    assert run_update(workdir, SNAPSHOT_DAY, "--json") == 0
    changes = json.loads(capsys.readouterr().out)["changes"]
    assert {(c["kind"], c["text"]) for c in changes} == {
        ("branch-added", "driver branch 590 (new feature branch) enters the top 3: 590.44.01"),
        ("branch-dropped", "driver branch 570 drops out (last 570.195.03)"),
    }


def test_gl_major_reaching_eol_and_a_new_major(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def new_major(d: dict[str, Any]) -> None:
        d["releases"].append({"name": "major-2222", "type": "major", "version": {"major": 2222}, "lifecycle": {
            "released": {"isodate": "2026-11-25", "timestamp": 0}, "extended": {"isodate": "2027-08-25", "timestamp": 0},
            "eol": {"isodate": "2027-11-25", "timestamp": 0}}})

    edit_json(workdir / "src" / "glrd-releases-major.json", new_major)
    add_gl_minor(workdir, "2222.0.0", "2026-11-25", "2027-11-25", like="2150.9.0")
    assert run_update(workdir, "2026-11-30") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        "- GL 2222 enters maintenance with 2222.0.0",
        "- GL 1877 reached end of maintenance (eol 2026-11-30): 1877.0, 1877.1, 1877.2, 1877.3 get no new images",
    ]
    assert run_update(workdir, "2026-11-30") == 0  # a second run finds nothing new
    assert capsys.readouterr().out.strip() == "no changes"


def test_kernel_override_replaces_the_repository_answer(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = workdir / "versions.yaml"
    lock.write_text(lock.read_text().replace(
        "  kernel_overrides: []",
        "  kernel_overrides:\n    - {os_version: '1877.3', flavour: cloud, arch: amd64, kernel: 6.12.45-cloud-amd64}"))
    assert run_update(workdir) == 0
    assert capsys.readouterr().out.strip() == "- kernel of 1877.3 cloud/amd64: 6.12.45-cloud-amd64 (was 6.12.44-cloud-amd64)"


def break_json(workdir: Path) -> None:
    (workdir / "src" / "nvidia-releases.json").write_text('{"580": {"type": "production branch", "driver_info": [')


def unknown_gl_version(workdir: Path) -> None:
    # A GL release with no apt repository suite: the kernel cannot be resolved.
    add_gl_minor(workdir, "2150.11.0", "2026-11-19", "2027-02-18", like="2150.9.0")
    shutil.rmtree(workdir / "src" / "gl-apt" / "dists" / "2150.11.0")


def unsigned_apt_repository(workdir: Path) -> None:
    for inrelease in (workdir / "src" / "gl-apt" / "dists").glob("*/InRelease"):
        inrelease.unlink()


def bad_pin(workdir: Path) -> None:
    lock = workdir / "versions.yaml"
    lock.write_text(lock.read_text().replace("  pins: []", "  pins: ['571.00.01']"))


def override_for_unknown_gl_version(workdir: Path) -> None:
    lock = workdir / "versions.yaml"
    lock.write_text(lock.read_text().replace(
        "  kernel_overrides: []",
        "  kernel_overrides:\n    - {os_version: '2150.99.0', flavour: cloud, arch: amd64, kernel: 6.12.99-cloud-amd64}"))


def bad_yaml(workdir: Path) -> None:
    lock = workdir / "versions.yaml"
    lock.write_text(lock.read_text().replace("  branches: 3", "  branches: [3"))


def bad_schema(workdir: Path) -> None:
    lock = workdir / "versions.yaml"
    lock.write_text(lock.read_text().replace("  branches: 3", "  branches: three"))


def bad_glrd(workdir: Path) -> None:
    (workdir / "src" / "glrd-releases-major.json").write_text('{"releases": [{"name": "major-1877"}]}')


def glrd_5000_digits(workdir: Path) -> None:
    path = workdir / "src" / "glrd-releases-major.json"
    path.write_text(path.read_text().replace('"major": 1877', '"major": ' + "9" * 5000, 1))


def glrd_deep(workdir: Path) -> None:
    (workdir / "src" / "glrd-releases-minor.json").write_text('{"releases": ' + "[" * 100_000 + "]" * 100_000 + "}")


def nvidia_version_of_5000_digits(workdir: Path) -> None:
    path = workdir / "src" / "nvidia-releases.json"
    data = json.loads(path.read_text())
    data["570"]["driver_info"][0]["release_version"] = "570." + "9" * 5000
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (glrd_5000_digits, r"GLRD data is not valid JSON: \S+glrd-releases-major\.json: Exceeds the limit \(4300 digits\)$"),
        (glrd_deep, r"GLRD data is not valid JSON: \S+glrd-releases-minor\.json: nested too deeply$"),
        (nvidia_version_of_5000_digits, r"NVIDIA releases\.json \S+: branch 570: driver_info\.0\.release_version: "
                                        r"Value error, '570\.9+' is not a driver version"),
        (break_json, r"NVIDIA releases\.json is not valid JSON: .*nvidia-releases\.json"),
        (bad_glrd, r"GLRD data .*glrd-releases-major\.json: releases\.0\.type: Field required"),
        (unknown_gl_version, r"no InRelease or Release in apt repository \S+/gl-apt/dists/2150\.11\.0/"),
        (unsigned_apt_repository, r"apt repository \S+/gl-apt/dists/[\d.]+/ is not signed"),
        (override_for_unknown_gl_version, r"policy names OS version 2150\.99\.0 \(kernel 6\.12\.99-cloud-amd64\), which the sources do not know"),
        (bad_pin, r"pinned driver 571\.00\.01 is in no branch of NVIDIA's releases\.json"),
        (bad_yaml, r"versions\.yaml: malformed YAML at line \d+"),
        (bad_schema, r"versions\.yaml: policy\.branches: Input should be a valid integer"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_versions_yaml_unchanged(
    workdir: Path, capsys: pytest.CaptureFixture[str], breaker: Any, message: str
) -> None:
    breaker(workdir)
    before = (workdir / "versions.yaml").read_bytes(), (workdir / "versions-history.yaml").read_bytes()
    assert run_update(workdir) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gl-nvidia: error:")]
    assert len(err) == 1 and re.search(message, err[0]), err
    assert ((workdir / "versions.yaml").read_bytes(), (workdir / "versions-history.yaml").read_bytes()) == before


def test_unreachable_source_leaves_versions_yaml_unchanged(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = (workdir / "versions.yaml").read_bytes()
    s_ = workdir / "src"
    code = cli("update", "--lock", "versions.yaml", "--today", SNAPSHOT_DAY,
               "--glrd", f"http://127.0.0.1:{port}/releases-major.json", "--glrd", str(s_ / "glrd-releases-minor.json"),
               "--nvidia", str(s_ / "nvidia-releases.json"), "--apt-repository", str(s_ / "gl-apt"))
    assert code == 2
    assert f"GLRD data unreachable: http://127.0.0.1:{port}/releases-major.json" in capsys.readouterr().err
    assert (workdir / "versions.yaml").read_bytes() == before


# --- commands on the bundled snapshot ---------------------------------------------------------------------


def test_matrix_json_on_the_bundled_snapshot_works_offline(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("GL_APT_REPOSITORY", raising=False)  # no source is read: the lock is resolved
    assert cli("matrix", "--profile", "gardenlinux", "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["cells"]) == 20 and len(data["excluded"]) == 4 and len(data["units"]) == 20
    assert data["cells"][0] == {"os_id": "gardenlinux", "os_version": "1877.3", "flavour": "cloud", "arch": "amd64",
                                "kernel": "6.12.44-cloud-amd64", "driver_version": "570.195.03", "driver_branch": "570"}
    assert data["excluded"][0]["reason"].startswith("kernel API change")


def test_matrix_github_format_is_a_strategy_matrix_of_build_units(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("matrix", "--lock", str(REPO / "versions.yaml"), "--format", "github") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line, for $GITHUB_OUTPUT
    include = json.loads(out)["include"]
    assert len(include) == 20
    assert all(isinstance(v, str) for row in include for v in row.values())
    assert {"kernel": "6.12.72-cloud-arm64", "driver_version": "580.105.08", "arch": "arm64"}.items() <= next(
        r for r in include if r["kernel"] == "6.12.72-cloud-arm64" and r["driver_branch"] == "580").items()


def test_versions_prints_the_support_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("versions", "--lock", str(REPO / "versions.yaml"), "--json") == 0
    table = json.loads(capsys.readouterr().out)
    assert table == [
        {"os_version": "2150.9.0", "driver_versions": ["580.105.08", "575.57.08"], "current": True},
        {"os_version": "1877.3", "driver_versions": ["580.105.08", "575.57.08", "570.195.03"], "current": True},
    ]


def test_versions_with_a_missing_or_malformed_lock_is_an_error(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("versions", "--lock", str(tmp_path / "versions.yaml")) == 2
    assert "lock file not found" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("policy: [\n")
    assert cli("versions", "--lock", str(tmp_path / "bad.yaml")) == 2
    assert "malformed YAML" in capsys.readouterr().err


def test_profile_and_lock_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("matrix", "--profile", "debian", "--lock", "versions.yaml") == 2
    assert "--profile and --lock exclude each other" in capsys.readouterr().err


def test_tables_in_a_log_keep_one_row_a_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Off a terminal (CI logs, `| tee`) a table is as wide as its rows: a reason once wrapped to one word a line."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("GL_APT_REPOSITORY", raising=False)
    assert cli("matrix", "--profile", "gardenlinux") == 0
    out = capsys.readouterr().out
    lock, _ = read_lock(REPO / "versions.yaml")
    reasons = {r.reason for r in lock.policy.exclusions}
    assert reasons and all(len(r) > 40 for r in reasons)
    for reason in reasons:
        assert any(reason in line for line in out.splitlines()), reason
    assert max(len(line) for line in out.splitlines()) > 80
