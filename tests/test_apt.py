"""The apt repository client: source parsing, index lookups, checked downloads, against real and local repos."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from gl_nvidia.apt import AptRepo, AptSource, extract, system_sources
from gl_nvidia.errors import UserError
from gl_nvidia.run import run


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
    assert system_sources(tmp_path) == [
        AptSource("http://mirror.example/debian", "bookworm", ("main", "contrib")),
        AptSource("http://repo.example/gl", "1877.3", ("main",)),
        AptSource("http://repo.example/gl", "1877.4", ("main",)),
    ]


def test_no_sources_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    with pytest.raises(UserError, match="no apt sources configured"):
        system_sources(tmp_path)


def _local_repo(root: Path, debs: dict[str, bytes], corrupt: str | None = None) -> AptSource:
    """A file-based repository in the real dists/ + pool/ layout with a gzip Packages index."""
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
    return AptSource(f"file://{root}", "1877.3", ("main",))


def test_local_repo_find_newest_and_download(tmp_path: Path) -> None:
    source = _local_repo(tmp_path / "repo", {"linux-headers-6.12.72-cloud-amd64": b"deb-bytes"})
    repo = AptRepo([source], cache=tmp_path / "cache")
    pkg = repo.find("linux-headers-6.12.72-cloud-amd64")
    assert pkg.version == "1.0"  # 1.0~rc1 sorts before 1.0 in Debian version order
    assert repo.download(pkg, tmp_path / "out").read_bytes() == b"deb-bytes"
    assert [p.name for p in repo.search(r"linux-headers-.*-cloud-amd64")] == [pkg.name]


def test_checksum_mismatch_keeps_nothing(tmp_path: Path) -> None:
    source = _local_repo(tmp_path / "repo", {"libcuda1": b"real"}, corrupt="libcuda1")
    repo = AptRepo([source], cache=tmp_path / "cache")
    with pytest.raises(UserError, match="checksum mismatch"):
        repo.download(repo.find("libcuda1"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "cache").rglob("*.deb"))


def test_unknown_package_names_the_repository(tmp_path: Path) -> None:
    repo = AptRepo([_local_repo(tmp_path / "repo", {"a": b"x"})], cache=tmp_path / "cache")
    with pytest.raises(UserError, match=r"package linux-headers-9\.9 not found in file://"):
        repo.find("linux-headers-9.9")


def test_unreachable_repository_is_a_clear_error(tmp_path: Path) -> None:
    repo = AptRepo([AptSource("http://127.0.0.1:9", "x", ("main",))], cache=tmp_path / "cache")
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
