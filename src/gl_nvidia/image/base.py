"""The base root filesystem: built daemonless with mmdebstrap (cached by its inputs), or an existing image.

Either way the result is a list of layers in our layout plus a flattened copy on disk, which the
build uses to check the tools the node runtime needs and to generate /etc/ld.so.cache.

amd64 bases are mmdebstrap's `essential` variant: dpkg installs every package, maintainer scripts run
in the root. arm64 bases are built on amd64 machines, where an arm64 maintainer script cannot run
without binfmt/qemu-user, so they are the `extract` variant: the same packages unpacked by the build
machine's dpkg-deb, no script run. Nothing the node runtime calls needs a script: python3, kmod,
util-linux, binutils' `ld` and the loader ship as files and symlinks in their packages, and the image
stage writes /etc/ld.so.cache itself (ldcache.py). A hook records the unpacked packages in dpkg's
status file (state `unpacked`) for the SBOM. The variant follows the target arch, never the build
machine, so an arm64 base has the same digest wherever it is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gl_nvidia import apt, fs, oci
from gl_nvidia.arches import ARCHES
from gl_nvidia.bundle import read_json
from gl_nvidia.catalog.kernels import expand_env
from gl_nvidia.errors import UserError
from gl_nvidia.image import layers, unpack
from gl_nvidia.oci import Descriptor, Layout
from gl_nvidia.osprofile import os_profile
from gl_nvidia.run import run
from gl_nvidia.table import Table

if TYPE_CHECKING:
    from gl_nvidia.catalog.lock import Lock

log = logging.getLogger(__name__)

# What the node runtime calls inside the image (python3, modprobe/insmod, nsenter, mount) and ldconfig;
# bookworm ships mount(8) in its own package.
# python3: the node runtime needs the full standard library (json, shlex, dataclasses, argparse's gettext),
# which python3-minimal lacks.
# binutils: the node links split modules (interface + NVIDIA's binary object) with ld before insmod (on
# kernels that run objtool over linked modules, IBT: 6.12, it applies the build's patch instead: no tools).
# libibumad3: NVIDIA's nvlsm (Blackwell NVL) reaches the NVLink switches through ib_umad with it (NVIDIA's
# packages of nvlsm depend on rdma-core for it; 40 KB). libibmad5: ibstat's other library (IBSTAT_HOOK).
PACKAGES = ("python3-minimal", "python3", "kmod", "util-linux", "mount", "binutils", "libibumad3", "libibmad5")
# Every node pulls the base: keep out what a driver container never reads. The merged-usr hook lays out
# /usr without the usrmerge package (which drags in perl); locales, manuals and docs (copyright kept)
# are not unpacked. Together: 76 MB -> 42 MB compressed.
SLIM_OPTIONS = (
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("locale", "man", "info", "doc")),
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
)
# Essential:yes packages an extract base needs spelled out: os-release, /bin/sh (the entrypoint script),
# ldconfig (the node reruns it if a cache lacks the NVIDIA libraries), and coreutils: the GPU Operator's
# probes run `sh -c 'nvidia-smi && touch ...'` and `rm -f ...` in the driver container.
EXTRACT_PACKAGES = (*PACKAGES, "base-files", "dash", "libc-bin", "coreutils")
# mmdebstrap runs extract hooks on the build machine with the root as $1 and the unpacked .debs (paths
# inside the root) in MMDEBSTRAP_ESSENTIAL.
STATUS_HOOK = ("--extract-hook=for deb in $MMDEBSTRAP_ESSENTIAL; do dpkg-deb --field \"$1/$deb\"; "
               "printf 'Status: install ok unpacked\\n\\n'; done >> \"$1/var/lib/dpkg/status\"")
# ibstat, which NVIDIA's nvidia-fabricmanager-start.sh runs on NVLink5 nodes, without the rest of
# infiniband-diags: the package depends on perl for its scripts (42 -> 54 MB compressed). The hook fetches
# the .deb through the root's own apt configuration (the signed Release's hashes vouch for it) and unpacks
# only the binary and its license; its libraries are packages of the base. An extract hook, which both
# variants run (a customize hook left the arm64 extract base without it).
IBSTAT_HOOK = ("--extract-hook=cd \"$1/tmp\" && APT_CONFIG=\"$MMDEBSTRAP_APT_CONFIG\" apt-get download --quiet=2 "
               "infiniband-diags && dpkg-deb --fsys-tarfile infiniband-diags_*.deb | tar -x -C \"$1\" "
               "./usr/sbin/ibstat ./usr/share/doc/infiniband-diags/copyright && rm infiniband-diags_*.deb")
REQUIRED_TOOLS = {
    "python3": ("usr/bin/python3",),
    "kmod (modprobe)": ("usr/sbin/modprobe", "sbin/modprobe", "usr/bin/kmod", "bin/kmod"),
    "util-linux (nsenter)": ("usr/bin/nsenter", "bin/nsenter"),
    "util-linux (mount)": ("usr/bin/mount", "bin/mount"),
    "ldconfig": ("usr/sbin/ldconfig", "sbin/ldconfig"),
    "binutils (ld)": ("usr/bin/ld", "bin/ld"),
}
_DIFF_ID = re.compile(r"sha256:[0-9a-f]{64}")
_MALFORMED = "the base image is malformed; use another --base"


@dataclass(frozen=True)
class BaseSpec:
    """Inputs of an mmdebstrap base: the cache key is a hash of exactly these."""

    suite: str
    mirrors: tuple[str, ...]  # full `deb URI SUITE COMPONENTS` lines
    arch: str
    packages: tuple[str, ...] = PACKAGES
    options: tuple[str, ...] = (*SLIM_OPTIONS, IBSTAT_HOOK)
    variant: str = "essential"  # mmdebstrap's: essential (maintainer scripts run) or extract (unpacked only)

    def key(self) -> str:
        blob = json.dumps([self.suite, self.mirrors, self.arch, self.packages, self.options, self.variant,
                           layers.source_date_epoch()])
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class BaseImage:
    layers: tuple[layers.LayerBlob, ...]
    description: str  # for labels and logs: "debian bookworm (mmdebstrap)" or the image reference
    digest: str  # its manifest's (org.opencontainers.image.base.digest)
    arch: str  # its config's architecture
    name: str | None = None  # the registry reference it came from (org.opencontainers.image.base.name)


def debian_spec(arch: str, codename: str | None = None) -> BaseSpec:
    """The debian profile: this machine's configured Debian archive (never a hard-coded URL); `codename`
    another release's suites of the same archive (trixie on a bookworm machine), as the catalog reads them."""
    sources = [s for s in apt.system_sources() if "main" in s.components]
    if not sources:
        raise UserError("no apt source with the `main` component configured", "configure Debian's archive in apt")
    if codename is not None and sources[0].suite.split("-", 1)[0] != codename:
        sources = [s for s in apt.release_suites(apt.system_sources(), codename) if "main" in s.components]
    suite = sources[0].suite
    mirrors = tuple(f"deb {s.uri} {s.suite} {' '.join(s.components)}" for s in sources)
    return _spec(suite, mirrors, arch)


def gardenlinux_spec(repo_url: str, gl_version: str, arch: str) -> BaseSpec:
    """The production profile: the Garden Linux apt repository of that GL version."""
    return _spec(gl_version, (f"deb {repo_url} {gl_version} main",), arch)


def _system_base(lock: Lock, arch: str, os_version: str) -> BaseSpec:
    """This machine's archive (another Debian release's suites of it where the OS version is one: trixie
    for 13)."""
    return debian_spec(arch, lock.os.codename_of(os_version))


def _apt_base(lock: Lock, arch: str, os_version: str) -> BaseSpec:
    """The OS version's suite of the lock's `sources.apt` repository."""
    suite = os_profile(lock.os.id).apt.suite_of(os_version, lock.os.codename_of(os_version))
    return gardenlinux_spec(expand_env(lock.sources.apt), suite, arch)


# Where a lock's images get their base, by the OS profile's `base`.
BASE_SOURCES: Table[Callable[[Lock, str, str], BaseSpec]] = Table("base source", {
    "system": _system_base,
    "apt": _apt_base,
})


def base_for(lock: Lock, arch: str, os_version: str) -> BaseSpec:
    """The base of a lock's images of `os_version`: the one its OS record names."""
    return BASE_SOURCES.lookup(os_profile(lock.os.id).base)(lock, arch, os_version)


def _spec(suite: str, mirrors: tuple[str, ...], arch: str) -> BaseSpec:
    """amd64: the essential variant; arm64: the extract variant (see the module docstring)."""
    deb_arch = _arch(arch)
    if ARCHES[deb_arch].build_machine:
        return BaseSpec(suite=suite, mirrors=mirrors, arch=deb_arch)
    return BaseSpec(suite=suite, mirrors=mirrors, arch=deb_arch, packages=EXTRACT_PACKAGES,
                    options=(*SLIM_OPTIONS, STATUS_HOOK, IBSTAT_HOOK), variant="extract")


def _arch(arch: str) -> str:
    if arch not in ARCHES:
        raise UserError(f"unsupported architecture {arch!r}", f"use {' or '.join(ARCHES)}")
    return ARCHES[arch].debian


def build_base(spec: BaseSpec, layout: Layout) -> BaseImage:
    """The mmdebstrap base as one reproducible layer, from the cache when its inputs are unchanged."""
    cache = fs.cache_dir("image-base", spec.key())
    meta = cache / "layer.json"
    if not _cache_hit(cache):
        with tempfile.TemporaryDirectory(prefix="gl-nvidia-base-") as tmp:
            rootfs = Path(tmp, "rootfs.tar")
            run(
                ["mmdebstrap", f"--variant={spec.variant}", "--mode=root", f"--architectures={spec.arch}",
                 f"--include={','.join(spec.packages)}", *spec.options, "--quiet", spec.suite, rootfs,
                 *spec.mirrors],
                env={"SOURCE_DATE_EPOCH": str(layers.source_date_epoch())},
                hint="mmdebstrap needs root and the apt repository; see the log above",
            )
            scratch = Layout.create(Path(tmp, "layout"))
            blob = layers.repack_rootfs(scratch, rootfs)
            # Renamed into place: another build may be reading the entry this one replaces.
            fd, part = tempfile.mkstemp(dir=cache, prefix=".layer.", suffix=".tmp")
            os.close(fd)
            shutil.copyfile(scratch.blob_path(blob.descriptor.digest), part)
            os.replace(part, cache / "layer.tar.gz")
        fs.atomic_write_text(meta, json.dumps({
            "digest": blob.descriptor.digest, "size": blob.descriptor.size,
            "diff_id": blob.diff_id, "uncompressed_size": blob.uncompressed_size,
        }))
    m = json.loads(meta.read_text())
    desc = Descriptor(oci.LAYER_GZIP, m["digest"], m["size"])
    layout.import_blob(cache / "layer.tar.gz", desc)
    # The base as an image of its own, so the driver image can name it by digest like any other base.
    config = layout.write_blob(oci.canonical_json({
        "architecture": ARCHES[spec.arch].oci, "os": "linux", "created": layers.created(),
        "rootfs": {"type": "layers", "diff_ids": [m["diff_id"]]},
    }), oci.CONFIG)
    manifest = oci.Manifest.build(config, [desc], {})
    layout.write_blob(manifest.raw, manifest.media_type)
    return BaseImage(
        (layers.LayerBlob(desc, m["diff_id"], m["uncompressed_size"]),),
        f"{spec.suite} {spec.arch} (mmdebstrap {spec.variant} {' '.join(spec.packages)})",
        manifest.digest,
        ARCHES[spec.arch].oci,
    )


def _cache_hit(cache: Path) -> bool:
    """Whether the cached layer is still the one its digest names (the entry is content-addressed)."""
    try:
        digest = json.loads((cache / "layer.json").read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    blob = cache / "layer.tar.gz"
    if blob.is_file() and f"sha256:{fs.sha256_file(blob)}" == digest:
        return True
    log.warning("cache entry %s fails verification (layer.tar.gz is not %s): building it again to replace it",
                cache, digest)
    return False


def from_layout_image(layout: Layout, manifest_digest: str, description: str, name: str | None = None) -> BaseImage:
    """An existing image already in `layout` (copied in from another layout, or from the registry image `name`)."""
    manifest = layout.manifest(manifest_digest)
    try:
        config = read_json(layout.read_blob(manifest.config.digest))
    except ValueError as exc:
        raise UserError(f"base image {description} has a config that is not JSON: {exc}", _MALFORMED) from exc
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and _DIFF_ID.fullmatch(d) for d in diff_ids):
        raise UserError(f"base image {description} has a malformed config (no JSON object with rootfs.diff_ids, "
                        "a list of sha256 digests)", _MALFORMED)
    if len(diff_ids) != len(manifest.layers):
        raise UserError(f"base image {description} has a malformed config (layers and diff_ids differ)", _MALFORMED)
    blobs = tuple(layers.LayerBlob(d, diff, 0) for d, diff in zip(manifest.layers, diff_ids, strict=True))
    return BaseImage(blobs, description, manifest_digest, str(config.get("architecture", "")), name)


def flatten(layout: Layout, base: BaseImage, dest: Path) -> None:
    """Apply the base layers in order to `dest`, never touching anything outside it, each checked against
    its config's diff_id, all of them within unpack.MAX_UNPACKED bytes (see `unpack`)."""
    budget = unpack.MAX_UNPACKED
    for i, blob in enumerate(base.layers, 1):
        budget -= unpack.apply_layer(layout.blob_path(blob.descriptor.digest), dest,
                                     f"base image {base.description}, layer {i} ({blob.descriptor.digest})",
                                     diff_id=blob.diff_id, budget=budget)


def check_tools(root: Path, description: str) -> None:
    """Every tool the node runtime calls exists in the base, or one clear error naming what is missing."""
    missing = [
        tool for tool, paths in REQUIRED_TOOLS.items()
        if not any(unpack.exists_in_root(root, p) for p in paths)
    ]
    if missing:
        raise UserError(
            f"base image {description} lacks {', '.join(missing)}",
            "use a base with python3, kmod, util-linux and binutils, or leave out --base to build one with mmdebstrap",
        )


