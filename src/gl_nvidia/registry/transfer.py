"""Push, pull and mirror: one copy routine over the digest-addressed image model.

`copy_image` takes a manifest and a way to get each blob as a file; it uploads only blobs the
destination lacks (HEAD, then a cross-repository mount when the source is on the same registry),
then PUTs the manifest by digest, and only then moves tags. So a tag never points at a partial
image, and a second push of the same content uploads nothing.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gl_nvidia import ui
from gl_nvidia.errors import UserError
from gl_nvidia.image.base import LayoutBase
from gl_nvidia.image.tags import validate_tag
from gl_nvidia.oci import Descriptor, Layout, Manifest, attachment_tag, is_attachment_tag
from gl_nvidia.registry.client import Reference, RegistryClient


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

    def client(self, host: str) -> RegistryClient:
        kwargs: dict[str, Any] = {"chunk_size": self.chunk_size} if self.chunk_size else {}
        return RegistryClient(host, plain_http=self.plain_http, retries=self.retries, backoff_s=self.backoff_s,
                              on_progress=self.on_progress, **kwargs)


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
    for tag in tags:
        try:
            validate_tag(tag)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    # Refuse before uploading anything: moving a tag to other content is an explicit decision.
    current = {t: dst.manifest_digest(repo, t) for t in tags}
    moved = {t: d for t, d in current.items() if d is not None and d != manifest.digest}
    if moved and not force:
        t, d = next(iter(moved.items()))
        raise UserError(
            f"tag {dst.host}/{repo}:{t} already points to other content ({d}); refusing to move it",
            "pass --force to move the tag(s) to the new image",
        )
    uploaded = skipped = mounted = sent = 0
    total = sum(b.size for b in manifest.blobs)
    with ui.progress(transfer=True) as prog, ui.task(prog, f"push {dst.host}/{repo}", total=total) as task, \
            tempfile.TemporaryDirectory(prefix="gl-nvidia-blobs-") as scratch:
        for blob in manifest.blobs:
            if dst.has_blob(repo, blob.digest):
                skipped += 1
            elif any(dst.mount_blob(repo, blob.digest, src) for src in mount_from if src != repo):
                mounted += 1
            else:
                dst.upload_blob(repo, fetch(blob, Path(scratch)), blob)
                uploaded += 1
                sent += blob.size
            task.advance(blob.size)
    dst.put_manifest(repo, manifest.digest, manifest)
    for tag in tags:
        dst.put_manifest(repo, tag, manifest)
    return PushResult(f"{dst.host}/{repo}", manifest.digest, tuple(tags), uploaded, skipped, mounted, sent)


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
    opts = options or ClientOptions()
    with opts.client(ref.host) as client:
        return [
            copy_image(layout.manifest(d), lambda b, _s: _layout_blob(layout, b), client, ref.repo, tags, force=force)
            for d, tags in by_digest.items()
        ]


def _layout_blob(layout: Layout, blob: Descriptor) -> Path:
    path = layout.blob_path(blob.digest)
    if not path.is_file():
        raise UserError(f"blob {blob.digest} is missing from {layout.root}", "rebuild the image layout")
    return path


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

        def fetch(blob: Descriptor, scratch: Path) -> Path:
            path = scratch / blob.digest.removeprefix("sha256:")
            src.download_blob(src_ref.repo, blob, path)
            return path

        same = src_ref.host == dst_ref.host
        mount_from = [src_ref.repo] if same else []
        results = []
        for m, t in by_digest.values():
            results.append(copy_image(m, fetch, dst, dst_ref.repo, t, force=force, mount_from=mount_from))
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
