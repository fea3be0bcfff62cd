"""The apt repository client: source parsing, signed Release verification, index lookups, checked downloads,
against the real archive and local repositories signed with throwaway keys."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import lzma
import os
import shutil
from pathlib import Path

import pytest

from gl_nvidia.apt import DEBIAN_KEYRING, AptRepo, AptSource, extract, system_sources
from gl_nvidia.errors import UserError
from gl_nvidia.run import run
from tests.fixtures.aptrepo import SigningKey, release_text, serve, sign_suite, valid_for


def test_system_sources_reads_one_line_and_deb822(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "gl.sources").write_text(
        "Types: deb\nURIs: http://repo.example/gl\nSuites: 1877.3 1877.4\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example\nSuites: x\nComponents: main\nEnabled: no\n"
    )
    (tmp_path / "sources.list.d" / "old.list.disabled").write_text("deb http://ignored.example x main\n")
    (tmp_path / "sources.list.d" / "vendor.sources").write_text(
        "Types: deb\nURIs: http://vendor.example\nSuites: stable\nComponents: main\nSigned-By: /vendor.gpg\n"
        "Architectures: amd64 arm64\n"
    )
    # Signed-By / signed-by= name the keyring; without it, Debian's archive keyring, as apt does for Debian.
    # arch= / Architectures: restrict a source to those architectures' indexes.
    assert system_sources(tmp_path) == [
        AptSource("http://mirror.example/debian", "bookworm", ("main", "contrib"), Path("/k.gpg"), ("amd64",)),
        AptSource("http://repo.example/gl", "1877.3", ("main",), DEBIAN_KEYRING),
        AptSource("http://repo.example/gl", "1877.4", ("main",), DEBIAN_KEYRING),
        AptSource("http://vendor.example", "stable", ("main",), Path("/vendor.gpg"), ("amd64", "arm64")),
    ]


def test_arm64_indexes_are_read_directly_and_an_amd64_only_source_is_left_out(
        tmp_path: Path, apt_key: SigningKey) -> None:
    """An arm64 repository view on this amd64 machine reads `binary-arm64` (no dpkg --add-architecture);
    a source restricted to amd64 contributes nothing to it, as apt would."""
    root = tmp_path / "repo"
    for arch in ("amd64", "arm64"):
        deb = root / f"pool/main/n/nvidia-kernel-source_535_{arch}.deb"
        deb.parent.mkdir(parents=True, exist_ok=True)
        deb.write_bytes(f"{arch} deb".encode())
        index = root / f"dists/1877.3/main/binary-{arch}/Packages.gz"
        index.parent.mkdir(parents=True)
        index.write_bytes(gzip.compress(
            f"Package: nvidia-kernel-source\nVersion: 535\nArchitecture: {arch}\nFilename: {deb.relative_to(root)}\n"
            f"Size: {deb.stat().st_size}\nSHA256: {hashlib.sha256(deb.read_bytes()).hexdigest()}\n".encode()))
    sign_suite(root / "dists/1877.3", apt_key)
    source = AptSource(f"file://{root}", "1877.3", ("main",), apt_key.keyring)
    arm64 = AptRepo([source], arch="arm64", cache=tmp_path / "cache")
    pkg = arm64.find("nvidia-kernel-source")
    assert pkg.architecture == "arm64" and arm64.download(pkg).read_bytes() == b"arm64 deb"
    amd64_only = dataclasses.replace(source, arches=("amd64",))
    assert AptRepo([amd64_only], arch="amd64", cache=tmp_path / "cache").find("nvidia-kernel-source").architecture == "amd64"
    with pytest.raises(UserError, match="package nvidia-kernel-source not found in no apt source for arm64"):
        AptRepo([amd64_only], arch="arm64", cache=tmp_path / "cache").find("nvidia-kernel-source")


def test_no_sources_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    with pytest.raises(UserError, match="no apt sources configured"):
        system_sources(tmp_path)


def _local_repo(root: Path, debs: dict[str, bytes], key: SigningKey, corrupt: str | None = None) -> AptSource:
    """A file-based repository in the real dists/ + pool/ layout with a gzip Packages index, signed by `key`."""
    paras = []
    for name, data in debs.items():
        rel = f"pool/main/{name[0]}/{name}/{name}_1.0_amd64.deb"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        digest = hashlib.sha256(b"tampered" if name == corrupt else data).hexdigest()
        for version in ("1.0", "1.0~rc1"):
            paras.append(
                f"Package: {name}\nVersion: {version}\nArchitecture: amd64\nFilename: {rel}\n"
                f"Size: {len(data)}\nSHA256: {digest}\n"
            )
    index = root / "dists/1877.3/main/binary-amd64/Packages.gz"
    index.parent.mkdir(parents=True)
    index.write_bytes(gzip.compress("\n".join(paras).encode()))
    sign_suite(root / "dists/1877.3", key)
    return AptSource(f"file://{root}", "1877.3", ("main",), key.keyring)


def test_local_repo_find_newest_and_download(tmp_path: Path, apt_key: SigningKey) -> None:
    source = _local_repo(tmp_path / "repo", {"linux-headers-6.12.72-cloud-amd64": b"deb-bytes"}, apt_key)
    repo = AptRepo([source], cache=tmp_path / "cache")
    pkg = repo.find("linux-headers-6.12.72-cloud-amd64")
    assert pkg.version == "1.0"  # 1.0~rc1 sorts before 1.0 in Debian version order
    assert repo.download(pkg, tmp_path / "out").read_bytes() == b"deb-bytes"
    assert [p.name for p in repo.search(r"linux-headers-.*-cloud-amd64")] == [pkg.name]


def test_checksum_mismatch_keeps_nothing(tmp_path: Path, apt_key: SigningKey) -> None:
    source = _local_repo(tmp_path / "repo", {"libcuda1": b"real"}, apt_key, corrupt="libcuda1")
    repo = AptRepo([source], cache=tmp_path / "cache")
    with pytest.raises(UserError, match="checksum mismatch"):
        repo.download(repo.find("libcuda1"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "cache").rglob("*.deb"))


def test_unknown_package_names_the_repository(tmp_path: Path, apt_key: SigningKey) -> None:
    repo = AptRepo([_local_repo(tmp_path / "repo", {"a": b"x"}, apt_key)], cache=tmp_path / "cache")
    with pytest.raises(UserError, match=r"package linux-headers-9\.9 not found in file://"):
        repo.find("linux-headers-9.9")


def test_unreachable_repository_is_a_clear_error(tmp_path: Path) -> None:
    repo = AptRepo([AptSource("http://127.0.0.1:9", "x", ("main",), DEBIAN_KEYRING)], cache=tmp_path / "cache")
    with pytest.raises(UserError, match="apt repository unreachable"):
        repo.find("anything")


def test_real_debian_archive_current_cloud_kernel_and_extract(tmp_path: Path) -> None:
    """This machine's configured Debian archive: the cloud-amd64 meta package names a real headers package."""
    repo = AptRepo(system_sources())
    meta = repo.find("linux-headers-cloud-amd64")
    kernel_pkg = meta.depends.split()[0]
    assert kernel_pkg.startswith("linux-headers-") and kernel_pkg.endswith("-cloud-amd64")
    assert repo.find(kernel_pkg).version == meta.depends.split("= ")[1].rstrip(")")
    deb = repo.download(repo.find("nvidia-modprobe"), tmp_path)
    extract(deb, tmp_path / "root")
    assert (tmp_path / "root/usr/bin/nvidia-modprobe").is_file()
    assert "nvidia-modprobe" in run(["dpkg-deb", "-f", deb, "Package"]).stdout.decode()


# --- signed Release verification, over HTTP as real repositories are reached ----------------------------------


def _signed_repo(root: Path, key: SigningKey, edit: tuple[str, str] = ("", ""), **sign: object) -> Path:
    """One suite with an xz Packages index naming one .deb, signed (InRelease unless detached=True);
    `edit` replaces a line of the index before it is signed."""
    deb = root / "pool/main/n/nvidia-smi/nvidia-smi_535_amd64.deb"
    deb.parent.mkdir(parents=True)
    deb.write_bytes(b"the real deb")
    index = root / "dists/1877.3/main/binary-amd64/Packages.xz"
    index.parent.mkdir(parents=True)
    index.write_bytes(lzma.compress(
        f"Package: nvidia-smi\nVersion: 535\nArchitecture: amd64\nFilename: {deb.relative_to(root)}\n"
        f"Size: 12\nSHA256: {hashlib.sha256(b'the real deb').hexdigest()}\n".replace(*edit).encode()))
    sign_suite(root / "dists/1877.3", key, **sign)  # type: ignore[arg-type]
    return root


def _find(url: str, keyring: Path, cache: Path) -> str:
    repo = AptRepo([AptSource(url, "1877.3", ("main", "contrib"), keyring)], cache=cache)
    return repo.download(repo.find("nvidia-smi"), cache / "out").read_text()


@pytest.mark.parametrize("variant", ["InRelease", "Release.gpg", "armored keyring", "Valid-Until ahead"])
def test_a_correctly_signed_repository_is_trusted(tmp_path: Path, apt_key: SigningKey, variant: str) -> None:
    root = _signed_repo(tmp_path / "repo", apt_key, detached=variant == "Release.gpg",
                        valid_until=valid_for(7) if variant == "Valid-Until ahead" else None)
    keyring = apt_key.armored if variant == "armored keyring" else apt_key.keyring
    with serve(root) as url:
        # contrib is not in the signed Release: the suite does not carry it, which is no error.
        assert _find(url, keyring, tmp_path / "cache") == "the real deb"


def test_the_verified_release_is_what_is_cached(tmp_path: Path, apt_key: SigningKey) -> None:
    root = _signed_repo(tmp_path / "repo", apt_key)
    with serve(root) as url:
        assert _find(url, apt_key.keyring, tmp_path / "cache") == "the real deb"
        (cached,) = (tmp_path / "cache/release").iterdir()
        assert cached.read_text().startswith("Origin: gl-nvidia-test\n")  # gpgv's signed text, no armor
        assert "PGP" not in cached.read_text()
        shutil.rmtree(root / "dists")  # within the TTL the verified Release and index come from the cache
        assert _find(url, apt_key.keyring, tmp_path / "cache") == "the real deb"


def _tamper_index(root: Path) -> None:
    index = root / "dists/1877.3/main/binary-amd64/Packages.xz"
    index.write_bytes(lzma.compress(lzma.decompress(index.read_bytes()).replace(
        hashlib.sha256(b"the real deb").hexdigest().encode(), hashlib.sha256(b"evil").hexdigest().encode())))


def _claim_tampered_index_outside_the_signature(root: Path) -> None:
    """Text before the signed message is ignored by gpgv; a parser reading the raw file would take it."""
    _tamper_index(root)
    index = root / "dists/1877.3/main/binary-amd64/Packages.xz"
    fake = f"SHA256:\n {hashlib.sha256(index.read_bytes()).hexdigest()} {index.stat().st_size} main/binary-amd64/Packages.xz\n\n"
    inrelease = root / "dists/1877.3/InRelease"
    inrelease.write_text(fake + inrelease.read_text())


def _change_signed_text(root: Path) -> None:
    inrelease = root / "dists/1877.3/InRelease"
    inrelease.write_text(inrelease.read_text().replace("Origin: gl-nvidia-test", "Origin: gl-nvidia-tent"))


def _unsign(root: Path) -> None:
    (root / "dists/1877.3/InRelease").unlink()


def _remove_release(root: Path) -> None:
    for name in ("InRelease", "Release"):
        (root / "dists/1877.3" / name).unlink()


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_tamper_index, r"apt index http://\S+/dists/1877\.3/main/binary-amd64/Packages\.xz does not match its signed Release"),
        (_claim_tampered_index_outside_the_signature, r"Packages\.xz does not match its signed Release"),
        (_change_signed_text, r"apt Release http://\S+/dists/1877\.3/InRelease has a bad signature"),
        (_unsign, r"apt repository http://\S+/dists/1877\.3/ is not signed \(no InRelease, no Release\.gpg\)"),
        (_remove_release, r"no InRelease or Release in apt repository http://\S+/dists/1877\.3/"),
    ],
)
def test_an_unverified_repository_is_refused_and_nothing_is_cached(
    tmp_path: Path, apt_key: SigningKey, breaker: object, message: str
) -> None:
    root = _signed_repo(tmp_path / "repo", apt_key)
    breaker(root)  # type: ignore[operator]
    with serve(root) as url, pytest.raises(UserError, match=message):
        _find(url, apt_key.keyring, tmp_path / "cache")
    # Only a verified Release may be cached (the tampered index's is); never an index or a .deb.
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.parent.name != "release"]


def test_a_release_signed_by_another_key_is_refused(
    tmp_path: Path, apt_key: SigningKey, other_apt_key: SigningKey
) -> None:
    root = _signed_repo(tmp_path / "repo", other_apt_key)
    with serve(root) as url, pytest.raises(UserError, match=rf"InRelease is not signed by a key in {apt_key.keyring}"):
        _find(url, apt_key.keyring, tmp_path / "cache")
    # The same with a detached signature: the older Release + Release.gpg layout gets no easier path.
    root = _signed_repo(tmp_path / "repo2", other_apt_key, detached=True)
    with serve(root) as url, pytest.raises(UserError, match=r"Release\.gpg is not signed by a key in"):
        _find(url, apt_key.keyring, tmp_path / "cache")


def test_a_release_signed_over_a_weak_digest_is_refused(tmp_path: Path, apt_key: SigningKey) -> None:
    root = _signed_repo(tmp_path / "repo", apt_key, digest="SHA1")  # gpgv alone accepts it
    with serve(root) as url, pytest.raises(UserError, match=r"InRelease is signed with a weak digest algorithm"):
        _find(url, apt_key.keyring, tmp_path / "cache")


def test_a_mirror_that_moved_on_within_the_ttl_is_followed(tmp_path: Path, apt_key: SigningKey) -> None:
    root = _signed_repo(tmp_path / "repo", apt_key)
    with serve(root) as url:
        source = AptSource(url, "1877.3", ("main",), apt_key.keyring)
        assert AptRepo([source], cache=tmp_path / "cache").find("nvidia-smi").version == "535"
        shutil.rmtree(tmp_path / "cache/index")
        index = root / "dists/1877.3/main/binary-amd64/Packages.xz"
        index.write_bytes(lzma.compress(lzma.decompress(index.read_bytes()).replace(b"Version: 535", b"Version: 536")))
        sign_suite(root / "dists/1877.3", apt_key)
        # The cached Release names the old index; the current one is verified and read instead.
        assert AptRepo([source], cache=tmp_path / "cache").find("nvidia-smi").version == "536"


def test_an_expired_release_is_refused(tmp_path: Path, apt_key: SigningKey) -> None:
    root = _signed_repo(tmp_path / "repo", apt_key, valid_until=valid_for(-1))
    with serve(root) as url, pytest.raises(UserError, match=r"apt Release http://\S+/dists/1877\.3/ expired on \d{4}-"):
        _find(url, apt_key.keyring, tmp_path / "cache")


def test_missing_keyring_or_gpgv_is_one_clear_error(
    tmp_path: Path, apt_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _local_repo(tmp_path / "repo", {"a": b"x"}, apt_key)
    nokey = AptSource(source.uri, source.suite, source.components, tmp_path / "absent.gpg")
    with pytest.raises(UserError, match=r"apt keyring .*absent\.gpg not found \(needed to verify file://"):
        AptRepo([nokey], cache=tmp_path / "cache").find("a")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="required program not found: gpgv") as exc:
        AptRepo([source], cache=tmp_path / "cache").find("a")
    assert exc.value.hint and "gpgv" in exc.value.hint
    assert os.environ["PATH"] == str(tmp_path / "empty")


@pytest.mark.parametrize(("edit", "words"), [
    (("Version: 535\n", "Version: ???\n"), "package nvidia-smi has a malformed Version"),
    (("Version: 535\n", "Version: 1:\n"), "package nvidia-smi has a malformed Version"),
    (("Version: 535\n", ""), "package nvidia-smi has no Version"),
    (("Size: 12\n", "Size: abc\n"), "package nvidia-smi has a malformed Size"),
    (("Size: 12\n", f"Size: {'9' * 5000}\n"), "package nvidia-smi has a malformed Size"),
], ids=["version-???", "version-epoch-only", "no-version", "size-abc", "size-5000-digits"])
def test_a_signed_index_with_a_malformed_field_is_one_line(tmp_path: Path, apt_key: SigningKey,
                                                          edit: tuple[str, str], words: str) -> None:
    """Signed is not well-formed: apt refuses such an index too, and the error names the field, not its text."""
    root = _signed_repo(tmp_path / "repo", apt_key, edit)
    with serve(root) as url, pytest.raises(UserError, match=f"apt index of {url}: {words}") as err:
        _find(url, apt_key.keyring, tmp_path / "cache")
    assert "???" not in str(err.value) and "abc" not in str(err.value)


@pytest.mark.parametrize("line", [" {sha} abc main/binary-amd64/Packages.xz", " {sha}", " zz 12 main/x"],
                         ids=["size-abc", "no-size", "sha-zz"])
def test_a_signed_release_with_a_malformed_sha256_line_is_one_line(tmp_path: Path, apt_key: SigningKey,
                                                                   line: str) -> None:
    root = _signed_repo(tmp_path / "repo", apt_key)
    suite = root / "dists/1877.3"
    text = release_text(suite) + line.format(sha="a" * 64) + "\n"
    sign_suite(suite, apt_key, release=text)
    with serve(root) as url, pytest.raises(UserError, match="has a malformed SHA256 line"):
        _find(url, apt_key.keyring, tmp_path / "cache")
