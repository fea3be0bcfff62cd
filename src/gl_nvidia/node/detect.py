"""Read the node through the host seam: kernel, PCI devices, loaded modules, os-release."""

from __future__ import annotations

import re

from .decide import Node, NodeError, PciDevice, shown
from .host import Host

PCI_DEVICES = "/sys/bus/pci/devices"
HOST_OS_RELEASE = "/host-etc/os-release"
INFINIBAND = "/sys/class/infiniband"
NVSWITCH_PROC = "/proc/driver/nvidia-nvswitch/devices"
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # shorter than the kernel's MODULE_NAME_LEN


def _hex(host: Host, path: str) -> int:
    text = host.read_opt(path)
    try:
        return int(text.strip(), 16) if text else 0
    except ValueError:
        return 0


def pci_devices(host: Host) -> tuple[PciDevice, ...]:
    return tuple(
        PciDevice(
            address=addr,
            vendor=_hex(host, f"{PCI_DEVICES}/{addr}/vendor"),
            device=_hex(host, f"{PCI_DEVICES}/{addr}/device"),
            pci_class=_hex(host, f"{PCI_DEVICES}/{addr}/class"),
        )
        for addr in host.listdir(PCI_DEVICES)
    )


def loaded_modules(host: Host) -> dict[str, str | None]:
    """Module name -> its version (from /sys/module/<name>/version) for every module in /proc/modules.

    A name the kernel cannot have (a NUL, a path) is refused: it would name a path under /sys/module."""
    names = [line.split()[0] for line in (host.read_opt("/proc/modules") or "").splitlines() if line.strip()]
    for n, name in enumerate(names, 1):
        if not _MODULE_NAME.match(name):
            raise NodeError(f"/proc/modules line {n} names no kernel module ({shown(name)}); "
                            "refusing to read the node's modules from it",
                            "run the driver container with the host's /proc (hostPID: true)")
    return {n: (v.strip() if (v := host.read_opt(f"/sys/module/{n}/version")) else None) for n in names}


def parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            out[key] = value.strip().strip('"').strip("'")
    return out


def nvlink5_switch(host: Host) -> bool:
    """NVIDIA's test: a ConnectX port whose VPD names the switch management function (SW_MNG)."""
    return any("SW_MNG" in (host.read_opt(f"{INFINIBAND}/{dev}/device/vpd") or "") for dev in host.listdir(INFINIBAND))


def nvswitch_count(host: Host, node: Node) -> int:
    """NVSwitches on the PCI bus, or those the loaded driver lists when it sees more."""
    return max(len(node.nvswitches), len(host.listdir(NVSWITCH_PROC)))


def read_node(host: Host) -> Node:
    kernel = (host.read_opt("/proc/sys/kernel/osrelease") or "").strip()
    return Node(
        kernel=kernel,
        devices=pci_devices(host),
        loaded=loaded_modules(host),
        os_release=parse_os_release(host.read_opt(HOST_OS_RELEASE) or ""),
        nvlink5=nvlink5_switch(host),
        machine=host.machine(),
    )
