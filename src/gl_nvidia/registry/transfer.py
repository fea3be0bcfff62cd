"""Push, pull and mirror: one copy routine over the digest-addressed image model.

`copy_images` takes manifests and a way to get each blob as a file. All or nothing: it checks every
tag first (none may move without --force), uploads only blobs the destination lacks (HEAD, then a
cross-repository mount when the source is on the same registry), PUTs each manifest by digest, and
only then writes the tags, after checking them again. So a tag never points at a partial image, a
refused tag leaves nothing tagged, and a second push of the same content uploads nothing.
`push` also checks every local blob against its digest before the first upload.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gl_nvidia import fs, ui
from gl_nvidia.errors import UserError
from gl_nvidia.oci import (
    Descriptor,
    Layout,
    LayoutBase,
    Manifest,
    attachment_tag,
    is_attachment_tag,
)
from gl_nvidia.reference import Reference, validate_tag
from gl_nvidia.registry.client import RegistryClient

if TYPE_CHECKING:
    from rich.progress import Progress


@dataclass(frozen=True)
class PushResult:
    repository: str
    digest: str
    tags: tuple[str, ...]
    uploaded: int  # blobs sent
    skipped: int  # blobs the destination already had
    mounted: int  # blobs linked from another repository of the same registry
    bytes_uploaded: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ClientOptions:
    """How to talk to registries (tests shorten retries and chunks; users rarely change these)."""

    plain_http: bool | None = None  # None: plain HTTP for loopback hosts only
    retries: int = 6
    backoff_s: float = 0.5
    chunk_size: int | None = None
    on_progress: Callable[[int], None] | None = None
    timeout_s: float = 120.0  # per read, and the base of each answer's deadline

    def client(self, host: str) -> RegistryClient:
        kwargs: dict[str, Any] = {"chunk_size": self.chunk_size} if self.chunk_size else {}
        return RegistryClient(host, plain_http=self.plain_http, retries=self.retries, backoff_s=self.backoff_s,
                              on_progress=self.on_progress, timeout_s=self.timeout_s, **kwargs)


# cosign's attachment tags: signatures, attestations, SBOMs (`sha256-<hex>.<kind>`)
ATTACHMENTS = ("sig", "att", "sbom")

BlobFetcher = Callable[[Descriptor, Path], Path]  # (blob, scratch dir) -> a file holding it


def copy_image(
    manifest: Manifest,
    fetch: BlobFetcher,
    dst: RegistryClient,
    repo: str,
    tags: Sequence[str],
    *,
    force: bool = False,
    mount_from: Sequence[str] = (),
) -> PushResult:
    """Put one image into `dst/repo` and point `tags` at it; see the module docstring for the order."""
    [result] = copy_images([(manifest, tags)], fetch, dst, repo, force=force, mount_from=mount_from)
    return result


def copy_images(
    images: Sequence[tuple[Manifest, Sequence[str]]],
    fetch: BlobFetcher,
    dst: RegistryClient,
    repo: str,
    *,
    force: bool = False,
    mount_from: Sequence[str] = (),
) -> list[PushResult]:
    """Put images into `dst/repo` and point each one's tags at it: every tag checked before the first
    upload, every tag written after the last."""
    for _m, tags in images:
        for tag in tags:
            try:
                validate_tag(tag)
            except ValueError as exc:
                raise UserError(str(exc)) from exc
    # Refuse before uploading anything: moving a tag to other content is an explicit decision.
    _refuse_moves(dst, repo, images, force)
    counts = []
    with ui.progress(transfer=True) as prog, tempfile.TemporaryDirectory(prefix="gl-nvidia-blobs-") as scratch:
        for manifest, _tags in images:
            counts.append(_upload(manifest, fetch, dst, repo, mount_from, prog, Path(scratch)))
            dst.put_manifest(repo, manifest.digest, manifest)
    # The API has no conditional tag write: look again right before writing, so that only a push landing
    # between this check and the writes is overwritten, not one that tagged during our uploads.
    _refuse_moves(dst, repo, images, force)
    for manifest, tags in images:
        for tag in tags:
            dst.put_manifest(repo, tag, manifest)
    return [PushResult(f"{dst.host}/{repo}", m.digest, tuple(tags), *c) for (m, tags), c in zip(images, counts, strict=True)]


def _refuse_moves(dst: RegistryClient, repo: str, images: Sequence[tuple[Manifest, Sequence[str]]],
                  force: bool) -> None:
    """An error when a tag points at other content than its image (none with `force`: it moves them)."""
    if force:
        return
    for manifest, tags in images:
        for tag in tags:
            d = dst.manifest_digest(repo, tag)
            if d is not None and d != manifest.digest:
                raise UserError(
                    f"tag {dst.host}/{repo}:{tag} already points to other content ({d}); refusing to move it",
                    "pass --force to move the tag(s) to the new image; nothing was tagged",
                )


def _upload(manifest: Manifest, fetch: BlobFetcher, dst: RegistryClient, repo: str, mount_from: Sequence[str],
            prog: Progress | None, scratch: Path) -> tuple[int, int, int, int]:
    """The image's blobs the destination lacks: (uploaded, skipped, mounted, bytes uploaded)."""
    uploaded = skipped = mounted = sent = 0
    with ui.task(prog, f"push {dst.host}/{repo}", total=sum(b.size for b in manifest.blobs)) as task:
        for blob in manifest.blobs:
            if dst.has_blob(repo, blob.digest):
                skipped += 1
            elif any(dst.mount_blob(repo, blob.digest, src) for src in mount_from if src != repo):
                mounted += 1
            else:
                dst.upload_blob(repo, fetch(blob, scratch), blob)
                uploaded += 1
                sent += blob.size
            task.advance(blob.size)
    return uploaded, skipped, mounted, sent


def push(
    layout_dir: Path,
    target: str,
    *,
    force: bool = False,
    options: ClientOptions | None = None,
) -> list[PushResult]:
    """Push every image of an OCI layout to `REGISTRY/REPO` under its layout tags.

    `REGISTRY/REPO:TAG` pushes only the image the layout tags TAG (and its SBOM). Images sharing
    layers upload each blob once; blobs the registry has are skipped. An image goes up before what
    is attached to it: `sha256-<hex>.sbom` sorts after every image tag.
    """
    layout = Layout.open(layout_dir)
    ref = Reference.parse(target)
    if ref.digest:
        raise UserError(f"push target {target} names a digest", "push to REGISTRY/REPO or REGISTRY/REPO:TAG")
    by_digest: dict[str, list[str]] = {}
    layout_tags = layout.tags()
    for tag, digest in sorted(layout_tags.items()):
        if ref.tag is None or tag == ref.tag:
            by_digest.setdefault(digest, []).append(tag)
    if ref.tag is not None:
        for digest in list(by_digest):
            sbom = attachment_tag(digest, "sbom")
            if sbom in layout_tags:
                by_digest.setdefault(layout_tags[sbom], []).append(sbom)
    if not by_digest:
        what = f"tagged {ref.tag!r}" if ref.tag else "with a tag"
        raise UserError(f"no image {what} in {layout_dir}", f"tags there: {', '.join(sorted(layout.tags())) or 'none'}")
    images = [(layout.manifest(d), tags) for d, tags in by_digest.items()]
    _verify_blobs(layout, [m for m, _t in images])
    opts = options or ClientOptions()
    with opts.client(ref.host) as client:
        return copy_images(images, lambda b, _s: layout.blob_path(b.digest), client, ref.repo, force=force)


def _verify_blobs(layout: Layout, manifests: Sequence[Manifest]) -> None:
    """Every blob the images name is in the layout with its size and digest (`Layout.manifest` checked
    the manifests): a registry that does not verify would otherwise store and tag the wrong bytes."""
    for blob in {b.digest: b for m in manifests for b in m.blobs}.values():
        path = layout.blob_path(blob.digest)
        if not path.is_file():
            raise UserError(f"blob {blob.digest} is missing from {layout.root}", "rebuild the image layout")
        size, digest = path.stat().st_size, "sha256:" + fs.sha256_file(path)
        if size != blob.size or digest != blob.digest:
            raise UserError(f"blob {blob.digest} in layout {layout.root} has changed: its content has digest {digest} "
                            f"({size} bytes, the manifest says {blob.size}); nothing pushed",
                            "the layout is damaged or was changed; rebuild it")


def pull(source: str, layout: Layout, *, arch: str | None = None, options: ClientOptions | None = None) -> str:
    """Copy one image (`REGISTRY/REPO:TAG` or `@DIGEST`) into a layout; returns its manifest digest.
    With `arch`, a multi-platform index gives its linux/`arch` image."""
    ref = Reference.parse(source)
    want = ref.digest or ref.tag or "latest"
    opts = options or ClientOptions()
    with opts.client(ref.host) as client:
        manifest = client.get_manifest(ref.repo, want, arch=arch)
        if manifest is None:
            raise UserError(f"image {source} not found", "check the reference (repository and tag)")
        for blob in manifest.blobs:
            if not layout.has_blob(blob.digest):
                client.download_blob(ref.repo, blob, layout.blob_path(blob.digest))
        layout.write_blob(manifest.raw, manifest.media_type)
    return manifest.digest


def pull_base(source: str, layout_dir: Path, arch: str) -> LayoutBase:
    """A registry image as a base for the image stage, which reads layouts only: pulled into a new
    layout at `layout_dir` and tagged there; of `arch` when `source` is a multi-platform index."""
    try:
        Reference.parse(source)
    except UserError as exc:  # `image --base` takes both: a path that is not there reads as a bad reference
        raise UserError(f"--base {source}: no OCI layout directory {LayoutBase.split(source)[0]}, "
                        "and not a registry reference", "name an OCI layout directory[:TAG] or REGISTRY/REPO[:TAG]") \
            from exc
    layout = Layout.create(layout_dir)
    digest = pull(source, layout, arch=arch)
    layout.add_image(layout.manifest(digest), ["base"])
    return LayoutBase(layout_dir, "base", name=source)


def branch_tags(tags: Sequence[str], branch: str | None) -> list[str]:
    """The tags of one driver branch: `<branch>-...` and `<branch>.<minor>...-...` (all when None)."""
    if branch is None:
        return list(tags)
    return [t for t in tags if t.startswith(f"{branch}-") or t.startswith(f"{branch}.")]


def mirror(
    source: str,
    destination: str,
    *,
    driver_branch: str | None = None,
    force: bool = False,
    options: ClientOptions | None = None,
) -> list[PushResult]:
    """Copy all (or one driver branch's) tags of SRC_REPO to DST_REPO, skipping blobs DST has.

    Blobs are fetched from the source only when the destination lacks them; on the same registry
    they are mounted instead of copied. What is attached to each copied image goes with it, after it, as
    `cosign copy` does: its signatures (`sha256-<hex>.sig`), attestations (`.att`) and SBOM (`.sbom`, our
    OCI 1.1 referrer). Those tags name the image's digest, so they follow the source's (a signature added
    there since the last mirror moves the destination's `.sig` tag; no --force needed).
    """
    src_ref, dst_ref = Reference.parse(source), Reference.parse(destination)
    if src_ref.tag or dst_ref.tag or src_ref.digest or dst_ref.digest:
        raise UserError("mirror copies whole repositories", "pass REGISTRY/REPO for both, without a tag")
    opts = options or ClientOptions()
    with opts.client(src_ref.host) as src, opts.client(dst_ref.host) as dst:
        listed = src.list_tags(src_ref.repo)
        tags = [t for t in branch_tags(listed, driver_branch) if not is_attachment_tag(t)]
        if not tags:
            raise UserError(f"no tags{' for driver branch ' + driver_branch if driver_branch else ''} in {source}")
        by_digest: dict[str, tuple[Manifest, list[str]]] = {}
        for tag in tags:
            m = src.get_manifest(src_ref.repo, tag)
            if m is None:
                continue  # deleted while we listed
            by_digest.setdefault(m.digest, (m, []))[1].append(tag)
        if not by_digest:
            raise UserError(f"none of the {len(tags)} tags {source} lists has a manifest there; nothing to copy")

        def fetch(blob: Descriptor, scratch: Path) -> Path:
            path = scratch / blob.digest.removeprefix("sha256:")
            src.download_blob(src_ref.repo, blob, path)
            return path

        same = src_ref.host == dst_ref.host
        mount_from = [src_ref.repo] if same else []
        results = copy_images(list(by_digest.values()), fetch, dst, dst_ref.repo, force=force, mount_from=mount_from)
        for m, _t in by_digest.values():
            for kind in ATTACHMENTS:
                tag = attachment_tag(m.digest, kind)
                attached = src.get_manifest(src_ref.repo, tag) if tag in listed else None
                if attached is not None:
                    results.append(copy_image(attached, fetch, dst, dst_ref.repo, [tag], force=True,
                                              mount_from=mount_from))
        return results


def helm_repository_line(destination: str) -> str:
    """The Helm flags that point the GPU Operator at a mirrored repository (`driver.image` = last path part)."""
    ref = Reference.parse(destination)
    repo, _, image = ref.repository.rpartition("/")
    return f"--set driver.repository={repo} --set driver.image={image}"
