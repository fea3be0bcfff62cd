"""Hostile base images: layers that try to leave the root are applied inside it, never outside.

Every test builds real layer tarballs (with Python's tarfile, names and links exactly as an attacker
writes them) into a real OCI layout, runs the real `flatten` (or the whole image build), and checks
that a sentinel file outside the root is untouched and the layer's legitimate content is in place.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from gl_nvidia.errors import UserError
from gl_nvidia.image import base as base_mod
from gl_nvidia.image.assemble import ImageOptions, build_image
from gl_nvidia.oci import CONFIG, LAYER_GZIP, Layout, Manifest, canonical_json
from tests.fixtures.small_bundle import KERNELS, TRIPLET, VERSION, make_bundle

SENTINEL = b"the build host's own file\n"


@dataclass(frozen=True)
class M:
    """One raw tar member: `kind` is a tarfile type, `link` the link target."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    link: str = ""
    mode: int = 0o644


def D(name: str) -> M:
    return M(name, tarfile.DIRTYPE, mode=0o755)


def S(name: str, target: str | Path) -> M:
    return M(name, tarfile.SYMTYPE, link=str(target), mode=0o777)


def H(name: str, target: str | Path) -> M:
    return M(name, tarfile.LNKTYPE, link=str(target))


def _tar(members: list[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)  # kept verbatim: ../, absolute and whiteout names included
            info.type, info.linkname, info.mode, info.size = m.kind, m.link, m.mode, len(m.data)
            tar.addfile(info, io.BytesIO(m.data) if m.kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def base_layout(path: Path, layers: list[list[M]], tag: str = "v1") -> Layout:
    """An OCI layout holding one image made of these raw layers (bottom first)."""
    layout = Layout.create(path)
    descs, diff_ids = [], []
    for members in layers:
        raw = _tar(members)
        descs.append(layout.write_blob(gzip.compress(raw, mtime=0), LAYER_GZIP))
        diff_ids.append(f"sha256:{hashlib.sha256(raw).hexdigest()}")
    cfg = layout.write_blob(canonical_json({"architecture": "amd64", "os": "linux",
                                            "rootfs": {"type": "layers", "diff_ids": diff_ids}}), CONFIG)
    layout.add_image(Manifest.build(cfg, descs, {}), [tag])
    return layout


def flatten(tmp: Path, layers: list[list[M]]) -> Path:
    layout = base_layout(tmp / "layout", layers)
    image = base_mod.from_layout_image(layout, layout.resolve("v1").digest, "hostile:v1")
    root = tmp / "root"
    root.mkdir()
    base_mod.flatten(layout, image, root)
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the root with a sentinel file the layers aim at."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "sentinel").write_bytes(SENTINEL)
    return d


def untouched(outside: Path, extra: int = 0) -> bool:
    """The sentinel as it was, and nothing added beside it but the `extra` entries the test put there."""
    s = outside / "sentinel"
    return (len(list(outside.iterdir())) == 1 + extra and not s.is_symlink()
            and s.read_bytes() == SENTINEL and s.stat().st_nlink == 1)


def test_dotdot_and_absolute_paths_are_clamped_inside_the_root_and_devices_skipped(tmp_path: Path,
                                                                                   outside: Path) -> None:
    root = flatten(tmp_path, [[
        M("../outside/sentinel", data=b"climbed"),
        M("usr/../../../outside/sentinel", data=b"climbed later"),
        M(f"{outside}/sentinel", data=b"absolute"),
        M("../outside/new", data=b"new"),
        M("usr/bin/python3", data=b"#!", mode=0o4755),
        M("dev/evil-null", tarfile.CHRTYPE), M("dev/evil-sda", tarfile.BLKTYPE), M("../outside/fifo", tarfile.FIFOTYPE),
    ]])
    assert untouched(outside)
    # `..` stops at the root (as containerd's fs.RootPath and umoci's securejoin); `/x` is the root's x.
    assert (root / "outside/sentinel").read_bytes() == b"climbed later"
    assert (root / "outside/new").read_bytes() == b"new"
    assert (root / str(outside).lstrip("/") / "sentinel").read_bytes() == b"absolute"
    assert (root / "usr/bin/python3").read_bytes() == b"#!"
    assert stat.S_IMODE((root / "usr/bin/python3").stat().st_mode) == 0o755  # no setuid on the build host
    assert not (root / "dev/evil-null").exists() and not (root / "dev/evil-sda").exists()
    assert not (root / "outside/fifo").exists()


def test_whiteouts_below_symlinks_or_dotdot_delete_only_inside_the_root(tmp_path: Path, outside: Path) -> None:
    root = flatten(tmp_path, [
        [S("abs", outside), S("rel", "../../../../../../../../.." + str(outside)), S("up", ".."),
         M("usr/bin/python3", data=b"#!"), M("usr/bin/stays", data=b"x"), M("outside/sentinel", data=b"in root")],
        [M("abs/.wh.sentinel"), M("rel/.wh.sentinel"), M("up/up/outside/.wh.sentinel"),
         M("../.wh.outside"), M(f"{outside.parent}/.wh.outside"), M("usr/bin/.wh.python3"),
         M(".wh.."), M("usr/.wh.."), M("usr/bin/.wh..")],
    ])
    assert untouched(outside)
    assert not (root / "usr/bin/python3").exists()  # the legitimate whiteout did its job
    assert (root / "usr/bin/stays").read_bytes() == b"x"  # `.wh..` names no file: ignored
    assert not (root / "outside").exists()  # `../.wh.outside` is the root's `outside`
    assert (root / "abs").is_symlink() and (root / "rel").is_symlink()


def test_opaque_whiteouts_below_symlinks_clear_only_inside_the_root(tmp_path: Path, outside: Path) -> None:
    root = flatten(tmp_path, [
        [S("abs", outside.parent), S("evil", outside), D("keep/"), M("keep/old", data=b"old")],
        [M("abs/outside/.wh..wh..opq"), M("evil/.wh..wh..opq"), M("../outside/.wh..wh..opq"),
         M("keep/.wh..wh..opq"), M("keep/new", data=b"new")],
    ])
    assert untouched(outside)
    assert sorted(p.name for p in (root / "keep").iterdir()) == ["new"]


def test_files_are_never_written_through_symlinks(tmp_path: Path, outside: Path) -> None:
    mode = outside.stat().st_mode
    root = flatten(tmp_path, [
        [S("etc", outside), S("lib", "../outside"), S("leaf", outside / "sentinel")],
        [M("etc/sentinel", data=b"via dir link"), M("lib/sentinel", data=b"via relative link"),
         M("leaf", data=b"replaces the link"), S("same", outside), M("same/sentinel", data=b"same layer"),
         # tar applies directory modes after the layer: by then this directory is a symlink out
         M("moved", tarfile.DIRTYPE, mode=0o500), S("moved", outside)],
    ])
    assert untouched(outside) and outside.stat().st_mode == mode
    # The leaf symlink is replaced, not followed (containerd removes whatever is at the path first).
    assert not (root / "leaf").is_symlink() and (root / "leaf").read_bytes() == b"replaces the link"
    # Through a symlinked directory the write lands where the link points inside the root.
    inside = root / str(outside).lstrip("/") / "sentinel"
    assert inside.read_bytes() == b"same layer"
    assert (root / "outside/sentinel").read_bytes() == b"via relative link"


def test_hard_links_resolve_inside_the_root(tmp_path: Path, outside: Path) -> None:
    root = flatten(tmp_path, [[
        M("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"), H("passwd-link", "/etc/passwd"),
        H("up-link", "../../../../etc/passwd"),
    ]])
    assert (root / "passwd-link").stat().st_ino == (root / "etc/passwd").stat().st_ino
    assert (root / "up-link").stat().st_ino == (root / "etc/passwd").stat().st_ino
    assert os.stat("/etc/passwd").st_ino != (root / "passwd-link").stat().st_ino


@pytest.mark.parametrize("link", ["../outside/sentinel", "ABS", "evil/sentinel", "/"])
def test_hard_links_to_what_is_outside_the_root_are_refused(tmp_path: Path, outside: Path, link: str) -> None:
    target = str(outside / "sentinel") if link == "ABS" else link
    with pytest.raises(UserError, match=r"hostile:v1, layer 1 .*cannot apply h: hard link to .*: no such file in the image"):
        flatten(tmp_path, [[S("evil", outside), H("h", target)]])
    assert untouched(outside)


def test_a_layer_that_is_not_a_tarball_is_one_error(tmp_path: Path) -> None:
    layout = base_layout(tmp_path / "layout", [[M("a", data=b"a")]])
    image = base_mod.from_layout_image(layout, layout.resolve("v1").digest, "broken:v1")
    layout.blob_path(image.layers[0].descriptor.digest).write_bytes(b"not gzip, not tar")
    (tmp_path / "root").mkdir()
    with pytest.raises(UserError, match=r"broken:v1, layer 1 .*not a readable layer tarball"):
        base_mod.flatten(layout, image, tmp_path / "root")


def test_image_build_on_a_hostile_base_writes_nothing_outside(tmp_path: Path, outside: Path) -> None:
    """The build writes the userspace and ld.so.conf into the flattened base for ldconfig: a base
    whose /etc and library names are symlinks to this machine's files must not redirect those writes."""
    tools = ["usr/bin/python3", "usr/sbin/modprobe", "usr/bin/nsenter", "usr/bin/mount", "usr/sbin/ldconfig",
             "usr/bin/ld"]
    base_layout(tmp_path / "base", [[
        *(M(t, data=b"#!", mode=0o755) for t in tools),
        S("etc", outside),
        S(f"usr/lib/{TRIPLET}/libcuda.so.{VERSION}", outside / "sentinel"),
    ]])
    bundle = make_bundle(tmp_path / "bundle", kernels=KERNELS[:1])
    build_image(bundle, KERNELS[0], tmp_path / "out", base=f"{tmp_path / 'base'}:v1",
                options=ImageOptions(os_versions=("1877.3",)))
    assert untouched(outside)


def test_a_base_with_a_file_where_the_libraries_go_is_one_error(tmp_path: Path) -> None:
    tools = ["usr/bin/python3", "usr/sbin/modprobe", "usr/bin/nsenter", "usr/bin/mount", "usr/sbin/ldconfig",
             "usr/bin/ld"]
    base_layout(tmp_path / "base", [[*(M(t, data=b"#!", mode=0o755) for t in tools),
                                     M(f"usr/lib/{TRIPLET}", data=b"not a directory")]])
    bundle = make_bundle(tmp_path / "bundle", kernels=KERNELS[:1])
    with pytest.raises(UserError, match=rf"cannot write /usr/lib/{TRIPLET}/.* into the base image: File exists"):
        build_image(bundle, KERNELS[0], tmp_path / "out", base=f"{tmp_path / 'base'}:v1",
                    options=ImageOptions(os_versions=("1877.3",)))


HOST_STATUS = b"Package: host-only-tool\nStatus: install ok installed\nVersion: 1.0\nArchitecture: amd64\n\n"
BASE_STATUS = b"Package: base-files\nStatus: install ok installed\nVersion: 12.4\nArchitecture: amd64\n\n"


@pytest.mark.parametrize("members", [
    [S("var/lib/dpkg/status", "{outside}/lib/dpkg/status")],  # the status file a link to the host's
    [S("var", "{outside}")],  # all of var a link to the host
    [S("var", "../../../../../../../../../..{outside}")],  # relative, climbing out
    [S("usr/lib", "{outside}"), S("etc/os-release", "../usr/lib/os-release")],  # os-release through a linked dir
    [S("etc/os-release", "{outside}/os-release")],
    [S("var/lib/dpkg/status", "/proc/kmsg")],  # would block a read on the host
], ids=["status", "var", "var-relative", "usr-lib", "os-release", "kmsg"])
def test_the_sbom_reads_the_base_never_the_build_host(members: list[M], tmp_path: Path, outside: Path) -> None:
    from gl_nvidia.image import sbom

    (outside / "lib/dpkg").mkdir(parents=True)
    (outside / "lib/dpkg/status").write_bytes(HOST_STATUS)
    (outside / "os-release").write_bytes(b"ID=hostos\nVERSION_ID=99\n")
    hostile = [M(m.name, m.kind, m.data, m.link.format(outside=outside), m.mode) for m in members]
    root = flatten(tmp_path, [[D("var/"), D("var/lib/"), D("var/lib/dpkg/"), M("var/lib/dpkg/status", data=BASE_STATUS),
                               D("usr/"), D("usr/lib/"), M("usr/lib/os-release", data=b"ID=debian\nVERSION_ID=12\n"),
                               D("etc/"), S("etc/os-release", "../usr/lib/os-release")], hostile])

    def stuck(*_: object) -> None:
        raise TimeoutError("the SBOM read blocked")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)
    try:
        found = sbom.base_packages(root, "base image hostile:v1")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert [p.name for p in found.packages] in ([], ["base-files"])
    assert (found.distro, found.distro_version) in (("debian", "12"), ("debian", ""))
    assert untouched_but_status(outside)


def untouched_but_status(outside: Path) -> bool:
    return (outside / "lib/dpkg/status").read_bytes() == HOST_STATUS and untouched(outside, extra=2)


def test_a_base_status_that_loops_or_is_a_directory_is_one_error(tmp_path: Path) -> None:
    from gl_nvidia.image import sbom

    root = flatten(tmp_path, [[S("var/lib/dpkg/status", "/var/lib/dpkg/status")]])
    with pytest.raises(UserError, match=r"^base image b:v1: too many levels of symbolic links"):
        sbom.base_packages(root, "base image b:v1")
    (root / "var/lib/dpkg/status").unlink()
    (root / "var/lib/dpkg/status").mkdir()
    with pytest.raises(UserError, match=r"^base image b:v1: var/lib/dpkg/status is not a regular file"):
        sbom.base_packages(root, "base image b:v1")


def _raw_base(path: Path, raw: bytes, diff_id: str | None = None, config: bytes | None = None) -> Layout:
    """A layout whose one layer is the tar `raw`, listed under `diff_id` (default: its own), with `config`."""
    layout = Layout.create(path)
    desc = layout.write_blob(gzip.compress(raw, mtime=0), LAYER_GZIP)
    cfg = layout.write_blob(config if config is not None else canonical_json({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id or f"sha256:{hashlib.sha256(raw).hexdigest()}"]}}), CONFIG)
    layout.add_image(Manifest.build(cfg, [desc], {}), ["v1"])
    return layout


def test_a_layer_that_is_not_its_diff_id_is_refused(tmp_path: Path) -> None:
    """umoci refuses such an image ("diffid mismatch"); the build must not publish it."""
    layout = _raw_base(tmp_path / "base", _tar([M("etc/x", data=b"x")]), diff_id="sha256:" + "0" * 64)
    image = base_mod.from_layout_image(layout, layout.resolve("v1").digest, "lying:v1")
    (tmp_path / "root").mkdir()
    with pytest.raises(UserError, match=r"^base image lying:v1, layer 1 \(sha256:[0-9a-f]{64}\): its content is "
                                        r"sha256:[0-9a-f]{64}, not the sha256:0{64} its config lists"):
        base_mod.flatten(layout, image, tmp_path / "root")


def test_a_tiny_layer_with_a_sparse_huge_file_writes_nothing_big(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with (src / "huge").open("wb") as fh:
        fh.truncate(4 << 30)  # 4 GiB of holes
    raw = subprocess.run(["tar", "--sparse", "-cf", "-", "-C", str(src), "huge"], check=True, capture_output=True).stdout
    assert len(gzip.compress(raw)) < 1000
    layout = _raw_base(tmp_path / "base", raw)
    image = base_mod.from_layout_image(layout, layout.resolve("v1").digest, "sparse:v1")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UserError, match=r"^base image sparse:v1, layer 1 \(sha256:[0-9a-f]{64}\): the base unpacks to "
                                        r"more than 2 GiB \(sparse files counted at their full size\)"):
        base_mod.flatten(layout, image, root)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("config", [b"[]", b"5", b"9" * 5000, b"[" * 100000, b'{"rootfs": []}',
                                    b'{"rootfs": {"diff_ids": ["../../etc"]}}', b"\xff"])
def test_a_base_config_that_is_not_an_object_is_one_error(config: bytes, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from gl_nvidia.cli import main

    _raw_base(tmp_path / "base", _tar([M("etc/x", data=b"x")]), config=config)
    bundle = make_bundle(tmp_path / "bundle", kernels=KERNELS[:1])
    rc = main(["image", str(bundle), "--kernel", KERNELS[0], "--base", f"{tmp_path / 'base'}:v1",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert [line for line in err.splitlines() if line.startswith("gl-nvidia: error:")] == [
        next(line for line in err.splitlines() if "has a" in line and "config" in line)]


def test_sigterm_during_the_image_build_leaves_no_temp_dirs_and_no_layout(tmp_path: Path) -> None:
    """A cancelled CI job: gl-nvidia unwinds, removing its temp root and the layout it began."""
    src = tmp_path / "src"
    src.mkdir()
    with (src / "zeros").open("wb") as fh:
        fh.truncate(400 << 20)  # read as 400 MiB of zeros (no --sparse): seconds of work in the temp root
    raw = tmp_path / "layer.tar"
    subprocess.run(["tar", "-cf", str(raw), "-C", str(src), "zeros"], check=True)
    layout = Layout.create(tmp_path / "base")
    desc = layout.write_blob(subprocess.run(["gzip", "-1", "-c", str(raw)], check=True, capture_output=True).stdout,
                             LAYER_GZIP)
    cfg = layout.write_blob(canonical_json({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(raw.read_bytes()).hexdigest()}"]}}), CONFIG)
    layout.add_image(Manifest.build(cfg, [desc], {}), ["v1"])
    raw.unlink()
    bundle = make_bundle(tmp_path / "bundle", kernels=KERNELS[:1])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from gl_nvidia.cli import main; sys.exit(main())", "image", str(bundle), "--kernel", KERNELS[0],
                             "--base", f"{tmp_path / 'base'}:v1", "--out", str(tmp_path / "out")],
                            env={**os.environ, "TMPDIR": str(tmp)}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp.glob("gl-nvidia-image-*/root")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "gl-nvidia: interrupted"
    assert list(tmp.iterdir()) == []
    assert not (tmp_path / "out").exists()
