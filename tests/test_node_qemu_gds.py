"""The kernel's own verdict on the nvidia-fs.ko the build ships (open set, OPEN_OK_KERNEL): one qemu boot.

Without a GPU nvidia.ko cannot stay loaded, so nvidia-fs meets the kernel without it. 2.13.5 links nothing of
NVIDIA's: insmod succeeds, and the first open of /dev/nvidia-fs0 is where it asks for nvidia_p2p_* (symbol_get),
the only symbols the kernel cannot give it. Then the same open beside two stand-ins that export those six names
the ways NVIDIA's modules do: EXPORT_SYMBOL (proprietary), which this kernel refuses to symbol_get (the build's
gate leaves nvidia-fs out beside proprietary modules for that reason), and EXPORT_SYMBOL_GPL (open), which it
hands over.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gl_nvidia import bundle as b
from gl_nvidia.modbuild import AptEnv, UnitResult
from gl_nvidia.run import run
from tests.fixtures.bundle import OPEN_OK_KERNEL
from tests.fixtures.qemu import GUEST_PRELUDE, boot, make_initramfs

P2P_SOURCES = Path(__file__).resolve().parent / "data" / "build" / "p2p"
# open(2) of the device, then the kernel's log lines of that open
OPEN = "/gl/busybox sh -c 'exec 3</dev/nvidia-fs0; echo opened'; /gl/busybox dmesg -c | /gl/busybox grep -i -e nvidia -e symbol_get"
INIT = GUEST_PRELUDE + f"""/gl/busybox dmesg -c >/dev/null
step insmod /gl/busybox insmod /gl/nvidia-fs.ko
step loaded /gl/busybox sh -c "/gl/busybox cat /sys/module/nvidia_fs/version; /gl/busybox ls /dev/nvidia-fs0"
step open-alone /gl/busybox sh -c "{OPEN}"
step proprietary-exports /gl/busybox sh -c "/gl/busybox insmod /gl/glnv_p2p.ko && {OPEN}; /gl/busybox rmmod glnv_p2p"
step open-exports /gl/busybox sh -c "/gl/busybox insmod /gl/glnv_p2p_gpl.ko && {OPEN}"
step modules /gl/busybox cat /proc/modules
/gl/busybox poweroff -f
"""


@pytest.fixture(scope="module")
def initramfs(open_bundle: tuple[Path, list[UnitResult]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle_dir, _ = open_bundle
    root = tmp_path_factory.mktemp("gds") / "root" / "rootfs"
    (root / "gl").mkdir(parents=True)
    shutil.copyfile(b.modules_dir(bundle_dir, OPEN_OK_KERNEL, "open") / "nvidia-fs.ko", root / "gl" / "nvidia-fs.ko")
    src = root.parent / "p2p"
    shutil.copytree(P2P_SOURCES, src)
    run(["make", "-C", AptEnv().headers(OPEN_OK_KERNEL, "amd64").sysout, f"M={src}", "modules"])
    for ko in ("glnv_p2p.ko", "glnv_p2p_gpl.ko"):
        shutil.copyfile(src / ko, root / "gl" / ko)
    for d in ("proc", "sys", "dev", "etc", "run"):
        (root / d).mkdir()
    (root / "etc/os-release").write_text("ID=debian\n")
    return make_initramfs(root, init=INIT)


@pytest.mark.slow
def test_the_kernel_loads_nvidia_fs_and_misses_only_nvidias_p2p_symbols(initramfs: Path) -> None:
    steps = boot(OPEN_OK_KERNEL, initramfs).steps
    # every symbol nvidia-fs links is the kernel's: it loads without nvidia.ko
    assert steps["insmod"] == (0, ""), steps["insmod"]
    assert steps["loaded"] == (0, "2.13.5\n/dev/nvidia-fs0\n")
    _, out = steps["open-alone"]
    assert "opened" not in out and "Operation not supported" in out, out
    assert "nvidia-fs:Unable to find symbol: nvidia_p2p_dma_unmap_pages" in out
    missing = [line for line in out.splitlines() if "Unable to find symbol" in line]
    assert all(line.split("Unable to find symbol: ")[1].startswith("nvidia_p2p_") for line in missing), out
    # NVIDIA's proprietary way of exporting them: refused by this kernel, as the gate says
    _, out = steps["proprietary-exports"]
    assert "opened" not in out and "failing symbol_get of non-GPLONLY symbol nvidia_p2p_dma_unmap_pages." in out, out
    # the open modules' way: handed over, the device opens; nothing is missing any more
    _, out = steps["open-exports"]
    assert out.splitlines()[0] == "opened" and "symbol_get" not in out and "Unable to find" not in out, out
    assert "nvidia_fs" in steps["modules"][1]
