"""The driver userspace from NVIDIA's `.run` (laid out from its `.manifest`) and from Debian's packages:
the same libraries under the same sonames, the ICD files where NVIDIA installs them, the toolkit's
capability lists reported against it; a hostile `.manifest` is one line and nothing written."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gl_nvidia import elf
from gl_nvidia.arches import ARCHES
from gl_nvidia.errors import IntegrityError, UserError
from gl_nvidia.image import ldcache
from gl_nvidia.modbuild import DebianSource, DirSource
from gl_nvidia.modbuild import capabilities as caps
from gl_nvidia.modbuild.nvidia import NvidiaRunSource
from tests.fixtures import runfile
from tests.fixtures.bundle import DEBIAN_DRIVER
from tests.fixtures.fuzz import SEED, mutate

LIB = f"usr/lib/{ARCHES['amd64'].triplet}"
# NVIDIA's own sonames that are not `.so.1`: a naming rule gets each of them wrong.
NOT_SO1 = {"libnvidia-nvvm.so.4", "libEGL_nvidia.so.0", "libGLX_nvidia.so.0", "libGLESv2_nvidia.so.2"}
ICD_FILES = ("etc/OpenCL/vendors/nvidia.icd", "etc/vulkan/icd.d/nvidia_icd.json",
             "etc/vulkan/implicit_layer.d/nvidia_layers.json", "usr/share/glvnd/egl_vendor.d/10_nvidia.json")


def _libraries(root: Path, arch: str) -> dict[str, str | None]:
    """Every name in the library directories -> the DT_SONAME of the file it is (or names)."""
    lib = root / "usr/lib" / ARCHES[arch].triplet
    found: dict[str, str | None] = {}
    for d in (lib, lib / "vdpau"):
        for p in d.iterdir():
            if p.name.startswith("lib") and p.resolve().is_file():
                dyn = elf.dynamic(p.resolve())
                assert dyn is not None and dyn.machine == ARCHES[arch].elf_machine, p
                found[p.relative_to(lib).as_posix()] = dyn.soname
    return found


@pytest.fixture(params=["amd64", "arm64"])
def debian_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One arch's installer, and a cache of its own for what is unpacked of it (1.2 GB, removed afterwards)."""
    d = tmp_path_factory.mktemp("run")
    yield request.param, runfile.debian_run(d, DEBIAN_DRIVER, request.param)
    shutil.rmtree(d)


def test_run_and_debian_lay_out_the_same_libraries_under_the_same_sonames(debian_run: tuple[str, Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    arch, run_file = debian_run
    from_deb = DebianSource().prepare(DEBIAN_DRIVER, arch)
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(run_file.parent / "cache"))  # out of the shared cache
    from_run = NvidiaRunSource(str(run_file)).prepare(DEBIAN_DRIVER, arch)
    run_libs, deb_libs = _libraries(from_run.userspace, arch), _libraries(from_deb.userspace, arch)
    assert run_libs == deb_libs
    sonames = {s for s in run_libs.values() if s}
    assert sonames >= NOT_SO1 and "vdpau/libvdpau_nvidia.so.1" in run_libs
    assert from_run.lacks == {k: v.replace(f"no Debian package of driver {DEBIAN_DRIVER} carries it",
                                           f"driver {DEBIAN_DRIVER}'s .manifest lists no such file")
                              for k, v in from_deb.lacks.items()}
    lib = f"usr/lib/{ARCHES[arch].triplet}"
    for root in (from_run.userspace, from_deb.userspace):
        # the loader finds every library under its soname (one without: its own name) in its own directory
        for name, soname in _libraries(root, arch).items():
            soname = soname or Path(name).name
            d = (root / lib / name).parent
            assert (d / soname).resolve() == (root / lib / name).resolve(), name
        for f in ICD_FILES:
            assert (root / f).is_file(), f
        assert (root / "usr/share/nvidia/nvoptix.bin").is_file()
        for tool in ("nvidia-smi", "nvidia-debugdump", "nvidia-bug-report.sh", "nvidia-cuda-mps-control",
                     "nvidia-cuda-mps-server", "nvidia-modprobe"):
            assert os.access(root / "usr/bin" / tool, os.X_OK), tool
    assert sorted(p.name for p in (from_run.firmware / "nvidia" / DEBIAN_DRIVER).iterdir()) == \
        sorted(p.name for p in (from_deb.firmware / "nvidia" / DEBIAN_DRIVER).iterdir())


def test_the_capability_report_names_each_missing_toolkit_file_with_why() -> None:
    inputs = DebianSource().prepare(DEBIAN_DRIVER, "amd64")
    gaps = inputs.lacks
    why = f"no Debian package of driver {DEBIAN_DRIVER} carries it"
    # 535 has no gpucomp (545+) nor tileiras; NSCQ and fabric manager are NVIDIA's, not Debian's
    for name in ("compute: libnvidia-gpucomp.so", "compute: libnvidia-tileiras.so", "utility: libnvidia-nscq.so",
                 "utility: nv-fabricmanager"):
        assert gaps[name] == why
    listed = {f"{c}: {n}" for c, lists in caps.toolkit_lists().items() for n in lists["libraries"] + lists["binaries"]}
    assert set(gaps) < listed
    for present in ("compute: libcuda.so", "compute: libnvidia-nvvm.so", "video: libnvidia-encode.so",
                    "video: libvdpau_nvidia.so", "graphics: libEGL_nvidia.so", "ngx: libnvidia-ngx.so",
                    "compute: nvidia-cuda-mps-server", "utility: nvidia-debugdump"):
        assert present not in gaps


def _tree(tmp_path: Path, entries: list[str], files: dict[str, bytes | str]) -> Path:
    """An unpacked installer: `files` name -> bytes, or a symlink's target."""
    tree = tmp_path / "driver"
    (tree / "kernel").mkdir(parents=True)
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            (tree / name).symlink_to(data)
        else:
            (tree / name).write_bytes(data)
    (tree / ".manifest").write_text(runfile.manifest_text("999.1.2", "amd64", entries))
    return tree


LIBFOO: dict[str, bytes | str] = {"libfoo.so.999.1.2": runfile.tiny_elf("libfoo.so.1")}


@pytest.mark.parametrize(("entries", "files", "message"), [
    (["../outside 0755 UTILITY_BINARY"], {}, r"\.\./outside is outside the unpacked installer"),
    (["libfoo.so.999.1.2 0755 UTILITY_LIB NATIVE", "libfoo.so.1 0777 UTILITY_LIB_SYMLINK NATIVE libfoo.so.999.1.2",
      "libbar.so.1 0777 UTILITY_LIB_SYMLINK NATIVE ../../../../etc/shadow"], LIBFOO,
     r"the link usr/lib/x86_64-linux-gnu/libbar\.so\.1 points to '\.\./\.\./\.\./\.\./etc/shadow', out of the image's root"),
    (["tool 0755 NVIDIA_MODPROBE /usr/../../bin"], {"tool": b"#!/bin/sh\n"}, r"tool goes to '/usr/\.\./\.\./bin'"),
    (["libfoo.so.999.1.2 0755 UTILITY_LIB NATIVE", "libfoo.so.2 0777 UTILITY_LIB_SYMLINK NATIVE libfoo.so.999.1.2"],
     LIBFOO, r"libfoo\.so\.999\.1\.2 has DT_SONAME libfoo\.so\.1, but the manifest declares no link libfoo\.so\.1"),
    (["libfoo.so.999.1.2 0755 CUDA_LIB NATIVE /"], {"libfoo.so.999.1.2": b"not an ELF"}, r"is no amd64 ELF shared library"),
    (["libfoo.so.999.1.2 0755 UTILITY_LIB NATIVE"], {"libfoo.so.999.1.2": "/etc/hostname"}, r"libfoo\.so\.999\.1\.2 is not a regular file inside the unpacked installer"),
], ids=["file-outside", "link-out-of-root", "path-outside", "soname-disagrees", "not-elf", "file-is-a-link"])
def test_a_hostile_manifest_is_one_line_and_nothing_written(entries: list[str], files: dict[str, bytes | str], message: str,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path / "cache"))
    tree = _tree(tmp_path, entries, files)
    with pytest.raises(IntegrityError, match=message) as exc:
        DirSource(tree).prepare("999.1.2", "amd64")
    assert exc.value.exit_code == 2 and "\n" not in str(exc.value)
    assert not any((tmp_path / "cache/build/driver").iterdir())


def test_links_and_sonames_come_from_the_manifest_and_the_elf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A soname that is not `.so.1` is linked as the manifest declares it, and ld.so.cache finds it there."""
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path / "cache"))
    tree = _tree(tmp_path, [
        "libnvidia-nvvm.so.999.1.2 0755 CUDA_LIB NATIVE /",
        "libnvidia-nvvm.so.4 0777 CUDA_SYMLINK NATIVE / libnvidia-nvvm.so.999.1.2",
        "libnvidia-glcore.so.999.1.2 0755 OPENGL_LIB NATIVE",
        "libnvidia-glcore.so.999.1.2 0755 OPENGL_LIB COMPAT32",
        "nvidia_icd.json 0644 VULKAN_ICD_JSON icd.d",
    ], {"libnvidia-nvvm.so.999.1.2": runfile.tiny_elf("libnvidia-nvvm.so.4"),
        "libnvidia-glcore.so.999.1.2": runfile.tiny_elf("libnvidia-glcore.so.999.1.2"),
        "nvidia_icd.json": b"{}"})
    root = DirSource(tree).prepare("999.1.2", "amd64").userspace
    assert os.readlink(root / LIB / "libnvidia-nvvm.so.4") == "libnvidia-nvvm.so.999.1.2"
    assert not (root / LIB / "libnvidia-nvvm.so.1").exists()
    assert (root / "etc/vulkan/icd.d/nvidia_icd.json").is_file()
    entries = {e.soname: e.path for e in ldcache.entries(root, "amd64")}
    assert entries["libnvidia-nvvm.so.4"] == f"/{LIB}/libnvidia-nvvm.so.4"
    assert entries["libnvidia-glcore.so.999.1.2"] == f"/{LIB}/libnvidia-glcore.so.999.1.2"
    for path in entries.values():
        assert (root / path.lstrip("/")).exists()



def test_a_fuzzed_manifest_is_laid_out_or_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutations of a valid .manifest (bytes flipped, lines dropped or repeated, hostile values): a layout,
    or a UserError (exit 2) with nothing written; never another exception."""
    entries = ["libfoo.so.999.1.2 0755 CUDA_LIB NATIVE /", "libfoo.so.1 0777 CUDA_SYMLINK NATIVE / libfoo.so.999.1.2",
               "tool 0755 UTILITY_BINARY", "nvidia_icd.json 0644 VULKAN_ICD_JSON icd.d",
               "firmware/gsp_x.bin 0644 FIRMWARE INHERIT_PATH_DEPTH:1"]
    tree = _tree(tmp_path, entries, {**LIBFOO, "tool": b"#!/bin/sh\n", "nvidia_icd.json": b"{}",
                                     "firmware/gsp_x.bin": b"fw"})
    seed = (tree / ".manifest").read_bytes()
    rng = random.Random(SEED)
    for i in range(60):
        cache = tmp_path / f"cache{i}"
        monkeypatch.setenv("GL_NVIDIA_CACHE", str(cache))
        (tree / ".manifest").write_bytes(mutate(rng, seed))
        try:
            DirSource(tree).prepare("", "amd64")
        except UserError as exc:
            assert exc.exit_code == 2 and "\n" not in exc.message
            assert not (cache / "build/driver").exists() or not any((cache / "build/driver").iterdir())
