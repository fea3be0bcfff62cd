"""The `nvidia` driver source: NVIDIA's `.run` installer, downloaded (or a local file), checked, unpacked.

Downloads are retried, checked against an expected sha256 when one is given, cached by version, and
unpacked with the installer's own `--extract-only` (which also verifies the installer's embedded
checksum). The unpacked tree is then read like the `dir` source.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import httpx

from gl_nvidia import ui
from gl_nvidia.build.sources import DriverInputs, run_tree_inputs
from gl_nvidia.download import download
from gl_nvidia.errors import CommandError, UserError
from gl_nvidia.fs import cache_dir, cache_fill, cache_hit, sha256_file
from gl_nvidia.run import run

log = logging.getLogger(__name__)

NVIDIA_URL = "https://us.download.nvidia.com/tesla/{version}/NVIDIA-Linux-{machine}-{version}.run"
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
# Fabric manager of every data center driver version, in NVIDIA's redist tree ({arch}: x86_64 or sbsa).
FABRICMANAGER_URL = ("https://developer.download.nvidia.com/compute/cuda/redist/fabricmanager/linux-{arch}/"
                     "fabricmanager-linux-{arch}-{version}-archive.tar.xz")
FM_ARCHES = {"amd64": "x86_64", "arm64": "sbsa"}  # the redist tree's name for arm64 servers


def run_file_name(version: str, arch: str) -> str:
    return f"NVIDIA-Linux-{MACHINES[arch]}-{version}.run"


def fabricmanager_name(version: str, arch: str) -> str:
    return f"fabricmanager-linux-{FM_ARCHES[arch]}-{version}-archive.tar.xz"


def _is_url(location: str) -> bool:
    return urlparse(location).scheme in ("http", "https")


class NvidiaRunSource:
    """`location`: a local .run path, or a URL (template with {version} and {machine}) to download.

    `fabricmanager`: NVIDIA's fabric manager archive of the same version, a local path or a URL template
    ({version}, {arch}); by default NVIDIA's redist tree for a downloaded installer, the archive beside a
    local one. When there is none (a 404, no file), the image ships without it and the bundle says why.
    """

    name = "nvidia"

    def __init__(self, location: str = NVIDIA_URL, *, sha256: str | None = None, fabricmanager: str | None = None,
                 client: httpx.Client | None = None, retry_delay: float = 1.0) -> None:
        self.location = location
        self.sha256 = sha256.lower() if sha256 else None
        self.fabricmanager = fabricmanager
        self._client = client
        self.retry_delay = retry_delay

    def checksums(self, driver_version: str, arch: str) -> dict[str, str]:
        """A local installer's sha256; a downloaded one's expected sha256, else its URL (NVIDIA never
        replaces a released installer under the same name). The same for the fabric manager archive."""
        url = self.location.format(version=driver_version, machine=MACHINES[arch])
        fm = self._fm_location(driver_version, arch)
        sums = {fabricmanager_name(driver_version, arch): fm if _is_url(fm) else
                sha256_file(Path(fm)) if Path(fm).is_file() else "none"}
        if not _is_url(url):
            return {run_file_name(driver_version, arch): sha256_file(self.fetch(driver_version, arch)), **sums}
        return {run_file_name(driver_version, arch): self.sha256 or url, **sums}

    def _fm_location(self, driver_version: str, arch: str) -> str:
        if self.fabricmanager is not None:
            return self.fabricmanager.format(version=driver_version, arch=FM_ARCHES[arch])
        run_file = self.location.format(version=driver_version, machine=MACHINES[arch])
        if _is_url(run_file):
            return FABRICMANAGER_URL.format(version=driver_version, arch=FM_ARCHES[arch])
        return str(Path(run_file).parent / fabricmanager_name(driver_version, arch))

    def fetch_fabricmanager(self, driver_version: str, arch: str) -> tuple[Path | None, str]:
        """The fabric manager archive of exactly this version (cached), or None and why there is none."""
        location = self._fm_location(driver_version, arch)
        name = fabricmanager_name(driver_version, arch)
        if not _is_url(location):
            path = Path(location)
            return (path, "") if path.is_file() else (None, f"no fabric manager for {driver_version}: {path} does not exist")
        entry = cache_dir("build", "fabricmanager") / f"{driver_version}-{arch}"
        if cache_hit(entry):
            return entry / name, ""
        client = self._client or httpx.Client(timeout=httpx.Timeout(30.0, read=300.0), follow_redirects=True)
        missing = UserError(f"NVIDIA publishes no fabric manager for {driver_version} ({arch})")
        try:
            with cache_fill(entry) as tmp:
                download(client, location, tmp / name, retry_delay=self.retry_delay, not_found=missing,
                         mismatch_hint="download it again")
        except UserError as exc:
            if exc is not missing:
                raise
            return None, f"NVIDIA publishes no fabric manager for {driver_version} ({arch}): {location} answered 404"
        return entry / name, ""

    def _unpack_fabricmanager(self, archive: Path, driver_version: str, arch: str) -> Path:
        digest = sha256_file(archive)
        tree = cache_dir("build", "fabricmanager-trees") / f"{driver_version}-{arch}-{digest[:16]}"
        top = fabricmanager_name(driver_version, arch).removesuffix(".tar.xz")
        if not cache_hit(tree):
            with cache_fill(tree) as tmp:
                try:
                    run(["tar", "-xJf", archive, "-C", tmp])
                except CommandError as exc:
                    raise UserError(f"cannot unpack {archive}: {exc.message}",
                                    "the archive is damaged; download it again") from exc
                if not (tmp / top).is_dir():
                    found = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
                    raise UserError(f"{archive.name} holds {found}, not {top}: fabric manager must be of "
                                    f"exactly driver {driver_version}", "pass the archive of this driver version")
        return tree / top

    def prepare(self, driver_version: str, arch: str) -> DriverInputs:
        run_file = self.fetch(driver_version, arch)
        digest = sha256_file(run_file)
        if self.sha256 and digest != self.sha256:
            raise UserError(f"checksum mismatch for {run_file.name}: expected sha256 {self.sha256}, got {digest}",
                            "check --sha256, or delete the file and download it again")
        tree = cache_dir("build", "run-trees") / f"{driver_version}-{arch}-{digest[:16]}"
        if not cache_hit(tree):
            with ui.progress() as prog, ui.task(prog, f"unpack {run_file.name}"), cache_fill(tree) as tmp:
                try:
                    run(["sh", run_file, "--extract-only", "--target", tmp / "driver"])
                except CommandError as exc:
                    raise UserError(f"cannot unpack {run_file}: {exc.message}",
                                    "the installer is damaged or not an NVIDIA .run; download it again") from exc
        archive, why = self.fetch_fabricmanager(driver_version, arch)
        fm = self._unpack_fabricmanager(archive, driver_version, arch) if archive else None
        digests = {run_file.name: digest, **({archive.name: sha256_file(archive)} if archive else {})}
        inputs = run_tree_inputs(tree / "driver", arch, self.name, digests, fabricmanager=fm,
                                 left_out={"fabricmanager": why} if why else {})
        if inputs.driver_version != driver_version:
            raise UserError(f"{run_file.name} holds driver {inputs.driver_version}, not {driver_version}")
        return inputs

    def fetch(self, driver_version: str, arch: str) -> Path:
        """The .run file for this version: the local path, or a cached (else downloaded) copy."""
        url = self.location.format(version=driver_version, machine=MACHINES[arch])
        if not _is_url(url):
            path = Path(url)
            if not path.is_file():
                raise UserError(f"no such driver installer: {path}", "pass a .run file or an http(s) URL")
            return path
        entry = cache_dir("build", "runs") / f"{driver_version}-{arch}"
        cached = entry / run_file_name(driver_version, arch)
        if cache_hit(entry) and (self.sha256 is None or sha256_file(cached) == self.sha256):
            return cached
        with cache_fill(entry) as tmp:
            self._download(url, tmp / cached.name, driver_version)
        return cached

    def _download(self, url: str, dest: Path, driver_version: str) -> None:
        client = self._client or httpx.Client(timeout=httpx.Timeout(30.0, read=300.0), follow_redirects=True)
        download(
            client, url, dest, sha256=self.sha256, retry_delay=self.retry_delay,
            mismatch_hint="check --sha256; the file on the server differs from the one expected",
            not_found=UserError(f"unknown driver version {driver_version}: {url} does not exist (HTTP 404)",
                                "check the version against NVIDIA's releases (gl-nvidia matrix)"),
        )
