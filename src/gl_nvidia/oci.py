"""The OCI image model, separate from where an image lives.

Everything is addressed by digest: a `Descriptor` names a blob (layer, config, manifest) by its
sha256. `Layout` is an OCI image layout on disk (blobs/sha256/<hex>, index.json, oci-layout);
the registry client in `gl_nvidia.registry` speaks the same descriptors, so build, push and
copy are one function each over this model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gl_nvidia.errors import UserError
from gl_nvidia.fs import atomic_write_bytes
from gl_nvidia.reference import check_digest

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
EMPTY = "application/vnd.oci.empty.v1+json"  # the config of an artifact (OCI 1.1): the two bytes `{}`
# Single-image manifests the registry client accepts, OCI first; and multi-platform indexes.
IMAGE_MANIFESTS = (MANIFEST, DOCKER_MANIFEST)
IMAGE_INDEXES = (INDEX, DOCKER_LIST)

REF_NAME = "org.opencontainers.image.ref.name"
_ATTACHMENT_TAG = re.compile(r"^sha256-[0-9a-f]{64}\.[a-z]+$")


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def attachment_tag(digest: str, kind: str) -> str:
    """cosign's tag for what is attached to an image: `sha256-<hex>.sig`, `.sbom`, `.att`."""
    return check_digest(digest).replace(":", "-") + "." + kind


def is_attachment_tag(tag: str) -> bool:
    return bool(_ATTACHMENT_TAG.match(tag))


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace: the same object always hashes to the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(sorted(self.annotations.items()))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Descriptor:
        return cls(d["mediaType"], check_digest(d["digest"]), int(d["size"]), dict(d.get("annotations") or {}))


def _declared(doc: Any, served_as: str | None) -> Any:
    """What a manifest says it is: its own mediaType, else the Content-Type the registry served it with."""
    return (doc.get("mediaType") if isinstance(doc, dict) else None) or served_as


def is_index(raw: bytes, served_as: str | None) -> bool:
    """Whether `raw` is a multi-platform index rather than one image's manifest."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return False
    return _declared(doc, served_as) in IMAGE_INDEXES


def platform_manifest(raw: bytes, arch: str, where: str) -> Descriptor:
    """The image of linux/`arch` a multi-platform index lists (a registry's `debian:bookworm`, say)."""
    try:
        entries = [(Descriptor.from_dict(m), m.get("platform") or {}) for m in json.loads(raw)["manifests"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"malformed image index {where}: {exc}") from exc
    found = [d for d, p in entries if p.get("os") == "linux" and p.get("architecture") == arch
             and d.media_type in IMAGE_MANIFESTS]
    if not found:
        listed = sorted({f"{p.get('os')}/{p.get('architecture')}" for _, p in entries})
        raise UserError(f"{where} has no linux/{arch} image (its index lists {', '.join(listed) or 'none'})",
                        f"use a base image built for {arch}")
    return found[0]


@dataclass(frozen=True)
class Manifest:
    """A parsed single-image manifest plus its exact bytes (the digest is over the bytes)."""

    raw: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def digest(self) -> str:
        return digest_bytes(self.raw)

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw))

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Config first, then layers bottom to top: the order a push uploads them in."""
        return (self.config, *self.layers)

    @property
    def annotations(self) -> dict[str, str]:
        found = json.loads(self.raw).get("annotations")
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}

    @classmethod
    def parse(cls, raw: bytes, media_type: str | None = None) -> Manifest:
        try:
            d = json.loads(raw)
            mt = _declared(d, media_type) or MANIFEST
            if mt not in IMAGE_MANIFESTS:
                raise UserError(f"unsupported manifest type {mt}", "only single-platform images are supported")
            return cls(raw, mt, Descriptor.from_dict(d["config"]), tuple(Descriptor.from_dict(x) for x in d["layers"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # AttributeError: not a JSON object
            raise UserError(f"malformed image manifest: {exc}") from exc

    @classmethod
    def build(cls, config: Descriptor, layers: list[Descriptor], annotations: dict[str, str], *,
              artifact_type: str | None = None, subject: Descriptor | None = None) -> Manifest:
        """An image manifest; with `subject`, an OCI 1.1 referrer of that manifest (an SBOM, say)."""
        body: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config.as_dict(),
            "layers": [layer.as_dict() for layer in layers],
            "annotations": dict(sorted(annotations.items())),
        }
        if artifact_type:
            body["artifactType"] = artifact_type
        if subject:
            body["subject"] = subject.as_dict()
        return cls(canonical_json(body), MANIFEST, config, tuple(layers))


class Layout:
    """An OCI image layout directory: content-addressed blobs plus index.json naming images by tag.

    Blobs are written with temp + rename, and index.json last, so an interrupted build leaves at
    most unreferenced blobs, never an index entry whose blobs are missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def create(cls, root: Path) -> Layout:
        layout = cls(root)
        if (root / "index.json").exists():
            layout.index()  # validates
            return layout
        if root.exists() and not root.is_dir():
            raise UserError(f"{root} exists and is not a directory", "choose another --out")
        atomic_write_bytes(root / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        atomic_write_bytes(root / "index.json", canonical_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": []}))
        return layout

    @classmethod
    def open(cls, root: Path) -> Layout:
        if not (root / "index.json").is_file() or not (root / "oci-layout").is_file():
            raise UserError(f"{root} is not an OCI image layout (no index.json / oci-layout)",
                            "build one with `gl-nvidia image`")
        return cls(root)

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / check_digest(digest).removeprefix("sha256:")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str) -> bytes:
        path = self.blob_path(digest)
        if not path.is_file():
            raise UserError(f"blob {digest} is missing from {self.root}", "rebuild the image layout")
        return path.read_bytes()

    def write_blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = digest_bytes(data)
        if not self.has_blob(digest):
            atomic_write_bytes(self.blob_path(digest), data)
        return Descriptor(media_type, digest, len(data))

    @contextmanager
    def blob_writer(self) -> Iterator[tuple[BinaryIO, _Hashing]]:
        """A temp file in the blob dir; the caller hashes as it writes, then `commit_blob` renames it."""
        d = self.root / "blobs" / "sha256"
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        fh = os.fdopen(fd, "wb")
        hashing = _Hashing(fh, Path(tmp))
        try:
            yield fh, hashing
        finally:
            fh.close()
            if Path(tmp).exists():
                os.unlink(tmp)

    def commit_blob(self, hashing: _Hashing, media_type: str) -> Descriptor:
        digest = hashing.digest
        os.replace(hashing.path, self.blob_path(digest))
        return Descriptor(media_type, digest, hashing.size)

    def import_blob(self, src: Path, desc: Descriptor) -> None:
        """Copy a blob file in (from a cache or another layout) unless present; it must hash to its digest."""
        if self.has_blob(desc.digest):
            return
        with self.blob_writer() as (_fh, hashing), src.open("rb") as inp:
            shutil.copyfileobj(inp, hashing)
            hashing.flush()
            if hashing.digest != desc.digest:
                raise UserError(f"{src} is not blob {desc.digest}: its content has digest {hashing.digest}",
                                "the source is damaged or was changed; rebuild or fetch it again")
            self.commit_blob(hashing, desc.media_type)

    def index(self) -> list[Descriptor]:
        try:
            d = json.loads((self.root / "index.json").read_text())
            return [Descriptor.from_dict(m) for m in d.get("manifests", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # a JSON value of the wrong type
            raise UserError(f"{self.root}/index.json is unreadable: {exc}", "remove the directory and rebuild") from exc

    def tags(self) -> dict[str, str]:
        """tag -> manifest digest."""
        return {m.annotations[REF_NAME]: m.digest for m in self.index() if REF_NAME in m.annotations}

    def manifest(self, digest: str) -> Manifest:
        raw = self.read_blob(digest)
        if digest_bytes(raw) != digest:
            raise UserError(f"manifest {digest} in {self.root} has digest {digest_bytes(raw)}",
                            "the layout is damaged or was changed; rebuild it")
        return Manifest.parse(raw)

    def resolve(self, tag: str | None = None) -> Manifest:
        """The manifest a tag names; without a tag, the layout's only image."""
        index = self.index()
        if tag is None:  # what is attached to an image (its SBOM) is not another image
            digests = list(dict.fromkeys(m.digest for m in index
                                         if not is_attachment_tag(m.annotations.get(REF_NAME, ""))))
            if len(digests) != 1:
                raise UserError(f"{self.root} holds {len(digests)} images", "name one with a tag")
            return self.manifest(digests[0])
        tags = self.tags()
        if tag not in tags:
            raise UserError(f"no image tagged {tag!r} in {self.root}", f"tags there: {', '.join(sorted(tags)) or 'none'}")
        return self.manifest(tags[tag])

    def add_image(self, manifest: Manifest, tags: list[str]) -> None:
        """Record the manifest under each tag (replacing what those tags named before)."""
        for blob in manifest.blobs:
            if not self.has_blob(blob.digest):
                raise UserError(f"blob {blob.digest} is missing from {self.root}", "rebuild the image layout")
        self.write_blob(manifest.raw, manifest.media_type)
        kept = [m for m in self.index() if m.annotations.get(REF_NAME) not in tags]
        added = [Descriptor(manifest.media_type, manifest.digest, len(manifest.raw), {REF_NAME: t}) for t in tags]
        entries = sorted(kept + added, key=lambda m: (m.annotations.get(REF_NAME, ""), m.digest))
        body = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [m.as_dict() for m in entries]}
        atomic_write_bytes(self.root / "index.json", canonical_json(body))


@dataclass(frozen=True)
class LayoutBase:
    """An existing image in an OCI layout on disk, used as the base (`name`: the registry image it was
    pulled from, for the provenance annotation)."""

    layout: Path
    tag: str | None = None
    name: str | None = None

    @staticmethod
    def split(ref: str) -> tuple[Path, str | None]:
        """`dir` or `dir:tag` -> (dir, tag); whether dir is a directory is for the caller to ask."""
        if Path(ref).is_dir() or ":" not in ref:
            return Path(ref), None
        path, tag = ref.rsplit(":", 1)
        return Path(path), tag or None

    @classmethod
    def parse(cls, ref: str) -> LayoutBase:
        """`dir` or `dir:tag`; a registry reference must be pulled into a layout first."""
        path, tag = cls.split(ref)
        if not path.is_dir():
            raise UserError(f"base image {ref} is not an OCI layout directory",
                            "pass an OCI layout dir[:tag], or REGISTRY/REPO:TAG to `gl-nvidia image --base`")
        return cls(path, tag)


class _Hashing:
    """Wraps a file object: hashes and counts every write."""

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self._fh = fh
        self._h = hashlib.sha256()
        self.path = path
        self.size = 0

    def write(self, data: bytes) -> int:
        self._h.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._h.hexdigest()
