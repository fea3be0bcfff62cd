"""Which kernel an OS version ships, read from the `Packages` index of its apt repository.

The flavour's headers meta-package (`linux-headers-cloud-amd64`; metal: `linux-headers-amd64`) depends on
the current `linux-headers-<kernel>`; without a meta-package the newest `linux-headers-<kernel>` by Debian
version order wins. Kernel names per flavour and arch are the OS record's (`gl_nvidia.osprofile`). Works
against any Debian-style repository through `gl_nvidia.apt`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from debian.debian_support import Version, version_compare

from gl_nvidia.apt import AptRepo, AptSource, release_suites, system_sources
from gl_nvidia.errors import UserError
from gl_nvidia.osprofile import DEBIAN, OSProfile

log = logging.getLogger(__name__)

# A kernel release's version part with its ABI ("6.1.0-57", "6.12.117+deb13", "6.12.44"): not a
# series meta-package ("6.12") nor another flavour's ("6.12.117+deb13-rt" before "-amd64").
_ABI_VERSION = re.compile(r"\d+\.\d+\.\d+(-\d+)?(\+[a-z0-9.]+)?")


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

    `system:<codename>` (`system`: `codename`'s): this machine's configured archive, only the suites `<codename>` and
    `<codename>-*` (other vendors' entries are not the OS's kernels), verified with their Signed-By keyring;
    for a release this machine does not list (trixie on a bookworm machine), the same archive's suites of
    that release (`apt.release_suites`).
    Anything else is the base URL (or directory) of a repository laid out as the OS record says (Garden
    Linux: one suite per OS version), verified with the keyring file GL_APT_KEYRING names.
    """
    if spec == "system":  # several OS versions: each its own release's suites
        if not codename:
            raise UserError(f"sources.apt `system` needs the codename of OS version {os_version}",
                            "give it in os.versions (e.g. {version: '13', codename: trixie})")
        spec = f"system:{codename}"
    if spec.startswith("system:"):
        codename = spec.removeprefix("system:")
        if not re.fullmatch(r"[a-z]+", codename):
            raise UserError(f"{spec!r} does not name a Debian release (system:<codename>, e.g. system:trixie)",
                            "fix sources.apt or --apt-repository")
        configured = system_sources(etc_apt)
        chosen = [s for s in configured if s.suite == codename or s.suite.startswith(f"{codename}-")]
        return chosen or release_suites(configured, codename)
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


def series(kernel: str, distro: OSProfile = DEBIAN) -> str:
    """The upstream series a kernel release belongs to ("6.1" for 6.1.0-57, "6.12" for 6.12.117+deb13)."""
    return ".".join(distro.kernel_version(kernel).split(".", 2)[:2])


def kernel_before(repo: AptRepo, kernel: str, flavour: str, arch: str, distro: OSProfile) -> str | None:
    """The newest ABI of `kernel`'s flavour, arch and series older than it, as the index lists it now
    (None: the index holds no older one). Nothing is pinned: when the archive rotates an ABI out, the
    next older one takes its place."""
    suffix = distro.kernel_suffix(flavour, arch)
    older = [name for p in repo.search(rf"linux-headers-\d\S*{re.escape(suffix)}")
             if _ABI_VERSION.fullmatch((name := p.name.removeprefix("linux-headers-")).removesuffix(suffix))
             and series(name, distro) == series(kernel, distro) and compare_kernels(name, kernel, distro) < 0]
    return max(older, key=lambda k: kernel_sort_key(k, distro)) if older else None


def resolve_kernel(spec: str, os_version: str, flavour: str, arch: str, distro: OSProfile,
                   codename: str | None = None) -> str:
    """The kernel release (`uname -r`) of one OS version, flavour and arch."""
    return resolve_kernels(spec, os_version, flavour, arch, distro, codename)[0]


def resolve_kernels(spec: str, os_version: str, flavour: str, arch: str, distro: OSProfile,
                    codename: str | None = None, previous: bool = False) -> list[str]:
    """The current kernel release of one OS version, flavour and arch, and with `previous` the ABI
    before it (when the index still lists one: a warning otherwise)."""
    repo = AptRepo(apt_sources(spec, os_version, distro, codename), arch=arch)
    current = kernel_from_index(repo, flavour, arch, distro)
    if not previous:
        return [current]
    before = kernel_before(repo, current, flavour, arch, distro)
    if before is None:
        log.warning("%s lists no %s kernel older than %s: its previous ABI is left out", repo.describe(),
                    distro.kernel_suffix(flavour, arch).lstrip("-"), current)
        return [current]
    return [current, before]


def kernel_sort_key(kernel: str, distro: OSProfile = DEBIAN) -> Version:
    """Debian version order of a kernel release without its flavour suffix ("6.1.0-56", "6.12.38+deb12")."""
    return Version(distro.kernel_version(kernel.removeprefix("linux-headers-")))


def compare_kernels(a: str, b: str, distro: OSProfile = DEBIAN) -> int:
    return int(version_compare(str(kernel_sort_key(a, distro)), str(kernel_sort_key(b, distro))))
