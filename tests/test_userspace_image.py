"""The built image's driver userspace links: every DT_NEEDED of every NVIDIA ELF resolves through the
image's own /etc/ld.so.cache, and every cache entry names a file the image has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from gl_nvidia.bundle import BundleManifest
from gl_nvidia.image import ldcache, unpack
from gl_nvidia.image.build import ImageOptions, build_images

# What the graphics ICDs and libnvidia-fbc link against but the workload brings: the toolkit mounts the
# driver's files into a container that has its own X11 client libraries and GLVND loaders (libGL, libEGL).
WORKLOADS_OWN = {"libX11.so.6", "libXext.so.6", "libGL.so.1", "libEGL.so.1"}


@pytest.fixture(scope="module", params=["amd64", "arm64"])
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(arch, bundle, the image's root filesystem as umoci unpacks it) for Debian's real 535 bundle."""
    arch = request.param
    bundle: Path = request.getfixturevalue("debian_bundle" if arch == "amd64" else "arm64_bundle")
    out = tmp_path_factory.mktemp("userspace-image")
    built = build_images(bundle, None, out / "layout", options=ImageOptions(os_id="debian", os_versions=("12",)))[0]
    subprocess.run(["umoci", "unpack", "--image", f"{out / 'layout'}:{built.tags[0]}", out / "b"], check=True,
                   capture_output=True)
    return arch, bundle, out / "b/rootfs"


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
        dyn = ldcache.dynamic(unpack.host_path(rootfs, unpack.resolve_in_root(rootfs, PurePosixPath("/") / f.path)))
        if dyn is None:
            continue
        assert dyn.machine == ldcache.ARCHES[arch][0], f.path
        elves += 1
        unresolved = set(dyn.needed) - set(cache) - WORKLOADS_OWN
        assert not unresolved, f"{f.path} needs {sorted(unresolved)}"
    assert elves > 30
