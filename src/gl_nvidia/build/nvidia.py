"""The `nvidia` driver source: NVIDIA's `.run` installer, downloaded (or a local file), checked, unpacked.

Downloads are retried, checked against an expected sha256 when one is given, cached by version, and
unpacked with the installer's own `--extract-only` (which also verifies the installer's embedded
checksum). The unpacked tree is then read like the `dir` source. The fabric manager archive from NVIDIA's
redist tree is checked against the sha256 and size its `redistrib_<version>.json` lists before it is used;
that manifest lists no `.run` (its driver entry is the tree's own archive), so an installer named only by
URL stays trusted by name unless `sha256` pins it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
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
# NVIDIA's driver redist tree: per driver version a redistrib_<version>.json listing each component's
# archive (its relative_path from the tree's root) with sha256 and size; fabric manager among them.
REDIST_URL = "https://developer.download.nvidia.com/compute/nvidia-driver/redist/"
FABRICMANAGER_URL = REDIST_URL + "fabricmanager/linux-{arch}/fabricmanager-linux-{arch}-{version}-archive.tar.xz"
FM_ARCHES = {"amd64": "x86_64", "arm64": "sbsa"}  # the redist tree's name for arm64 servers
_SHA256 = re.compile(r"[0-9a-f]{64}")


def run_file_name(version: str, arch: str) -> str:
    return f"NVIDIA-Linux-{MACHINES[arch]}-{version}.run"


def fabricmanager_name(version: str, arch: str) -> str:
    return f"fabricmanager-linux-{FM_ARCHES[arch]}-{version}-archive.tar.xz"


def fabricmanager_path(version: str, arch: str) -> str:
    """The archive's relative_path in the redist tree, as redistrib_<version>.json names it."""
    return f"fabricmanager/linux-{FM_ARCHES[arch]}/{fabricmanager_name(version, arch)}"


def redist_manifest_url(archive_url: str, version: str, arch: str) -> str:
    """redistrib_<version>.json at the root of the redist tree that holds `archive_url`."""
    rel = fabricmanager_path(version, arch)
    if not archive_url.endswith(f"/{rel}"):
        raise UserError(f"cannot verify {archive_url}: not in NVIDIA's redist tree layout (<tree>/{rel}), whose "
                        f"redistrib_{version}.json lists its sha256", "pass a URL in that layout, or a local archive")
    return f"{archive_url.removesuffix(rel)}redistrib_{version}.json"


@dataclass(frozen=True)
class RedistFile:
    sha256: str
    size: int


def fabricmanager_entry(manifest: Any, version: str, arch: str, where: str) -> RedistFile | None:
    """What NVIDIA's redistrib_<version>.json (`manifest`, parsed) lists for the fabric manager archive of
    `arch`; None when it lists none. Anything else than the exact archive of `version` is refused."""
    if not isinstance(manifest, dict):
        raise UserError(f"{where} is not NVIDIA's redistrib manifest (not a JSON object)")
    component = manifest.get("fabricmanager")
    platform = f"linux-{FM_ARCHES[arch]}"
    if not isinstance(component, dict) or platform not in component:
        return None
    entry, rel = component[platform], fabricmanager_path(version, arch)
    try:
        listed = (component["version"], entry["relative_path"], entry["sha256"], int(entry["size"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: fabricmanager {platform} lacks a valid {exc}",
                        "the manifest is damaged; NVIDIA's lists version, relative_path, sha256 and size") from exc
    if listed[:2] != (version, rel):
        raise UserError(f"{where} lists fabricmanager {listed[0]} at {listed[1]}, not {version} at {rel}")
    if not (isinstance(listed[2], str) and _SHA256.fullmatch(listed[2])):
        raise UserError(f"{where}: fabricmanager {platform} has no valid sha256: {listed[2]!r}")
    return RedistFile(listed[2], listed[3])


class _NotPublished(UserError):
    """NVIDIA's tree has no fabric manager of this version: the image ships without it, saying why."""


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
        """The fabric manager archive of exactly this version (cached), or None and why there is none.

        A download is used only when its sha256 and size are what NVIDIA's redistrib_<version>.json lists."""
        location = self._fm_location(driver_version, arch)
        name = fabricmanager_name(driver_version, arch)
        if not _is_url(location):
            path = Path(location)
            return (path, "") if path.is_file() else (None, f"no fabric manager for {driver_version}: {path} does not exist")
        manifest_url = redist_manifest_url(location, driver_version, arch)
        entry = cache_dir("build", "fabricmanager") / f"{driver_version}-{arch}"
        if cache_hit(entry):  # filled only with an archive that matched the manifest beside it
            return entry / name, ""
        client = self._client or httpx.Client(timeout=httpx.Timeout(30.0, read=300.0), follow_redirects=True)
        none = f"NVIDIA publishes no fabric manager for {driver_version} ({arch})"
        try:
            with cache_fill(entry) as tmp:
                listed = self._redist_entry(client, manifest_url, tmp, driver_version, arch, none)
                download(client, location, tmp / name, sha256=listed.sha256, retry_delay=self.retry_delay,
                         not_found=_NotPublished(f"{none}: {location} answered 404"),
                         mismatch_hint=f"the archive is not the one {manifest_url} lists; nothing was kept")
                size = (tmp / name).stat().st_size
                if size != listed.size:
                    raise UserError(f"size mismatch for {location}: {manifest_url} lists {listed.size} bytes, "
                                    f"got {size}", "the archive is not the one NVIDIA lists; nothing was kept")
        except _NotPublished as exc:
            return None, exc.message
        return entry / name, ""

    def _redist_entry(self, client: httpx.Client, url: str, tmp: Path, driver_version: str, arch: str,
                      none: str) -> RedistFile:
        dest = tmp / url.rpartition("/")[2]
        download(client, url, dest, retry_delay=self.retry_delay, not_found=_NotPublished(f"{none}: {url} answered 404"),
                 mismatch_hint="download it again")
        try:
            manifest = json.loads(dest.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{url} is not NVIDIA's redistrib manifest (not JSON: {exc})") from exc
        listed = fabricmanager_entry(manifest, driver_version, arch, url)
        if listed is None:
            raise _NotPublished(f"{none}: {url} lists none for linux-{FM_ARCHES[arch]}")
        return listed

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
