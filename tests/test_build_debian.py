"""The debian profile for real: Debian's NVIDIA packages and kernel headers, real compiles, real gate.

Cold (empty cache) this compiles proprietary for DEBIAN_KERNEL (about 2.5 min on 2 idle cores) and open for
OPEN_OK_KERNEL and DEBIAN_KERNEL (about 2.5 min and 1 min); warm, everything comes from the build cache.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from gl_nvidia import bundle as b
from gl_nvidia.fs import sha256_file
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit
from gl_nvidia.modbuild.abi import gate_files, read_module
from gl_nvidia.modbuild.kenv import KernelHeaders
from gl_nvidia.modbuild.split import link, linker_version
from tests.fixtures.bundle import DEBIAN_DRIVER, DEBIAN_KERNEL, DEBIAN_UNIT

pytestmark = pytest.mark.slow  # real compiles of Debian's NVIDIA sources (the build cache makes them warm)


def test_debian_bundle_holds_gated_stripped_proprietary_modules(debian_bundle: Path,
                                                                 debian_headers: KernelHeaders) -> None:
    m = b.BundleManifest.load(debian_bundle)
    assert (m.driver_version, m.driver_branch, m.arch, m.source) == (DEBIAN_DRIVER, "535", "amd64", "debian")
    kb = m.kernels[DEBIAN_KERNEL]
    assert kb.toolchain == kb.kernel_compiler == "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
    ms = kb.module_sets["proprietary"]
    assert (ms.status, ms.source_version, ms.error) == ("ok", DEBIAN_DRIVER, None)
    assert ms.abi_gate is not None and ms.abi_gate.ok
    names = {mod.name for mod in ms.modules}
    assert {"nvidia.ko", "nvidia-uvm.ko", "nvidia-modeset.ko", "nvidia-drm.ko"} <= names
    d = b.modules_dir(debian_bundle, DEBIAN_KERNEL, "proprietary")
    assert sorted(p.name for p in d.iterdir()) == sorted(names)
    for mod in ms.modules:
        assert mod.vermagic == f"{DEBIAN_KERNEL} SMP preempt mod_unload modversions "
        assert sha256_file(d / mod.name) == mod.sha256 and (d / mod.name).stat().st_size == mod.size
        assert mod.size < mod.size_unstripped  # debug info stripped from what ships
    uvm = next(mod for mod in ms.modules if mod.name == "nvidia-uvm.ko")
    assert uvm.size * 5 < uvm.size_unstripped
    # The gate, run again from the shipped files: they load on the kernel they were built for.
    assert gate_files([d / mod.name for mod in ms.modules], debian_headers.sysout).ok
    assert "nvidia.ko" in (debian_bundle / str(ms.log)).read_text()


def test_debian_bundle_userspace_is_a_root_relative_tree(debian_bundle: Path) -> None:
    m = b.BundleManifest.load(debian_bundle)
    root = b.userspace_dir(debian_bundle)
    paths = {f.path: f for f in m.userspace}
    lib = "usr/lib/x86_64-linux-gnu"
    for want in ("usr/bin/nvidia-smi", "usr/bin/nvidia-modprobe", f"{lib}/libcuda.so.{DEBIAN_DRIVER}",
                 f"{lib}/libnvidia-ml.so.{DEBIAN_DRIVER}", f"{lib}/libnvidia-ptxjitcompiler.so.{DEBIAN_DRIVER}"):
        assert want in paths and (root / want).is_file(), want
        assert sha256_file(root / want) == paths[want].sha256
    assert paths[f"{lib}/libcuda.so.1"].link == f"libcuda.so.{DEBIAN_DRIVER}"
    assert os.readlink(root / lib / "libnvidia-ml.so.1") == f"libnvidia-ml.so.{DEBIAN_DRIVER}"
    assert os.access(root / "usr/bin/nvidia-smi", os.X_OK)
    # nvidia-modprobe is setuid root in Debian's package; the bundle keeps that.
    assert paths["usr/bin/nvidia-modprobe"].mode & stat.S_ISUID
    assert (root / "usr/share/doc/nvidia-smi/copyright").is_file()
    firmware = {f.path for f in m.firmware}
    assert {f"nvidia/{DEBIAN_DRIVER}/gsp_tu10x.bin", f"nvidia/{DEBIAN_DRIVER}/gsp_ga10x.bin"} <= firmware
    assert all((b.firmware_dir(debian_bundle) / p).is_file() for p in firmware)


def test_nvidia_ships_split_and_links_from_its_parts_like_kbuild(debian_bundle: Path, debian_headers: KernelHeaders,
                                                                tmp_path: Path) -> None:
    """nvidia.ko and nvidia-modeset.ko: a per-kernel interface + NVIDIA's kernel-independent object, linked with
    the kernel's modfinal recipe into exactly the module the gate passed; the others ship whole."""
    ms = b.BundleManifest.load(debian_bundle).kernels[DEBIAN_KERNEL].module_sets["proprietary"]
    mods = {m.name: m for m in ms.modules}
    assert {n for n, m in mods.items() if m.parts} == {"nvidia.ko", "nvidia-modeset.ko"}
    nvidia = mods["nvidia.ko"]
    assert nvidia.parts is not None and nvidia.parts.binary == "nv-kernel.o"
    assert nvidia.parts.ld_flags[:3] == ("-r", "-m", "elf_x86_64") and "--build-id=sha1" in nvidia.parts.ld_flags
    assert nvidia.parts.linker == linker_version()
    # the kernel-independent object is most of the module; the interface is small
    assert nvidia.parts.interface_size * 20 < nvidia.parts.binary_size
    # kbuild's own modules (unstripped, from the build cache) to compare the links with
    debug = tmp_path / "debug-bundle"
    assert build_unit(DEBIAN_UNIT, debug, source=DebianSource(), env=AptEnv(), module_types=("proprietary",),
                      keep_debug=True).ok
    linked = []
    for m in ms.modules:
        if m.parts is None:
            linked.append(b.modules_dir(debian_bundle, DEBIAN_KERNEL, "proprietary") / m.name)
            continue
        iface = b.interfaces_dir(debian_bundle, DEBIAN_KERNEL, "proprietary")
        binary = b.binaries_dir(debian_bundle, "proprietary") / m.parts.binary
        assert sha256_file(binary) == m.parts.binary_sha256 and sha256_file(iface / m.parts.interface) == m.parts.interface_sha256
        out = link(m.parts, m.parts.paths(str(iface), str(binary.parent)), tmp_path / m.name)
        # the same linker gives the same bytes: what the node links is what the build gated and recorded
        assert sha256_file(out) == m.sha256 == sha256_file(b.modules_dir(debian_bundle, DEBIAN_KERNEL, "proprietary") / m.name)
        ours, kbuild = read_module(out), read_module(b.debug_dir(debug, DEBIAN_KERNEL, "proprietary") / m.name)
        assert (ours.vermagic, ours.srcversion, ours.undefined, ours.versions) == (
            kbuild.vermagic, kbuild.srcversion, kbuild.undefined, kbuild.versions)
        linked.append(out)
    assert gate_files(linked, debian_headers.sysout).ok


def test_a_wrong_interface_binary_pairing_fails_the_gate_and_the_checksum(debian_bundle: Path,
                                                                         debian_headers: KernelHeaders,
                                                                         tmp_path: Path) -> None:
    ms = b.BundleManifest.load(debian_bundle).kernels[DEBIAN_KERNEL].module_sets["proprietary"]
    nvidia = next(m for m in ms.modules if m.name == "nvidia.ko")
    assert nvidia.parts is not None
    iface = b.interfaces_dir(debian_bundle, DEBIAN_KERNEL, "proprietary")
    # nvidia's interface with nvidia-modeset's binary object
    paths = nvidia.parts.paths(str(iface), str(b.binaries_dir(debian_bundle, "proprietary")))
    out = link(nvidia.parts, replace(paths, binary=paths.binary.replace("nv-kernel.o", "nv-modeset-kernel.o")),
               tmp_path / "nvidia.ko")
    assert sha256_file(out) != nvidia.sha256
    verdict = gate_files([out], debian_headers.sysout)
    assert not verdict.ok
    assert any(p.startswith("nvidia.ko: symbol rm_") and p.endswith(f"is not exported by {DEBIAN_KERNEL}")
               for p in verdict.problems), verdict.problems[:5]
