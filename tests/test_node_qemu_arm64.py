"""A real arm64 kernel: boot Debian's arm64 cloud kernel in qemu (TCG) with the real arm64 image as initramfs.

The image is built on this amd64 machine, daemonless and without binfmt/qemu-user, from the build stage's
cross-compiled arm64 bundle (tests/fixtures/arm64.py): an extract base of Debian's arm64 packages, Debian's
arm64 userspace and firmware, the ld.so.cache gl-nvidia writes, the interface object and NVIDIA's arm64
object. `qemu-system-aarch64 -M virt -cpu max` boots `linux-image-<ARM64_KERNEL>` from the archive with it as
the root filesystem (arm64 busybox-static mounts and powers off). Before the boot, on this machine: the
manifest, config and base say arm64, the tags carry the arm64 kernel, a second build gives the same digests
and every tool and library the node uses is aarch64. In one boot:
- `check-load` links nvidia.ko with the image's own arm64 `ld` (the same binutils as the build's cross `ld`,
  so the gated sha256) and the kernel accepts it ("NVRM: No NVIDIA GPU found");
- the image's own arm64 ldconfig rebuilds the cache from the same configuration: it lists exactly what the
  cache written on amd64 lists, and the loader finds libnvidia-ml.so.1 through that cache;
- an amd64 image's driver files (its manifest and per-kernel modules, bind-mounted over the arm64 image's
  as a node would see them had it pulled the amd64 image: the node decides from these before it reads
  NVIDIA's objects, whose 64 MB would only slow the boot) are refused with one line before any insmod;
  /proc/modules stays empty.
One boot keeps the cold run short: about 20 s to the shell on 2 cores, about 60 s in all with the steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from gl_nvidia import apt, fs
from gl_nvidia.image import unpack
from gl_nvidia.image.assemble import BuiltImage, ImageOptions, build_image
from gl_nvidia.node.imagefiles import Image
from gl_nvidia.oci import Layout

from .fixtures.arm64 import ARM64_KERNEL
from .fixtures.bundle import DEBIAN_DRIVER
from .fixtures.images import sh, unpacked_image
from .fixtures.qemu import GUEST_MEMORY, GUEST_PRELUDE, Boot, make_initramfs, parse_console, vmlinuz

pytestmark = pytest.mark.slow  # a real arm64 compile, image build and qemu boots

INIT = GUEST_PRELUDE + """step check-load nvidia-driver check-load
step ldconfig-own /gl/busybox sh -c 'ldconfig -X -C /tmp/ld.so.cache && ldconfig -p -C /tmp/ld.so.cache'
step ldconfig-ours ldconfig -p
step loader /gl/busybox env LD_DEBUG=libs python3 -c 'import ctypes; ctypes.CDLL("libnvidia-ml.so.1")'
/gl/busybox mount --bind /amd64/usr/share/gl-nvidia /usr/share/gl-nvidia
/gl/busybox mount --bind /amd64/usr/lib/gl-nvidia/modules /usr/lib/gl-nvidia/modules
step amd64-check-load nvidia-driver check-load
step amd64-init nvidia-driver init
step modules /gl/busybox cat /proc/modules
/gl/busybox poweroff -f
"""


def arm64_busybox() -> Path:
    """busybox-static from Debian's arm64 archive (downloaded and unpacked once, cached)."""
    cache = fs.cache_dir("node-qemu", "busybox-arm64")
    out = cache / "busybox"
    if not out.exists():
        repo = apt.AptRepo(apt.system_sources(), arch="arm64")
        tmp = cache / ".unpack.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        apt.extract(repo.download(repo.find("busybox-static")), tmp)
        os.replace(tmp / "bin" / "busybox", out)
        shutil.rmtree(tmp)
    return out


def machine(path: Path) -> str:
    with path.open("rb") as fh:
        return str(ELFFile(fh)["e_machine"])


@pytest.fixture(scope="module")
def arm64_image(arm64_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuiltImage]:
    return unpacked_image(arm64_bundle, ARM64_KERNEL, tmp_path_factory.mktemp("node-qemu-arm64"))


@pytest.fixture(scope="module")
def arm64_rootfs(arm64_image: tuple[Path, BuiltImage]) -> Path:
    return arm64_image[0]


@pytest.fixture(scope="module")
def arm64_boot(arm64_rootfs: Path, debian_image: tuple[Path, BuiltImage]) -> Boot:
    amd64 = debian_image[0]
    for d in ("usr/share/gl-nvidia", "usr/lib/gl-nvidia/modules"):
        shutil.copytree(amd64 / d, arm64_rootfs / "amd64" / d, symlinks=True)
    initramfs = make_initramfs(arm64_rootfs, arm64_busybox(), INIT)
    p = subprocess.run(
        ["qemu-system-aarch64", "-M", "virt", "-cpu", "max,pauth-impdef=on", "-m", GUEST_MEMORY, "-nographic",
         "-no-reboot", "-kernel", str(vmlinuz(ARM64_KERNEL, "arm64")), "-initrd", str(initramfs),
         "-append", "console=ttyAMA0 panic=-1 quiet loglevel=4"],
        capture_output=True, text=True, errors="replace", timeout=600, check=False,
    )
    return parse_console(p.stdout)


def test_the_arm64_image_says_arm64_and_same_inputs_give_the_same_digests(
        arm64_bundle: Path, arm64_image: tuple[Path, BuiltImage], tmp_path: Path) -> None:
    """Manifest, config and base say arm64; tags carry the arm64 kernel; a second build is byte-identical
    (checked here, on the boot's own image, so the cold run builds the arm64 image twice, not three times)."""
    built = arm64_image[1]
    assert built.tags == (f"535-{ARM64_KERNEL}-debian12", f"{DEBIAN_DRIVER}-{ARM64_KERNEL}-debian12")
    assert [x.name for x in built.layers] == ["base", "node-runtime", "userspace", "ld.so.cache", "firmware",
                                              "binaries proprietary", f"modules {ARM64_KERNEL}"]
    inspected = json.loads(sh("skopeo", "inspect", f"oci:{built.layout}:{built.tags[0]}"))
    assert (inspected["Architecture"], inspected["Os"]) == ("arm64", "linux")
    layout = Layout.open(built.layout)
    base = layout.manifest(layout.resolve(built.tags[0]).annotations["org.opencontainers.image.base.digest"])
    assert json.loads(layout.read_blob(base.config.digest))["architecture"] == "arm64"
    assert "(mmdebstrap extract " in inspected["Labels"]["io.gardenlinux.nvidia.base"]
    again = build_image(arm64_bundle, ARM64_KERNEL, tmp_path / "again", options=ImageOptions(os_id="debian",
                                                                                              os_versions=("12",)))
    assert (again.digest, again.layers) == (built.digest, built.layers)


def test_arm64_image_holds_arm64_tools_libraries_and_cache(arm64_rootfs: Path) -> None:
    image = Image.load(arm64_rootfs)
    assert (image.arch, image.driver_version, image.kernels()) == ("arm64", DEBIAN_DRIVER, [ARM64_KERNEL])
    split = image.split_module(ARM64_KERNEL, "proprietary", "nvidia")
    assert split is not None and not image.ko(ARM64_KERNEL, "proprietary", "nvidia").exists()
    image.verify(ARM64_KERNEL, "proprietary", "nvidia")
    for f in ("usr/bin/python3", "usr/bin/ld", "usr/bin/kmod", "usr/sbin/ldconfig", "usr/bin/nvidia-smi", "bin/sh",
              "usr/bin/touch",  # the GPU Operator's startup probe: sh -c 'nvidia-smi && touch ...'

              "usr/lib/aarch64-linux-gnu/libnvidia-ml.so.1", "usr/lib/gl-nvidia/binaries/proprietary/nv-kernel.o"):
        real = unpack.host_path(arm64_rootfs, unpack.resolve_in_root(arm64_rootfs, f, follow=True))
        assert machine(real) == "EM_AARCH64", f
    # an extract base: what dpkg unpacked is on record for the SBOM, and no maintainer script ran
    status = (arm64_rootfs / "var/lib/dpkg/status").read_text()
    assert "Package: python3.11-minimal\n" in status and "Status: install ok unpacked" in status
    # the cache the loader and the container toolkit read: AArch64 entries (the host's ldconfig decodes it)
    listing = sh("ldconfig", "-p", "-C", arm64_rootfs / "etc/ld.so.cache")
    assert "\tlibnvidia-ml.so.1 (libc6,AArch64) => /lib/aarch64-linux-gnu/libnvidia-ml.so.1\n" in listing
    assert "\tlibcuda.so.1 (libc6,AArch64) => /lib/aarch64-linux-gnu/libcuda.so.1\n" in listing
    assert "x86-64" not in listing


def test_arm64_kernel_accepts_the_module_the_images_own_ld_linked(arm64_boot: Boot) -> None:
    rc, out = arm64_boot.steps["check-load"]
    assert rc == 0, out
    assert (f'msg="module linked" module=nvidia type=proprietary '
            f'path=/run/gl-nvidia/modules/{ARM64_KERNEL}/proprietary/nvidia.ko sha256="the build\'s" signed=no') in out
    assert "check-load: ABI OK, no GPU on this machine" in out
    assert f"kernel={ARM64_KERNEL} type=proprietary version={DEBIAN_DRIVER}" in out
    assert "NVRM: No NVIDIA GPU found" in out  # the kernel's own words, from its log


def test_the_images_own_ldconfig_lists_what_the_cache_written_on_amd64_lists(arm64_boot: Boot) -> None:
    rc, own = arm64_boot.steps["ldconfig-own"]
    assert rc == 0, own
    rc, ours = arm64_boot.steps["ldconfig-ours"]
    assert rc == 0, ours

    def entries(listing: str) -> list[str]:
        return [line for line in listing.splitlines() if line.startswith("\t")]

    assert entries(ours) == entries(own)
    assert "\tlibnvidia-ml.so.1 (libc6,AArch64) => /lib/aarch64-linux-gnu/libnvidia-ml.so.1" in entries(own)
    assert "Cache generated by: gl-nvidia" in ours
    # the loader takes libnvidia-ml.so.1 from the cache, not from its default directories
    rc, out = arm64_boot.steps["loader"]
    assert rc == 0, out
    assert re.search(r"find library=libnvidia-ml\.so\.1 \[0\]; searching\n\s*\d*:\s*search cache=/etc/ld\.so\.cache\n"
                     r"\s*\d*:\s*trying file=/lib/aarch64-linux-gnu/libnvidia-ml\.so\.1\n", out), out


def test_an_amd64_image_is_refused_on_the_arm64_kernel_before_any_insmod(arm64_boot: Boot) -> None:
    line = (f"nvidia-driver: error: this image is for amd64, but this node's kernel {ARM64_KERNEL} is arm64 "
            f"(aarch64); the node needs driver:535-{ARM64_KERNEL}-debian12\n")
    for step in ("amd64-check-load", "amd64-init"):
        rc, out = arm64_boot.steps[step]
        assert rc == 1 and line in out, out
        assert "module linked" not in out and "insmod" not in out
    assert arm64_boot.steps["modules"] == (0, "")  # check-load's module is gone, nothing else went in
