"""A real IBT kernel: boot Debian's 6.12 cloud kernel in qemu with the real driver image as initramfs.

The image is built from the real 6.12 bundle (tests/fixtures/ibt.py): per kernel it holds the interface
objects, modpost's final objects, module.lds and the kernel's objtool, not nvidia.ko. Inside the guest the
image's own `nvidia-driver` links nvidia.ko the way kbuild did (ld, the kernel's objtool, ld) with the image's
ld and libelf, checks it against the manifest and inserts it: the kernel accepts it ("No NVIDIA GPU found").
On the next 6.12 ABI the same image is refused before any module is inserted. Software emulation (TCG), as
in test_node_qemu.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gl_nvidia.node.image import Image

from .fixtures.bundle import DEBIAN_DRIVER
from .fixtures.ibt import ibt_kernels
from .test_node_qemu import boot, make_initramfs, unpacked_image


@pytest.fixture(scope="module")
def ibt_rootfs(ibt_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rootfs, built = unpacked_image(ibt_bundle, ibt_kernels().built, tmp_path_factory.mktemp("node-qemu-ibt"))
    assert built.tags[0] == f"535-{ibt_kernels().built.replace('+', '_')}-debian12"
    return rootfs


@pytest.fixture(scope="module")
def ibt_initramfs(ibt_rootfs: Path) -> Path:
    return make_initramfs(ibt_rootfs)


def test_ibt_image_holds_the_kernels_objtool_and_what_it_loads(ibt_rootfs: Path) -> None:
    kernel = ibt_kernels().built
    image = Image.load(ibt_rootfs)
    assert (image.kernels(), image.module_types(kernel)) == ([kernel], ["proprietary"])
    split = image.split_module(kernel, "proprietary", "nvidia")
    assert split is not None and split.objtool is not None and split.final is not None
    assert not image.ko(kernel, "proprietary", "nvidia").exists()
    # every file the node links from, the kernel's objtool included, is the one the manifest names
    assert {i.path for i in image.inputs(kernel, "proprietary", "nvidia")} == {
        split.interface, split.binary, split.lds, split.objtool, split.final}
    image.verify(kernel, "proprietary", "nvidia")
    # objtool runs in the image (the boot below proves it): the base carries its libelf
    assert (ibt_rootfs / "usr/lib/x86_64-linux-gnu/libelf.so.1").exists()
    assert shutil.which("ld", path=str(ibt_rootfs / "usr/bin"))


def test_the_node_links_through_objtool_and_the_ibt_kernel_accepts_the_module(ibt_initramfs: Path) -> None:
    kernel = ibt_kernels().built
    b = boot(kernel, ibt_initramfs)
    rc, out = b.steps["check-load"]
    assert rc == 0, out
    # linked in the guest by its ld and the kernel's objtool, byte for byte the module the build gated
    assert (f'msg="module linked" module=nvidia type=proprietary '
            f'path=/run/gl-nvidia/modules/{kernel}/proprietary/nvidia.ko objtool=yes sha256="the build\'s"') in out
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
