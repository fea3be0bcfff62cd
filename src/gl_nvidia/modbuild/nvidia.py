"""The `nvidia` driver source: NVIDIA's `.run` installer, downloaded (or a local file), checked, unpacked.

Downloads are retried, checked against an expected sha256 when one is given, cached by version, and
unpacked with the installer's own `--extract-only` (which also verifies the installer's embedded
checksum). The unpacked tree is then read like the `dir` source. Fabric manager, IMEX and nvlsm come from
the redist tree (redist.py), each checked against its `redistrib_<version>.json` before it is used; that
manifest lists no `.run` (its driver entry is the tree's own archive), so an installer named only by URL
stays trusted by name unless `sha256` pins it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import httpx

from gl_nvidia import net, ui
from gl_nvidia.arches import ARCHES
from gl_nvidia.download import download
from gl_nvidia.errors import CommandError, UserError
from gl_nvidia.fs import cache_dir, cache_fill, cache_hit, sha256_file
from gl_nvidia.modbuild.redist import REDIST_URL, NotPublished, RedistFile, RedistTree
from gl_nvidia.modbuild.sources import EXTRA_COMPONENTS, DriverInputs, run_tree_inputs
from gl_nvidia.run import run

log = logging.getLogger(__name__)

NVIDIA_URL = "https://us.download.nvidia.com/tesla/{version}/NVIDIA-Linux-{machine}-{version}.run"


def run_file_name(version: str, arch: str) -> str:
    return f"NVIDIA-Linux-{ARCHES[arch].nvidia}-{version}.run"


def _is_url(location: str) -> bool:
    return urlparse(location).scheme in ("http", "https")


class NvidiaRunSource:
    """`location`: a local .run path, or a URL (template with {version} and {machine}) to download.

    `redist`: the redist tree (URL or directory) whose redistrib_<version>.json lists the fabric manager,
    IMEX and nvlsm archives of the release; by default NVIDIA's for a downloaded installer, the directory
    of a local one. A component the tree does not list ships as a left-out reason, not a silent gap.
    """

    name = "nvidia"

    def __init__(self, location: str = NVIDIA_URL, *, sha256: str | None = None, redist: str | None = None,
                 client: httpx.Client | None = None, retry_delay: float = 1.0) -> None:
        self.location = location
        self.sha256 = sha256.lower() if sha256 else None
        self.redist = redist
        self._client = client
        self.retry_delay = retry_delay
        self._listed: dict[tuple[str, str], tuple[dict[str, RedistFile], dict[str, str]]] = {}

    def checksums(self, driver_version: str, arch: str) -> dict[str, str]:
        """A local installer's sha256; a downloaded one's expected sha256, else its URL (NVIDIA never
        replaces a released installer under the same name). Each component archive's sha256 as the redist
        manifest lists it, or why there is none."""
        url = self.location.format(version=driver_version, machine=ARCHES[arch].nvidia)
        files, missing = self.components(driver_version, arch)
        sums = {**{f.name: f.sha256 for f in files.values()}, **{c: f"none: {why}" for c, why in missing.items()}}
        if not _is_url(url):
            return {run_file_name(driver_version, arch): sha256_file(self.fetch(driver_version, arch)), **sums}
        return {run_file_name(driver_version, arch): self.sha256 or url, **sums}

    def tree(self, driver_version: str, arch: str) -> RedistTree:
        location = self.redist
        if location is None:
            run_file = self.location.format(version=driver_version, machine=ARCHES[arch].nvidia)
            location = REDIST_URL if _is_url(run_file) else str(Path(run_file).parent)
        return RedistTree(location, self.client, self.retry_delay)

    @property
    def client(self) -> httpx.Client:
        """One HTTP client for the installer and the redist tree (made on first use: a local .run needs none)."""
        if self._client is None:
            self._client = net.client(read_s=300.0)
        return self._client

    def components(self, driver_version: str, arch: str) -> tuple[dict[str, RedistFile], dict[str, str]]:
        """What the redist tree lists for this release (read once per source), and why each other
        component is missing."""
        key = (driver_version, arch)
        if key not in self._listed:
            try:
                self._listed[key] = self.tree(*key).manifest(driver_version, arch)
            except NotPublished as exc:
                self._listed[key] = ({}, {c: exc.message for c in EXTRA_COMPONENTS})
        return self._listed[key]

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
        files, missing = self.components(driver_version, arch)
        redist = self.tree(driver_version, arch)
        trees = {c: redist.unpack(f) for c, f in files.items()}
        digests = {run_file.name: digest, **{f.name: f.sha256 for f in files.values()}}
        inputs = run_tree_inputs(tree / "driver", arch, self.name, digests, components=trees, left_out=missing)
        if inputs.driver_version != driver_version:
            raise UserError(f"{run_file.name} holds driver {inputs.driver_version}, not {driver_version}")
        return inputs

    def fetch(self, driver_version: str, arch: str) -> Path:
        """The .run file for this version: the local path, or a cached (else downloaded) copy."""
        url = self.location.format(version=driver_version, machine=ARCHES[arch].nvidia)
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
        download(
            self.client, url, dest, sha256=self.sha256, retry_delay=self.retry_delay,
            mismatch_hint="check --sha256; the file on the server differs from the one expected",
            not_found=UserError(f"unknown driver version {driver_version}: {url} does not exist (HTTP 404)",
                                "check the version against NVIDIA's releases (gl-nvidia matrix)"),
        )
