"""The arch record: its names agree with this machine's tools and real binaries, and an arch (or OS) that
has no record stops where it enters (CLI options, lock files, bundle manifests) with one line, exit 2,
nothing written."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest

from gl_nvidia import bundle as b
from gl_nvidia import elf
from gl_nvidia.arches import ARCHES, ARM64, BUILD, by_elf_machine, by_machine, check_arch, of_kernel
from gl_nvidia.cli import main
from tests.fixtures.cli import one_error, tree
from tests.fixtures.redist import PLATFORMS
from tests.fixtures.small_bundle import KERNELS, make_bundle, with_os

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_LOCK = ROOT / "tests" / "data" / "deploy" / "release-debian-lock.yaml"
ARM64_LIBC = Path("/usr/aarch64-linux-gnu/lib/libc.so.6")  # libc6-arm64-cross, as test_image_ldcache reads it


def _tool(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def test_the_build_machine_is_the_record_marked_so() -> None:
    """This machine is a build machine (CI's runner shape): dpkg and uname name the record marked as one."""
    assert [a for a in ARCHES.values() if a.build_machine] == [BUILD]
    assert _tool("dpkg", "--print-architecture") == BUILD.debian
    assert platform.machine() == _tool("uname", "-m") == BUILD.machine
    assert by_machine(platform.machine()) == BUILD


@pytest.mark.parametrize("name", sorted(ARCHES))
def test_gnu_names_are_dpkgs(name: str) -> None:
    """dpkg-architecture's own table: the GNU triplet and CPU (which is the kernel's uname -m) per Debian arch."""
    a = ARCHES[name]
    assert _tool("dpkg-architecture", f"-a{name}", "-qDEB_HOST_GNU_TYPE") == a.triplet
    assert _tool("dpkg-architecture", f"-a{name}", "-qDEB_HOST_GNU_CPU") == a.machine


def test_elf_machines_are_those_of_real_libraries() -> None:
    """The build machine's own libc and the arm64 cross libc the tests already read."""
    own = elf.dynamic(Path("/usr/lib") / BUILD.triplet / "libc.so.6")
    arm = elf.dynamic(ARM64_LIBC)
    assert own is not None and arm is not None
    assert (own.machine, arm.machine) == (BUILD.elf_machine, ARM64.elf_machine)
    assert (by_elf_machine(own.machine), by_elf_machine(arm.machine), by_elf_machine("EM_PPC64")) == (BUILD, ARM64, None)


def test_names_each_stage_reads() -> None:
    assert {a.redist for a in ARCHES.values()} == set(PLATFORMS)  # the redist tree's platform keys
    assert [of_kernel(k) for k in ("6.12.72-cloud-arm64", "6.1.0-56-amd64", "6.1.0", "6.1.0-arm64x")] == [
        ARM64, ARCHES["amd64"], None, None]
    assert check_arch("arm64") == "arm64"
    with pytest.raises(ValueError, match=r"'riscv64' is not an architecture gl-nvidia builds for \(amd64, arm64\)"):
        check_arch("riscv64")


def test_build_refuses_an_unknown_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["build", "--kernel", "6.1.0-56-riscv64", "--driver", "535.309.01", "--arch", "riscv64",
                 "--out", str(out)]) == 2
    one_error(capsys.readouterr().err, "'riscv64' is not one of 'amd64', 'arm64'")
    assert not out.exists()


@pytest.mark.parametrize(("old", "new", "words"), [
    ("arches: [amd64]", "arches: [amd64, riscv64]", "policy.arches.1: Value error, 'riscv64' is not an architecture"),
    ("module_type: open", "module_type: open\n      arch: riscv64",
     "policy.exclusions.0.arch: Value error, 'riscv64' is not an architecture"),
    ("arch: amd64, kernel", "arch: riscv64, kernel", "Value error, 'riscv64' is not an architecture"),
    ("id: debian", "id: ubuntu", "os.id: Value error, gl-nvidia has no OS profile for 'ubuntu'"),
], ids=["policy arch", "exclusion arch", "resolved kernel arch", "os id"])
@pytest.mark.parametrize("command", [["matrix", "--lock"], ["values", "--lock"], ["build", "--all", "--profile"]])
def test_a_lock_naming_an_unknown_arch_or_os_is_one_error_line(old: str, new: str, words: str, command: list[str],
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "versions.yaml"
    text = DEBIAN_LOCK.read_text()
    assert old in text
    lock.write_text(text.replace(old, new, 1))
    before = tree(tmp_path)
    assert main([*command, str(lock)]) == 2
    one_error(capsys.readouterr().err, words)
    assert tree(tmp_path) == before and lock.read_text() == text.replace(old, new, 1)


@pytest.fixture(scope="module")
def riscv_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle whose manifest names an arch without a record (as a newer gl-nvidia might write one)."""
    bundle = make_bundle(tmp_path_factory.mktemp("riscv"))
    manifest = bundle / b.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "arch": "riscv64"}))
    return bundle


@pytest.mark.parametrize("args", [
    ["image", "{bundle}", "--kernel", KERNELS[0], "--out", "{tmp}/out"],
    # the registry base would be pulled (for the bundle's arch) before the bundle's files were read
    ["image", "{bundle}", "--kernel", KERNELS[0], "--base", "registry.invalid/base:1", "--out", "{tmp}/out"],
    ["image", "{bundle}", "--all", "--gardenlinux-repo", "http://127.0.0.1:9/gl", "--gl-version", "1877.3",
     "--out", "{tmp}/out"],
    ["check-modules", "{bundle}", "--kernel-headers", "{tmp}"],
], ids=["image", "image --base", "image --gardenlinux-repo", "check-modules"])
def test_a_bundle_of_an_unknown_arch_is_one_error_line(args: list[str], riscv_bundle: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(riscv_bundle)
    assert main([a.format(bundle=riscv_bundle, tmp=tmp_path) for a in args]) == 2
    one_error(capsys.readouterr().err, "'riscv64' is not an architecture gl-nvidia builds for (amd64, arm64)")
    assert tree(tmp_path) == [] and tree(riscv_bundle) == before


def test_an_unknown_os_id_is_one_error_line_where_it_enters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`image --os-id` of a bundle that records no OS, and a node's os-release for `resolve`."""
    old = with_os(make_bundle(tmp_path / "old"), None)
    before = tree(tmp_path)
    assert main(["image", str(old), "--kernel", KERNELS[0], "--os-id", "ubuntu", "--gl-version", "24.04",
                 "--out", str(tmp_path / "out")]) == 2
    one_error(capsys.readouterr().err, "gl-nvidia has no OS profile for 'ubuntu'")
    assert tree(tmp_path) == before
    os_release = tmp_path / "os-release"
    os_release.write_text('ID=ubuntu\nVERSION_ID="24.04"\n')
    assert main(["resolve", "--os-release", str(os_release), "--kernel", "6.8.0-1-generic",
                 "--lock", str(DEBIAN_LOCK)]) == 2
    one_error(capsys.readouterr().err, "gl-nvidia has no OS profile for 'ubuntu'")
