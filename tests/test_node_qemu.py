"""A real kernel: boot Debian's cloud kernel in qemu with an initramfs made from the real driver image.

The image is built by the image stage from the build stage's real bundle (proprietary 535.309.01 for
DEBIAN_KERNEL: the ABI before the archive's newest 6.1 cloud amd64), unpacked with umoci, and booted as the initramfs root with busybox-static for
mounting and power-off. Inside, the image's own `nvidia-driver` runs against the running kernel:
- the matching kernel: `check-load` links nvidia.ko from the image's interface object and NVIDIA's binary
  object with the image's own `ld`, then inserts it (ABI accepted, init fails with ENODEV,
  "NVRM: No NVIDIA GPU found"), `init` stops with the no-GPU error;
- the same image with one byte appended to NVIDIA's binary object: `check-load` refuses it against the
  image's manifest before linking;
- another kernel (the archive's newest 6.1 ABI): `init` refuses before inserting any module (/proc/modules stays empty);
- the matching kernel booted with `module.sig_enforce=1`: the image's modules are signed with a test key
  (`signed_debian_bundle`), which the kernel's keyring lacks: the node-linked nvidia.ko (its signature
  appended by the node, shown by the image's own modinfo) is refused for its unavailable key, the build's
  unsigned nvidia.ko as unsigned. Without enforcement the signed module loads (the kernel only taints).
qemu runs in software emulation (tests/fixtures/qemu.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gl_nvidia import bundle as b
from gl_nvidia.image.assemble import BuiltImage
from gl_nvidia.node.imagefiles import Image
from gl_nvidia.oci import Layout

from .fixtures.bundle import DEBIAN_DRIVER, DEBIAN_KERNEL, MODULE_SIGNER, ModuleKey
from .fixtures.kernels import debian_abis
from .fixtures.qemu import boot, make_initramfs

pytestmark = pytest.mark.slow  # qemu boots of a real image

OTHER_KERNEL = debian_abis("6.1")[-1]  # the archive's newest: not the image's DEBIAN_KERNEL


@pytest.fixture(scope="module")
def image_rootfs(debian_image: tuple[Path, BuiltImage], debian_bundle: Path) -> Path:
    """The signed image's root, plus (outside the image, at /gl) the build's unsigned nvidia.ko."""
    root = debian_image[0]
    (root / "gl").mkdir(exist_ok=True)
    shutil.copyfile(b.modules_dir(debian_bundle, DEBIAN_KERNEL, "proprietary") / "nvidia.ko",
                    root / "gl" / "nvidia-unsigned.ko")
    return root


@pytest.fixture(scope="module")
def image_initramfs(image_rootfs: Path) -> Path:
    return make_initramfs(image_rootfs)


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
    for tool in ("insmod", "rmmod", "modprobe", "modinfo", "nsenter", "mount", "umount", "mountpoint", "dmesg", "ldconfig",
                 "nvidia-smi", "nvidia-modprobe", "nvidia-driver", "python3", "ld"):
        assert shutil.which(tool, path=":".join(str(image_rootfs / d) for d in
                                                 ("usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin"))), tool


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


def test_the_image_ships_signed_modules_and_the_certificates_fingerprint_not_the_key(
        debian_image: tuple[Path, BuiltImage], image_rootfs: Path, module_key: ModuleKey) -> None:
    root, built = debian_image
    mods = root / f"usr/lib/gl-nvidia/modules/{DEBIAN_KERNEL}/proprietary"
    image = Image.load(root)
    assert {r.parts is None for r in image.records.values()} == {True, False}
    for (_k, _t, name), record in image.records.items():
        assert record.signature is not None, name
        assert record.signature.cert_sha256 == module_key.fingerprint
        if record.parts is None:  # whole: signed in place, as kmod's modinfo reads it
            out = subprocess.run(["modinfo", "-F", "signer", str(mods / f"{name}.ko")], capture_output=True, text=True,
                                 check=True).stdout
            assert out.strip() == MODULE_SIGNER
        else:  # split: the signature beside the parts, for the node to append
            assert (mods / record.signature.file).is_file() and not (mods / f"{name}.ko").exists()
    annotations = Layout.open(built.layout).manifest(built.digest).annotations
    assert annotations["io.gardenlinux.nvidia.modules.signing-cert.sha256"] == module_key.fingerprint
    for path in (*(root / "usr/lib/gl-nvidia").rglob("*"), *(root / "usr/share/gl-nvidia").rglob("*")):
        if path.is_file() and path.stat().st_size < 1 << 20:
            assert not [line for line in module_key.body if line.encode() in path.read_bytes()], path


def test_an_enforcing_kernel_refuses_our_unsigned_module_and_names_the_missing_key_for_the_signed_one(
        image_initramfs: Path) -> None:
    b = boot(DEBIAN_KERNEL, image_initramfs, "module.sig_enforce=1")
    rc, out = b.steps["check-load"]
    assert rc == 1, out
    # the node linked nvidia.ko to the gated sha256 and appended the build's signature
    assert (f'msg="module linked" module=nvidia type=proprietary path=/run/gl-nvidia/modules/{DEBIAN_KERNEL}/'
            "proprietary/nvidia.ko sha256=\"the build's\" signed=yes") in out
    assert "check-load: rejected by the kernel" in out and "Key was rejected by service" in out
    assert "Loading of module with unavailable key is rejected" in out, out  # signed, by a key it lacks
    rc, out = b.steps["signature"]  # the image's own modinfo on the module the node linked and signed
    signer, hash_algo, key = out.splitlines()
    assert (rc, signer, hash_algo) == (0, MODULE_SIGNER, "sha256"), out
    assert re.fullmatch(r"[0-9A-F]{2}(:[0-9A-F]{2})+", key), out
    rc, out = b.steps["unsigned"]
    assert rc != 0 and "Key was rejected by service" in out, out
    assert "Loading of unsigned module is rejected" in out, out
    assert "nvidia" not in b.steps["modules"][1]
