"""A release as one Open Component Model (OCM) component version, the form Gardener operators move software in.

`release --version X` describes every published image as a resource by digest (labels: driver version and
branch, kernel, OS and its versions, arch, flavour, module types, every tag), with its cosign signature and
SBOM where the registry holds them, and the driver sources each was built from. The descriptor goes to the
registry under OCM's OCI repository mapping, `<registry>/component-descriptors/<name>:<version>`, in the
format Gardener's own upload writes (its tar layer and config), so Gardener's retrieval code and tools read it.

`mirror --component` copies a component version with its images to another registry, as Gardener's transport
tool (`ctt`) would, and checks the copy: each resource by digest, and its signature with `--key`.

Gardener's Python bindings (`gardener-ocm`) give the model, the schema check, the descriptor's serialisation
and the repository mapping. Registry traffic goes through our client: theirs does not check fetched content
against its digest and hands credentials to whatever token service a registry names. `ctt` itself is not run:
its modules need Python 3.12 (README: Gardener).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import ocm
import ocm.oci
from ruamel.yaml import YAML

from gl_nvidia import oci, yamldoc
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.errors import UserError
from gl_nvidia.image.assemble import LABEL_PREFIX
from gl_nvidia.osprofile import os_profile
from gl_nvidia.reference import Reference, validate_tag
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.transfer import ClientOptions, PushResult, copy_image
from gl_nvidia.release.inputs import INPUTS, INPUTS_DIGEST

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

    from gl_nvidia.release.conductor import ReleaseResult

COMPONENT = "github.com/gardenlinux/gardenlinux-nvidia-installer"
PROVIDER = "gardenlinux"
DESCRIPTOR_FILE = "component-descriptor.yaml"
# OCM resource types of what is attached to an image (cosign's attachment tags)
ATTACHED = {"sig": (str(ocm.ArtefactType.COSIGN_SIGNATURE), "driver-signature"),
            "sbom": (str(ocm.ArtefactType.SBOM), "driver-sbom")}
TAGS_LABEL = f"{LABEL_PREFIX}.tags"
_OCI_DIGEST = str(ocm.NormalisationAlgorithm.OCI_ARTIFACT_DIGEST)
_NAME_VERSION = re.compile(r"^(?P<name>[a-z0-9.\-]+[.][a-z][a-z]+/[-a-z0-9/_.]*):(?P<version>[^:/@]+)$")


@dataclass(frozen=True)
class ComponentImage:
    """One published image as the component lists it."""

    unit: BuildUnit
    tags: tuple[str, ...]
    digest: str
    inputs: Mapping[str, Any] | None  # the inputs its manifest records (release.inputs), if any
    attached: Mapping[str, str]  # "sig" / "sbom" -> digest of that attachment's manifest
    inputs_digest: str | None = None  # the inputs' digest, as recorded there


def oci_tag(version: str) -> str:
    """OCM's OCI mapping of a version to a tag: `+` (semver build metadata), which tags cannot hold, as `.build-`."""
    return version.replace("+", ".build-")


def descriptor_repository(base: str, name: str) -> str:
    """`<base>/component-descriptors/<name>`: OCM's OCI repository mapping, as Gardener's bindings compute it."""
    return ocm.OciOcmRepository(baseUrl=base).component_oci_ref(name)  # type: ignore[no-any-return]


def _label(name: str, value: Any) -> ocm.Label:
    return ocm.Label(name=f"{LABEL_PREFIX}.{name}", value=value)


def _identity(unit: BuildUnit) -> dict[str, str]:
    return {"kernel": unit.kernel, "driver-branch": unit.driver_branch}


def _source_identity(unit: BuildUnit) -> dict[str, str]:
    return {"driver-version": unit.driver_version, "arch": unit.arch}


def _reference(repository: str, tag: str, digest: str) -> str:
    return f"{repository}:{tag}@{digest}"


def component_descriptor(version: str, registry: str, repository: str, images: Sequence[ComponentImage],
                         origin: str) -> ocm.ComponentDescriptor:
    """The component version of a release: `registry` is the OCM repository (the descriptor's home),
    `repository` the images' (`<registry>/driver`), `origin` the lock's driver source."""
    resources: list[ocm.Resource] = []
    sources: dict[tuple[str, str], ocm.Source] = {}
    for img in images:
        u = img.unit
        full = next((t for t in img.tags if t.startswith(f"{u.driver_version}-")), img.tags[0])
        labels = [_label("driver.version", u.driver_version), _label("driver.branch", u.driver_branch),
                  _label("kernel", u.kernel), _label("os", u.os_id),
                  _label(os_profile(u.os_id).versions_label, list(u.os_versions)), _label("arch", u.arch),
                  _label("flavour", u.flavour), _label("module-types", list(u.module_types)),
                  ocm.Label(name=TAGS_LABEL, value=list(img.tags))]
        src_refs: list[ocm.SourceReference] = []
        if img.inputs is not None:
            sid = _source_identity(u)
            sources.setdefault((u.driver_version, u.arch), ocm.Source(
                name="nvidia-driver", version=version, type="nvidia-driver", extraIdentity=sid,
                access={"type": str(ocm.AccessType.NONE)},
                labels=[_label("files", dict(sorted((img.inputs.get("sources") or {}).items()))),
                        _label("origin", origin)]))
            src_refs.append(ocm.SourceReference(identitySelector={"name": "nvidia-driver", **sid}, labels=[]))
        if img.inputs_digest is not None:  # the image's own annotations hold the inputs, the source their files
            labels.append(_label("inputs.digest", img.inputs_digest))
        resources.append(ocm.Resource(
            name="driver", version=version, type=ocm.ArtefactType.OCI_IMAGE, extraIdentity=_identity(u),
            access={"type": str(ocm.AccessType.OCI_REGISTRY), "imageReference": _reference(repository, full, img.digest)},
            digest=ocm.DigestSpec.from_oci_artifact_digest(img.digest), labels=labels, srcRefs=src_refs))
        for kind, digest in sorted(img.attached.items()):
            kind_type, name = ATTACHED[kind]
            resources.append(ocm.Resource(
                name=name, version=version, type=kind_type, extraIdentity=_identity(u),
                access={"type": str(ocm.AccessType.OCI_REGISTRY),
                        "imageReference": _reference(repository, oci.attachment_tag(img.digest, kind), digest)},
                digest=ocm.DigestSpec.from_oci_artifact_digest(digest),
                labels=[ocm.Label(name=f"{LABEL_PREFIX}.subject", value=img.digest)]))
    component = ocm.Component(
        name=COMPONENT, version=version, repositoryContexts=[ocm.OciOcmRepository(baseUrl=registry)],
        provider=PROVIDER, sources=list(sources.values()), componentReferences=[], resources=resources,
        labels=[])
    descriptor = ocm.ComponentDescriptor(meta=ocm.Metadata(), component=component, signatures=[])
    _check_schema(_as_dict(descriptor), f"component {COMPONENT}:{version}")
    return descriptor


def _as_dict(descriptor: ocm.ComponentDescriptor) -> dict[str, Any]:
    """Plain data as Gardener serialises it (enums as their values)."""
    return json.loads(json.dumps(dataclasses.asdict(descriptor), cls=ocm.EnumJSONEncoder))  # type: ignore[no-any-return]


def _check_schema(data: dict[str, Any], what: str) -> None:
    try:
        ocm.ComponentDescriptor.validate(data, validation_mode=ocm.ValidationMode.FAIL)
    except jsonschema.ValidationError as exc:
        at = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise UserError(f"{what} is not a valid OCM component descriptor: {at}: {exc.message[:200]}",
                        "check the component's names, versions and labels") from exc


# -- the descriptor in a registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Artifact:
    """A component descriptor as OCI blobs: config, the tar layer, and the manifest naming both."""

    manifest: oci.Manifest
    blobs: Mapping[str, bytes]


def _artifact(descriptor: ocm.ComponentDescriptor) -> _Artifact:
    """The OCI artifact exactly as Gardener's `ocm.upload.upload_component_descriptor` writes it."""
    layer = ocm.oci.component_descriptor_to_tarfileobj(descriptor).getvalue()
    layer_digest = oci.digest_bytes(layer)
    cfg = ocm.oci.ComponentDescriptorOciCfg(componentDescriptorLayer=ocm.oci.ComponentDescriptorOciBlobRef(
        digest=layer_digest, size=len(layer), mediaType=ocm.oci.component_descriptor_mimetype))
    config = json.dumps(dataclasses.asdict(cfg)).encode()
    manifest = oci.Manifest.build(
        oci.Descriptor(ocm.oci.component_descriptor_cfg_mimetype, oci.digest_bytes(config), len(config)),
        [oci.Descriptor(ocm.oci.component_descriptor_mimetype, layer_digest, len(layer))], {})
    return _Artifact(manifest, {oci.digest_bytes(config): config, layer_digest: layer})


def push_descriptor(client: RegistryClient, base: str, descriptor: ocm.ComponentDescriptor, *,
                    force: bool = False) -> PushResult:
    """Put the descriptor at `<base>/component-descriptors/<name>:<version>` (a version is not moved to other
    content unless `force`)."""
    artifact = _artifact(descriptor)
    repo = Reference.parse(descriptor_repository(base, descriptor.component.name)).repo
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-ocm-") as tmp:
        def fetch(blob: oci.Descriptor, _scratch: Path) -> Path:
            path = Path(tmp, blob.digest.removeprefix("sha256:"))
            path.write_bytes(artifact.blobs[blob.digest])
            return path

        return copy_image(artifact.manifest, fetch, client, repo, [oci_tag(descriptor.component.version)], force=force)


def read_descriptor(client: RegistryClient, base: str, name: str, version: str) -> ocm.ComponentDescriptor:
    """The component version at `base`, every byte checked against the digests its manifest names, and the
    descriptor against OCM's schema."""
    where = f"{descriptor_repository(base, name)}:{oci_tag(version)}"
    repo = Reference.parse(descriptor_repository(base, name)).repo
    manifest = client.get_manifest(repo, oci_tag(version))
    if manifest is None:
        raise UserError(f"no OCM component {name}:{version} in {base} ({where} not found)",
                        "check the repository and the component's name and version")
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-ocm-") as tmp:
        def blob(desc: oci.Descriptor) -> bytes:
            if desc.size > 16 << 20:
                raise UserError(f"{where}: a {desc.size}-byte blob is no component descriptor")
            path = Path(tmp, desc.digest.removeprefix("sha256:"))
            client.download_blob(repo, desc, path)
            return path.read_bytes()

        layer = _descriptor_layer(manifest, blob(manifest.config), where)
        data = _descriptor_data(blob(layer), layer.media_type, where)
    _check_schema(data, where)
    try:
        descriptor = ocm.ComponentDescriptor.from_dict(data)
    except Exception as exc:  # dacite raises several types; all mean "not this model"
        raise UserError(f"{where} is not an OCM component descriptor: {str(exc).splitlines()[0][:200]}") from exc
    if (descriptor.component.name, descriptor.component.version) != (name, version):
        raise UserError(f"{where} holds {descriptor.component.name}:{descriptor.component.version}, "
                        f"not {name}:{version}", "the registry's tag points at another component")
    return descriptor


def _descriptor_layer(manifest: oci.Manifest, config: bytes, where: str) -> oci.Descriptor:
    """The layer the config names (Gardener's rule), else the only one."""
    try:
        wanted = json.loads(config)["componentDescriptorLayer"]["digest"]
    except (ValueError, KeyError, TypeError):
        wanted = manifest.layers[0].digest if len(manifest.layers) == 1 else None
    found = [x for x in manifest.layers if x.digest == wanted]
    if not found or found[0].media_type not in ocm.oci.component_descriptor_mimetypes:
        raise UserError(f"{where} is no OCM component descriptor (no descriptor layer)")
    return found[0]


def _descriptor_yaml(layer: bytes, where: str) -> bytes:
    """The descriptor file of a `+tar` layer, read in memory (nothing of it reaches the file system)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
            member = tf.extractfile(ocm.oci.component_descriptor_fname)
            return member.read() if member is not None else b""
    except (tarfile.TarError, KeyError) as exc:
        raise UserError(f"{where}: the descriptor layer is no tar holding "
                        f"{ocm.oci.component_descriptor_fname}: {exc}") from exc


def _descriptor_data(raw: bytes, media_type: str, where: str) -> dict[str, Any]:
    if "+tar" in media_type:
        raw = _descriptor_yaml(raw, where)
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: the component descriptor is not UTF-8 text") from exc
    data = yamldoc.load(YAML(typ="safe"), text, where)  # JSON is YAML too
    if not isinstance(data, dict):
        raise UserError(f"{where}: the component descriptor is not a mapping")
    return data


# -- release: describe and publish ---------------------------------------------------------------------------------


def published_images(client: RegistryClient, repo: str, units: Sequence[tuple[BuildUnit, tuple[str, ...], str]]
                     ) -> list[ComponentImage]:
    """Each published image as the registry holds it now (manifest fetched by digest, so checked), with its
    recorded inputs and attachments; an image the registry lacks is refused before anything is written."""
    out = []
    for unit, tags, digest in units:
        manifest = client.get_manifest(repo, digest)
        if manifest is None:
            raise UserError(f"the component would list {client.host}/{repo}@{digest} ({unit.key}), which the registry "
                            "does not have", "publish the release again (gl-nvidia release): nothing was pushed")
        recorded = manifest.annotations.get(INPUTS)
        try:
            inputs = json.loads(recorded) if recorded else None
        except ValueError:
            inputs = None
        attached = {kind: d for kind in ATTACHED
                    if (d := client.manifest_digest(repo, oci.attachment_tag(digest, kind))) is not None}
        out.append(ComponentImage(unit, tags, digest, inputs if isinstance(inputs, dict) else None, attached,
                                  manifest.annotations.get(INPUTS_DIGEST)))
    return out


def describe_release(client: RegistryClient, result: ReleaseResult, version: str) -> ocm.ComponentDescriptor:
    """The component version of a release that published every unit (`result.repository` is its OCM repository)."""
    from gl_nvidia.release.conductor import IMAGE

    assert result.repository is not None
    repository = f"{result.repository}/{IMAGE}"
    units = [(u.unit, u.tags, u.digest) for u in result.units if u.push in ("pushed", "exists") and u.digest]
    images = published_images(client, Reference.parse(repository).repo, units)
    return component_descriptor(version, result.repository, repository, images, result.lock.sources.nvidia)


def descriptor_text(descriptor: ocm.ComponentDescriptor) -> str:
    """The descriptor's YAML, byte for byte what its layer in the registry holds."""
    layer = ocm.oci.component_descriptor_to_tarfileobj(descriptor).getvalue()
    return _descriptor_yaml(layer, "the component descriptor").decode()


# -- mirror --component ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopiedResource:
    name: str
    identity: Mapping[str, str]
    source: str
    destination: str  # REPO:TAG@DIGEST in the destination
    uploaded: int  # blobs sent
    signature: str  # an image's: "verified" (with --key), "copied", "unsigned"; "-" for an attachment

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ComponentCopy:
    component: str  # NAME:VERSION
    descriptor: str  # where the copy's descriptor is
    resources: tuple[CopiedResource, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"component": self.component, "descriptor": self.descriptor,
                "resources": [r.as_dict() for r in self.resources]}


def parse_component(value: str) -> tuple[str, str]:
    m = _NAME_VERSION.match(value)
    if not m:
        raise UserError(f"--component {value!r} is not NAME:VERSION",
                        f"e.g. --component {COMPONENT}:1.4.0")
    return m["name"], m["version"]


@dataclass(frozen=True)
class _Planned:
    resource: ocm.Resource
    source: Reference
    manifest: oci.Manifest
    tags: tuple[str, ...]
    target: Reference


def _plan(descriptor: ocm.ComponentDescriptor, src: RegistryClient, src_base: Reference, dst_base: Reference
          ) -> list[_Planned]:
    """Every resource with its manifest fetched from the source by the digest the component states; a resource
    without one, one whose reference names another digest, or one the source lacks is refused."""
    plan = []
    for r in descriptor.component.resources:
        what = f"resource {r.name} {dict(r.extraIdentity)}"
        access = _access(r)
        if access.get("type") not in (str(ocm.AccessType.OCI_REGISTRY), "ociArtifact", "OCIImage", "ociImage"):
            raise UserError(f"{what} has access type {access.get('type')!r}: mirror --component copies OCI artifacts",
                            "mirror this component with Gardener's ctt")
        digest = r.digest
        if digest is None or str(digest.normalisationAlgorithm) != _OCI_DIGEST or digest.hashAlgorithm != "SHA-256":
            raise UserError(f"{what} states no OCI artifact digest (SHA-256)", "the component cannot be verified")
        want = f"sha256:{digest.value}"
        ref = Reference.parse(str(access.get("imageReference", "")))
        if ref.host != src_base.host:
            raise UserError(f"{what} lives on {ref.host}, not on the source registry {src_base.host}",
                            "mirror from the registry the component's images are in")
        if ref.digest is not None and ref.digest != want:
            raise UserError(f"{what}: its image reference names {ref.digest}, its digest says {want}; refusing it",
                            "the component descriptor was altered")
        manifest = src.get_manifest(ref.repo, want)  # by digest: checked against it
        if manifest is None:
            raise UserError(f"{what}: the source has no {ref.repository}@{want}",
                            "the component references an image that is not there: nothing was copied")
        label = next((lb.value for lb in r.labels if lb.name == TAGS_LABEL), None)
        tags = tuple(str(t) for t in label) if isinstance(label, list) else ()
        tags = tuple(dict.fromkeys([*([ref.tag] if ref.tag else []), *tags]))
        for tag in tags:  # a tag no registry takes would stop the copy half-way
            try:
                validate_tag(tag)
            except ValueError as exc:
                raise UserError(f"{what}: {exc}", "the component descriptor was altered") from exc
        plan.append(_Planned(r, ref, manifest, tags, Reference(dst_base.host, _target_repo(ref.repo, src_base, dst_base))))
    return plan


def _access(r: ocm.Resource) -> dict[str, Any]:
    """A resource's access as plain data: Gardener's model parses known types into dataclasses."""
    access = r.access
    raw = dataclasses.asdict(access) if dataclasses.is_dataclass(access) and not isinstance(access, type) else access
    return {str(k): str(v) for k, v in raw.items() if v is not None} if isinstance(raw, dict) else {}


def _target_repo(repo: str, src_base: Reference, dst_base: Reference) -> str:
    """The same path below the destination base as below the source base (ctt's prefix rule otherwise)."""
    rel = repo.removeprefix(src_base.repo + "/") if repo.startswith(src_base.repo + "/") else repo
    return f"{dst_base.repo}/{rel}"


def mirror_component(source: str, destination: str, component: str, *, public_key: EllipticCurvePublicKey | None = None,
                     force: bool = False, options: ClientOptions | None = None) -> ComponentCopy:
    """Copy component version NAME:VERSION from OCM repository `source` (REGISTRY/PATH) to `destination`, with
    every image it lists; the descriptor is written last, naming the copies, and everything is then read back
    from the destination and checked by digest (and each image's signature with `public_key`)."""
    from gl_nvidia.registry.sign import verify_image

    name, version = parse_component(component)
    src_base, dst_base = _base(source), _base(destination)
    opts = options or ClientOptions()
    with opts.client(src_base.host) as src, opts.client(dst_base.host) as dst:
        descriptor = read_descriptor(src, source, name, version)
        plan = _plan(descriptor, src, src_base, dst_base)  # every check on the source before any copy
        signed = {_key(p.resource) for p in plan if str(p.resource.type) == ATTACHED["sig"][0]}
        verified = [p for p in plan if str(p.resource.type) == str(ocm.ArtefactType.OCI_IMAGE)
                    and _key(p.resource) in signed and public_key is not None]
        for p in verified:  # a signature that does not verify at the source is not carried anywhere
            assert public_key is not None
            verify_image(src, Reference(p.source.host, p.source.repo, digest=p.manifest.digest), public_key)

        def fetch_from(repo: str) -> Callable[[oci.Descriptor, Path], Path]:
            def fetch(blob: oci.Descriptor, scratch: Path) -> Path:
                path = scratch / blob.digest.removeprefix("sha256:")
                src.download_blob(repo, blob, path)
                return path
            return fetch

        pushed = [copy_image(p.manifest, fetch_from(p.source.repo), dst, p.target.repo, p.tags, force=force)
                  for p in plan]
        copied = _retarget(descriptor, destination, plan)
        push_descriptor(dst, destination, copied, force=force)
        again = read_descriptor(dst, destination, name, version)
        results = []
        for p, r, res in zip(plan, again.component.resources, pushed, strict=True):
            ref = Reference.parse(str(_access(r).get("imageReference", "")))
            digest = f"sha256:{r.digest.value}"
            held = dst.get_manifest(ref.repo, digest)  # checked against the digest
            if held is None or ref.digest != digest or any(dst.manifest_digest(ref.repo, t) != digest for t in p.tags):
                raise UserError(f"the copy of {r.name} {dict(r.extraIdentity)} in {dst_base.host} does not hold "
                                f"{digest} under its tags", "run the mirror again")
            state = "-"  # what is attached to an image
            if str(r.type) == str(ocm.ArtefactType.OCI_IMAGE):
                state = "copied" if _key(r) in signed else "unsigned"
                if p in verified:
                    assert public_key is not None
                    verify_image(dst, Reference(ref.host, ref.repo, digest=digest), public_key)
                    state = "verified"
            results.append(CopiedResource(r.name, dict(r.extraIdentity), str(p.source), str(ref), res.uploaded, state))
    target = f"{descriptor_repository(destination, name)}:{oci_tag(version)}"
    return ComponentCopy(f"{name}:{version}", target, tuple(results))


def _key(r: ocm.Resource) -> frozenset[tuple[str, str]]:
    """An image and what is attached to it share their extra identity (kernel, driver branch)."""
    return frozenset(dict(r.extraIdentity).items())


def _base(value: str) -> Reference:
    ref = Reference.parse(value.rstrip("/"))
    if ref.tag or ref.digest:
        raise UserError(f"{value} names a tag or digest", "pass the OCM repository: REGISTRY/PATH")
    return ref


def _retarget(descriptor: ocm.ComponentDescriptor, destination: str, plan: Sequence[_Planned]
              ) -> ocm.ComponentDescriptor:
    """The descriptor as the destination serves it: its repository context added (OCM's rule for a transport),
    every resource's image reference pointing at the copy; digests unchanged (the copy is the same bytes)."""
    copied = copy.deepcopy(descriptor)
    copied.component.set_current_ocm_repo(ocm.OciOcmRepository(baseUrl=destination))
    for r, p in zip(copied.component.resources, plan, strict=True):
        access = _access(r)
        access["imageReference"] = f"{p.target.repository}:{p.tags[0]}@{p.manifest.digest}" if p.tags else \
            f"{p.target.repository}@{p.manifest.digest}"
        r.access = ocm.AccessDict(access)
    return copied
