"""Kernel releases and driver versions, checked where they enter (CLI options, the lock file).

Both become file names, image tags and make arguments later on, so a value like `../../etc` or
`$(id)` must stop at the door, not surface as a failed compile or a path outside the output.
"""

from __future__ import annotations

import re

_KERNEL = re.compile(r"[0-9][A-Za-z0-9._+-]*")
_KERNEL_MAX = 64  # the kernel's own limit for `uname -r` (__NEW_UTS_LEN)
_DRIVER = re.compile(r"[0-9]{1,6}\.[0-9]{1,6}(\.[0-9]{1,6})?")


def check_kernel(name: str) -> str:
    """`name` when it is a kernel release (uname -r) safe as a path component and tag; else ValueError."""
    if len(name) > _KERNEL_MAX or not _KERNEL.fullmatch(name) or ".." in name:
        raise ValueError(f"{name[:80]!r} is not a kernel release like 6.12.72-cloud-amd64")
    return name


def check_driver_version(version: str) -> str:
    """`version` when it is a full NVIDIA driver version (535.309.01, 580.105); else ValueError."""
    if not _DRIVER.fullmatch(version):
        raise ValueError(f"{version[:80]!r} is not a driver version like 580.105.08")
    return version
