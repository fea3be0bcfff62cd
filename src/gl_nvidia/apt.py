"""A client for Debian-style apt repositories: read `Packages` indexes, find, download and unpack packages.

Used for Garden Linux's per-version repositories and for Debian's archive alike. Debian's archive is
never named in code: `system_sources()` reads what this machine's apt is configured with.

Trust works as in apt: a suite's `InRelease` (or `Release` + `Release.gpg`) is verified with `gpgv`
against the source's keyring, only the signed text is read, each `Packages` index must match its size
and SHA256 there, and a `.deb` must match the SHA256 of that index. Nothing unverified reaches the cache.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import gzip
import hashlib
import logging
import lzma
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import httpx
from debian.deb822 import Deb822, Packages, Release
from debian.debian_support import Version

from gl_nvidia import net
from gl_nvidia.download import download
from gl_nvidia.errors import UserError
from gl_nvidia.fs import atomic_write_bytes, cache_dir, sha256_file
from gl_nvidia.run import run

log = logging.getLogger(__name__)

# A suite's verified Release is fetched and verified again when older than this.
RELEASE_TTL_S = 3600.0
_PKG_LINE = re.compile(rb"^Package: (\S+)$", re.M)
_SIZE = re.compile(r"[0-9]{1,19}")  # bytes, as apt reads them: decimal, within 64 bits
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# What apt trusts for a Debian source without Signed-By.
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# OpenPGP hash algorithm ids apt no longer accepts in a Release signature: MD5, SHA1, RIPEMD160.
_WEAK_DIGESTS = {"1", "2", "3"}


@dataclass(frozen=True)
class AptSource:
    """One `deb` entry: base URI (or local directory / file:// URI), suite, components, the keyring
    its Release must be signed with, and the architectures it is restricted to (empty: any)."""

    uri: str
    suite: str
    components: tuple[str, ...]
    keyring: Path
    arches: tuple[str, ...] = ()  # `arch=` / `Architectures:`: apt reads no other architecture's index of it

    def serves(self, arch: str) -> bool:
        return not self.arches or arch in self.arches

    @property
    def dists_url(self) -> str:
        return f"{self.uri.rstrip('/')}/dists/{self.suite}"


@dataclass(frozen=True)
class ReleaseInfo:
    """The verified content of a suite's Release file: what its indexes must be."""

    files: dict[str, tuple[int, str]]  # path under dists/<suite>/ -> (size, sha256)
    valid_until: datetime | None
    by_hash: bool  # Acquire-By-Hash: indexes can be fetched by their digest (no mid-sync mismatch)


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


def release_suites(sources: Iterable[AptSource], codename: str) -> list[AptSource]:
    """Another Debian release's suites in the archive this machine trusts: each entry signed by Debian's
    archive keyring (`bookworm`, `bookworm-updates`, `bookworm-security`) with `codename` in place of its
    release, the same URI, components and keyring (bookworm's keyring verifies trixie's InRelease). Only
    its signed indexes are read; nothing of that release is installed here."""
    debian = [s for s in sources if s.keyring == DEBIAN_KEYRING]
    releases = {s.suite.split("-", 1)[0] for s in debian}
    if len(releases) != 1:
        raise UserError(f"cannot tell which Debian release this machine's apt sources are for (found: "
                        f"{', '.join(sorted(releases)) or 'no entry signed by ' + str(DEBIAN_KEYRING)})",
                        "configure the archive's entries for the suites wanted in /etc/apt")
    (own,) = releases
    return [dataclasses.replace(s, suite=codename + s.suite.removeprefix(own)) for s in debian]


def _parse_one_line(text: str) -> list[AptSource]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        # Options in brackets ("deb [arch=amd64 signed-by=...] uri suite comp..."): signed-by and arch matter here.
        options = dict(o.split("=", 1) for o in " ".join(re.findall(r"\[([^\]]*)\]", line)).split() if "=" in o)
        line = re.sub(r"\[[^\]]*\]\s*", "", line)
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "deb":
            out.append(AptSource(parts[1], parts[2], tuple(parts[3:]), _keyring(options.get("signed-by", "")),
                                 tuple(a for a in options.get("arch", "").split(",") if a)))
    return out


def _parse_deb822(text: str) -> list[AptSource]:
    out = []
    for para in Deb822.iter_paragraphs(text.splitlines()):
        if "deb" not in para.get("Types", "").split() or para.get("Enabled", "yes").lower() == "no":
            continue
        keyring = _keyring(para.get("Signed-By", ""))
        arches = tuple(para.get("Architectures", "").split())
        for uri in para.get("URIs", "").split():
            for suite in para.get("Suites", "").split():
                out.append(AptSource(uri, suite, tuple(para.get("Components", "").split()), keyring, arches))
    return out


def _keyring(signed_by: str) -> Path:
    """Signed-By's keyring file; fingerprints, an inline key or nothing fall back to Debian's archive keyring."""
    value = signed_by.strip()
    return Path(value) if value.startswith("/") and "\n" not in value else DEBIAN_KEYRING


def _broken(what: str) -> UserError:
    """A signed index or Release that apt could not use either: the field named, never its text."""
    return UserError(what, "the repository publishes a broken index: tell its maintainers, or use another mirror")


def depends_names(depends: str) -> list[str]:
    """The package names a Depends field lists, each clause's first (version constraints dropped)."""
    return [alt.strip().split()[0] for alt in depends.split(",") if alt.strip()]


def parse_packages(data: bytes, base_uri: str) -> dict[str, list[AptPackage]]:
    """Parse a `Packages` index into name -> versions (newest first)."""
    index: dict[str, list[AptPackage]] = {}
    for para in Packages.iter_paragraphs(data.decode("utf-8", errors="replace").splitlines(), use_apt_pkg=False):
        if "Package" not in para or "Filename" not in para:
            continue
        where = f"apt index of {base_uri}: package {para['Package'][:100]}"
        try:
            Version(para.get("Version", ""))
        except ValueError:
            raise _broken(f"{where} has {'a malformed' if para.get('Version') else 'no'} Version") from None
        if not _SIZE.fullmatch(para.get("Size", "0")):
            raise _broken(f"{where} has a malformed Size")
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


def parse_release(text: str, where: str) -> ReleaseInfo:
    """The index digests and validity of a Release file's (already verified) text."""
    rel = Release(text)
    if not rel.get("SHA256"):
        raise UserError(f"apt Release {where} has no SHA256 checksums", "apt refuses such a repository too")
    valid_until = None
    if "Valid-Until" in rel:
        try:
            valid_until = parsedate_to_datetime(rel["Valid-Until"])
        except (TypeError, ValueError) as exc:
            raise UserError(f"apt Release {where} has a malformed Valid-Until: {rel['Valid-Until']!r}") from exc
        if valid_until.tzinfo is None:  # RFC 2822 "-0000": UTC
            valid_until = valid_until.replace(tzinfo=UTC)
    for f in rel["SHA256"]:
        if not (_SIZE.fullmatch(f.get("size", "")) and _SHA256.fullmatch(f["sha256"]) and f.get("name")):
            raise _broken(f"apt Release {where} has a malformed SHA256 line (expected: sha256 size path)")
    return ReleaseInfo(
        files={f["name"]: (int(f["size"]), f["sha256"].lower()) for f in rel["SHA256"]},
        valid_until=valid_until,
        by_hash=rel.get("Acquire-By-Hash", "no").lower() == "yes",
    )


def check_valid_until(release: ReleaseInfo, now: datetime, where: str) -> None:
    """apt's rule: a Release past its Valid-Until may be a replayed old one (withholding security updates)."""
    if release.valid_until is not None and now > release.valid_until:
        raise UserError(
            f"apt Release {where} expired on {release.valid_until:%Y-%m-%d %H:%M} UTC (Valid-Until)",
            "the mirror is stale or replays an old Release; use an up-to-date mirror",
        )


def signature_problem(status: str, keyring: Path) -> str | None:
    """Why gpgv's status output (--status-fd) does not prove a valid signature, or None if it does.

    As apt: at least one signature that is good, by a current key of the keyring, over a strong digest;
    any bad signature refuses the file. Each signature's lines start at NEWSIG."""
    sigs: list[dict[str, list[str]]] = []
    for line in status.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "[GNUPG:]":
            continue
        if words[1] == "NEWSIG" or not sigs:
            sigs.append({})
        sigs[-1][words[1]] = words[2:]
    if any("BADSIG" in sig for sig in sigs):
        return "has a bad signature (its content was changed after signing)"
    good = [sig for sig in sigs if "GOODSIG" in sig and "VALIDSIG" in sig]
    if any(len(sig["VALIDSIG"]) > 7 and sig["VALIDSIG"][7] not in _WEAK_DIGESTS for sig in good):
        return None
    if good:
        return "is signed with a weak digest algorithm (MD5, SHA1 or RIPEMD160)"
    if any("EXPKEYSIG" in sig or "REVKEYSIG" in sig for sig in sigs):
        return f"is signed with an expired or revoked key of {keyring}"
    if any("ERRSIG" in sig or "NO_PUBKEY" in sig for sig in sigs):
        return f"is not signed by a key in {keyring}"
    return "carries no valid OpenPGP signature"


def dearmor(data: bytes) -> bytes:
    """A binary keyring from an ASCII-armored one (gpgv reads only binary keyrings; repositories publish .asc)."""
    text = data.decode("ascii", errors="replace")
    # Armor headers ("Comment: ...") end at the first empty line; the checksum line starts with "=".
    m = re.search(r"-----BEGIN PGP PUBLIC KEY BLOCK-----\r?\n(?:[^\r\n]+\r?\n)*\r?\n(.*?)-----END PGP", text, re.S)
    if m is None:
        return data
    body = "".join(line.strip() for line in m.group(1).splitlines() if not line.startswith("="))
    try:
        return base64.b64decode(body, validate=True)
    except binascii.Error:
        return data


def check_index(data: bytes, expected: tuple[int, str], url: str) -> None:
    size, sha256 = expected
    got = hashlib.sha256(data).hexdigest()
    if len(data) != size or got != sha256:
        raise UserError(
            f"apt index {url} does not match its signed Release: size {len(data)}, sha256 {got}; "
            f"expected size {size}, sha256 {sha256}",
            "the mirror may be mid-sync (retry later) or the index was tampered with",
        )


class AptRepo:
    """The union of several apt sources for one architecture, read lazily.

    Any architecture's `binary-<arch>` indexes are read directly (arm64 ones on an amd64 machine need
    no `dpkg --add-architecture`); a source restricted to other architectures is left out, as apt does.

    A remote suite's verified Release is cached for RELEASE_TTL_S and its indexes by the digest it names
    (local repositories are read and verified every time); paragraphs are parsed only for the package
    names asked about, since Debian's full index has tens of thousands.
    """

    def __init__(
        self,
        sources: Iterable[AptSource],
        arch: str = "amd64",
        client: httpx.Client | None = None,
        cache: Path | None = None,
    ) -> None:
        self.sources = [s for s in sources if s.serves(arch)]
        self.arch = arch
        self._client = client or net.client(read_s=120.0)
        self._cache = cache or cache_dir("apt")
        self._raw: dict[str, list[tuple[bytes, str]]] | None = None  # name -> [(paragraph, base uri)]

    def describe(self) -> str:
        return ", ".join(sorted({f"{s.uri} {s.suite}" for s in self.sources})) or f"no apt source for {self.arch}"

    def _load(self) -> dict[str, list[tuple[bytes, str]]]:
        if self._raw is None:
            raw: dict[str, list[tuple[bytes, str]]] = {}
            for source in self.sources:
                for data in self._indexes(source):
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

    def _indexes(self, source: AptSource) -> list[bytes]:
        release, fresh = self._release(source)
        try:
            return [self._fetch_index(source, release, c) for c in source.components]
        except UserError:
            if fresh:
                raise
            # The cached Release may be older than the mirror's indexes: verify its current one, try once more.
            release, _ = self._release(source, refresh=True)
            return [self._fetch_index(source, release, c) for c in source.components]

    def _release(self, source: AptSource, refresh: bool = False) -> tuple[ReleaseInfo, bool]:
        """The suite's verified Release, and whether it was fetched now (else it was verified less than
        RELEASE_TTL_S ago, is cached and still valid)."""
        where = f"{source.dists_url}/"
        key = _sha256(f"{source.dists_url}\n{source.keyring.resolve()}".encode())[:24]
        cached = self._cache / "release" / key
        local = _local_path(source.uri) is not None
        now = datetime.now(UTC)
        if not (refresh or local) and cached.is_file() and time.time() - cached.stat().st_mtime < RELEASE_TTL_S:
            release = parse_release(cached.read_text(errors="replace"), where)
            if release.valid_until is None or now <= release.valid_until:
                return release, False
        signed = self._fetch_release(source)
        release = parse_release(signed.decode("utf-8", errors="replace"), where)
        check_valid_until(release, now, where)
        if not local:  # the signed text gpgv put out, never the file as served
            atomic_write_bytes(cached, signed)
        return release, True

    def _fetch_release(self, source: AptSource) -> bytes:
        base = source.dists_url
        with tempfile.TemporaryDirectory(prefix="gl-nvidia-apt-") as tmp:
            inrelease = self._get(f"{base}/InRelease")
            if inrelease is not None:
                (Path(tmp) / "InRelease").write_bytes(inrelease)
                return _verify(source.keyring, f"{base}/InRelease", Path(tmp), "InRelease")
            release = self._get(f"{base}/Release")
            if release is None:
                raise UserError(f"no InRelease or Release in apt repository {base}/",
                                "check the repository URL and the suite (OS version); it must publish a signed InRelease")
            signature = self._get(f"{base}/Release.gpg")
            if signature is None:
                raise UserError(f"apt repository {base}/ is not signed (no InRelease, no Release.gpg)",
                                "an unsigned repository is never trusted; sign its Release")
            (Path(tmp) / "Release").write_bytes(release)
            (Path(tmp) / "Release.gpg").write_bytes(signature)
            _verify(source.keyring, f"{base}/Release.gpg", Path(tmp), "Release.gpg", "Release")
            return release  # a detached signature covers exactly these bytes

    def _get(self, url: str) -> bytes | None:
        """A small file of the repository (InRelease, Release, Release.gpg); None when it does not exist."""
        local = _local_path(url)
        if local is not None:
            return local.read_bytes() if local.is_file() else None
        try:
            resp = net.get(self._client, url)
        except httpx.HTTPError as exc:
            raise UserError(f"apt repository unreachable: {url}: {exc}", "check the repository URL and the network") from exc
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise UserError(f"apt repository answered HTTP {resp.status_code} for {url}")
        return resp.content

    def _fetch_index(self, source: AptSource, release: ReleaseInfo, component: str) -> bytes:
        """The component's Packages index, checked against the verified Release (cached by that digest)."""
        listed = [f"{component}/binary-{self.arch}/Packages{suffix}" for suffix in (".xz", ".gz", "")]
        path = next((p for p in listed if p in release.files), None)
        if path is None:
            # The signed Release says this suite does not carry the component (non-free-firmware on an old suite).
            log.debug("no %s/binary-%s index in %s", component, self.arch, source.dists_url)
            return b""
        size, sha256 = release.files[path]
        url = f"{source.dists_url}/{path}"
        key = _sha256(url.encode())[:24]
        cached = self._cache / "index" / f"{key}.{sha256}"
        try:
            return cached.read_bytes()
        except FileNotFoundError:
            pass
        fetch_url = url
        if release.by_hash and _local_path(url) is None:
            fetch_url = f"{source.dists_url}/{PurePosixPath(path).parent}/by-hash/SHA256/{sha256}"
        with tempfile.TemporaryDirectory(prefix="gl-nvidia-apt-") as tmp:
            part = Path(tmp) / "index"
            download(self._client, fetch_url, part, mismatch_hint="the mirror may be mid-sync; retry later",
                     not_found=UserError(f"apt index {fetch_url} listed in its signed Release is missing",
                                         "the mirror may be mid-sync; retry later"))
            compressed = part.read_bytes()
        check_index(compressed, (size, sha256), url)
        decode = lzma.decompress if path.endswith(".xz") else gzip.decompress if path.endswith(".gz") else bytes
        try:
            data = decode(compressed)
        except (lzma.LZMAError, OSError) as exc:
            raise UserError(f"corrupt apt index {url}: {exc}") from exc
        if _local_path(url) is None:
            atomic_write_bytes(cached, data)
            for old in cached.parent.glob(f"{key}.*"):  # the index this one replaces
                if old != cached:
                    old.unlink(missing_ok=True)
        return data


def _verify(keyring: Path, url: str, tmp: Path, signed: str, data: str | None = None) -> bytes:
    """gpgv over `tmp/signed` (a clearsigned file, or a detached signature of `tmp/data`); the signed text."""
    if not keyring.is_file():
        raise UserError(f"apt keyring {keyring} not found (needed to verify {url})",
                        "install the repository's keyring (Debian: debian-archive-keyring), or point "
                        "Signed-By in /etc/apt, or GL_APT_KEYRING, at it")
    binary = tmp / "keyring.gpg"
    binary.write_bytes(dearmor(keyring.read_bytes()))
    result = run(["gpgv", "--status-fd", "1", "--keyring", binary, "--output", tmp / "signed.txt",
                  tmp / signed, *([tmp / data] if data else [])],
                 check=False, hint="install gpgv (scripts/bootstrap does)")
    problem = signature_problem(result.stdout.decode(errors="replace"), keyring)
    if problem is not None:
        raise UserError(f"apt Release {url} {problem}",
                        "nothing from it is used; check that the keyring is this repository's "
                        "(Signed-By in /etc/apt, GL_APT_KEYRING for a repository by URL)")
    return (tmp / "signed.txt").read_bytes() if data is None else (tmp / data).read_bytes()


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files into `dest` without installing it (no root, no maintainer scripts)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", deb, dest])


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
