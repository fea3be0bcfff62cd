"""Where things live inside the driver image. `image` writes these paths, `node` reads them.

Standard library only (ships inside the image).
"""

from __future__ import annotations

from pathlib import PurePosixPath

# Driver-wide facts (driver version, branch, arch, userspace file list): the bundle manifest with
# its `kernels` trimmed to those this image holds. Written by the image stage.
MANIFEST = PurePosixPath("/usr/share/gl-nvidia/manifest.json")

# Per-kernel module sets: /usr/lib/gl-nvidia/modules/<kernel>/<open|proprietary>/*.ko
MODULES_ROOT = PurePosixPath("/usr/lib/gl-nvidia/modules")

# Kernel-independent binary objects of split modules (bundle.ModuleParts), once per driver version:
# /usr/lib/gl-nvidia/binaries/<open|proprietary>/nv-kernel.o. The node links them with the per-kernel
# interface objects in the modules directory before insmod.
BINARIES_ROOT = PurePosixPath("/usr/lib/gl-nvidia/binaries")

# GSP firmware, at the path the kernel's firmware loader finds under the driver root.
FIRMWARE_ROOT = PurePosixPath("/lib/firmware/nvidia")

# The node runtime's Python package and its entry point.
ENTRYPOINT = PurePosixPath("/usr/local/bin/nvidia-driver")
PYTHON_SITE = PurePosixPath("/usr/lib/python3/dist-packages")


def modules_dir(kernel: str, module_type: str) -> PurePosixPath:
    return MODULES_ROOT / kernel / module_type


def binaries_dir(module_type: str) -> PurePosixPath:
    return BINARIES_ROOT / module_type
