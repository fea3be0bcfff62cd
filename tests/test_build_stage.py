"""The build stage end to end on the debian profile: open modules, a real failing cell, the cache, the
CLI table, --exclude-failed, and the gate against another kernel series.

Cold this compiles the open tree for the oldest 6.1 ABI (about 2.5 min) and DEBIAN_KERNEL (fails after about 1 min)
and the proprietary set for the oldest (about 2.5 min); warm, nothing compiles.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from gl_nvidia import bundle as b
from gl_nvidia.catalog.kernels import kernel_sort_key
from gl_nvidia.catalog.lock import resolved_to_yaml
from gl_nvidia.catalog.matrix import load_lock, profile_text
from gl_nvidia.catalog.refresh import refresh
from gl_nvidia.cli import main
from gl_nvidia.modbuild import (
    AptEnv,
    DebianSource,
    KernelHeaders,
    UnitResult,
    build_all,
    build_unit,
)
from tests.fixtures.bundle import (
    DEBIAN_DRIVER,
    DEBIAN_KERNEL,
    DEBIAN_UNIT,
    OPEN_OK_KERNEL,
    OPEN_OK_UNIT,
)

pytestmark = pytest.mark.slow  # real compiles of the open and proprietary trees


@pytest.fixture(scope="session")
def headers_612() -> KernelHeaders:
    env = AptEnv()
    names = [p.name for p in env.repo("amd64").search(r"linux-headers-6\.12\.\d+\+deb12-cloud-amd64")]
    assert names, "Debian's archive serves 6.12 cloud headers for bookworm"
    kernel = max((n.removeprefix("linux-headers-") for n in names), key=kernel_sort_key)
    return env.headers(kernel, "amd64")


def test_open_modules_build_for_a_kernel_they_support(open_bundle: tuple[Path, list[UnitResult]]) -> None:
    bundle_dir, results = open_bundle
    assert results[0].ok
    ms = b.BundleManifest.load(bundle_dir).kernels[OPEN_OK_KERNEL].module_sets["open"]
    assert ms.status == "ok" and ms.source_version == "535.261.03"
    assert ms.abi_gate is not None and ms.abi_gate.ok
    nvidia = next(m for m in ms.modules if m.name == "nvidia.ko")
    assert nvidia.vermagic.startswith(f"{OPEN_OK_KERNEL} SMP ")
    # Built with the kernel's debug flags: stripping is what makes the open nvidia.ko shippable.
    assert nvidia.size_unstripped > 100_000_000 and nvidia.size < 20_000_000
    assert (b.modules_dir(bundle_dir, OPEN_OK_KERNEL, "open") / "nvidia.ko").stat().st_size == nvidia.size


def test_open_modules_fail_cleanly_on_a_kernel_that_changed_the_api(
        open_bundle: tuple[Path, list[UnitResult]]) -> None:
    bundle_dir, results = open_bundle
    outcome = results[1].outcomes["open"]
    assert not results[1].ok
    assert outcome.status == "failed" and outcome.error is not None
    assert "pci_resize_resource" in outcome.error and ": error:" in outcome.error
    assert outcome.log == bundle_dir / "logs" / f"{DEBIAN_KERNEL}-open.log"
    manifest = b.BundleManifest.load(bundle_dir)
    ms = manifest.kernels[DEBIAN_KERNEL].module_sets["open"]
    assert (ms.status, ms.modules, ms.abi_gate) == ("failed", (), None)
    assert "pci_resize_resource" in (bundle_dir / str(ms.log)).read_text()
    assert not b.modules_dir(bundle_dir, DEBIAN_KERNEL, "open").exists()
    # The kernel that did build is untouched by the failure.
    assert manifest.kernels[OPEN_OK_KERNEL].module_sets["open"].status == "ok"


def test_gate_says_61_modules_do_not_load_on_612(debian_bundle: Path, headers_612: KernelHeaders,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["check-modules", str(debian_bundle), "--kernel-headers", str(headers_612.sysout), "--json"])
    captured = capsys.readouterr()
    assert rc == 1  # the check ran and said no; bad input is 2
    assert "would not load on the kernel" in captured.err
    (verdict,) = json.loads(captured.out)
    assert (verdict["kernel"], verdict["module_type"], verdict["ok"]) == (DEBIAN_KERNEL, "proprietary", False)
    problems = "\n".join(verdict["problems"])
    assert f"nvidia.ko: vermagic '{DEBIAN_KERNEL} SMP" in problems and f"{headers_612.kernel} SMP" in problems
    assert "CRC" in problems or "is not exported" in problems


def test_gate_says_the_bundle_loads_on_its_own_kernel(debian_bundle: Path, debian_headers: KernelHeaders,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-modules", str(debian_bundle), "--kernel-headers", str(debian_headers.sysout)]) == 0
    assert "yes" in capsys.readouterr().out


def test_second_build_of_an_unchanged_unit_compiles_nothing(debian_bundle: Path, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (Path(debian_bundle).parent).rglob("*")}
    results = build_all([DEBIAN_UNIT], tmp_path, source=DebianSource(), env_for=lambda u: AptEnv(),
                        module_types=("proprietary",))
    (r,) = results
    assert r.ok and r.outcomes["proprietary"].cached and r.outcomes["proprietary"].cell == "cached"
    assert r.bundle == tmp_path / f"{DEBIAN_DRIVER}-amd64"
    fresh = b.BundleManifest.load(r.bundle).kernels[DEBIAN_KERNEL].module_sets["proprietary"]
    assert fresh == b.BundleManifest.load(debian_bundle).kernels[DEBIAN_KERNEL].module_sets["proprietary"]
    assert before == {p: p.stat().st_mtime_ns for p in (Path(debian_bundle).parent).rglob("*")}


def _profile_building_open(path: Path) -> Path:
    """The debian profile resolved now, with the open source's version treated as the driver's, so the
    matrix asks for the open modules (which fail on DEBIAN_KERNEL) instead of excluding them."""
    yaml = YAML()
    doc = yaml.load(profile_text("debian"))
    resolved = refresh(load_lock("debian"), date.today())
    drivers = [d.model_copy(update={"open_version": None}) for d in resolved.drivers]
    # The fixtures' two kernels, whichever is the archive's current one today.
    kernels = [resolved.kernels[0].model_copy(update={"kernel": k}) for k in (OPEN_OK_KERNEL, DEBIAN_KERNEL)]
    doc["resolved"] = resolved_to_yaml(resolved.model_copy(update={"drivers": drivers, "kernels": kernels}))
    # Only cells the other fixtures compile: a proprietary build for OPEN_OK_KERNEL would cost minutes and
    # prove nothing the DEBIAN_KERNEL one does not.
    doc["policy"]["exclusions"] = [{"module_type": "proprietary", "kernel": f"=={OPEN_OK_KERNEL}",
                                    "reason": "the tests' compile budget"}]
    with path.open("w") as fh:
        yaml.dump(doc, fh)
    return path


def test_build_all_reports_failed_cells_and_excludes_them(
        open_bundle: tuple[Path, list[UnitResult]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    lock = _profile_building_open(tmp_path / "versions.yaml")
    out = tmp_path / "bundles"
    argv = ["build", "--all", "--profile", str(lock), "--out", str(out)]
    rc = main([*argv, "--exclude-failed"])
    captured = capsys.readouterr()
    assert rc == 1 and "1 of 2 build unit(s) failed" in captured.err
    table = captured.out
    assert DEBIAN_KERNEL in table and OPEN_OK_KERNEL in table
    assert "failed" in table and "pci_resize_resource" in table
    # Debian packages no fabric manager, IMEX or nvlsm: lines under the table, not silent gaps in the image
    assert (f"{DEBIAN_DRIVER}-amd64: left out fabricmanager: no fabric manager for {DEBIAN_DRIVER} in Debian"
            in " ".join(table.split()))
    assert f"{DEBIAN_DRIVER}-amd64: left out nvlsm: Debian packages no nvlsm" in " ".join(table.split())
    rules = YAML(typ="safe").load(lock.read_text())["policy"]["exclusions"]
    assert len(rules) == 2  # the test's own, and the failed cell's
    assert rules[1]["module_type"] == "open" and rules[1]["kernel"] == f"=={DEBIAN_KERNEL}"
    assert "pci_resize_resource" in rules[1]["reason"]
    # With the cell excluded the same matrix builds, entirely from the cache.
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    cells = {(r["unit"]["kernel"], t): m for r in rows for t, m in r["modules"].items()}
    assert set(cells) == {(DEBIAN_KERNEL, "proprietary"), (OPEN_OK_KERNEL, "open")}
    assert all(m["status"] == "ok" and m["cached"] for m in cells.values())
    assert {r["left_out"]["fabricmanager"] for r in rows} == {
        f"no fabric manager for {DEBIAN_DRIVER} in Debian (the archive's nvidia-fabricmanager: no such package)"}
    manifest = b.BundleManifest.load(out / f"{DEBIAN_DRIVER}-amd64")
    assert sorted(manifest.kernels) == sorted([DEBIAN_KERNEL, OPEN_OK_KERNEL])


def test_keep_debug_ships_unstripped_copies_beside_the_bundle(
        open_bundle: tuple[Path, list[UnitResult]], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    r = build_unit(OPEN_OK_UNIT, out, source=DebianSource(), env=AptEnv(), module_types=("open",), keep_debug=True)
    assert r.ok and r.outcomes["open"].cached  # debug copies are cached with the build: no recompile
    ms = b.BundleManifest.load(out).kernels[OPEN_OK_KERNEL].module_sets["open"]
    debug = b.debug_dir(out, OPEN_OK_KERNEL, "open")
    assert sorted(p.name for p in debug.iterdir()) == sorted(m.name for m in ms.modules)
    assert all((debug / m.name).stat().st_size == m.size_unstripped for m in ms.modules)
    # Without --keep-debug the bundle has no debug/ at all.
    assert not (open_bundle[0] / "debug").exists()


def test_parallel_units_share_one_bundle(open_bundle: tuple[Path, list[UnitResult]], tmp_path: Path) -> None:
    # Two units at once write two kernels into the same bundle; the bundle lock keeps both, the failed
    # cell's record too (the open modules the fixture compiled: -47 builds, -56 fails).
    results = build_all([DEBIAN_UNIT, OPEN_OK_UNIT], tmp_path, source=DebianSource(), env_for=lambda u: AptEnv(),
                        jobs=2, module_types=("open",))
    assert [r.ok for r in results] == [False, True]
    assert {r.bundle for r in results} == {tmp_path / f"{DEBIAN_DRIVER}-amd64"}
    manifest = b.BundleManifest.load(tmp_path / f"{DEBIAN_DRIVER}-amd64")
    assert sorted(manifest.kernels) == sorted([DEBIAN_KERNEL, OPEN_OK_KERNEL])
    assert manifest.kernels[DEBIAN_KERNEL].module_sets["open"].status == "failed"
    assert (b.modules_dir(tmp_path / f"{DEBIAN_DRIVER}-amd64", OPEN_OK_KERNEL, "open") / "nvidia.ko").is_file()
