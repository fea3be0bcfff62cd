"""NVIDIA's driver redist tree: the components the image carries beside the `.run`, as NVIDIA lists them.

Per driver release the tree's root holds `redistrib_<version>.json`: per component (`fabricmanager`,
`imex`, `nvlsm`, ...) its version and, per platform, the archive's `relative_path`, `sha256` and `size`.
The image takes five: fabric manager, IMEX, libnvidia_nscq and libnvsdm (which DCGM needs on NVSwitch
systems) of exactly the driver version, and the NVLink subnet manager that the release names (nvlsm is
versioned on its own). The tree may be NVIDIA's, a mirror's or a local
directory: an archive is used only when its sha256 and size are the ones the manifest lists, and a
manifest path that leaves the component's directory is refused. Every such refusal is an
IntegrityError: bad input for the whole run, never one build unit's failure.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from gl_nvidia.arches import ARCHES
from gl_nvidia.bundle import read_json
from gl_nvidia.download import download
from gl_nvidia.errors import CommandError, IntegrityError, UserError
from gl_nvidia.fs import cache_dir, cache_fill, cache_hit, sha256_file
from gl_nvidia.modbuild.sources import EXTRA_COMPONENTS
from gl_nvidia.run import run

REDIST_URL = "https://developer.download.nvidia.com/compute/nvidia-driver/redist/"
OWN_VERSION = {"nvlsm"}  # versioned on its own; every other component is of exactly the driver's version
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RedistFile:
    component: str
    version: str
    relative_path: str
    sha256: str
    size: int
    listed_by: str  # the manifest that vouches for it

    @property
    def name(self) -> str:
        return PurePosixPath(self.relative_path).name

    @property
    def top(self) -> str:
        """The one directory NVIDIA's archives unpack to."""
        return self.name.removesuffix(".tar.xz")


def manifest_name(driver_version: str) -> str:
    return f"redistrib_{driver_version}.json"


def listed(manifest: Any, driver_version: str, arch: str, where: str) -> tuple[dict[str, RedistFile], dict[str, str]]:
    """The archives the parsed manifest lists for `arch`, and why each component it lists none of is missing.

    A listing that is damaged, of another version, or whose path leaves `<component>/<platform>/` is an
    error: the manifest is the only thing that vouches for the archives."""
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{where} is not NVIDIA's redistrib manifest (not a JSON object)")
    if manifest.get("release_label", driver_version) != driver_version:
        raise IntegrityError(f"{where} is the manifest of {manifest['release_label']}, not of {driver_version}")
    platform = ARCHES[arch].redist
    files: dict[str, RedistFile] = {}
    missing: dict[str, str] = {}
    for component in EXTRA_COMPONENTS:
        entry = manifest.get(component)
        if not isinstance(entry, dict) or platform not in entry:
            missing[component] = f"{where} lists no {component} for {platform}"
            continue
        try:
            f = RedistFile(component, str(entry["version"]), str(entry[platform]["relative_path"]),
                           str(entry[platform]["sha256"]), int(entry[platform]["size"]), where)
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{where}: {component} {platform} lacks a valid {exc}", "the manifest is damaged; "
                            "NVIDIA's lists version, relative_path, sha256 and size") from exc
        path = PurePosixPath(f.relative_path)
        if (path.is_absolute() or ".." in path.parts or path.parts[:2] != (component, platform)
                or not f.name.endswith(f"-{f.version}-archive.tar.xz")):
            raise IntegrityError(f"{where} lists {component} {f.version} at {f.relative_path!r}, not an archive of "
                            f"that version under {component}/{platform}/")
        if component not in OWN_VERSION and f.version != driver_version:
            raise IntegrityError(f"{where} lists {component} {f.version}, not {driver_version}: it must be of exactly "
                            "the driver's version")
        if not _SHA256.fullmatch(f.sha256):
            raise IntegrityError(f"{where}: {component} {platform} has no valid sha256: {f.sha256!r}")
        files[component] = f
    return files, missing


class NotPublished(UserError):
    """The tree has no manifest for this release: the image ships without its components, saying why."""


class RedistTree:
    """A redist tree at `location`: an http(s) URL or a local directory, laid out as NVIDIA's."""

    def __init__(self, location: str, client: httpx.Client, retry_delay: float = 1.0) -> None:
        self.location = location.rstrip("/") + "/"
        self.client = client
        self.retry_delay = retry_delay

    def url(self, relative: str) -> str:
        return self.location + relative

    def manifest(self, driver_version: str, arch: str) -> tuple[dict[str, RedistFile], dict[str, str]]:
        """What redistrib_<version>.json lists; NotPublished when the tree has none."""
        url = self.url(manifest_name(driver_version))
        with tempfile.TemporaryDirectory(prefix="gl-nvidia-redist-") as tmp:
            dest = Path(tmp) / manifest_name(driver_version)
            download(self.client, url, dest, retry_delay=self.retry_delay, mismatch_hint="download it again",
                     not_found=NotPublished(f"the redist tree has no release {driver_version}: {url} does not exist"))
            raw = dest.read_bytes()
        try:
            parsed = read_json(raw)
        except ValueError as exc:
            raise IntegrityError(f"{url} is not NVIDIA's redistrib manifest (not JSON: {exc})") from exc
        return listed(parsed, driver_version, arch, url)

    def fetch(self, f: RedistFile) -> Path:
        """The archive, downloaded once and kept by its sha256; a mismatch keeps nothing."""
        entry = cache_dir("build", "redist") / f"{f.top}-{f.sha256}"
        if not cache_hit(entry):
            url = self.url(f.relative_path)
            with cache_fill(entry) as tmp:
                # Checked here, not by download(): a mismatch is an IntegrityError, a network failure is not.
                download(self.client, url, tmp / f.name, retry_delay=self.retry_delay, mismatch_hint="")
                got = sha256_file(tmp / f.name)
                if got != f.sha256:
                    raise IntegrityError(f"checksum mismatch for {url}: expected sha256 {f.sha256}, got {got}",
                                         f"the archive is not the one {f.listed_by} lists; nothing was kept")
                size = (tmp / f.name).stat().st_size
                if size != f.size:
                    raise IntegrityError(f"size mismatch for {url}: the manifest lists {f.size} bytes, got {size}",
                                         "the archive is not the one NVIDIA lists; nothing was kept")
        return entry / f.name

    def unpack(self, f: RedistFile) -> Path:
        archive = self.fetch(f)
        tree = cache_dir("build", "redist-trees") / f"{f.top}-{f.sha256}"
        if not cache_hit(tree):
            with cache_fill(tree) as tmp:
                try:
                    run(["tar", "-xJf", archive, "-C", tmp, "--no-same-owner"])
                except CommandError as exc:
                    raise IntegrityError(f"cannot unpack {archive}: {exc.message}", "the archive is damaged") from exc
                found = sorted(p.name for p in tmp.iterdir())
                if found != [f.top] or (tmp / f.top).is_symlink():
                    raise IntegrityError(f"{f.name} holds {', '.join(found) or 'nothing'}, not {f.top}",
                                    "NVIDIA's archives unpack to one directory named like the archive")
        return tree / f.top
