"""The base root filesystem: built daemonless with mmdebstrap (cached by its inputs), or an existing image.

Either way the result is a list of layers in our layout plus a flattened copy on disk, which the
build uses to check the tools the node runtime needs and to generate /etc/ld.so.cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gl_nvidia import apt, fs
from gl_nvidia.errors import UserError
from gl_nvidia.image import layers, oci
from gl_nvidia.image.oci import Descriptor, Layout
from gl_nvidia.run import run

# What the node runtime calls inside the image (python3, modprobe/insmod, nsenter, mount) and ldconfig;
# bookworm ships mount(8) in its own package.
# python3: the node runtime needs the full standard library (json, shlex, dataclasses, argparse's gettext),
# which python3-minimal lacks.
# binutils: the node links split modules (interface + NVIDIA's binary object) with ld before insmod.
# libelf1: on kernels that run objtool over linked modules (IBT: 6.12) the node runs the kernel's objtool.
PACKAGES = ("python3-minimal", "python3", "kmod", "util-linux", "mount", "binutils", "libelf1")
# Every node pulls the base: keep out what a driver container never reads. The merged-usr hook lays out
# /usr without the usrmerge package (which drags in perl); locales, manuals and docs (copyright kept)
# are not unpacked. Together: 76 MB -> 42 MB compressed.
SLIM_OPTIONS = (
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("locale", "man", "info", "doc")),
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
)
REQUIRED_TOOLS = {
    "python3": ("usr/bin/python3",),
    "kmod (modprobe)": ("usr/sbin/modprobe", "sbin/modprobe", "usr/bin/kmod", "bin/kmod"),
    "util-linux (nsenter)": ("usr/bin/nsenter", "bin/nsenter"),
    "util-linux (mount)": ("usr/bin/mount", "bin/mount"),
    "ldconfig": ("usr/sbin/ldconfig", "sbin/ldconfig"),
    "binutils (ld)": ("usr/bin/ld", "bin/ld"),
}
_DEB_ARCH = {"amd64": "amd64", "arm64": "arm64"}


@dataclass(frozen=True)
class BaseSpec:
    """Inputs of an mmdebstrap base: the cache key is a hash of exactly these."""

    suite: str
    mirrors: tuple[str, ...]  # full `deb URI SUITE COMPONENTS` lines
    arch: str
    packages: tuple[str, ...] = PACKAGES
    options: tuple[str, ...] = SLIM_OPTIONS

    def key(self) -> str:
        blob = json.dumps([self.suite, self.mirrors, self.arch, self.packages, self.options,
                           layers.source_date_epoch()])
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class BaseImage:
    layers: tuple[layers.LayerBlob, ...]
    description: str  # for labels and logs: "debian bookworm (mmdebstrap)" or the image reference


def debian_spec(arch: str) -> BaseSpec:
    """The debian profile: this machine's configured Debian archive (never a hard-coded URL)."""
    sources = [s for s in apt.system_sources() if "main" in s.components]
    if not sources:
        raise UserError("no apt source with the `main` component configured", "configure Debian's archive in apt")
    suite = sources[0].suite
    mirrors = tuple(f"deb {s.uri} {s.suite} {' '.join(s.components)}" for s in sources)
    return BaseSpec(suite=suite, mirrors=mirrors, arch=_arch(arch))


def gardenlinux_spec(repo_url: str, gl_version: str, arch: str) -> BaseSpec:
    """The production profile: the Garden Linux apt repository of that GL version."""
    return BaseSpec(suite=gl_version, mirrors=(f"deb {repo_url} {gl_version} main",), arch=_arch(arch))


def _arch(arch: str) -> str:
    if arch not in _DEB_ARCH:
        raise UserError(f"unsupported architecture {arch!r}", "use amd64 or arm64")
    return _DEB_ARCH[arch]


def build_base(spec: BaseSpec, layout: Layout) -> BaseImage:
    """The mmdebstrap base as one reproducible layer, from the cache when its inputs are unchanged."""
    cache = fs.cache_dir("image-base", spec.key())
    meta = cache / "layer.json"
    if not meta.is_file():
        with tempfile.TemporaryDirectory(prefix="gl-nvidia-base-") as tmp:
            rootfs = Path(tmp, "rootfs.tar")
            run(
                ["mmdebstrap", "--variant=essential", "--mode=root", f"--architectures={spec.arch}",
                 f"--include={','.join(spec.packages)}", *spec.options, "--quiet", spec.suite, rootfs,
                 *spec.mirrors],
                env={"SOURCE_DATE_EPOCH": str(layers.source_date_epoch())},
                hint="mmdebstrap needs root and the apt repository; see the log above",
            )
            scratch = Layout.create(Path(tmp, "layout"))
            blob = layers.repack_rootfs(scratch, rootfs)
            shutil.copyfile(scratch.blob_path(blob.descriptor.digest), cache / "layer.tar.gz")
        fs.atomic_write_text(meta, json.dumps({
            "digest": blob.descriptor.digest, "size": blob.descriptor.size,
            "diff_id": blob.diff_id, "uncompressed_size": blob.uncompressed_size,
        }))
    m = json.loads(meta.read_text())
    desc = Descriptor(oci.LAYER_GZIP, m["digest"], m["size"])
    layout.import_blob(cache / "layer.tar.gz", desc)
    return BaseImage(
        (layers.LayerBlob(desc, m["diff_id"], m["uncompressed_size"]),),
        f"{spec.suite} {spec.arch} (mmdebstrap {' '.join(spec.packages)})",
    )


def from_layout_image(layout: Layout, manifest_digest: str, description: str) -> BaseImage:
    """An existing image already in `layout` (copied in from another layout or a registry)."""
    manifest = layout.manifest(manifest_digest)
    config = json.loads(layout.read_blob(manifest.config.digest))
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(manifest.layers):
        raise UserError(f"base image {description} has a malformed config (layers and diff_ids differ)")
    blobs = tuple(layers.LayerBlob(d, diff, 0) for d, diff in zip(manifest.layers, diff_ids, strict=True))
    return BaseImage(blobs, description)


def flatten(layout: Layout, base: BaseImage, dest: Path) -> None:
    """Unpack the base layers in order into `dest`, applying whiteouts; device nodes are skipped."""
    for blob in base.layers:
        with tarfile.open(layout.blob_path(blob.descriptor.digest), "r:*") as tar:
            members = []
            for m in tar.getmembers():
                name = m.name.removeprefix("./").strip("/")
                if not name or m.ischr() or m.isblk() or m.isfifo():
                    continue
                parent, _, leaf = name.rpartition("/")
                if leaf == ".wh..wh..opq":
                    _clear(dest / parent, keep=())
                elif leaf.startswith(".wh."):
                    _remove(dest / parent / leaf.removeprefix(".wh."))
                else:
                    _remove_if_conflicts(dest / name, m)
                    members.append(m)
            tar.extractall(dest, members=members, filter="tar", numeric_owner=True)


def _clear(path: Path, keep: tuple[str, ...]) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            if child.name not in keep:
                _remove(child)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_if_conflicts(path: Path, m: tarfile.TarInfo) -> None:
    if (path.is_symlink() or path.is_file()) or (path.is_dir() and not m.isdir()):
        _remove(path)


def resolve_in_root(root: Path, path: PurePosixPath) -> PurePosixPath:
    """`path` with every symlinked parent directory resolved inside `root` (e.g. /lib -> /usr/lib).

    A layer must not replace the base's /lib symlink with a directory, so files are placed at
    their canonical location.
    """
    parts = path.relative_to("/").parts
    current = PurePosixPath("/")
    for part in parts[:-1]:
        candidate = current / part
        host = root / candidate.relative_to("/")
        hops = 0
        while host.is_symlink() and hops < 40:
            target = os.readlink(host)
            candidate = PurePosixPath(os.path.normpath(
                target if target.startswith("/") else str(candidate.parent / target)
            ))
            host = root / candidate.relative_to("/")
            hops += 1
        current = candidate
    return current / parts[-1]


def check_tools(root: Path, description: str) -> None:
    """Every tool the node runtime calls exists in the base, or one clear error naming what is missing."""
    missing = [
        tool for tool, paths in REQUIRED_TOOLS.items()
        if not any((root / p).exists() for p in paths)
    ]
    if missing:
        raise UserError(
            f"base image {description} lacks {', '.join(missing)}",
            "use a base with python3, kmod, util-linux and binutils, or leave out --base to build one with mmdebstrap",
        )


_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu",
             "usr/lib64", "usr/lib", "lib64", "lib")


def check_libraries(root: Path, needed: Iterable[str], user: str, description: str) -> None:
    """Every shared library `user` (a program the node runs, shipped outside the base) loads is in the base."""
    missing = sorted(lib for lib in set(needed) if not any((root / d / lib).exists() for d in _LIB_DIRS))
    if missing:
        raise UserError(
            f"base image {description} lacks {', '.join(missing)}, which {user} needs",
            "use a base with libelf1 and zlib (the default base has them), or leave out --base",
        )
