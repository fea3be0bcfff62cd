"""Build driver images from a bundle into an OCI image layout, without a container engine.

Layers, bottom to top (so a kernel-only upgrade pulls only the last one):
  base rootfs | node runtime | userspace | ld.so.cache | firmware | binaries per module type | modules of one kernel
Every layer below the modules layer depends only on the driver version, arch and module type, never on
which kernels a bundle holds or which module types one kernel got: NVIDIA's kernel-independent objects
are one layer per module type, so images of kernels with different module types still share them. The
modules layer holds the interface objects and module.lds of split modules (bundle.ModuleParts), whole
small modules and the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import gl_nvidia
from gl_nvidia import bundle as bundle_mod
from gl_nvidia import oci, ui
from gl_nvidia.arches import ARCHES
from gl_nvidia.bundle import BundleManifest
from gl_nvidia.errors import UserError
from gl_nvidia.fs import atomic_write_bytes, sha256_file
from gl_nvidia.image import base as base_mod
from gl_nvidia.image import layers, ldcache, sbom, unpack
from gl_nvidia.image.layers import Entry, LayerBlob
from gl_nvidia.image.tags import image_tags, kernel_arch
from gl_nvidia.node import layout as node_layout
from gl_nvidia.oci import Layout, LayoutBase, Manifest
from gl_nvidia.osprofile import os_profile
from gl_nvidia.reference import validate_tag

log = logging.getLogger(__name__)

MODULE_TYPE_CHOICES = {"open": ("open",), "proprietary": ("proprietary",), "both": ("open", "proprietary")}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LABEL_PREFIX = "io.gardenlinux.nvidia"
ENTRYPOINT_SCRIPT = b'#!/bin/sh\nexec python3 -m gl_nvidia.node "$@"\n'
# The modules of gl_nvidia the node runtime may import besides its own package (standard library only).
NODE_SHARED = ("__init__.py", "bundle.py", "arches.py")


@dataclass(frozen=True)
class ImageOptions:
    """What an image says about itself beyond the bundle: tags' OS and provenance labels."""

    module_types: str = "both"  # open | proprietary | both
    os_id: str | None = None  # NFD system-os_release.ID of the nodes; None: the one the bundle records
    os_versions: tuple[str, ...] = ()  # OS (GL) versions the kernel ships in; (): the ones the bundle records
    source: str | None = None  # org.opencontainers.image.source
    revision: str | None = None  # org.opencontainers.image.revision


@dataclass(frozen=True)
class LayerInfo:
    name: str
    digest: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BuiltImage:
    """One (driver, kernel) image in a layout: what the release stage pushes."""

    layout: Path
    kernel: str
    digest: str  # manifest digest
    size: int  # sum of compressed layers and config
    tags: tuple[str, ...]
    module_types: tuple[str, ...]
    layers: tuple[LayerInfo, ...]
    sbom: str  # digest of the SBOM's referrer manifest, tagged sha256-<image hex>.sbom in the layout

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layout"] = str(self.layout)
        d["layers"] = [x.as_dict() for x in self.layers]
        return d


def build_image(
    bundle_dir: Path,
    kernel: str,
    out_layout: Path,
    *,
    base: str | base_mod.BaseSpec | LayoutBase | None = None,
    options: ImageOptions | None = None,
) -> BuiltImage:
    """Build the image for one kernel of a bundle into the OCI layout `out_layout`.

    `base`: None builds the debian-profile base with mmdebstrap (cached); a `BaseSpec` builds that
    one (e.g. `base.gardenlinux_spec(...)`); a `LayoutBase` (or its `dir[:tag]` string) is an existing
    image in an OCI layout, e.g. one `registry.transfer.pull_base` fetched. Returns the manifest digest
    and tags; the same bundle and base give the same digest.
    """
    return build_images(bundle_dir, [kernel], out_layout, base=base, options=options)[0]


def build_images(
    bundle_dir: Path,
    kernels: Sequence[str] | None,
    out_layout: Path,
    *,
    base: str | base_mod.BaseSpec | LayoutBase | None = None,
    options: ImageOptions | None = None,
    annotations: Mapping[str, Mapping[str, str]] | None = None,
) -> list[BuiltImage]:
    """One image per kernel (None: every kernel in the bundle); the shared layers are built once.

    `annotations`: kernel -> extra manifest annotations of its image (release records its inputs there).
    """
    opts = options or ImageOptions()
    manifest = _load_bundle(bundle_dir)
    wanted = list(manifest.kernels) if kernels is None else list(kernels)
    if not wanted:
        raise UserError(f"bundle {bundle_dir} holds no kernels", "build modules with `gl-nvidia build` first")
    plans = [_plan_kernel(bundle_dir, manifest, k, opts) for k in wanted]  # all input errors before any work
    results = []
    binaries: dict[str, LayerBlob | None] = {}  # one layer of NVIDIA's objects per module type
    with (_out_layout(out_layout) as layout, ui.progress() as prog,
          tempfile.TemporaryDirectory(prefix="gl-nvidia-image-") as tmp):
        with ui.task(prog, "base root filesystem"):
            base_image = _resolve_base(base, layout, manifest.arch)
            if base_image.arch != ARCHES[manifest.arch].oci:
                raise UserError(f"base image {base_image.description} is for {base_image.arch or 'no architecture'}, "
                                f"but bundle {bundle_dir} is {manifest.arch}: its tools could not run the node runtime",
                                f"use a {manifest.arch} base, or leave out --base to build one")
            root = Path(tmp, "root")
            root.mkdir()
            base_mod.flatten(layout, base_image, root)
            base_mod.check_tools(root, base_image.description)
            base_packages = sbom.base_packages(root, f"base image {base_image.description}")
        with ui.task(prog, "shared layers (node runtime, userspace, ld.so.cache, firmware)"):
            shared = _shared_layers(layout, bundle_dir, manifest, root)
        with ui.task(prog, "kernel images", total=len(plans)) as t:
            for plan in plans:
                for mtype in plan.module_types:
                    if mtype not in binaries:
                        binaries[mtype] = _binaries_layer(layout, bundle_dir, manifest, plan, mtype, root)
                own = [(f"binaries {m}", layer) for m in plan.module_types if (layer := binaries[m]) is not None]
                extra = dict((annotations or {}).get(plan.kernel, {}))
                results.append(_kernel_image(layout, bundle_dir, manifest, plan, base_image, base_packages, shared, own,
                                             root, opts, extra))
                t.advance(1)
    return results


@dataclass(frozen=True)
class _KernelPlan:
    kernel: str
    module_types: tuple[str, ...]
    tags: tuple[str, ...]
    os: bundle_mod.OSRecord  # what the tags and labels name


def read_bundle_manifest(bundle_dir: Path) -> BundleManifest:
    """The bundle's manifest, or one error line saying why BUNDLE is not a bundle (files are not checked)."""
    path = bundle_dir / bundle_mod.MANIFEST
    if not path.is_file():
        raise UserError(f"{bundle_dir} is not a driver bundle (no {bundle_mod.MANIFEST})",
                        "pass the directory `gl-nvidia build` wrote")
    try:
        return BundleManifest.load(bundle_dir)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"bundle manifest {path} is invalid: {exc}", "rebuild the bundle") from exc


def _load_bundle(bundle_dir: Path) -> BundleManifest:
    manifest = read_bundle_manifest(bundle_dir)
    for tree, files in ((bundle_mod.userspace_dir(bundle_dir), manifest.userspace),
                        (bundle_mod.firmware_dir(bundle_dir), manifest.firmware)):
        for f in files:
            _check_file(tree, f, bundle_dir)
        _check_unlisted(tree, files, bundle_dir)
    return manifest


def _check_file(tree: Path, f: bundle_mod.UserspaceFile, bundle_dir: Path) -> None:
    path = tree / f.path
    if path.parent.resolve() != (tree.resolve() / f.path).parent:  # a directory on the way is a symlink
        raise UserError(f"bundle {bundle_dir} is corrupt: {path} lies behind a symlink", "rebuild the bundle")
    if f.link is not None:
        if not path.is_symlink():
            raise UserError(f"bundle {bundle_dir} is incomplete: symlink {path} is missing", "rebuild the bundle")
        return
    if path.is_symlink() or not path.is_file():
        raise UserError(f"bundle {bundle_dir} is incomplete: {path} is missing", "rebuild the bundle")
    if path.stat().st_size != f.size or sha256_file(path) != f.sha256:
        raise UserError(f"bundle {bundle_dir} is corrupt: {path} does not match its manifest checksum",
                        "rebuild the bundle")


def _check_unlisted(tree: Path, files: tuple[bundle_mod.UserspaceFile, ...], bundle_dir: Path) -> None:
    """The image takes only what the manifest lists; a file it does not list (an `etc/ld.so.preload` put
    beside the bundle's own) means the bundle was changed after the build."""
    listed = {f.path for f in files}
    for top, dirs, names in os.walk(tree):
        for name in sorted(names + [d for d in dirs if os.path.islink(os.path.join(top, d))]):
            rel = os.path.relpath(os.path.join(top, name), tree)
            if rel not in listed:
                raise UserError(f"bundle {bundle_dir} holds {tree.name}/{rel}, which its manifest does not list",
                                "rebuild the bundle; the image takes only what the build listed")


def _plan_kernel(bundle_dir: Path, manifest: BundleManifest, kernel: str, opts: ImageOptions) -> _KernelPlan:
    if kernel not in manifest.kernels:
        have = ", ".join(sorted(manifest.kernels)) or "none"
        raise UserError(f"no modules for kernel {kernel} in bundle {bundle_dir} (it holds {have})",
                        f"build them with `gl-nvidia build --kernel {kernel}`")
    named = kernel_arch(kernel)
    if named is not None and named != manifest.arch:
        raise UserError(f"kernel {kernel} is an {named} kernel, but bundle {bundle_dir} is {manifest.arch}: "
                        f"its image would be published under the {named} image's tags",
                        "build the bundle for the kernel's own arch")
    if opts.module_types not in MODULE_TYPE_CHOICES:
        raise UserError(f"unknown module type {opts.module_types!r}", "use open, proprietary or both")
    sets = manifest.kernels[kernel].module_sets
    built = tuple(t for t in MODULE_TYPE_CHOICES[opts.module_types] if t in sets and sets[t].status == "ok")
    if not built:
        raise UserError(f"bundle {bundle_dir} has no successfully built {opts.module_types} modules for kernel {kernel}",
                        "see the build log in the bundle's logs/ directory")
    ok = usable_module_types(manifest, kernel, built)
    if not ok:
        t = built[0]
        raise UserError(f"the {t} modules for kernel {kernel} in bundle {bundle_dir} are {sets[t].source_version}, "
                        f"not the driver {manifest.driver_version}: the node would refuse them",
                        "build modules from the source of the driver's own version")
    for t in built:
        if t not in ok:
            log.warning("%s: leaving out the %s modules: %s is not the driver %s (the node would refuse them)",
                        kernel, t, sets[t].source_version, manifest.driver_version)
    for t in ok:
        for mod in sets[t].modules:
            for path, sha in _module_sources(bundle_dir, kernel, t, mod):
                if not path.is_file():
                    raise UserError(f"bundle {bundle_dir} is incomplete: {path} is missing", "rebuild the bundle")
                if sha256_file(path) != sha:
                    raise UserError(f"bundle {bundle_dir} is corrupt: {path} does not match its manifest checksum",
                                    "rebuild the bundle")
    nodes = _os_of(bundle_dir, manifest.kernels[kernel], opts)
    if os_profile(nodes.id).version_id is None and not nodes.versions:  # the tags need the nodes' own
        raise UserError(f"no OS version given for os id {nodes.id!r}", "pass --gl-version (for another --os-id: the nodes' VERSION_ID)")
    tags = image_tags(manifest.driver_version, manifest.driver_branch, kernel, nodes.id, nodes.versions)
    for tag in tags:
        try:
            validate_tag(tag)
        except ValueError as exc:
            raise UserError(str(exc), "kernel, driver version and OS version must only use [A-Za-z0-9_.-]") from exc
    return _KernelPlan(kernel, ok, tuple(tags), nodes)


def _os_of(bundle_dir: Path, kb: bundle_mod.KernelBuild, opts: ImageOptions) -> bundle_mod.OSRecord:
    """The nodes a kernel's image is for: the bundle's record; an option may only repeat it (a Debian
    bundle imaged without options is tagged for Debian, not for Garden Linux)."""
    rec = kb.os
    if rec is None:  # a bundle from before bundles recorded it
        if opts.os_id is None:
            raise UserError(f"bundle {bundle_dir} does not record the OS kernel {kb.kernel} was built for",
                            "pass --os-id (and --gl-version), or rebuild the bundle")
        return bundle_mod.OSRecord(opts.os_id, opts.os_versions)
    if opts.os_id is not None and opts.os_id != rec.id:
        raise UserError(f"--os-id {opts.os_id} disagrees with bundle {bundle_dir}: kernel {kb.kernel} was built for "
                        f"{rec.id}", "leave out --os-id: the image takes the bundle's")
    if opts.os_versions and rec.versions and sorted(set(opts.os_versions)) != sorted(set(rec.versions)):
        raise UserError(f"--gl-version {', '.join(opts.os_versions)} disagrees with bundle {bundle_dir}: kernel "
                        f"{kb.kernel} was built for {rec.id} {', '.join(rec.versions)}",
                        "leave out --gl-version: the image takes the bundle's")
    return bundle_mod.OSRecord(rec.id, opts.os_versions or rec.versions)


def usable_module_types(manifest: BundleManifest, kernel: str, types: Sequence[str]) -> tuple[str, ...]:
    """The module types of `types` built from the driver's own version: the node refuses the others
    (NVML: "Driver/library version mismatch"), so an image never carries them."""
    sets = manifest.kernels[kernel].module_sets
    return tuple(t for t in types if sets[t].source_version == manifest.driver_version)


def _module_sources(bundle_dir: Path, kernel: str, module_type: str,
                    mod: bundle_mod.ModuleFile) -> list[tuple[Path, str]]:
    """The bundle files the image takes for one module, with their manifest sha256 (the binary last)."""
    if mod.parts is None:  # signed in place when signed
        return [(bundle_mod.modules_dir(bundle_dir, kernel, module_type) / mod.name, mod.file_sha256)]
    iface = bundle_mod.interfaces_dir(bundle_dir, kernel, module_type)
    sig = [(iface / mod.signature.file, mod.signature.sha256)] if mod.signature else []  # the node appends it
    if mod.patch is not None:  # IBT kernels: the node rebuilds it from the binary, without ld or objtool
        return [(iface / mod.patch.patch, mod.patch.patch_sha256), *sig,
                (bundle_mod.binaries_dir(bundle_dir, module_type) / mod.patch.binary, mod.patch.binary_sha256)]
    return [
        *((iface / name, sha) for name, sha in mod.parts.per_kernel()),
        *sig,
        (bundle_mod.binaries_dir(bundle_dir, module_type) / mod.parts.binary, mod.parts.binary_sha256),
    ]


def _binary(mod: bundle_mod.ModuleFile) -> str | None:
    """The name of the kernel-independent binary object a module is made from (None: shipped whole)."""
    return mod.patch.binary if mod.patch else mod.parts.binary if mod.parts else None


@contextlib.contextmanager
def _out_layout(out_layout: Path) -> Iterator[Layout]:
    """The layout at `out_layout`, left as it was when the block fails: a layout it made is removed (and
    the directories made for it), one it added to gets its index back and loses the blobs written since."""
    made = _first_missing(out_layout)
    index, blobs = out_layout / "index.json", out_layout / "blobs" / "sha256"
    old_index = index.read_bytes() if made is None and index.is_file() else None
    old_blobs = set(os.listdir(blobs)) if old_index is not None and blobs.is_dir() else set()
    empty = made is None and out_layout.is_dir() and not any(out_layout.iterdir())
    try:
        yield _open_out(out_layout)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        elif empty:  # back to empty
            for child in out_layout.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif old_index is not None:
            atomic_write_bytes(index, old_index)
            for name in set(os.listdir(blobs)) - old_blobs:
                (blobs / name).unlink(missing_ok=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (None: it exists)."""
    missing = None
    for p in (path.absolute(), *path.absolute().parents):
        if os.path.lexists(p):
            break
        missing = p
    return missing


def _open_out(out_layout: Path) -> Layout:
    if out_layout.is_dir() and any(out_layout.iterdir()) and not (out_layout / "index.json").exists():
        raise UserError(f"{out_layout} exists and is not an OCI image layout", "choose an empty or new --out")
    blocker = next((p for p in (out_layout.absolute(), *out_layout.absolute().parents)
                    if os.path.lexists(p) and not p.is_dir()), None)
    if blocker is not None:  # mkdir would say "File exists" or "Not a directory"
        raise UserError(f"cannot write image layout {out_layout}: {blocker} is a file, not a directory",
                        "choose another --out")
    try:
        if not out_layout.exists():
            out_layout.mkdir(parents=True)
        return Layout.create(out_layout)
    except OSError as exc:
        raise UserError(f"cannot write image layout {out_layout}: {exc.strerror or exc}", "choose a writable --out") from exc


def _resolve_base(base: str | base_mod.BaseSpec | LayoutBase | None, layout: Layout,
                  arch: str) -> base_mod.BaseImage:
    if base is None:
        return base_mod.build_base(base_mod.debian_spec(arch), layout)
    if isinstance(base, base_mod.BaseSpec):
        return base_mod.build_base(base, layout)
    return _existing_base(LayoutBase.parse(base) if isinstance(base, str) else base, layout)


def _existing_base(base: LayoutBase, layout: Layout) -> base_mod.BaseImage:
    ref = base.name or f"{base.layout}{f':{base.tag}' if base.tag else ''}"
    src = Layout.open(base.layout)
    m = src.resolve(base.tag)
    for blob in m.blobs:
        src_path = src.blob_path(blob.digest)
        if not src_path.is_file():
            raise UserError(f"base image {ref} is incomplete: blob {blob.digest} is missing")
        layout.import_blob(src_path, blob)
    layout.write_blob(m.raw, m.media_type)
    return base_mod.from_layout_image(layout, m.digest, ref, name=base.name)


@dataclass(frozen=True)
class _Shared:
    layers: tuple[tuple[str, LayerBlob], ...]


def _place(root: Path, path: PurePosixPath) -> PurePosixPath:
    """Where `path` goes given the base's symlinked directories (/lib -> /usr/lib): a layer must not
    replace such a symlink with a directory, so files are placed at their canonical location."""
    return unpack.resolve_in_root(root, path)


def _shared_layers(layout: Layout, bundle_dir: Path, manifest: BundleManifest, root: Path) -> _Shared:
    pkg = Path(gl_nvidia.__file__).parent
    site = node_layout.PYTHON_SITE / "gl_nvidia"
    runtime = [
        *[Entry(_place(root, site / name), source=pkg / name) for name in NODE_SHARED],
        *[
            Entry(_place(root, site / "node" / p.relative_to(pkg / "node").as_posix()), source=p)
            for p in sorted((pkg / "node").rglob("*.py"))
        ],
        Entry(_place(root, node_layout.ENTRYPOINT), mode=0o755, data=ENTRYPOINT_SCRIPT),
    ]
    userspace = [dataclasses.replace(e, path=_place(root, e.path)) for e in
                 _listed(bundle_mod.userspace_dir(bundle_dir), manifest.userspace, PurePosixPath("/"))]
    firmware = [dataclasses.replace(e, path=_place(root, e.path)) for e in
                _listed(bundle_mod.firmware_dir(bundle_dir), manifest.firmware, node_layout.FIRMWARE_ROOT.parent)]
    return _Shared((
        ("node-runtime", layers.write_layer(layout, runtime)),
        ("userspace", layers.write_layer(layout, userspace)),
        ("ld.so.cache", layers.write_layer(layout, _ld_cache(root, userspace, manifest.arch))),
        ("firmware", layers.write_layer(layout, firmware)),
    ))


def _listed(tree: Path, files: tuple[bundle_mod.UserspaceFile, ...], dest: PurePosixPath) -> list[Entry]:
    """The layer entries of what the manifest lists of `tree` (`_load_bundle` checked each), under `dest`."""
    return [Entry(dest / f.path, link=f.link) if f.link is not None else
            Entry(dest / f.path, mode=stat.S_IMODE((tree / f.path).lstat().st_mode) & 0o755 | 0o644, source=tree / f.path)
            for f in sorted(files, key=lambda f: f.path)]


def _ld_cache(root: Path, userspace: list[Entry], arch: str) -> list[Entry]:
    """/etc/ld.so.cache of base + userspace for the image's arch, from a scratch copy of the tree (ldcache.py:
    no ldconfig runs, so an arm64 image gets its cache on an amd64 machine)."""
    lib_dirs = sorted({str(e.path.parent) for e in userspace if ".so" in e.path.name})
    conf_path = PurePosixPath("/etc/ld.so.conf.d/gl-nvidia.conf")
    conf = "".join(f"{d}\n" for d in lib_dirs).encode()
    # The base's files are not ours: every write replaces what is there, never goes through a symlink.
    for e in userspace:
        if e.link is not None:
            os.symlink(e.link, unpack.writable(root, e.path))
        elif e.source is not None:
            shutil.copyfile(e.source, unpack.writable(root, e.path))
    unpack.writable(root, conf_path).write_bytes(conf)
    cache = ldcache.build(root, arch)
    return [
        Entry(_place(root, PurePosixPath("/etc/ld.so.cache")), data=cache),
        Entry(_place(root, conf_path), data=conf),
    ]


def _binaries_layer(layout: Layout, bundle_dir: Path, manifest: BundleManifest, plan: _KernelPlan,
                    module_type: str, root: Path) -> LayerBlob | None:
    """NVIDIA's kernel-independent objects of one module type (None when nothing of it is split).

    They are the same bytes for every kernel (`_plan_kernel` checked each kernel's parts against the
    bundle's one copy), so every image with this module type gets this one layer.
    """
    names = sorted({name for m in manifest.kernels[plan.kernel].module_sets[module_type].modules
                    if (name := _binary(m))})
    entries = [Entry(_place(root, node_layout.binaries_dir(module_type) / name),
                     source=bundle_mod.binaries_dir(bundle_dir, module_type) / name) for name in names]
    return layers.write_layer(layout, entries) if entries else None


def _kernel_image(
    layout: Layout,
    bundle_dir: Path,
    manifest: BundleManifest,
    plan: _KernelPlan,
    base_image: base_mod.BaseImage,
    base_packages: sbom.BasePackages,
    shared: _Shared,
    binaries: list[tuple[str, LayerBlob]],
    root: Path,
    opts: ImageOptions,
    extra: dict[str, str],
) -> BuiltImage:
    kb = manifest.kernels[plan.kernel]
    trimmed = dataclasses.replace(
        manifest,
        kernels={plan.kernel: dataclasses.replace(kb, module_sets={t: kb.module_sets[t] for t in plan.module_types})},
    )
    entries = [Entry(_place(root, node_layout.MANIFEST), data=trimmed.to_json().encode())]
    for t in plan.module_types:
        dest = node_layout.modules_dir(plan.kernel, t)
        for mod in sorted(kb.module_sets[t].modules, key=lambda m: m.name):
            # Binaries go to their own layer; the interface and module.lds (or the patch) stay here.
            entries += [Entry(_place(root, dest / src.name), source=src)
                        for src, _ in _module_sources(bundle_dir, plan.kernel, t, mod) if src.name != _binary(mod)]
    modules = layers.write_layer(layout, list({e.path: e for e in entries}.values()))

    named = [("base", b) for b in base_image.layers] + list(shared.layers) + [*binaries, (f"modules {plan.kernel}", modules)]
    labels = _labels(manifest, plan, base_image, opts)
    created = layers.created()
    config = {
        "architecture": ARCHES[manifest.arch].oci,
        "os": "linux",
        "created": created,
        "config": {
            "Entrypoint": ["nvidia-driver"],
            "Cmd": ["init"],
            "Env": [
                f"PATH={PATH}",
                f"DRIVER_VERSION={manifest.driver_version}",
                f"DRIVER_BRANCH={manifest.driver_branch}",
                f"KERNEL_VERSION={plan.kernel}",
                f"KERNEL_MODULE_TYPES={','.join(plan.module_types)}",
                # as NVIDIA's driver images: the runtime hook injects no GPU into the driver container
                "NVIDIA_VISIBLE_DEVICES=void",
            ],
            "Labels": labels,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for _, b in named]},
        "history": [{"created": created, "created_by": f"gl-nvidia image: {name}"} for name, _ in named],
    }
    config_desc = layout.write_blob(oci.canonical_json(config), oci.CONFIG)
    image = Manifest.build(config_desc, [b.descriptor for _, b in named], {**labels, **extra})
    layout.add_image(image, list(plan.tags))
    facts = sbom.ImageFacts(image.digest, plan.kernel, plan.module_types, base_image.digest,
                            base_image.name or base_image.description)
    referrer = sbom.attach(layout, image, sbom.document(trimmed, facts, base_packages))
    return BuiltImage(
        layout=layout.root,
        kernel=plan.kernel,
        digest=image.digest,
        size=config_desc.size + sum(b.descriptor.size for _, b in named),
        tags=plan.tags,
        module_types=plan.module_types,
        layers=tuple(LayerInfo(name, b.descriptor.digest, b.descriptor.size) for name, b in named),
        sbom=referrer.digest,
    )


def _labels(manifest: BundleManifest, plan: _KernelPlan, base_image: base_mod.BaseImage, opts: ImageOptions) -> dict[str, str]:
    labels = {
        "org.opencontainers.image.title": "NVIDIA driver for Garden Linux",
        "org.opencontainers.image.version": manifest.driver_version,
        "org.opencontainers.image.created": layers.created(),
        "org.opencontainers.image.base.digest": base_image.digest,
        f"{LABEL_PREFIX}.base": base_image.description,
        f"{LABEL_PREFIX}.driver.version": manifest.driver_version,
        f"{LABEL_PREFIX}.driver.branch": manifest.driver_branch,
        f"{LABEL_PREFIX}.kernel": plan.kernel,
        f"{LABEL_PREFIX}.module-types": ",".join(plan.module_types),
        f"{LABEL_PREFIX}.os": plan.os.id,
    }
    if plan.os.versions:
        labels[f"{LABEL_PREFIX}.{os_profile(plan.os.id).versions_label}"] = ",".join(sorted(set(plan.os.versions)))
    if base_image.name:
        labels["org.opencontainers.image.base.name"] = base_image.name
    sets = manifest.kernels[plan.kernel].module_sets
    certs = sorted({m.signature.cert_sha256 for t in plan.module_types for m in sets[t].modules if m.signature})
    if certs:  # the certificate a node's keyring (MOK) must hold, never the key
        labels[f"{LABEL_PREFIX}.modules.signing-cert.sha256"] = ",".join(certs)
    if opts.source:
        labels["org.opencontainers.image.source"] = opts.source
    if opts.revision:
        labels["org.opencontainers.image.revision"] = opts.revision
    return labels
