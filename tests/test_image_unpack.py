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
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from gl_nvidia.errors import UserError
from gl_nvidia.image import base as base_mod
from gl_nvidia.image.build import ImageOptions, build_image
from gl_nvidia.oci import CONFIG, LAYER_GZIP, Layout, Manifest, canonical_json
from tests.test_image_support import KERNELS, TRIPLET, VERSION, make_bundle

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


def untouched(outside: Path) -> bool:
    s = outside / "sentinel"
    return (sorted(p.name for p in outside.iterdir()) == ["sentinel"] and not s.is_symlink()
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
