"""arm64 cross-compiled on this amd64 machine for real: Debian's arm64 headers and nvidia-kernel-source, this
machine's kbuild programs, the aarch64-linux-gnu- toolchain, the gate on aarch64 ELF, the split relinked.

Cold (empty cache) the `arm64_bundle` fixture compiles once (about 4 minutes on 2 idle cores); warm, nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from gl_nvidia import bundle as b
from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.fs import sha256_file
from gl_nvidia.modbuild import AptEnv, DebianSource, DirEnv, build_unit
from gl_nvidia.modbuild.abi import gate_files, read_module
from gl_nvidia.modbuild.kenv import KernelHeaders, compiler_mismatch, host_toolchain, make_argv
from gl_nvidia.modbuild.split import link, linker_version
from tests.fixtures.arm64 import ARM64_KERNEL, ARM64_UNIT
from tests.fixtures.bundle import DEBIAN_DRIVER, DEBIAN_KERNEL

CROSS_LD = "aarch64-linux-gnu-ld"


def _machine(path: Path) -> str:
    with path.open("rb") as fh:
        return str(ELFFile(fh)["e_machine"])


def test_arm64_headers_run_this_machines_kbuild_and_the_cross_compiler(arm64_headers: KernelHeaders) -> None:
    """Debian's arm64 headers name arm64 kbuild programs; the private tree holds this machine's (x86_64) ones,
    and the compiler checked against the kernel's is the cross gcc make runs."""
    assert (arm64_headers.arch, arm64_headers.cross_compile) == ("arm64", "aarch64-linux-gnu-")
    for prog in ("scripts/basic/fixdep", "scripts/mod/modpost.real-lsb-64"):
        assert _machine(arm64_headers.sysout / prog) == "EM_X86_64", prog
    assert arm64_headers.kernel_compiler.startswith("gcc-12 (Debian 12.2.0")  # built natively on arm64
    assert arm64_headers.cc == "aarch64-linux-gnu-gcc-12"
    toolchain = AptEnv().toolchain(arm64_headers)
    assert toolchain.startswith("aarch64-linux-gnu-gcc-12 (Debian 12.2.0")
    argv = make_argv(arm64_headers, Path("/t"), 2)
    assert argv[-4:] == ["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-", "CC=aarch64-linux-gnu-gcc-12", "modules"]
    # The cross prefix alone is no mismatch; another compiler version is, named as the cross gcc.
    assert compiler_mismatch(f"aarch64-linux-gnu-{arm64_headers.kernel_compiler}", arm64_headers.kernel_compiler,
                             "aarch64-linux-gnu-") is None
    note = compiler_mismatch("aarch64-linux-gnu-gcc-12 (Debian 12.2.0-1) 12.2.0", arm64_headers.kernel_compiler,
                             "aarch64-linux-gnu-")
    assert note is not None and "building with 'aarch64-linux-gnu-gcc-12 (Debian 12.2.0-1)" in note
    assert host_toolchain("gcc-12") != toolchain  # the host compiler would have been the wrong one


@pytest.mark.slow
def test_arm64_bundle_holds_gated_aarch64_modules(arm64_bundle: Path, arm64_headers: KernelHeaders) -> None:
    m = b.BundleManifest.load(arm64_bundle)
    assert (m.driver_version, m.arch, m.source) == (DEBIAN_DRIVER, "arm64", "debian")
    kb = m.kernels[ARM64_KERNEL]
    assert kb.toolchain.startswith("aarch64-linux-gnu-gcc-12 ") and kb.kernel_compiler.startswith("gcc-12 ")
    ms = kb.module_sets["proprietary"]
    assert (ms.status, ms.source_version, ms.error) == ("ok", DEBIAN_DRIVER, None)
    assert ms.abi_gate is not None and ms.abi_gate.ok
    d = b.modules_dir(arm64_bundle, ARM64_KERNEL, "proprietary")
    assert {"nvidia.ko", "nvidia-uvm.ko", "nvidia-modeset.ko", "nvidia-drm.ko"} <= {mod.name for mod in ms.modules}
    for mod in ms.modules:
        assert mod.vermagic == f"{ARM64_KERNEL} SMP mod_unload modversions aarch64"  # the arch tag ends it
        assert read_module(d / mod.name).machine == "EM_AARCH64"
        assert sha256_file(d / mod.name) == mod.sha256 and mod.size < mod.size_unstripped
    assert gate_files([d / mod.name for mod in ms.modules], arm64_headers.sysout).ok
    # NVIDIA's prebuilt object and the userspace are arm64's too.
    assert _machine(b.binaries_dir(arm64_bundle, "proprietary") / "nv-kernel.o") == "EM_AARCH64"
    lib = f"usr/lib/aarch64-linux-gnu/libcuda.so.{DEBIAN_DRIVER}"
    assert lib in {f.path for f in m.userspace}
    assert _machine(b.userspace_dir(arm64_bundle) / lib) == "EM_AARCH64"
    assert _machine(b.userspace_dir(arm64_bundle) / "usr/bin/nvidia-smi") == "EM_AARCH64"


@pytest.mark.slow
def test_arm64_split_relinks_to_the_gated_module_with_a_cross_ld(arm64_bundle: Path, arm64_headers: KernelHeaders,
                                                                tmp_path: Path) -> None:
    """6.1 arm64 runs no objtool: nvidia.ko and nvidia-modeset.ko ship as interface + NVIDIA object, and the recipe
    (aarch64 emulation included) run by another aarch64 `ld` gives the sha256 the build gated."""
    ms = b.BundleManifest.load(arm64_bundle).kernels[ARM64_KERNEL].module_sets["proprietary"]
    split = [m for m in ms.modules if m.parts is not None]
    assert {m.name for m in split} == {"nvidia.ko", "nvidia-modeset.ko"}
    iface = b.interfaces_dir(arm64_bundle, ARM64_KERNEL, "proprietary")
    binaries = b.binaries_dir(arm64_bundle, "proprietary")
    for m in split:
        assert m.parts is not None and m.parts.objtool is None
        assert m.parts.linker == linker_version(CROSS_LD)
        assert "-maarch64elf" in m.parts.ld_flags and "-EL" in m.parts.ld_flags
        out = link(m.parts, m.parts.paths(str(iface), str(binaries)), tmp_path / m.name, CROSS_LD)
        assert sha256_file(out) == m.sha256
    assert gate_files([tmp_path / m.name for m in split], arm64_headers.sysout).ok


@pytest.mark.slow
def test_the_gate_refuses_modules_of_the_other_architecture_in_one_line(
        arm64_bundle: Path, debian_bundle: Path, arm64_headers: KernelHeaders, debian_headers: KernelHeaders,
        capsys: pytest.CaptureFixture[str]) -> None:
    for bundle, kernel, headers, found, want in (
            (arm64_bundle, ARM64_KERNEL, debian_headers, "aarch64", "amd64 (x86_64)"),
            (debian_bundle, DEBIAN_KERNEL, arm64_headers, "x86_64", "arm64 (aarch64)")):
        assert main(["check-modules", str(bundle), "--kernel-headers", str(headers.sysout), "--json"]) == 1
        (verdict,) = json.loads(capsys.readouterr().out)
        assert (verdict["kernel"], verdict["ok"]) == (kernel, False)
        (problem,) = verdict["problems"]
        assert problem.startswith("nvidia")
        assert f": {found} ELF, but kernel {headers.kernel} is {want}: modules of another architecture never load" \
            in problem


def test_a_unit_whose_headers_are_another_architectures_is_refused_before_compiling(
        arm64_headers: KernelHeaders, tmp_path: Path) -> None:
    unit = dataclasses.replace(ARM64_UNIT, arch="amd64")
    with pytest.raises(UserError, match=f"the headers of {ARM64_KERNEL} are for an arm64 kernel, but the unit is amd64"):
        build_unit(unit, tmp_path / "out", source=DebianSource(), env=DirEnv(arm64_headers.sysout),
                   module_types=("proprietary",))
    assert not (tmp_path / "out").exists()
