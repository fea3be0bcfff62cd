"""Every name an architecture goes by, in one record per arch: adding an arch is adding its record.

Locks, bundles, CLI options and apt indexes name an arch by its Debian name; each stage asks the record
for the name its own world uses (the kernel's machine, ELF's, GNU's, NVIDIA's, OCI's, kbuild's). Standard
library only: the node runtime ships it beside `bundle.py` (image/assemble.py `NODE_SHARED`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    debian: str  # dpkg --print-architecture: locks, bundles, CLI options, apt indexes, mmdebstrap
    machine: str  # uname -m of its kernels
    oci: str  # an OCI image config's and a multi-platform index's architecture
    elf_machine: str  # e_machine of its code, as pyelftools names it
    triplet: str  # GNU multiarch triplet: library directories, cross tools' prefix
    nvidia: str  # NVIDIA's name for it in installer names: NVIDIA-Linux-<nvidia>-<version>.run
    redist: str  # the platform NVIDIA's redist tree lists its archives under
    kbuild: str  # ARCH= for kbuild and NVIDIA's Makefile (x86_64 is kbuild's 64-bit arch/x86)
    kconfig: str  # the .config option only its kernels set
    vermagic: str  # what its kernels append to vermagic (arch/*/include/asm/vermagic.h)
    ldconfig_flags: int  # ld.so.cache entry flags its loader accepts (FLAG_ELF_LIBC6 | the arch's own)
    kernel_suffix: str  # how its kernel releases end, after a dash: 6.1.0-56-amd64, 6.12.72-cloud-arm64
    # The arch of the machines that build (CI's runners): other arches' code is cross-compiled there and
    # their bases unpacked without running their maintainer scripts.
    build_machine: bool


AMD64 = Arch(debian="amd64", machine="x86_64", oci="amd64", elf_machine="EM_X86_64", triplet="x86_64-linux-gnu",
             nvidia="x86_64", redist="linux-x86_64", kbuild="x86_64", kconfig="CONFIG_X86_64", vermagic="",
             ldconfig_flags=0x0303, kernel_suffix="amd64", build_machine=True)  # FLAG_X8664_LIB64
ARM64 = Arch(debian="arm64", machine="aarch64", oci="arm64", elf_machine="EM_AARCH64", triplet="aarch64-linux-gnu",
             nvidia="aarch64", redist="linux-sbsa", kbuild="arm64", kconfig="CONFIG_ARM64", vermagic="aarch64 ",
             ldconfig_flags=0x0A03, kernel_suffix="arm64", build_machine=False)  # FLAG_AARCH64_LIB64; sbsa: servers
ARCHES = {a.debian: a for a in (AMD64, ARM64)}  # by Debian name
BUILD = next(a for a in ARCHES.values() if a.build_machine)


def check_arch(name: str) -> str:
    """`name` when it is the Debian name of a known arch; else ValueError naming the known ones."""
    if name not in ARCHES:
        raise ValueError(f"{str(name)[:80]!r} is not an architecture gl-nvidia builds for ({', '.join(ARCHES)})")
    return name


def by_machine(machine: str) -> Arch | None:
    """The arch whose kernels report `machine` (uname -m), or None."""
    return next((a for a in ARCHES.values() if a.machine == machine), None)


def by_elf_machine(elf_machine: str) -> Arch | None:
    """The arch whose code is of ELF `elf_machine` ("EM_X86_64"), or None."""
    return next((a for a in ARCHES.values() if a.elf_machine == elf_machine), None)


def of_kernel(kernel: str) -> Arch | None:
    """The arch a kernel release names by its last part (6.12.72-cloud-arm64), or None (6.1.0)."""
    return next((a for a in ARCHES.values() if kernel.endswith(f"-{a.kernel_suffix}")), None)
