"""A client for Debian-style apt repositories: read `Packages` indexes, find, download and unpack packages.

Used for Garden Linux's per-version repositories and for Debian's archive alike. Debian's archive is
never named in code: `system_sources()` reads what this machine's apt is configured with.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
from debian.deb822 import Deb822, Packages
from debian.debian_support import Version

from gl_nvidia.download import download
from gl_nvidia.errors import UserError
from gl_nvidia.fs import atomic_write_bytes, cache_dir, sha256_file
from gl_nvidia.run import run

log = logging.getLogger(__name__)

# Indexes are re-validated (a conditional GET, cheap) when older than this.
INDEX_TTL_S = 3600.0
_PKG_LINE = re.compile(rb"^Package: (\S+)$", re.M)


@dataclass(frozen=True)
class AptSource:
    """One `deb` entry: base URI (or local directory / file:// URI), suite, components."""

    uri: str
    suite: str
    components: tuple[str, ...]

    def index_url(self, component: str, arch: str) -> str:
        return f"{self.uri.rstrip('/')}/dists/{self.suite}/{component}/binary-{arch}/Packages"


@dataclass(frozen=True)
class AptPackage:
    name: str
    version: str
    architecture: str
    filename: str  # repository-relative path of the .deb
    sha256: str
    size: int
    depends: str
    source: str  # source package name
    base_uri: str

    @property
    def url(self) -> str:
        return f"{self.base_uri.rstrip('/')}/{self.filename}"

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


def system_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """The `deb` sources this machine's apt uses (sources.list, *.list, deb822 *.sources)."""
    sources: list[AptSource] = []
    one_line = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if path.is_file():
            sources += _parse_one_line(path.read_text())
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        sources += _parse_deb822(path.read_text())
    if not sources:
        raise UserError(f"no apt sources configured in {etc_apt}", "configure Debian's archive in apt first")
    return sources


def _parse_one_line(text: str) -> list[AptSource]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        # Options in brackets ("deb [arch=amd64 signed-by=...] uri suite comp...") do not change the index path.
        line = re.sub(r"\[[^\]]*\]\s*", "", line)
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "deb":
            out.append(AptSource(parts[1], parts[2], tuple(parts[3:])))
    return out


def _parse_deb822(text: str) -> list[AptSource]:
    out = []
    for para in Deb822.iter_paragraphs(text.splitlines()):
        if "deb" not in para.get("Types", "").split() or para.get("Enabled", "yes").lower() == "no":
            continue
        for uri in para.get("URIs", "").split():
            for suite in para.get("Suites", "").split():
                out.append(AptSource(uri, suite, tuple(para.get("Components", "").split())))
    return out


def parse_packages(data: bytes, base_uri: str) -> dict[str, list[AptPackage]]:
    """Parse a `Packages` index into name -> versions (newest first)."""
    index: dict[str, list[AptPackage]] = {}
    for para in Packages.iter_paragraphs(data.decode("utf-8", errors="replace").splitlines(), use_apt_pkg=False):
        if "Package" not in para or "Filename" not in para:
            continue
        pkg = AptPackage(
            name=para["Package"],
            version=para["Version"],
            architecture=para.get("Architecture", ""),
            filename=para["Filename"],
            sha256=para.get("SHA256", ""),
            size=int(para.get("Size", "0")),
            depends=para.get("Depends", ""),
            source=para.get("Source", para["Package"]).split()[0],
            base_uri=base_uri,
        )
        index.setdefault(pkg.name, []).append(pkg)
    for versions in index.values():
        versions.sort(key=lambda p: Version(p.version), reverse=True)
    return index


class AptRepo:
    """The union of several apt sources for one architecture, read lazily.

    Indexes are cached on disk and re-validated with conditional GETs; paragraphs are parsed only for
    the package names asked about, since Debian's full index has tens of thousands.
    """

    def __init__(
        self,
        sources: Iterable[AptSource],
        arch: str = "amd64",
        client: httpx.Client | None = None,
        cache: Path | None = None,
    ) -> None:
        self.sources = list(sources)
        self.arch = arch
        self._client = client or httpx.Client(timeout=httpx.Timeout(30.0, read=120.0), follow_redirects=True)
        self._cache = cache or cache_dir("apt")
        self._raw: dict[str, list[tuple[bytes, str]]] | None = None  # name -> [(paragraph, base uri)]

    def describe(self) -> str:
        return ", ".join(sorted({f"{s.uri} {s.suite}" for s in self.sources}))

    def _load(self) -> dict[str, list[tuple[bytes, str]]]:
        if self._raw is None:
            raw: dict[str, list[tuple[bytes, str]]] = {}
            for source in self.sources:
                for component in source.components:
                    data = self._fetch_index(source, component)
                    for para in data.split(b"\n\n"):
                        m = _PKG_LINE.search(para)
                        if m:
                            raw.setdefault(m.group(1).decode(), []).append((para, source.uri))
            self._raw = raw
        return self._raw

    def names(self) -> list[str]:
        return sorted(self._load())

    def versions(self, name: str) -> list[AptPackage]:
        """Every version of `name` across the sources, newest first."""
        found: list[AptPackage] = []
        for para, base in self._load().get(name, []):
            found += parse_packages(para, base).get(name, [])
        found.sort(key=lambda p: Version(p.version), reverse=True)
        return found

    def find(self, name: str, version: str | None = None) -> AptPackage:
        versions = self.versions(name)
        if version is not None:
            versions = [p for p in versions if p.version == version]
        if not versions:
            what = name if version is None else f"{name} {version}"
            raise UserError(
                f"package {what} not found in {self.describe()}",
                "check the name and version, and that the repository's index is current",
            )
        return versions[0]

    def search(self, pattern: str) -> list[AptPackage]:
        """Newest version of every package whose name fully matches `pattern`."""
        rx = re.compile(pattern)
        return [self.find(n) for n in self.names() if rx.fullmatch(n)]

    def download(self, pkg: AptPackage, dest: Path | None = None) -> Path:
        """Download a .deb (sha256-checked, cached by digest); return its path (in `dest` if given)."""
        cached = self._cache / "debs" / f"{pkg.sha256[:16]}-{pkg.deb_name}"
        if not (cached.is_file() and sha256_file(cached) == pkg.sha256):
            download(self._client, pkg.url, cached, sha256=pkg.sha256 or None,
                     mismatch_hint="the mirror may be mid-sync; retry later")
        if dest is None:
            return cached
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / pkg.deb_name
        if not target.exists():
            if _same_fs(cached, dest):
                target.hardlink_to(cached)
            else:
                atomic_write_bytes(target, cached.read_bytes())
        return target

    def _fetch_index(self, source: AptSource, component: str) -> bytes:
        url = source.index_url(component, self.arch)
        key = _sha256(url.encode())[:24]
        body, meta = self._cache / "index" / f"{key}.bin", self._cache / "index" / f"{key}.json"
        if body.exists() and meta.exists():
            info = json.loads(meta.read_text())
            if time.time() - info["checked"] < INDEX_TTL_S:
                return body.read_bytes()
        else:
            info = {}
        local = _local_path(url)
        if local is not None:
            return _read_index_file(local)
        headers = {k: v for k, v in (("If-None-Match", info.get("etag")),
                                     ("If-Modified-Since", info.get("last_modified"))) if v}
        for suffix, decode in ((".xz", lzma.decompress), (".gz", gzip.decompress), ("", lambda b: b)):
            try:
                resp = self._client.get(url + suffix, headers=headers if info.get("suffix") == suffix else {})
            except httpx.HTTPError as exc:
                raise UserError(f"apt repository unreachable: {url + suffix}: {exc}",
                                "check the repository URL and the network") from exc
            if resp.status_code == 304:
                info["checked"] = time.time()
                atomic_write_bytes(meta, json.dumps(info).encode())
                return body.read_bytes()
            if resp.status_code == 404:
                continue
            if resp.status_code != 200:
                raise UserError(f"apt repository answered HTTP {resp.status_code} for {url + suffix}")
            try:
                data = decode(resp.content)
            except (lzma.LZMAError, OSError) as exc:
                raise UserError(f"corrupt apt index {url + suffix}: {exc}") from exc
            atomic_write_bytes(body, data)
            atomic_write_bytes(meta, json.dumps({
                "checked": time.time(), "suffix": suffix,
                "etag": resp.headers.get("etag"), "last_modified": resp.headers.get("last-modified"),
            }).encode())
            return data
        # A component this suite does not carry (e.g. non-free-firmware on an old suite) is not an error.
        log.debug("no index at %s(.xz|.gz)", url)
        return b""


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files into `dest` without installing it (no root, no maintainer scripts)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", deb, dest])


def _read_index_file(path: Path) -> bytes:
    for candidate, decode in ((path.with_name(path.name + ".xz"), lzma.decompress),
                              (path.with_name(path.name + ".gz"), gzip.decompress), (path, lambda b: b)):
        if candidate.is_file():
            return decode(candidate.read_bytes())
    return b""


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "":
        return Path(url)
    return None


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
