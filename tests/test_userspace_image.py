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


@pytest.fixture(scope="module")
def rootfs(debian_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("userspace-image")
    image = build_images(debian_bundle, None, out / "layout", options=ImageOptions(os_id="debian", os_versions=("12",)))[0]
    subprocess.run(["umoci", "unpack", "--image", f"{out / 'layout'}:{image.tags[0]}", out / "b"], check=True,
                   capture_output=True)
    return out / "b/rootfs"


def _cache(root: Path) -> dict[str, str]:
    """soname -> path, as the loader reads the image's cache (the build machine's ldconfig -p, amd64)."""
    listing = subprocess.run(["ldconfig", "-p", "-C", root / "etc/ld.so.cache"], check=True, capture_output=True,
                             text=True).stdout
    return {m[1]: m[2] for m in re.finditer(r"^\t(\S+) \(libc6,x86-64\) => (\S+)$", listing, re.M)}


def test_every_cache_entry_names_a_file_the_image_has(rootfs: Path) -> None:
    cache = _cache(rootfs)
    assert "libnvidia-nvvm.so.4" in cache and "libEGL_nvidia.so.0" in cache
    for soname, path in cache.items():
        assert unpack.host_path(rootfs, unpack.resolve_in_root(rootfs, path, follow=True)).is_file(), soname


def test_every_nvidia_elf_resolves_each_dt_needed_through_the_images_cache(rootfs: Path, debian_bundle: Path) -> None:
    cache = _cache(rootfs)
    manifest = BundleManifest.load(debian_bundle)
    elves = 0
    for f in manifest.userspace:
        if f.link is not None:
            continue
        dyn = ldcache.dynamic(unpack.host_path(rootfs, unpack.resolve_in_root(rootfs, PurePosixPath("/") / f.path)))
        if dyn is None:
            continue
        elves += 1
        unresolved = set(dyn.needed) - set(cache) - WORKLOADS_OWN
        assert not unresolved, f"{f.path} needs {sorted(unresolved)}"
    assert elves > 30
