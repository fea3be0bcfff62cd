"""A real kernel: boot Debian's cloud kernel in qemu with an initramfs made from the real driver image.

The image is built by the image stage from the build stage's real bundle (proprietary 535.309.01 for
6.1.0-56-cloud-amd64), unpacked with umoci, and booted as the initramfs root with busybox-static for
mounting and power-off. Inside, the image's own `nvidia-driver` runs against the running kernel:
- the matching kernel: `check-load` links nvidia.ko from the image's interface object and NVIDIA's binary
  object with the image's own `ld`, then inserts it (ABI accepted, init fails with ENODEV,
  "NVRM: No NVIDIA GPU found"), `init` stops with the no-GPU error;
- the same image with one byte appended to NVIDIA's binary object: `check-load` refuses it against the
  image's manifest before linking;
- another kernel (6.1.0-47): `init` refuses before inserting any module (/proc/modules stays empty).
qemu runs in software emulation (TCG, about 10 s a boot): on this machine KVM accepts the VM but the
nested guest hangs before its first console line, so `-accel kvm` is not used.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from gl_nvidia import apt, fs
from gl_nvidia.image.build import BuiltImage
from gl_nvidia.node.image import Image

from .fixtures.bundle import DEBIAN_DRIVER, DEBIAN_KERNEL
from .fixtures.images import unpacked_image

__all__ = ["unpacked_image"]  # the IBT and arm64 qemu modules take it from here

OTHER_KERNEL = "6.1.0-47-cloud-amd64"
BUSYBOX = Path("/bin/busybox")  # busybox-static
MARK = "@@gl-nvidia@@"
INIT = f"""#!/gl/busybox sh
/gl/busybox mount -t proc proc /proc
/gl/busybox mount -t sysfs sysfs /sys
/gl/busybox mount -t devtmpfs devtmpfs /dev
/gl/busybox mkdir -p /run/nvidia/validations /tmp /host-etc
/gl/busybox cp /etc/os-release /host-etc/os-release
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
step() {{
  echo "{MARK} begin $1"
  shift
  "$@" 2>&1
  echo "{MARK} end rc=$?"
}}
step dry-run nvidia-driver init --dry-run
step check-load nvidia-driver check-load
step init nvidia-driver init
step tampered /gl/busybox sh -c 'echo >> /usr/lib/gl-nvidia/binaries/proprietary/nv-kernel.o; exec nvidia-driver check-load'
step modules cat /proc/modules
/gl/busybox poweroff -f
"""


def vmlinuz(kernel: str, arch: str = "amd64") -> Path:
    """The kernel image from Debian's linux-image package (downloaded and unpacked once, cached)."""
    cache = fs.cache_dir("node-qemu", "kernels")
    out = cache / f"vmlinuz-{kernel}"
    if not out.exists():
        repo = apt.AptRepo(apt.system_sources(), arch=arch)
        deb = repo.download(repo.find(f"linux-image-{kernel}"))
        tmp = cache / f".{kernel}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        apt.extract(deb, tmp)
        os.replace(tmp / "boot" / f"vmlinuz-{kernel}", out)
        shutil.rmtree(tmp)
    return out


@pytest.fixture(scope="module")
def image_rootfs(debian_image: tuple[Path, BuiltImage]) -> Path:
    return debian_image[0]


@pytest.fixture(scope="module")
def image_initramfs(image_rootfs: Path) -> Path:
    return make_initramfs(image_rootfs)


def make_initramfs(root: Path, busybox: Path = BUSYBOX, init: str = INIT) -> Path:
    """An image's root filesystem plus busybox-static and an /init script, as an uncompressed cpio."""
    (root / "gl").mkdir()
    shutil.copy2(busybox, root / "gl" / "busybox")
    (root / "init").write_text(init)
    (root / "init").chmod(0o755)
    cpio = root.parent.parent / "initramfs.cpio"
    with cpio.open("wb") as out:
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=root, input=files, stdout=out, check=True)
    return cpio


def test_image_root_holds_what_the_node_runtime_uses(image_rootfs: Path) -> None:
    """What the bind-mounted driver root must offer the host, and the tools init calls."""
    image = Image.load(image_rootfs)
    assert (image.driver_version, image.kernels(), image.module_types(DEBIAN_KERNEL)) == (
        DEBIAN_DRIVER, [DEBIAN_KERNEL], ["proprietary"])
    # the container toolkit resolves the libraries through the driver root's ld.so.cache
    cache = (image_rootfs / "etc/ld.so.cache").read_bytes()
    assert b"libnvidia-ml.so.1" in cache and b"libcuda.so.1" in cache
    # GSP firmware where the firmware search path /run/nvidia/driver/lib/firmware finds it
    assert list((image_rootfs / "lib/firmware/nvidia" / DEBIAN_DRIVER).glob("gsp_*.bin"))
    mods = image_rootfs / f"usr/lib/gl-nvidia/modules/{DEBIAN_KERNEL}/proprietary"
    assert not (mods / "nvidia.ko").exists() and (mods / "nvidia.o").is_file()  # split: linked on the node
    assert (image_rootfs / "usr/lib/gl-nvidia/binaries/proprietary/nv-kernel.o").is_file()
    for tool in ("insmod", "rmmod", "modprobe", "nsenter", "mount", "umount", "mountpoint", "dmesg", "ldconfig",
                 "nvidia-smi", "nvidia-modprobe", "nvidia-driver", "python3", "ld"):
        assert shutil.which(tool, path=":".join(str(image_rootfs / d) for d in
                                                 ("usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin"))), tool


@dataclass(frozen=True)
class Boot:
    console: str
    steps: dict[str, tuple[int, str]]  # step -> (exit code, output)


def boot(kernel: str, initramfs: Path) -> Boot:
    p = subprocess.run(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "2048", "-nographic",
         "-no-reboot", "-kernel", str(vmlinuz(kernel)), "-initrd", str(initramfs),
         "-append", "console=ttyS0 panic=-1 quiet loglevel=4"],
        capture_output=True, text=True, errors="replace", timeout=300, check=False,
    )
    return parse_console(p.stdout)


def parse_console(stdout: str) -> Boot:
    """The guest's steps (between MARK lines) from its console; every step must have finished."""
    console = stdout.replace("\r", "")
    steps: dict[str, tuple[int, str]] = {}
    for chunk in console.split(f"{MARK} begin ")[1:]:
        name, _, rest = chunk.partition("\n")
        body, sep, tail = rest.partition(f"{MARK} end rc=")
        assert sep, f"step {name} did not finish:\n{console[-3000:]}"
        steps[name] = (int(tail.split()[0]), body)
    assert "modules" in steps, f"the guest did not run to the end:\n{console[-3000:]}"
    return Boot(console, steps)


def test_matching_kernel_accepts_the_modules_and_init_stops_for_want_of_a_gpu(image_initramfs: Path) -> None:
    b = boot(DEBIAN_KERNEL, image_initramfs)
    rc, out = b.steps["dry-run"]
    assert rc == 1, out  # init would stop: no GPU
    assert f"msg=\"dry-run: image holds\" kernel={DEBIAN_KERNEL} types=proprietary driver={DEBIAN_DRIVER}" in out
    assert "msg=\"dry-run: init would stop\" reason=\"no NVIDIA GPU on this node" in out
    rc, out = b.steps["check-load"]
    assert rc == 0, out
    assert "check-load: ABI OK, no GPU on this machine" in out
    # the image holds no nvidia.ko: the guest linked it from the interface + NVIDIA's binary object first
    assert (f'msg="module linked" module=nvidia type=proprietary '
            f'path=/run/gl-nvidia/modules/{DEBIAN_KERNEL}/proprietary/nvidia.ko') in out
    assert f"kernel={DEBIAN_KERNEL} type=proprietary version={DEBIAN_DRIVER}" in out
    assert "NVRM: No NVIDIA GPU found" in out  # the kernel's own words, from its log
    rc, out = b.steps["init"]
    assert rc == 1
    assert "nvidia-driver: error: no NVIDIA GPU on this node" in out
    assert f"nothing loaded into kernel {DEBIAN_KERNEL}" in out
    # one byte appended to NVIDIA's binary object: refused before ld runs, by the image's manifest
    rc, out = b.steps["tampered"]
    assert rc == 1, out
    assert re.search(r"nvidia-driver: error: /usr/lib/gl-nvidia/binaries/proprietary/nv-kernel\.o has sha256 "
                     r"[0-9a-f]{64}, but this image's manifest says [0-9a-f]{64}; refusing to load nvidia\.ko\n", out), out
    assert "module linked" not in out
    assert "nvidia" not in b.steps["modules"][1]


def test_other_kernel_is_refused_before_any_module_is_inserted(image_initramfs: Path) -> None:
    b = boot(OTHER_KERNEL, image_initramfs)
    rc, out = b.steps["init"]
    assert rc == 1
    assert (
        f"nvidia-driver: error: no modules for kernel {OTHER_KERNEL} in this image (it holds {DEBIAN_KERNEL}); "
        f"the node needs driver:535-{OTHER_KERNEL}-debian12"
    ) in out
    assert b.steps["modules"] == (0, "")  # nothing was inserted
    assert b.steps["check-load"][0] == 1  # check-load refuses the same way
