"""Debian 13's real kernel: boot trixie's newest 6.12 cloud amd64 kernel in qemu with the driver image of
the default profile's Debian 13 unit (550, open and proprietary modules; tests/fixtures/trixie.py) as
initramfs.

The kernel has IBT, so per kernel the image holds patches where a module is linked from NVIDIA's object:
inside the guest the image's own `nvidia-driver check-load` rebuilds nvidia.ko of each module type from the
object and the patch (byte for byte the gated module) and inserts it. The kernel accepts both, the open
modules included ("No NVIDIA GPU found"): the outcome a GPU-less machine has. Software emulation (TCG), as
in test_node_qemu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gl_nvidia.catalog.matrix import load_lock
from gl_nvidia.image.base import base_for
from gl_nvidia.node.imagefiles import Image

from .fixtures.images import unpacked_image
from .fixtures.qemu import GUEST_PRELUDE, boot, make_initramfs
from .fixtures.trixie import TrixieUnit, trixie_env

pytestmark = pytest.mark.slow  # two compiles in trixie's toolchain root, an image build and a qemu boot

INIT = GUEST_PRELUDE + """step check-load nvidia-driver check-load
step init nvidia-driver init
step modules cat /proc/modules
/gl/busybox poweroff -f
"""


@pytest.fixture(scope="module")
def trixie_rootfs(trixie_unit: TrixieUnit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = base_for(load_lock(str(trixie_unit.lock)), "amd64", "13")
    rootfs, built = unpacked_image(trixie_unit.bundle, trixie_unit.kernel, tmp_path_factory.mktemp("node-qemu-trixie"),
                                   "13", base)
    branch = trixie_unit.result.unit.driver_branch
    assert built.tags[0] == f"{branch}-{trixie_unit.kernel.replace('+', '_')}-debian13"
    assert built.module_types == ("open", "proprietary")
    return rootfs


def test_the_trixie_kernel_accepts_the_550_open_and_proprietary_modules(trixie_unit: TrixieUnit,
                                                                       trixie_rootfs: Path) -> None:
    kernel, version = trixie_unit.kernel, trixie_unit.result.unit.driver_version
    image = Image.load(trixie_rootfs)
    assert (image.kernels(), image.module_types(kernel)) == ([kernel], ["open", "proprietary"])
    assert "VERSION_CODENAME=trixie" in (trixie_rootfs / "etc/os-release").read_text()  # 13's own base
    patched = {t for t in ("open", "proprietary") if image.patched_module(kernel, t, "nvidia") is not None}
    b = boot(kernel, make_initramfs(trixie_rootfs, init=INIT), repo=trixie_env().repo("amd64"))
    rc, out = b.steps["check-load"]
    assert rc == 0, out
    for mtype in ("open", "proprietary"):
        assert f"kernel={kernel} type={mtype} version={version}" in out, out
        if mtype in patched:  # rebuilt in the guest from NVIDIA's object and the patch, as the build gated it
            assert (f'msg="module rebuilt from its patch" module=nvidia type={mtype} '
                    f'path=/run/gl-nvidia/modules/{kernel}/{mtype}/nvidia.ko sha256="the build\'s"') in out
    assert out.count("check-load: ABI OK, no GPU on this machine") == 2, out
    assert "NVRM: No NVIDIA GPU found" in out  # the kernel's own words, from its log
    rc, out = b.steps["init"]
    assert rc == 1 and "nvidia-driver: error: no NVIDIA GPU on this node" in out
    assert "nvidia" not in b.steps["modules"][1]
