"""The built image's driver userspace links, from Debian's packages (amd64, arm64) and from a .run
(amd64): every DT_NEEDED of every NVIDIA ELF resolves through the image's own /etc/ld.so.cache, and
every cache entry names a file the image has."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from gl_nvidia import bundle as b
from gl_nvidia import elf
from gl_nvidia.arches import ARCHES
from gl_nvidia.bundle import BundleManifest
from gl_nvidia.image import unpack
from gl_nvidia.image.assemble import ImageOptions, build_images
from gl_nvidia.modbuild import DebianSource, capabilities
from gl_nvidia.modbuild.nvidia import NvidiaRunSource
from gl_nvidia.modbuild.unit import _copy_tree
from tests.fixtures import runfile
from tests.fixtures.bundle import DEBIAN_DRIVER

pytestmark = pytest.mark.slow  # real images of the real Debian bundles (amd64, arm64 cross-compiled)

# What the graphics ICDs and libnvidia-fbc link against but the workload brings: the toolkit mounts the
# driver's files into a container that has its own X11 client libraries and GLVND loaders (libGL, libEGL).
WORKLOADS_OWN = {"libX11.so.6", "libXext.so.6", "libGL.so.1", "libEGL.so.1"}


def _with_run_userspace(bundle: Path, dest: Path, arch: str) -> Path:
    """A copy of Debian's real bundle whose userspace and firmware are what the nvidia source lays out of a
    makeself .run of Debian's files of the same version (tests/fixtures/runfile.py); the modules stay."""
    shutil.copytree(bundle, dest, symlinks=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GL_NVIDIA_CACHE", str(dest.parent / "cache"))  # 1.2 GB unpacked: out of the shared cache
        inputs = NvidiaRunSource(str(runfile.debian_run(dest.parent, DEBIAN_DRIVER, arch))).prepare(DEBIAN_DRIVER, arch)
        shutil.rmtree(b.userspace_dir(dest))
        shutil.rmtree(b.firmware_dir(dest))
        userspace, firmware = _copy_tree(inputs.userspace, b.userspace_dir(dest)), _copy_tree(inputs.firmware, b.firmware_dir(dest))
    shutil.rmtree(dest.parent / "cache")
    manifest = dataclasses.replace(BundleManifest.load(dest), source="nvidia", source_digests=inputs.digests,
                                   userspace=userspace, firmware=firmware)
    (dest / b.MANIFEST).write_text(manifest.to_json())
    return dest


@pytest.fixture(scope="module", params=[("debian", "amd64"), ("debian", "arm64"), ("nvidia", "amd64")],
                ids=["debian-amd64", "debian-arm64", "run-amd64"])
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """(arch, bundle, the image's root filesystem as umoci unpacks it) for Debian's real 535 bundle, and for
    the same with the userspace laid out from a .run."""
    source, arch = request.param
    bundle: Path = request.getfixturevalue("debian_bundle" if arch == "amd64" else "arm64_bundle")
    out = tmp_path_factory.mktemp("userspace-image")
    if source == "nvidia":
        bundle = _with_run_userspace(bundle, out / "run" / "bundle", arch)
    built = build_images(bundle, None, out / "layout", options=ImageOptions(os_id="debian", os_versions=("12",)))[0]
    subprocess.run(["umoci", "unpack", "--image", f"{out / 'layout'}:{built.tags[0]}", out / "b"], check=True,
                   capture_output=True)
    yield arch, bundle, out / "b/rootfs"
    shutil.rmtree(out)


def _cache(root: Path, arch: str) -> dict[str, str]:
    """soname -> path, as the loader reads the image's cache (the build machine's ldconfig -p reads either arch's)."""
    listing = subprocess.run(["ldconfig", "-p", "-C", root / "etc/ld.so.cache"], check=True, capture_output=True,
                             text=True).stdout
    flags = {"amd64": "libc6,x86-64", "arm64": "libc6,AArch64"}[arch]
    return {m[1]: m[2] for m in re.finditer(rf"^\t(\S+) \({flags}\) => (\S+)$", listing, re.M)}


def test_every_cache_entry_names_a_file_the_image_has(image: tuple[str, Path, Path]) -> None:
    arch, _, rootfs = image
    cache = _cache(rootfs, arch)
    assert "libnvidia-nvvm.so.4" in cache and "libEGL_nvidia.so.0" in cache
    for soname, path in cache.items():
        assert unpack.host_path(rootfs, unpack.resolve_in_root(rootfs, path, follow=True)).is_file(), soname


def test_every_nvidia_elf_resolves_each_dt_needed_through_the_images_cache(image: tuple[str, Path, Path]) -> None:
    arch, bundle, rootfs = image
    cache = _cache(rootfs, arch)
    manifest = BundleManifest.load(bundle)
    elves = 0
    for f in manifest.userspace:
        if f.link is not None:
            continue
        dyn = elf.dynamic(unpack.host_path(rootfs, unpack.resolve_in_root(rootfs, PurePosixPath("/") / f.path)))
        if dyn is None:
            continue
        assert dyn.machine == ARCHES[arch].elf_machine, f.path
        elves += 1
        unresolved = set(dyn.needed) - set(cache) - WORKLOADS_OWN
        assert not unresolved, f"{f.path} needs {sorted(unresolved)}"
    assert elves > 30


def test_every_toolkit_name_is_in_the_image_or_reported_with_why(image: tuple[str, Path, Path]) -> None:
    """What the build reported missing (DriverInputs.lacks, one warning each) is exactly what the image lacks."""
    arch, _, rootfs = image
    lacks = DebianSource().prepare(DEBIAN_DRIVER, arch).lacks
    assert set(capabilities.missing(rootfs, ARCHES[arch].triplet, "")) == set(lacks)
    assert all(why for why in lacks.values())
