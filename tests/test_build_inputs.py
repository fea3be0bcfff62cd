"""Driver sources and kernel environments, and bad input: each a clear error and nothing half-written.

NVIDIA's download site is replaced by a local HTTP server serving a small self-made `.run`-shaped
installer (it answers `--extract-only --target DIR` like NVIDIA's makeself archives).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.errors import IntegrityError, UserError
from gl_nvidia.image import ldcache
from gl_nvidia.modbuild import AptEnv, DebianSource, DirEnv, DirSource, KernelHeaders, build_unit
from gl_nvidia.modbuild.compile import first_error
from gl_nvidia.modbuild.kenv import (
    KmodbuildEnv,
    compiler_mismatch,
    config_arch,
    cross_prefix,
    host_arch,
    host_toolchain,
    kmodbuild_image,
    make_argv,
)
from gl_nvidia.modbuild.nvidia import NvidiaRunSource
from gl_nvidia.modbuild.redist import RedistFile, listed
from gl_nvidia.node import fabric as node_fabric
from tests.fixtures import redist
from tests.fixtures.bundle import DEBIAN_DRIVER, DEBIAN_KERNEL, DEBIAN_UNIT
from tests.fixtures.nvidia_site import FAKE_RUN, FAKE_VERSION, _Server, _template, own_cache, server

__all__ = ["own_cache", "server"]  # fixtures, from tests/fixtures/nvidia_site.py

MANIFEST = f"redistrib_{FAKE_VERSION}.json"
ARCHIVES = {c: redist.relative_path(c, "linux-x86_64", redist.component_version(c, FAKE_VERSION))
            for c in redist.CONTENTS}


def test_nvidia_run_is_downloaded_with_retries_checked_and_laid_out(server: _Server, own_cache: Path) -> None:
    server.fail = 2
    digest = hashlib.sha256(FAKE_RUN.encode()).hexdigest()
    source = NvidiaRunSource(_template(server), sha256=digest, redist=server.redist, retry_delay=0.01)
    inputs = source.prepare(FAKE_VERSION, "amd64")
    assert server.requests == 3
    assert (inputs.driver_version, inputs.branch, inputs.source) == (FAKE_VERSION, "999", "nvidia")
    assert inputs.digests == {f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run": digest, **{
        rel.rpartition("/")[2]: hashlib.sha256((server.tree / rel).read_bytes()).hexdigest() for rel in ARCHIVES.values()}}
    assert inputs.left_out == {}
    lib = inputs.userspace / "usr/lib/x86_64-linux-gnu"
    assert os.access(inputs.userspace / "usr/bin/nvidia-smi", os.X_OK)
    assert os.readlink(lib / "libcuda.so.1") == f"libcuda.so.{FAKE_VERSION}"
    assert (inputs.userspace / "usr/share/nvidia/supported-gpus.json").is_file()
    assert (inputs.userspace / "usr/share/doc/nvidia/LICENSE").is_file()
    assert (inputs.firmware / "nvidia" / FAKE_VERSION / "gsp_ga10x.bin").is_file()
    assert sorted(inputs.module_sources) == ["open", "proprietary"]
    assert (inputs.module_sources["open"].tree / "Kbuild").is_file()
    # Cached: a second prepare downloads nothing again, the manifest included.
    source.prepare(FAKE_VERSION, "amd64")
    assert server.requests == 3 and sorted(server.redist_requests) == sorted([MANIFEST, *ARCHIVES.values()])


def test_nvidia_source_ships_fabric_manager_imex_and_nvlsm_of_the_release(server: _Server, own_cache: Path) -> None:
    source = NvidiaRunSource(_template(server), redist=server.redist, retry_delay=0.01)
    root = source.prepare(FAKE_VERSION, "amd64").userspace
    usr = root / "usr"
    for tool in ("nv-fabricmanager", "nvswitch-audit", "nvidia-fabricmanager-start.sh", "nvidia-imex", "nvidia-imex-ctl"):
        assert os.access(usr / "bin" / tool, os.X_OK), tool
    nvswitch = usr / "share/nvidia/nvswitch"
    assert sorted(p.name for p in nvswitch.iterdir()) == [
        "dgxh100_hgxh100_topology", "fabricmanager.cfg", "fabricmanager_multinode.cfg"]
    assert "FABRIC_MODE=0" in (nvswitch / "fabricmanager.cfg").read_text()  # NVIDIA's own config, as shipped
    assert (usr / "lib/x86_64-linux-gnu/libnvfm.so.1").is_file()
    assert not (usr / "include").exists()  # the API headers are for building against it, not for the node
    # nvlsm where its RUNPATH and nvidia-fabricmanager-start.sh look for it; IMEX's defaults for hosts running it
    assert os.access(root / "opt/nvidia/nvlsm/sbin/nvlsm", os.X_OK)
    assert (root / "opt/nvidia/nvlsm/lib/libgrpc_mgr.so").is_file()
    assert sorted(p.name for p in (usr / "share/nvidia/nvlsm").iterdir()) == ["grpc_mgr.conf", "nvlsm.conf"]
    assert sorted(p.name for p in (usr / "share/nvidia/imex").iterdir()) == ["config.cfg", "nodes_config.cfg"]
    assert sorted(p.name for p in (usr / "share/doc").iterdir()) == [
        "libnvidia-nscq", "libnvsdm", "nvidia", "nvidia-fabricmanager", "nvidia-imex", "nvlsm"]
    # every file the node runs on an NVSwitch or NVLink5 node is where the build put it
    for path in (*node_fabric.COMPONENT_OF, "/usr/bin/nvidia-imex"):
        assert (root / path.lstrip("/")).is_file(), path
    # What `release` compares to skip a unit: the sha256 NVIDIA's manifest lists for each archive.
    listed = json.loads((server.tree / MANIFEST).read_text())
    sums = source.checksums(FAKE_VERSION, "amd64")
    for component, rel in ARCHIVES.items():
        assert sums[rel.rpartition("/")[2]] == listed[component]["linux-x86_64"]["sha256"]


def test_a_new_archive_in_the_release_changes_the_units_inputs(server: _Server, own_cache: Path) -> None:
    """NVIDIA re-lists nvlsm (a respin) under the same driver release: the unit is not "the same inputs"."""
    before = NvidiaRunSource(_template(server), redist=server.redist).checksums(FAKE_VERSION, "amd64")
    doc = json.loads((server.tree / MANIFEST).read_text())
    respin = redist.archive("nvlsm", "linux-x86_64", redist.NVLSM_VERSION) + b"\0"
    doc["nvlsm"]["linux-x86_64"]["sha256"] = hashlib.sha256(respin).hexdigest()
    redist.write_manifest(server.tree, FAKE_VERSION, doc)
    after = NvidiaRunSource(_template(server), redist=server.redist).checksums(FAKE_VERSION, "amd64")
    assert {k for k in before if before[k] != after[k]} == {ARCHIVES["nvlsm"].rpartition("/")[2]}


def test_no_release_in_the_redist_tree_is_a_left_out_reason_not_a_gap(server: _Server, own_cache: Path) -> None:
    source = NvidiaRunSource(_template(server), redist=server.url + "/redist/missing", retry_delay=0.01)
    inputs = source.prepare(FAKE_VERSION, "amd64")
    why = f"the redist tree has no release {FAKE_VERSION}: {server.url}/redist/missing/{MANIFEST} does not exist"
    assert inputs.left_out == {c: why for c in ("fabricmanager", "imex", "nvlsm", "libnvidia_nscq", "libnvsdm")}
    assert not (inputs.userspace / "usr/bin/nv-fabricmanager").exists()
    assert server.redist_requests == [f"missing/{MANIFEST}"]  # a 404 is an answer, not a reason to retry
    assert source.checksums(FAKE_VERSION, "amd64")["nvlsm"] == f"none: {why}"


def test_a_component_the_release_does_not_list_is_left_out_by_name(tmp_path: Path, own_cache: Path) -> None:
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run"
    run_file.write_text(FAKE_RUN)
    redist.write_tree(tmp_path, FAKE_VERSION, ("fabricmanager",))  # a pre-Blackwell release
    inputs = NvidiaRunSource(str(run_file)).prepare(FAKE_VERSION, "amd64")  # the tree beside a local .run
    listed = f"{tmp_path}/{MANIFEST}"
    assert inputs.left_out == {c: f"{listed} lists no {c} for linux-x86_64"
                               for c in ("imex", "nvlsm", "libnvidia_nscq", "libnvsdm")}
    assert (inputs.userspace / "usr/bin/nv-fabricmanager").is_file()


def test_an_archive_other_than_the_manifest_lists_is_refused(server: _Server, own_cache: Path) -> None:
    """The archive on the server was swapped: its sha256 is not the one redistrib_<version>.json lists."""
    path = server.tree / ARCHIVES["imex"]
    good = path.read_bytes()
    path.write_bytes(good + b"\0")
    source = NvidiaRunSource(_template(server), redist=server.redist, retry_delay=0.01)
    with pytest.raises(UserError) as exc:
        source.prepare(FAKE_VERSION, "amd64")
    assert re.fullmatch(rf"checksum mismatch for {server.redist}{ARCHIVES['imex']}: expected sha256 "
                        rf"{hashlib.sha256(good).hexdigest()}, got [0-9a-f]{{64}}", exc.value.message), exc.value.message
    assert exc.value.hint == f"the archive is not the one {server.redist}{MANIFEST} lists; nothing was kept"
    assert server.redist_requests.count(ARCHIVES["imex"]) == 1  # a mismatch is final, not retried
    assert not [p for p in (own_cache / "build" / "redist").iterdir() if p.name.startswith("nvidia-imex")]
    path.write_bytes(good)  # NVIDIA's own archive again: verified, used, cached
    assert (source.prepare(FAKE_VERSION, "amd64").userspace / "usr/bin/nvidia-imex").is_file()
    assert any(p.name.endswith(hashlib.sha256(good).hexdigest()) for p in (own_cache / "build" / "redist").iterdir())


def test_nscq_and_nvsdm_are_installed_as_nvidias_packages_do(tmp_path: Path, own_cache: Path) -> None:
    """DCGM opens libnvidia-nscq.so.2 and libnvsdm.so.1: each library lands in the multiarch directory with
    its SONAME link (read from the library, as ldconfig does) and the links its archive has, and the image's
    ld.so.cache lists it under that SONAME."""
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run"
    run_file.write_text(FAKE_RUN)
    redist.write_tree(tmp_path, FAKE_VERSION, links={"libnvidia_nscq": {"lib/libnvidia-nscq.so": "libnvidia-nscq.so.2"}})
    inputs = NvidiaRunSource(str(run_file)).prepare(FAKE_VERSION, "amd64")
    assert inputs.left_out == {}
    root = inputs.userspace
    lib = root / "usr/lib/x86_64-linux-gnu"
    for stem, soname in (("libnvidia-nscq", "libnvidia-nscq.so.2"), ("libnvsdm", "libnvsdm.so.1")):
        real = lib / f"{stem}.so.{FAKE_VERSION}"
        assert real.is_file() and not real.is_symlink() and os.access(real, os.X_OK)
        assert os.readlink(lib / soname) == real.name
        assert (root / "usr/share/doc" / stem / "LICENSE").is_file()
    assert os.readlink(lib / "libnvidia-nscq.so") == "libnvidia-nscq.so.2"  # the archive's own link, kept
    cache = {e.soname: e.path for e in ldcache.entries(root, "amd64")}
    assert cache["libnvidia-nscq.so.2"] == "/usr/lib/x86_64-linux-gnu/libnvidia-nscq.so.2"
    assert cache["libnvsdm.so.1"] == "/usr/lib/x86_64-linux-gnu/libnvsdm.so.1"


def test_nscq_archive_other_than_the_manifest_lists_is_refused(server: _Server, own_cache: Path) -> None:
    """The same sha256 rule as fabric manager's: a swapped libnvidia_nscq archive stops the run, nothing kept."""
    path = server.tree / ARCHIVES["libnvidia_nscq"]
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, other bytes
    source = NvidiaRunSource(_template(server), redist=server.redist, retry_delay=0.01)
    with pytest.raises(IntegrityError) as exc:
        source.prepare(FAKE_VERSION, "amd64")
    assert exc.value.message.startswith(f"checksum mismatch for {server.redist}{ARCHIVES['libnvidia_nscq']}: "
                                        f"expected sha256 {hashlib.sha256(good).hexdigest()}, got ")
    assert not [p for p in (own_cache / "build" / "redist").iterdir() if p.name.startswith("libnvidia_nscq")]


def test_a_release_without_nvsdm_for_arm64_names_it_left_out(tmp_path: Path) -> None:
    """NVIDIA's 570 releases list libnvsdm for x86_64 only: arm64 images say why they lack it."""
    bodies = {c: {"linux-x86_64": c.encode(), **({} if c == "libnvsdm" else {"linux-sbsa": c.encode()})}
              for c in redist.CONTENTS}
    files, missing = listed(redist.manifest(FAKE_VERSION, bodies), FAKE_VERSION, "arm64", "m.json")
    assert missing == {"libnvsdm": "m.json lists no libnvsdm for linux-sbsa"}
    assert files["libnvidia_nscq"].relative_path == (
        f"libnvidia_nscq/linux-sbsa/libnvidia_nscq-linux-sbsa-{FAKE_VERSION}-archive.tar.xz")


def test_the_redist_manifest_must_list_exactly_the_release() -> None:
    good = redist.manifest(FAKE_VERSION, {c: {"linux-sbsa": c.encode()} for c in redist.CONTENTS})
    files, missing = listed(good, FAKE_VERSION, "arm64", "m.json")
    assert files["fabricmanager"] == RedistFile("fabricmanager", FAKE_VERSION, redist.relative_path(
        "fabricmanager", "linux-sbsa", FAKE_VERSION), hashlib.sha256(b"fabricmanager").hexdigest(), 13, "m.json")
    assert files["nvlsm"].version == redist.NVLSM_VERSION and missing == {}  # nvlsm: the release names its own
    assert listed(good, FAKE_VERSION, "amd64", "m.json") == ({}, {c: f"m.json lists no {c} for linux-x86_64"
                                                                  for c in redist.CONTENTS})

    def broken(component: str, **change: object) -> dict[str, object]:
        entry = good[component]
        assert isinstance(entry, dict)
        return {**good, component: {**entry, "linux-sbsa": {**entry["linux-sbsa"], **change}}}

    for doc, why in (
        ({**good, "release_label": "999.12.35"}, r"^m\.json is the manifest of 999\.12\.35, not of 999\.12\.34$"),
        ({**good, "imex": {**good["imex"], "version": "999.12.33"}},  # type: ignore[dict-item]
         r"lists imex 999\.12\.33 at .*, not an archive of that version"),
        (broken("fabricmanager", relative_path="fabricmanager/linux-sbsa/../../../etc/passwd-999.12.34-archive.tar.xz"),
         r"not an archive of that version under fabricmanager/linux-sbsa/"),
        (broken("nvlsm", relative_path="/nvlsm/linux-sbsa/nvlsm-linux-sbsa-2025.06.10-archive.tar.xz"), "not an archive"),
        (broken("imex", relative_path="fabricmanager/linux-sbsa/nvidia-imex-linux-sbsa-999.12.34-archive.tar.xz"),
         "not an archive"),
        (broken("imex", sha256="abc"), r"imex linux-sbsa has no valid sha256: 'abc'"),
        (broken("nvlsm", size="many"), r"nvlsm linux-sbsa lacks a valid"),
        ([], "not a JSON object"),
    ):
        with pytest.raises(UserError, match=why):
            listed(doc, FAKE_VERSION, "arm64", "m.json")
    same_path = {**good, "imex": {**good["imex"], "version": "999.12.33",  # type: ignore[dict-item]
                                  "linux-sbsa": {**good["imex"]["linux-sbsa"],  # type: ignore[index]
                                                 "relative_path": redist.relative_path("imex", "linux-sbsa", "999.12.33")}}}
    with pytest.raises(UserError, match=r"lists imex 999\.12\.33, not 999\.12\.34: it must be of exactly the driver"):
        listed(same_path, FAKE_VERSION, "arm64", "m.json")


def test_an_archive_that_unpacks_to_another_release_is_refused(tmp_path: Path, own_cache: Path) -> None:
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run"
    run_file.write_text(FAKE_RUN)
    other = redist.archive("fabricmanager", "linux-x86_64", "999.12.33")  # listed, but holds 999.12.33
    (tmp_path / ARCHIVES["fabricmanager"]).parent.mkdir(parents=True)
    (tmp_path / ARCHIVES["fabricmanager"]).write_bytes(other)
    redist.write_manifest(tmp_path, FAKE_VERSION, redist.manifest(FAKE_VERSION, {"fabricmanager": {"linux-x86_64": other}}))
    with pytest.raises(UserError, match=r"holds fabricmanager-linux-x86_64-999\.12\.33-archive, not "
                                        r"fabricmanager-linux-x86_64-999\.12\.34-archive"):
        NvidiaRunSource(str(run_file)).prepare(FAKE_VERSION, "amd64")
    assert not any((own_cache / "build" / "redist-trees").iterdir())


SECRET = b"build-host secret: a docker config.json"


@pytest.mark.parametrize(("links", "member"), [
    ({"share/nvidia/nvswitch/config.json": "{secret}"}, "share/nvidia/nvswitch/config.json"),  # absolute
    ({"share/nvidia/nvswitch/config.json": "../../../../../../../../../../../../..{secret}"},
     "share/nvidia/nvswitch/config.json"),  # relative, leaving the tree
    ({"share/nvidia/nvswitch/host": "{host}"}, "share/nvidia/nvswitch/host"),  # a symlinked directory
    ({"share/nvidia/nvswitch": "{host}"}, "share/nvidia/nvswitch"),  # the copied directory itself
    ({"etc": "{host}"}, "etc"),  # a directory the layout looks into
], ids=["absolute", "relative-out", "symlinked-dir", "symlinked-top", "symlinked-parent"])
def test_an_archive_whose_links_leave_it_copies_nothing_of_the_build_host(
        links: dict[str, str], member: str, tmp_path: Path, own_cache: Path) -> None:
    """The archive is the one the manifest lists (its sha256 matches): only its links are hostile."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "config.json").write_bytes(SECRET)
    (host / "fabricmanager.cfg").write_bytes(SECRET)
    secret = host / "config.json"
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run"
    run_file.write_text(FAKE_RUN)
    redist.write_tree(tmp_path / "redist", FAKE_VERSION, links={"fabricmanager": {
        name: target.format(secret=secret, host=host) for name, target in links.items()}})
    with pytest.raises(IntegrityError) as exc:
        NvidiaRunSource(str(run_file), redist=str(tmp_path / "redist")).prepare(FAKE_VERSION, "amd64")
    assert exc.value.message.startswith(f"fabricmanager-linux-x86_64-{FAKE_VERSION}-archive: {member} is a symlink")
    assert not [p for p in own_cache.rglob("*") if p.is_file() and not p.is_symlink() and SECRET in p.read_bytes()]
    assert not any((own_cache / "build" / "driver").iterdir())  # no layout of the driver was kept


def test_links_inside_an_archive_are_copied_as_links(tmp_path: Path, own_cache: Path) -> None:
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run"
    run_file.write_text(FAKE_RUN)
    redist.write_tree(tmp_path, FAKE_VERSION, links={"fabricmanager": {
        "lib/libnvfm.so": "libnvfm.so.1", "share/nvidia/nvswitch/current": "dgxh100_hgxh100_topology"}})
    usr = NvidiaRunSource(str(run_file)).prepare(FAKE_VERSION, "amd64").userspace / "usr"
    assert os.readlink(usr / "lib/x86_64-linux-gnu/libnvfm.so") == "libnvfm.so.1"
    assert (usr / "share/nvidia/nvswitch/current").read_text() == "topology"


def test_a_run_tree_whose_links_leave_it_is_refused(tmp_path: Path, own_cache: Path) -> None:
    """The dir source (an unpacked .run on disk) goes through the same copy."""
    tree = tmp_path / "unpacked"
    run_file = tmp_path / "driver.run"
    run_file.write_text(FAKE_RUN)
    subprocess.run(["sh", str(run_file), "--extract-only", "--target", str(tree)], check=True)
    (tmp_path / "secret").write_bytes(SECRET)
    (tree / "LICENSE").unlink()
    (tree / "LICENSE").symlink_to(tmp_path / "secret")
    with pytest.raises(IntegrityError, match=rf"unpacked driver {FAKE_VERSION}: LICENSE is a symlink to '/"):
        DirSource(tree).prepare(FAKE_VERSION, "amd64")


@pytest.mark.parametrize("hostile", ["link", "checksum", "manifest"])
def test_a_hostile_redist_tree_is_bad_input_never_a_failed_unit(hostile: str, tmp_path: Path, own_cache: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """exit 2 with one line, no unit table, and nothing offered to (or written by) --exclude-failed."""
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run"
    run_file.write_text(FAKE_RUN)
    tree = tmp_path / "redist"
    redist.write_tree(tree, FAKE_VERSION, links={"imex": {"LICENSE": "/etc/hostname"}} if hostile == "link" else None)
    if hostile == "checksum":
        (tree / ARCHIVES["imex"]).write_bytes(b"not the listed archive")
    if hostile == "manifest":
        (tree / MANIFEST).write_text('{"release_label": ' + "9" * 5000 + "}")
    lock = tmp_path / "versions.yaml"
    lock.write_bytes((Path(__file__).parent / "data/deploy/release-debian-lock.yaml").read_bytes())
    before = lock.read_bytes()
    rc = main(["build", "--kernel", "6.1.0-99-cloud-amd64", "--driver", FAKE_VERSION, "--source", "nvidia",
               "--source-path", str(run_file), "--redist", str(tree), "--exclude-failed", "--profile", str(lock),
               "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 2, captured
    errors = [line for line in captured.err.splitlines() if line.startswith("gl-nvidia: error:")]
    assert len(errors) == 1 and "build results" not in captured.out and "exclude-failed" not in captured.err
    assert {"link": "LICENSE is a symlink to '/etc/hostname'", "checksum": "checksum mismatch for",
            "manifest": "is not NVIDIA's redistrib manifest"}[hostile] in errors[0]
    assert lock.read_bytes() == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_nvidia_checksum_mismatch_leaves_nothing_behind(server: _Server, own_cache: Path) -> None:
    source = NvidiaRunSource(_template(server), sha256="0" * 64, retry_delay=0.01)
    with pytest.raises(UserError, match=r"checksum mismatch for .*NVIDIA-Linux-x86_64-999\.12\.34\.run"):
        source.prepare(FAKE_VERSION, "amd64")
    assert list((own_cache / "build" / "runs").iterdir()) == []


def test_nvidia_unknown_driver_version(server: _Server, own_cache: Path) -> None:
    source = NvidiaRunSource(server.url + "/missing/{version}.run", retry_delay=0.01)
    with pytest.raises(UserError, match=r"unknown driver version 1\.2\.3: .* does not exist \(HTTP 404\)"):
        source.prepare("1.2.3", "amd64")
    assert server.requests == 1  # a 404 is an answer, not a reason to retry


def test_nvidia_download_gives_up_after_retries(server: _Server, own_cache: Path) -> None:
    server.fail = 10
    with pytest.raises(UserError, match=r"download failed after 4 attempts: .*HTTP 503"):
        NvidiaRunSource(_template(server), retry_delay=0.01).prepare(FAKE_VERSION, "amd64")
    assert server.requests == 4
    assert list((own_cache / "build" / "runs").iterdir()) == []


def test_local_run_file_and_dir_source(tmp_path: Path, own_cache: Path) -> None:
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run"
    run_file.write_text(FAKE_RUN)
    inputs = NvidiaRunSource(str(run_file)).prepare(FAKE_VERSION, "amd64")
    assert inputs.source == "nvidia" and (inputs.userspace / "usr/bin/nvidia-smi").is_file()
    assert inputs.left_out["nvlsm"] == f"the redist tree has no release {FAKE_VERSION}: {tmp_path}/{MANIFEST} does not exist"
    redist.write_tree(tmp_path, FAKE_VERSION)  # beside the installer: taken by default
    inputs = NvidiaRunSource(str(run_file)).prepare(FAKE_VERSION, "amd64")
    assert inputs.left_out == {} and (inputs.userspace / "usr/bin/nv-fabricmanager").is_file()
    with pytest.raises(UserError, match=r"holds driver 999\.12\.34, not 1\.0\.0"):
        NvidiaRunSource(str(run_file)).prepare("1.0.0", "amd64")
    with pytest.raises(UserError, match="no such driver installer"):
        NvidiaRunSource(str(tmp_path / "nope.run")).prepare(FAKE_VERSION, "amd64")
    tree = tmp_path / "unpacked"
    subprocess.run(["sh", str(run_file), "--extract-only", "--target", str(tree)], check=True)
    d = DirSource(tree).prepare(FAKE_VERSION, "amd64")
    assert d.source == "dir" and (d.module_sources["proprietary"].tree / "Kbuild").is_file()
    assert sorted(d.left_out) == ["fabricmanager", "imex", "libnvidia_nscq", "libnvsdm", "nvlsm"] and "has no imex" in d.left_out["imex"]
    with pytest.raises(UserError, match="is not an unpacked NVIDIA driver"):
        DirSource(tmp_path).prepare(FAKE_VERSION, "amd64")


def test_damaged_installer_is_a_clear_error(tmp_path: Path, own_cache: Path) -> None:
    bad = tmp_path / "NVIDIA-Linux-x86_64-1.0.0.run"
    bad.write_text("#!/bin/sh\necho 'Verifying archive integrity... Error in MD5 checksums' >&2\nexit 1\n")
    with pytest.raises(UserError, match=r"cannot unpack .*: .*Error in MD5 checksums"):
        NvidiaRunSource(str(bad)).prepare("1.0.0", "amd64")
    assert not any((own_cache / "build" / "run-trees").iterdir())


def test_kmodbuild_runs_make_in_garden_linux_container() -> None:
    env = KmodbuildEnv("1877.3", engine="podman")
    hdrs = KernelHeaders("6.12.72-cloud-amd64", Path("/s"), Path("/o"), "d", "gcc-14 (Debian 14.2.0-19) 14.2.0", "amd64")
    tree = Path("/cache/work/tree")
    assert kmodbuild_image("arm64", "2150.9.0") == "ghcr.io/gardenlinux/gardenlinux/kmodbuild:arm64-2150.9.0"
    assert env.make_argv(hdrs, tree, 8) == [
        "podman", "run", "--rm", "--network=none", "-v", "/cache/work/tree:/cache/work/tree:rw",
        "-w", "/cache/work/tree", "ghcr.io/gardenlinux/gardenlinux/kmodbuild:amd64-1877.3",
        "make", "-j8", "-C", "/cache/work/tree", "KERNEL_UNAME=6.12.72-cloud-amd64", "modules",
    ]
    assert make_argv(hdrs, tree, 2) == ["make", "-j2", "-C", "/cache/work/tree", "SYSSRC=/s", "SYSOUT=/o", "modules"]
    assert hdrs.cc == "gcc-14"


def test_an_arm64_kernel_is_cross_compiled_on_amd64_and_not_on_arm64() -> None:
    hdrs = KernelHeaders("6.1.0-56-cloud-arm64", Path("/s"), Path("/o"), "d", "gcc-12 (Debian 12.2.0-14) 12.2.0", "arm64")
    assert cross_prefix("arm64", "amd64") == "aarch64-linux-gnu-" and cross_prefix("arm64", "arm64") == ""
    assert cross_prefix("amd64", "arm64") == "x86_64-linux-gnu-"
    assert host_arch() == "amd64"  # this machine; the rest of the test depends on it
    assert (hdrs.cc, hdrs.kernel_cc, hdrs.tool("ld")) == ("aarch64-linux-gnu-gcc-12", "gcc-12", "aarch64-linux-gnu-ld")
    assert make_argv(hdrs, Path("/t"), 2)[-4:] == [
        "ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-", "CC=aarch64-linux-gnu-gcc-12", "modules"]
    with pytest.raises(UserError, match="is for neither amd64 nor arm64"):
        config_arch({"CONFIG_PPC64": "y"}, Path("/o"))


def test_first_error_is_the_compiler_error_line() -> None:
    log = ("  CC [M]  nvidia/nv.o\nwarning: something harmless\n"
           "nvidia/nv-pci.c:212:13: error: too few arguments to function 'pci_resize_resource'\n"
           "make[2]: *** [scripts/Makefile.build:250: nvidia/nv-pci.o] Error 1\n")
    assert first_error(log) == "nvidia/nv-pci.c:212:13: error: too few arguments to function 'pci_resize_resource'"
    assert first_error("make: *** No rule to make target 'modules'.  Stop.\n").startswith("make: ***")


def test_debian_has_no_fabric_manager_imex_or_nvlsm_and_says_so() -> None:
    """Debian 12 packages none of them: the bundle records why the image ships without each."""
    inputs = DebianSource().prepare(DEBIAN_DRIVER, "amd64")
    assert inputs.left_out == {
        "fabricmanager": f"no fabric manager for {DEBIAN_DRIVER} in Debian (the archive's nvidia-fabricmanager: no "
                         "such package)",
        "imex": "Debian packages no imex (NVIDIA's redist tree has it: --source nvidia)",
        "nvlsm": "Debian packages no nvlsm (NVIDIA's redist tree has it: --source nvidia)",
        "libnvidia_nscq": "Debian packages no libnvidia_nscq (NVIDIA's redist tree has it: --source nvidia)",
        "libnvsdm": "Debian packages no libnvsdm (NVIDIA's redist tree has it: --source nvidia)"}
    assert "nvidia-fabricmanager" not in DebianSource().checksums(DEBIAN_DRIVER, "amd64")


def test_unknown_driver_version_in_debian(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=r"driver 999\.1\.1 is not in the Debian archive \(nvidia-smi has: 535\."):
        DebianSource().prepare("999.1.1", "amd64")
    out = tmp_path / "bundles"
    rc = main(["build", "--kernel", "6.1.0-56-cloud-amd64", "--driver", "999.1.1", "--out", str(out)])
    assert rc != 0
    assert "driver 999.1.1 is not in the Debian archive" in capsys.readouterr().out
    assert not (out / "999.1.1-amd64").exists()


@pytest.mark.parametrize(("args", "ignored"), [
    (["--kernel-headers", "."], "--kernel-headers is read only with --env dir"),
    (["--env", "apt", "--kernel-headers", "."], "--kernel-headers is read only with --env dir"),
    (["--source-path", "/x.run"], "--source-path and --sha256 are read only"),
    (["--sha256", "0" * 64], "--source-path and --sha256 are read only"),
    (["--source", "dir", "--source-path", ".", "--sha256", "0" * 64], "--sha256 and --redist are read only"),
    (["--redist", "/mirror/redist"], "--sha256 and --redist are read only with --source nvidia"),
])
def test_options_the_build_would_ignore_are_refused(args: list[str], ignored: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["build", "--kernel", "6.1.0-56-cloud-amd64", "--driver", DEBIAN_DRIVER, "--out", str(out), *args]) == 2
    assert ignored in capsys.readouterr().err
    assert not out.exists()


def test_missing_headers_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=r"no kernel headers package linux-headers-6\.1\.0-99-cloud-amd64"):
        AptEnv().headers("6.1.0-99-cloud-amd64", "amd64")
    out = tmp_path / "bundles"
    rc = main(["build", "--kernel", "6.1.0-99-cloud-amd64", "--driver", DEBIAN_DRIVER, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc != 0 and "1 of 1 build unit(s) failed" in captured.err
    assert "no kernel headers package linux-headers-6.1.0-99-cloud-amd64" in captured.out
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_disk_full_leaves_no_half_written_bundle(debian_bundle: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / f"{DEBIAN_DRIVER}-amd64"
        with pytest.raises(UserError, match="no space left on device while writing"):
            build_unit(DEBIAN_UNIT, out, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.slow
def test_a_bundle_holds_one_driver(debian_bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((debian_bundle / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "driver_version": "1.2.3"}))
    with pytest.raises(UserError, match=r"is the bundle of driver 1\.2\.3 amd64, not 535\.309\.01 amd64"):
        build_unit(DEBIAN_UNIT, other, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
    assert sorted(p.name for p in other.iterdir()) == ["manifest.json"]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not a driver bundle"):
        build_unit(DEBIAN_UNIT, stranger, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
    assert sorted(p.name for p in stranger.iterdir()) == ["notes.txt"]


def test_compiler_check_names_both_compilers(debian_headers: KernelHeaders) -> None:
    # This machine has the kernel's own compiler: no warning.
    assert compiler_mismatch(host_toolchain(debian_headers.cc), debian_headers.kernel_compiler) is None
    note = compiler_mismatch("gcc (Debian 14.2.0-19) 14.2.0", debian_headers.kernel_compiler)
    assert note is not None and "gcc (Debian 14.2.0-19) 14.2.0" in note and "gcc-12 (Debian 12.2.0" in note
    with pytest.raises(UserError, match="the kernel was built with gcc-99, which is not installed"):
        host_toolchain("gcc-99")


def test_dir_env_reads_headers_on_disk(debian_headers: KernelHeaders) -> None:
    env = DirEnv(debian_headers.sysout)
    hdrs = env.headers(DEBIAN_KERNEL, "amd64")
    # The arch dir's Makefile names the common dir: SYSSRC is found from it.
    assert (hdrs.sysout, hdrs.syssrc) == (debian_headers.sysout, debian_headers.syssrc)
    assert hdrs.kernel_compiler == debian_headers.kernel_compiler
    with pytest.raises(UserError, match=rf"are for {re.escape(DEBIAN_KERNEL)}, not 6\.1\.0-47-cloud-amd64"):
        env.headers("6.1.0-47-cloud-amd64", "amd64")
