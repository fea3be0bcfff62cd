"""Which kernel an OS version ships, read from the `Packages` index of its apt repository.

The flavour's headers meta-package (`linux-headers-cloud-amd64`; metal: `linux-headers-amd64`) depends on
the current `linux-headers-<kernel>`; without a meta-package the newest `linux-headers-<kernel>` by Debian
version order wins. Kernel names per flavour and arch are the OS record's (`gl_nvidia.osprofile`). Works
against any Debian-style repository through `gl_nvidia.apt`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from debian.debian_support import Version, version_compare

from gl_nvidia.apt import AptRepo, AptSource, system_sources
from gl_nvidia.errors import UserError
from gl_nvidia.osprofile import DEBIAN, OSProfile


def expand_env(value: str) -> str:
    """Replace `${VAR}` with the environment's value; a missing variable is a clear error."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if not os.environ.get(name):
            raise UserError(f"environment variable {name} is not set (needed for {value})",
                            f"export {name}=<base URL of the apt repository>, or pass --apt-repository")
        return os.environ[name]

    return re.sub(r"\$\{(\w+)\}", sub, value)


def apt_sources(spec: str, os_version: str, distro: OSProfile, codename: str | None = None,
                etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """The apt sources of one OS version.

    `system:<codename>`: this machine's configured archive, only the suites `<codename>` and
    `<codename>-*` (other vendors' entries are not the OS's kernels), verified with their Signed-By keyring.
    Anything else is the base URL (or directory) of a repository laid out as the OS record says (Garden
    Linux: one suite per OS version), verified with the keyring file GL_APT_KEYRING names.
    """
    if spec.startswith("system:"):
        codename = spec.removeprefix("system:")
        chosen = [s for s in system_sources(etc_apt) if s.suite == codename or s.suite.startswith(f"{codename}-")]
        if not chosen:
            raise UserError(f"this machine's apt sources have no {codename} suites", "configure Debian's archive in /etc/apt")
        return chosen
    uri = expand_env(spec)
    keyring = os.environ.get("GL_APT_KEYRING")
    if not keyring:
        raise UserError(f"environment variable GL_APT_KEYRING is not set (the keyring to verify {uri} with)",
                        "export GL_APT_KEYRING=<the repository's archive keyring file, .gpg or .asc>")
    return [AptSource(uri, distro.apt.suite_of(os_version, codename), distro.apt.components, Path(keyring))]


def kernel_from_index(repo: AptRepo, flavour: str, arch: str, distro: OSProfile) -> str:
    suffix = distro.kernel_suffix(flavour, arch)
    meta = distro.headers_meta_package(flavour, arch)
    if repo.versions(meta):
        depends = repo.find(meta).depends
        for alternative in re.split(r"[,|]", depends):
            name = alternative.strip().split(" ", 1)[0]
            if name.startswith("linux-headers-") and name.endswith(suffix) and name != meta:
                return name.removeprefix("linux-headers-")
    # Without a meta-package: the newest headers package of this flavour and arch.
    candidates = repo.search(rf"linux-headers-\d\S*{re.escape(suffix)}")
    if not candidates:
        raise UserError(
            f"no linux-headers-*{suffix} package in {repo.describe()}",
            "check the repository URL and that this version ships the flavour",
        )
    newest = max(candidates, key=lambda p: (Version(p.version), kernel_sort_key(p.name, distro)))
    return newest.name.removeprefix("linux-headers-")


def resolve_kernel(spec: str, os_version: str, flavour: str, arch: str, distro: OSProfile,
                   codename: str | None = None) -> str:
    """The kernel release (`uname -r`) of one OS version, flavour and arch."""
    repo = AptRepo(apt_sources(spec, os_version, distro, codename), arch=arch)
    return kernel_from_index(repo, flavour, arch, distro)


def kernel_sort_key(kernel: str, distro: OSProfile = DEBIAN) -> Version:
    """Debian version order of a kernel release without its flavour suffix ("6.1.0-56", "6.12.38+deb12")."""
    return Version(distro.kernel_version(kernel.removeprefix("linux-headers-")))


def compare_kernels(a: str, b: str, distro: OSProfile = DEBIAN) -> int:
    return int(version_compare(str(kernel_sort_key(a, distro)), str(kernel_sort_key(b, distro))))
