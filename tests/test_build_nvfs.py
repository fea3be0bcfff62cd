"""nvidia-fs (GPUDirect Storage) built per kernel from Debian's nvidia-fs-dkms and gated against the kernel
and the nvidia.ko built beside it.

The slow tests reuse the other fixtures' module sets (nothing more of NVIDIA's is compiled): the open
535.261.03 modules for OPEN_OK_KERNEL (test_build_stage's `open_bundle`) and the proprietary 535.309.01 ones for
DEBIAN_KERNEL (`debian_bundle`). Cold, nvidia-fs 2.13.5 compiles once per kernel in about 35-50 s on 2 cores
(its configure probes the kernel with some twenty test builds); warm it comes from the build cache.
The fast tests give the gate the shapes of the other cases: linked nvidia_p2p_* (nvidia-fs >= 2.17.1), older
kernels, a CRC of another nvidia.ko.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gl_nvidia import apt
from gl_nvidia import bundle as b
from gl_nvidia.fs import sha256_file
from gl_nvidia.modbuild import DebianSource, UnitResult, build_unit
from gl_nvidia.modbuild.abi import KernelAbi, ModuleElf, check_bundle, read_module
from gl_nvidia.modbuild.compile import CompiledSet
from gl_nvidia.modbuild.kenv import AptEnv, DirEnv, KernelHeaders, KmodbuildEnv
from gl_nvidia.modbuild.nvfs import (
    GDRCOPY_LEFT_OUT,
    Export,
    NvidiaExports,
    add_to_sets,
    gate_nvfs,
    gpl_only_symbols,
    kernel_version,
    source,
    symbol_get_gpl_only,
    symbol_get_names,
    upstream_version,
)
from gl_nvidia.modbuild.sources import ModuleSource
from tests.fixtures.bundle import DEBIAN_KERNEL, DEBIAN_UNIT, OPEN_OK_KERNEL, OPEN_OK_UNIT

P2P = ("nvidia_p2p_dma_map_pages", "nvidia_p2p_dma_unmap_pages", "nvidia_p2p_free_dma_mapping",
       "nvidia_p2p_free_page_table", "nvidia_p2p_get_pages", "nvidia_p2p_put_pages")


@pytest.mark.slow
def test_nvidia_fs_ships_in_the_open_set_it_passed_the_gate_with(open_bundle: tuple[Path, list[UnitResult]]) -> None:
    bundle_dir, results = open_bundle
    assert results[0].ok
    manifest = b.BundleManifest.load(bundle_dir)
    ms = manifest.kernels[OPEN_OK_KERNEL].module_sets["open"]
    nvfs = next(m for m in ms.modules if m.name == "nvidia-fs.ko")
    ko = b.modules_dir(bundle_dir, OPEN_OK_KERNEL, "open") / "nvidia-fs.ko"
    assert sha256_file(ko) == nvfs.sha256 and ko.stat().st_size == nvfs.size
    assert nvfs.vermagic == f"{OPEN_OK_KERNEL} SMP preempt mod_unload modversions "
    assert nvfs.size < 300_000 < 2_000_000 < nvfs.size_unstripped  # stripped like NVIDIA's modules
    assert read_module(ko).modinfo["version"] == "2.13.5"
    assert ms.abi_gate is not None and ms.abi_gate.ok
    assert ("nvidia-fs.ko: binds with symbol_get 6 nvidia_p2p_* symbol(s) of nvidia.ko (license 'Dual MIT/GPL'), "
            f"exported with EXPORT_SYMBOL_GPL; kernel {OPEN_OK_KERNEL} is Linux 6.1.") in "\n".join(ms.abi_gate.evidence)
    # 2.13.5 links nothing of NVIDIA's: it asks __symbol_get for nvidia_p2p_* on the first open of /dev/nvidia-fs*
    elf = read_module(ko)
    assert "__symbol_get" in elf.undefined and not {s for s in elf.undefined if s.startswith("nvidia")}
    assert symbol_get_names(ko) == set(P2P)
    # the kernel's own gate (check-modules) passes the set, nvidia-fs.ko with it
    headers = AptEnv().headers(OPEN_OK_KERNEL, "amd64")
    assert check_bundle(bundle_dir, headers.sysout)[(OPEN_OK_KERNEL, "open")].ok
    assert manifest.left_out["gdrcopy"] == GDRCOPY_LEFT_OUT and not [k for k in manifest.left_out if "nvidia-fs" in k]


@pytest.mark.slow
def test_nvidia_fs_is_left_out_beside_proprietary_modules_with_the_kernels_reason(debian_bundle: Path) -> None:
    manifest = b.BundleManifest.load(debian_bundle)
    assert manifest.left_out[f"nvidia-fs {DEBIAN_KERNEL}"] == (
        f"nvidia-fs 2.13.5: proprietary: ABI gate: nvidia-fs.ko: binds {', '.join(P2P)} with "
        "symbol_get, which Linux 6.1.192 refuses for exports that are not EXPORT_SYMBOL_GPL, and nvidia.ko "
        "(license 'NVIDIA') exports them with EXPORT_SYMBOL: GDS needs the open kernel modules")
    ms = manifest.kernels[DEBIAN_KERNEL].module_sets["proprietary"]
    assert ms.status == "ok" and "nvidia-fs.ko" not in {m.name for m in ms.modules}
    assert not (b.modules_dir(debian_bundle, DEBIAN_KERNEL, "proprietary") / "nvidia-fs.ko").exists()


@pytest.mark.slow
def test_a_bundle_keeps_each_kernels_reason_when_another_kernel_is_added(tmp_path: Path) -> None:
    """One bundle, two units: DEBIAN_KERNEL's reason stays when OPEN_OK_KERNEL (which ships nvidia-fs) is built after it."""
    out = tmp_path / "bundle"
    for unit, types in ((DEBIAN_UNIT, ("proprietary",)), (OPEN_OK_UNIT, ("open",))):
        assert build_unit(unit, out, source=DebianSource(), env=AptEnv(), module_types=types).ok
    left = b.BundleManifest.load(out).left_out
    assert left[f"nvidia-fs {DEBIAN_KERNEL}"].startswith("nvidia-fs 2.13.5: proprietary: ABI gate: ")
    assert f"nvidia-fs {OPEN_OK_KERNEL}" not in left


# --- the gate on the other shapes (no compile) ------------------------------------------------------------

KERNEL = "6.12.117+deb12-cloud-amd64"
VERMAGIC = f"{KERNEL} SMP preempt mod_unload modversions "
ABI = KernelAbi(KERNEL, VERMAGIC, {"filp_open": 0x11, "bio_add_page": 0x22, "__symbol_get": 0x33}, "amd64")
GPL_ONLY = frozenset({"bio_add_page", "__symbol_get"})
OPEN = NvidiaExports({s: Export(0x1000 + i, True) for i, s in enumerate(P2P)}, "Dual MIT/GPL")
PROPRIETARY = NvidiaExports({s: Export(0x1000 + i, False) for i, s in enumerate(P2P)}, "NVIDIA")


def _linked(crcs: dict[str, int]) -> ModuleElf:
    """nvidia-fs >= 2.17.1: nvidia_p2p_* linked (their CRCs in __versions, from nv.symvers)."""
    return ModuleElf("nvidia-fs.ko", {"vermagic": VERMAGIC}, frozenset({"filp_open", "bio_add_page", *P2P}),
                     frozenset(), {"filp_open": 0x11, "bio_add_page": 0x22, **crcs}, "EM_X86_64")


def test_linked_p2p_with_the_open_modules_passes() -> None:
    verdict = gate_nvfs(_linked({s: e.crc for s, e in OPEN.exports.items() if e.crc}), frozenset(), ABI,
                        (6, 12, 117), GPL_ONLY, OPEN)
    assert verdict.ok, verdict.problems
    assert verdict.evidence[-1] == ("nvidia-fs.ko: links 6 nvidia_p2p_* symbol(s) of nvidia.ko (license 'Dual MIT/GPL'), "
                                    f"exported with EXPORT_SYMBOL_GPL; kernel {KERNEL} is Linux 6.12.117")


def test_linked_p2p_of_a_proprietary_module_with_gpl_only_kernel_symbols_is_refused() -> None:
    verdict = gate_nvfs(_linked({s: e.crc for s, e in PROPRIETARY.exports.items() if e.crc}), frozenset(), ABI,
                        (6, 12, 117), GPL_ONLY, PROPRIETARY)
    assert verdict.problems == (
        f"nvidia-fs.ko: links {', '.join(P2P)} of the proprietary nvidia.ko (license 'NVIDIA') and uses GPL-only "
        "kernel symbols (bio_add_page, ...): the kernel refuses such a module: GDS needs the open kernel modules",)


def test_a_p2p_crc_of_another_nvidia_ko_is_refused() -> None:
    crcs = {s: e.crc for s, e in OPEN.exports.items() if e.crc}
    verdict = gate_nvfs(_linked({**crcs, "nvidia_p2p_get_pages": 0xDEAD}), frozenset(), ABI, (6, 12, 117), GPL_ONLY, OPEN)
    assert verdict.problems == (
        f"nvidia-fs.ko: symbol nvidia_p2p_get_pages CRC 0x0000dead != kernel's {OPEN.exports['nvidia_p2p_get_pages'].crc:#010x}",)


def test_symbol_get_of_non_gpl_exports_passes_only_before_the_kernel_refused_it() -> None:
    m = ModuleElf("nvidia-fs.ko", {"vermagic": VERMAGIC}, frozenset({"filp_open", "__symbol_get"}), frozenset(),
                  {"filp_open": 0x11, "__symbol_get": 0x33}, "EM_X86_64")
    assert gate_nvfs(m, frozenset(P2P), ABI, (6, 1, 51), GPL_ONLY, PROPRIETARY).ok
    (problem,) = gate_nvfs(m, frozenset(P2P), ABI, (6, 1, 52), GPL_ONLY, PROPRIETARY).problems
    assert "with symbol_get, which Linux 6.1.52 refuses for exports that are not EXPORT_SYMBOL_GPL" in problem
    assert gate_nvfs(m, frozenset(P2P), ABI, (6, 12, 117), GPL_ONLY, OPEN).ok
    (missing,) = gate_nvfs(m, frozenset({"nvidia_p2p_get_pages_v2"}), ABI, (6, 1, 51), GPL_ONLY, OPEN).problems
    assert missing == ("nvidia-fs.ko: asks for nvidia_p2p_get_pages_v2 with symbol_get, which nvidia.ko "
                       "(license 'Dual MIT/GPL') does not export")


@pytest.mark.parametrize(("version", "refused"), [((5, 15, 200), False), ((6, 1, 51), False), ((6, 1, 52), True),
                                                  ((6, 4, 15), True), ((6, 5, 1), False), ((6, 6, 0), True),
                                                  ((6, 12, 0), True)])
def test_which_kernels_refuse_symbol_get_of_non_gpl_exports(version: tuple[int, int, int], refused: bool) -> None:
    assert symbol_get_gpl_only(version) is refused


def test_a_new_nvidia_fs_dkms_is_an_input_of_every_debian_unit() -> None:
    """release rebuilds a unit when Debian uploads another nvidia-fs-dkms (its sha256 is in the checksums)."""
    sums = DebianSource().checksums("535.309.01", "amd64")
    (deb,) = [name for name in sums if name.startswith("nvidia-fs-dkms_")]
    assert deb.endswith("_amd64.deb") and len(sums[deb]) == 64


def test_where_nvidia_fs_cannot_be_built_the_bundle_says_why(tmp_path: Path) -> None:
    nvidia = b.ModuleFile("nvidia.ko", "0" * 64, 1, 1, VERMAGIC, "x")
    cs = CompiledSet(tmp_path, "open", "550.163.01", "ok", (nvidia,), b.AbiGate(True), None, True)
    src = {"open": ModuleSource("open", "550.163.01", tmp_path, "0" * 64)}
    hdrs = KernelHeaders(KERNEL, tmp_path, tmp_path, "0" * 64, "gcc-12", "amd64")
    sets, left = add_to_sets({"open": cs}, src, hdrs, KmodbuildEnv("1877.3"), "gcc-12", None, jobs=1)
    assert sets == {"open": cs} and left == {
        "gdrcopy": GDRCOPY_LEFT_OUT, f"nvidia-fs {KERNEL}": "built only with --env apt or dir (this unit: --env kmodbuild)"}
    _, left = add_to_sets({"open": cs}, src, hdrs, DirEnv(tmp_path), "gcc-12", None, jobs=1)
    assert left[f"nvidia-fs {KERNEL}"] == "no apt repository to take nvidia-fs-dkms from"
    # bookworm packages it for amd64 only
    arm64 = apt.AptRepo([s for s in apt.system_sources() if s.suite.startswith("bookworm")], arch="arm64")
    assert source(arm64) == f"no nvidia-fs-dkms for arm64 in {arm64.describe()}"


def test_the_kernels_version_and_gpl_only_exports_from_its_headers(debian_headers: KernelHeaders) -> None:
    version = kernel_version(debian_headers.sysout)  # Debian's 6.1.0-56 is Linux 6.1.<sublevel>
    assert version[:2] == (6, 1) and symbol_get_gpl_only(version)
    gpl = gpl_only_symbols(debian_headers.sysout)
    assert "__symbol_get" in gpl and "filp_open" not in gpl


def test_upstream_version_of_debians_package() -> None:
    assert upstream_version("2.13.5~11.8.0-5~deb12u1") == "2.13.5"
    assert upstream_version("2.19.7~12.4.1-2") == "2.19.7"
