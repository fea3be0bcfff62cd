"""A real IBT kernel: boot Debian's 6.12 cloud kernel in qemu with the real driver image as initramfs.

The image is built from the real 6.12 bundle (tests/fixtures/ibt.py): per kernel it holds the build's
patches, not nvidia.ko, and no objtool. Inside the guest the image's own `nvidia-driver` rebuilds nvidia.ko
from NVIDIA's binary object and the patch (what kbuild's ld, objtool and ld made at build time), checks it
is the gated module (sha256) and inserts it: the kernel accepts it ("No NVIDIA GPU found").
On the next 6.12 ABI the same image is refused before any module is inserted. Software emulation (TCG), as
in test_node_qemu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gl_nvidia.node.imagefiles import Image

from .fixtures.bundle import DEBIAN_DRIVER
from .fixtures.ibt import ibt_kernels
from .fixtures.images import unpacked_image
from .fixtures.qemu import boot, make_initramfs

pytestmark = pytest.mark.slow  # qemu boots of the IBT kernels


@pytest.fixture(scope="module")
def ibt_rootfs(ibt_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rootfs, built = unpacked_image(ibt_bundle, ibt_kernels().built, tmp_path_factory.mktemp("node-qemu-ibt"))
    assert built.tags[0] == f"535-{ibt_kernels().built.replace('+', '_')}-debian12"
    assert built.layers[-1].name.startswith("modules ") and built.layers[-1].size < 5_000_000  # the per-kernel layer
    return rootfs


@pytest.fixture(scope="module")
def ibt_initramfs(ibt_rootfs: Path) -> Path:
    return make_initramfs(ibt_rootfs)


def test_ibt_image_holds_the_patches_and_no_objtool(ibt_rootfs: Path) -> None:
    kernel = ibt_kernels().built
    image = Image.load(ibt_rootfs)
    assert (image.kernels(), image.module_types(kernel)) == ([kernel], ["proprietary"])
    patched = image.patched_module(kernel, "proprietary", "nvidia")
    assert patched is not None and image.split_module(kernel, "proprietary", "nvidia") is None
    assert not image.ko(kernel, "proprietary", "nvidia").exists()
    # what the node rebuilds it from is what the manifest names; nothing of the kernel's toolchain ships
    assert {i.path for i in image.inputs(kernel, "proprietary", "nvidia")} == {patched.patch, patched.binary}
    image.verify(kernel, "proprietary", "nvidia")
    here = ibt_rootfs / f"usr/lib/gl-nvidia/modules/{kernel}/proprietary"
    assert sorted(p.name for p in here.iterdir()) == [
        "nvidia-drm.ko", "nvidia-modeset.patch", "nvidia-peermem.ko", "nvidia-uvm.ko", "nvidia.patch"]


def test_the_node_rebuilds_the_module_from_its_patch_and_the_ibt_kernel_accepts_it(ibt_initramfs: Path) -> None:
    kernel = ibt_kernels().built
    b = boot(kernel, ibt_initramfs)
    rc, out = b.steps["check-load"]
    assert rc == 0, out
    # rebuilt in the guest from the binary and the patch, byte for byte the module the build gated
    assert (f'msg="module rebuilt from its patch" module=nvidia type=proprietary '
            f'path=/run/gl-nvidia/modules/{kernel}/proprietary/nvidia.ko sha256="the build\'s"') in out
    assert "check-load: ABI OK, no GPU on this machine" in out
    assert f"kernel={kernel} type=proprietary version={DEBIAN_DRIVER}" in out
    assert "NVRM: No NVIDIA GPU found" in out  # the kernel's own words, from its log
    rc, out = b.steps["init"]
    assert rc == 1 and "nvidia-driver: error: no NVIDIA GPU on this node" in out
    assert "nvidia" not in b.steps["modules"][1]


def test_an_image_for_one_ibt_abi_is_refused_on_the_next_before_any_insmod(ibt_initramfs: Path) -> None:
    built, upgraded = ibt_kernels().built, ibt_kernels().next
    b = boot(upgraded, ibt_initramfs)
    rc, out = b.steps["init"]
    assert rc == 1
    assert (f"nvidia-driver: error: no modules for kernel {upgraded} in this image (it holds {built}); "
            f"the node needs driver:535-{upgraded.replace('+', '_')}-debian12") in out
    assert b.steps["modules"] == (0, "")  # nothing was inserted
    assert b.steps["check-load"][0] == 1
