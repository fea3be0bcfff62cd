"""The nodes' OS as one typed record that every stage reads: Debian and Garden Linux.

A stage asks the record (how nodes report their version, which tags the operator pulls, how kernels
are named, where the base and the kernel headers come from) instead of comparing OS ids. The node
runtime (standard library only) keeps its own copy of the one rule it needs, the tag's OS part
(node/decide.py `os_tag`); tests/test_osprofile.py holds the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from gl_nvidia.arches import ARCHES
from gl_nvidia.table import Table

# One shape for both OSes: `<version>-cloud-<arch>` (cloud) and `<version>-<arch>` (metal: no infix).
_KERNEL_SUFFIXES = (("cloud", "-cloud-{arch}"), ("metal", "-{arch}"))


@dataclass(frozen=True)
class AptLayout:
    """How one OS version's packages lie in its apt repository (a `sources.apt` URL)."""

    suite: str  # "{version}": one suite per OS version; "{codename}": the release's codename
    components: tuple[str, ...]

    def suite_of(self, os_version: str, codename: str | None) -> str:
        return self.suite.format(version=os_version, codename=codename or os_version)


@dataclass(frozen=True)
class OSProfile:
    id: str  # NFD's system-os_release.ID of the nodes: the OS part of every tag
    name: str  # how changelogs name a version: "GL 2150.9.0", "Debian 12"
    # The VERSION_ID every node reports, whatever its release (Garden Linux's NFD rule in the values
    # says 0, so one image serves every GL release with that kernel); None: each node its own.
    version_id: str | None
    version_id_key: str | None  # the os-release key the values' NFD rule matches to set version_id
    release_tags: bool  # also `<branch>-<kernel>-<id><OS version>` per release served, for people
    versions_label: str  # the image label (under io.gardenlinux.nvidia.) listing the OS versions served
    apt: AptLayout
    kernel_suffixes: tuple[tuple[str, str], ...]  # (flavour, suffix with {arch}); most specific first
    # Where the image's base root filesystem comes from, a row of image/base.py `BASE_SOURCES`: "system"
    # this machine's configured archive (Debian's), "apt" the OS version's suite of the lock's `sources.apt`.
    base: str
    # Where kernel headers and compiler come from unless the caller says, a row of modbuild/strategy.py
    # `KERNEL_ENVS`: "apt" the headers packages unpacked on this machine, "kmodbuild" the OS's container.
    build_env: str

    def node_version_id(self, os_version: str) -> str:
        """The VERSION_ID the operator sees on a node of `os_version`."""
        return self.version_id if self.version_id is not None else os_version

    def os_tag(self, version_id: str) -> str:
        """NFD's `system-os_release.ID` + `VERSION_ID`: the tag's last part."""
        return f"{self.id}{version_id}"

    def pulled_version_ids(self, os_versions: tuple[str, ...]) -> tuple[str, ...]:
        """The VERSION_IDs the operator asks images for, for nodes of these OS versions (a fixed one
        whatever they are)."""
        if self.version_id is not None:
            return (self.version_id,)
        return tuple(sorted(set(os_versions)))

    def kernel_suffix(self, flavour: str, arch: str) -> str:
        return dict(self.kernel_suffixes)[flavour].format(arch=ARCHES[arch].kernel_suffix)

    def headers_meta_package(self, flavour: str, arch: str) -> str:
        """The meta-package that depends on the current headers (`linux-headers-cloud-amd64`)."""
        return f"linux-headers{self.kernel_suffix(flavour, arch)}"

    def kernel_flavour(self, kernel: str) -> str:
        """The flavour a kernel release names; one of no known shape counts as the last (metal)."""
        for flavour, _ in self.kernel_suffixes:
            if any(kernel.endswith(self.kernel_suffix(flavour, a)) for a in ARCHES):
                return flavour
        return self.kernel_suffixes[-1][0]

    def kernel_version(self, kernel: str) -> str:
        """A kernel release without its flavour and arch ("6.1.0-56", "6.12.38+deb12")."""
        for flavour, _ in self.kernel_suffixes:
            for arch in ARCHES:
                suffix = self.kernel_suffix(flavour, arch)
                if kernel.endswith(suffix):
                    return kernel.removesuffix(suffix)
        return kernel


DEBIAN = OSProfile(
    id="debian", name="Debian", version_id=None, version_id_key=None, release_tags=False, versions_label="os.versions",
    apt=AptLayout("{codename}", ("main",)), kernel_suffixes=_KERNEL_SUFFIXES, base="system", build_env="apt",
)
GARDENLINUX = OSProfile(
    id="gardenlinux", name="GL", version_id="0", version_id_key="GARDENLINUX_VERSION", release_tags=True, versions_label="gardenlinux.versions",
    apt=AptLayout("{version}", ("main",)), kernel_suffixes=_KERNEL_SUFFIXES, base="apt", build_env="kmodbuild",
)
PROFILES = Table("OS profile for", {p.id: p for p in (DEBIAN, GARDENLINUX)})


def os_profile(os_id: str) -> OSProfile:
    """The record of `os_id`; an OS without one is refused (UserError), not guessed to be like Debian."""
    return PROFILES.lookup(os_id)
