"""A release as one OCM component version in real registries: pushed, read back by Gardener's own retrieval code,
replicated with its images to a second registry and verified there; altered or dangling components refused."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import httpx
import oci.client
import ocm
import ocm.retrieve
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from ruamel.yaml import YAML

from gl_nvidia.catalog.matrix import build_matrix, load_lock, lock_resolved
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.image import layers, sbom
from gl_nvidia.image.tags import image_tags
from gl_nvidia.oci import CONFIG, Layout, Manifest, canonical_json
from gl_nvidia.reference import Reference
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.sign import load_public_key, sign_digest, verify_image
from gl_nvidia.registry.transfer import ClientOptions, push
from gl_nvidia.release.assets import release_assets
from gl_nvidia.release.conductor import ReleaseResult, UnitReport
from gl_nvidia.release.inputs import UnitInputs
from gl_nvidia.release.ocm import (
    COMPONENT,
    component_descriptor,
    mirror_component,
    published_images,
    push_descriptor,
    read_descriptor,
)
from tests.fixtures.registry import Registry, free_port

RELEASE_LOCK = Path(__file__).parent / "data" / "deploy" / "release-debian-lock.yaml"
VERSION = "1.4.0"
UNITS = [BuildUnit("6.12.72-cloud-amd64", "580.105.08", "580", "amd64", "cloud", "gardenlinux", ("1877.3",),
                   ("open", "proprietary")),
         BuildUnit("6.12.72-cloud-arm64", "580.105.08", "580", "arm64", "cloud", "gardenlinux", ("1877.3",),
                   ("proprietary",))]


@dataclasses.dataclass
class TLSRegistry(Registry):
    """docker-registry serving HTTPS with a certificate for 127.0.0.1: Gardener's OCI client speaks nothing
    else (it asks https://HOST/v2/ for the auth challenge whatever its routes say)."""

    cert: Path = Path()

    def write_config(self) -> None:
        super().write_config()
        key = self.cert.with_suffix(".key")
        self.config.write_text(self.config.read_text().replace(
            "  secret: gl-nvidia-test-secret\n",
            f"  secret: gl-nvidia-test-secret\n  tls:\n    certificate: {self.cert}\n    key: {key}\n"))

    def start(self) -> None:
        self.write_config()
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"https://{self.host}/v2/", verify=ssl.create_default_context(cafile=self.cert), timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("docker-registry (TLS) did not come up within 20 s")


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TLSRegistry, TLSRegistry]]:
    """Two HTTPS registries; both our client (httpx) and Gardener's (requests) trust their certificate."""
    cert = tmp_path / "tls" / "registry.crt"
    cert.parent.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(cert.with_suffix(".key")),
                    "-out", str(cert)], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    regs = []
    for name in ("tls1", "tls2"):
        reg = TLSRegistry(tmp_path / name, free_port(), cert=cert)
        reg.root.mkdir()
        reg.start()
        regs.append(reg)
    try:
        yield regs[0], regs[1]
    finally:
        for reg in regs:
            reg.kill()


HTTPS = ClientOptions(plain_http=False, retries=1, backoff_s=0.05)
PLAIN = ClientOptions(retries=1, backoff_s=0.05)


def tags(u: BuildUnit) -> tuple[str, ...]:
    return tuple(image_tags(u.driver_version, u.driver_branch, u.kernel, u.os_id, u.os_versions))


@dataclasses.dataclass
class Published:
    base: str  # the OCM repository: REGISTRY/gl
    digests: list[str]
    key: ec.EllipticCurvePrivateKey
    pub: Path


def publish(registry: Registry, tmp_path: Path, options: ClientOptions = PLAIN) -> Published:
    """Two driver images as `release` leaves them: inputs recorded, SBOM attached; the amd64 one signed."""
    layout = Layout.create(tmp_path / "layout")
    for u in UNITS:
        layer = layers.write_layer(layout, [layers.Entry(PurePosixPath("/kernel"), data=u.kernel.encode())])
        cfg = layout.write_blob(canonical_json({"architecture": u.arch, "os": "linux",
                                                "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}), CONFIG)
        inputs = UnitInputs(u.as_dict(), {f"nvidia-kernel-source_{u.driver_version}_{u.arch}.deb": "ab" * 32},
                            "cd" * 32, "0.1.0")
        manifest = Manifest.build(cfg, [layer.descriptor], inputs.annotations())
        layout.add_image(manifest, list(tags(u)))
        sbom.attach(layout, manifest, {"spdxVersion": "SPDX-2.3", "name": u.kernel})
    push(tmp_path / "layout", f"{registry.host}/gl/driver", options=options)
    key = ec.generate_private_key(ec.SECP256R1())
    digests = [layout.tags()[tags(u)[0]] for u in UNITS]
    with options.client(registry.host) as c:
        sign_digest(c, "gl/driver", digests[0], key)
    pub = tmp_path / "cosign.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return Published(f"{registry.host}/gl", digests, key, pub)


def describe(registry: Registry, p: Published, units: list[tuple[BuildUnit, tuple[str, ...], str]] | None = None,
             options: ClientOptions = PLAIN) -> ocm.ComponentDescriptor:
    with options.client(registry.host) as c:
        images = published_images(c, "gl/driver", units or [(u, tags(u), d) for u, d in zip(UNITS, p.digests,
                                                                                             strict=True)])
    return component_descriptor(VERSION, p.base, f"{p.base}/driver", images, "apt:debian")


def gardener_lookup(base: str) -> ocm.ComponentDescriptor:
    """Gardener's retrieval code as its tools run it: its OCI client over HTTPS, its repository lookup."""
    client = oci.client.Client(max_retries=1)
    lookup = ocm.retrieve.oci_component_descriptor_lookup(
        ocm_repository_lookup=ocm.retrieve.ocm_repository_lookup(base), oci_client=client)
    return lookup(ocm.ComponentIdentity(name=COMPONENT, version=VERSION), absent_ok=False)  # type: ignore[no-any-return]


def skopeo_tags(ref: str) -> list[str]:
    out = subprocess.run(["skopeo", "list-tags", "--tls-verify=false", f"docker://{ref}"],
                         check=True, capture_output=True, text=True).stdout
    return sorted(json.loads(out)["Tags"])


def repositories(registry: Registry) -> list[str]:
    with RegistryClient(registry.host) as c:
        return list(c._http.get(f"{c.base}/v2/_catalog").json().get("repositories") or [])


def test_the_component_is_pushed_and_gardeners_retrieval_reads_it(tls: tuple[TLSRegistry, TLSRegistry],
                                                                  tmp_path: Path) -> None:
    registry = tls[0]
    p = publish(registry, tmp_path, HTTPS)
    with HTTPS.client(registry.host) as c:
        push_descriptor(c, p.base, describe(registry, p, options=HTTPS))
        again = push_descriptor(c, p.base, describe(registry, p, options=HTTPS))  # the same release: same descriptor
    assert again.uploaded == 0
    assert skopeo_tags(f"{p.base}/component-descriptors/{COMPONENT}") == [VERSION]
    got = gardener_lookup(p.base).component
    assert (got.name, got.version, got.current_ocm_repo.baseUrl) == (COMPONENT, VERSION, p.base)
    images = [r for r in got.resources if r.type is ocm.ArtefactType.OCI_IMAGE]
    assert [f"sha256:{r.digest.value}" for r in images] == p.digests
    assert images[0].access.imageReference == f"{p.base}/driver:{tags(UNITS[0])[1]}@{p.digests[0]}"
    labels = {lb.name: lb.value for lb in images[0].labels}
    assert labels["io.gardenlinux.nvidia.driver.version"] == "580.105.08"
    assert labels["io.gardenlinux.nvidia.driver.branch"] == "580"
    assert labels["io.gardenlinux.nvidia.kernel"] == "6.12.72-cloud-amd64"
    assert labels["io.gardenlinux.nvidia.gardenlinux.versions"] == ["1877.3"]
    assert (labels["io.gardenlinux.nvidia.arch"], labels["io.gardenlinux.nvidia.flavour"]) == ("amd64", "cloud")
    assert labels["io.gardenlinux.nvidia.module-types"] == ["open", "proprietary"]
    assert labels["io.gardenlinux.nvidia.tags"] == list(tags(UNITS[0]))
    assert labels["io.gardenlinux.nvidia.inputs.digest"] == UnitInputs(
        UNITS[0].as_dict(), {"nvidia-kernel-source_580.105.08_amd64.deb": "ab" * 32}, "cd" * 32, "0.1.0").digest
    kinds = sorted((r.name, r.extraIdentity["kernel"]) for r in got.resources if r not in images)
    assert kinds == [("driver-sbom", "6.12.72-cloud-amd64"), ("driver-sbom", "6.12.72-cloud-arm64"),
                     ("driver-signature", "6.12.72-cloud-amd64")]  # only the amd64 image is signed
    (source,) = [s for s in got.sources if s.extraIdentity["arch"] == "amd64"]
    assert {lb.name: lb.value for lb in source.labels}["io.gardenlinux.nvidia.files"] == {
        "nvidia-kernel-source_580.105.08_amd64.deb": "ab" * 32}
    assert images[0].srcRefs[0].identitySelector == {"name": "nvidia-driver", "driver-version": "580.105.08",
                                                     "arch": "amd64"}


def test_the_component_is_replicated_and_gardeners_retrieval_reads_the_copy(tls: tuple[TLSRegistry, TLSRegistry],
                                                                            tmp_path: Path) -> None:
    src, dst = tls
    p = publish(src, tmp_path, HTTPS)
    with HTTPS.client(src.host) as c:
        push_descriptor(c, p.base, describe(src, p, options=HTTPS))
    public = load_public_key(p.pub)
    copied = mirror_component(p.base, f"{dst.host}/airgap", f"{COMPONENT}:{VERSION}", public_key=public,
                              options=HTTPS)
    assert [r.signature for r in copied.resources if r.name == "driver"] == ["verified", "unsigned"]
    copy = gardener_lookup(f"{dst.host}/airgap").component
    assert [ctx.baseUrl for ctx in copy.repositoryContexts] == [p.base, f"{dst.host}/airgap"]
    assert all(r.access.imageReference.startswith(f"{dst.host}/airgap/driver:") for r in copy.resources)
    assert [f"sha256:{r.digest.value}" for r in copy.resources if r.name == "driver"] == p.digests
    with HTTPS.client(dst.host) as c:
        assert verify_image(c, Reference.parse(f"{dst.host}/airgap/driver:{tags(UNITS[0])[0]}"), public).signatures == 1


def test_mirror_component_copies_every_tag_and_attachment_and_verifies_them(
        registry: Registry, registry2: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = publish(registry, tmp_path)
    with RegistryClient(registry.host) as c:
        push_descriptor(c, p.base, describe(registry, p))
    assert main(["mirror", "--component", f"{COMPONENT}:{VERSION}", p.base, f"{registry2.host}/airgap",
                 "--key", str(p.pub), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["descriptor"] == f"{registry2.host}/airgap/component-descriptors/{COMPONENT}:{VERSION}"
    assert [r["signature"] for r in report["resources"] if r["name"] == "driver"] == ["verified", "unsigned"]
    # every tag the operator pulls, and what is attached, under the same path below the new base
    assert skopeo_tags(f"{registry2.host}/airgap/driver") == sorted(
        [*tags(UNITS[0]), *tags(UNITS[1]), *(f"{d.replace(':', '-')}.sbom" for d in p.digests),
         f"{p.digests[0].replace(':', '-')}.sig"])
    assert main(["verify-image", f"{registry2.host}/airgap/driver:{tags(UNITS[0])[0]}", "--key", str(p.pub)]) == 0
    with RegistryClient(registry2.host) as c:
        copy = read_descriptor(c, f"{registry2.host}/airgap", COMPONENT, VERSION)
    assert copy.component.current_ocm_repo.baseUrl == f"{registry2.host}/airgap"
    # a second run copies nothing
    again = mirror_component(p.base, f"{registry2.host}/airgap", f"{COMPONENT}:{VERSION}")
    assert sum(r.uploaded for r in again.resources) == 0


def test_an_image_signed_by_another_key_is_not_carried(registry: Registry, registry2: Registry,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = publish(registry, tmp_path)
    with RegistryClient(registry.host) as c:
        push_descriptor(c, p.base, describe(registry, p))
    other = tmp_path / "other.pub"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert main(["mirror", "--component", f"{COMPONENT}:{VERSION}", p.base, f"{registry2.host}/airgap",
                 "--key", str(other)]) == 1
    assert "none of its 1 signature(s) verifies with this public key" in capsys.readouterr().err
    assert repositories(registry2) == []  # checked at the source: nothing was carried


def _altered(registry: Registry, p: Published, field: str) -> None:
    """Push the component with its first image's digest changed to the second's, in `field` of the resource."""
    descriptor = describe(registry, p)
    first = descriptor.component.resources[0]
    other = p.digests[1]
    if field in ("digest", "both"):
        first.digest = ocm.DigestSpec.from_oci_artifact_digest(other)
    if field == "tags":
        first.labels = [ocm.Label(name=lb.name, value=[*lb.value, "../x"]) if lb.name.endswith(".tags") else lb
                        for lb in first.labels]
    if field == "both":
        ref = first.access["imageReference"].rsplit("@", 1)[0]
        first.access = ocm.AccessDict({**first.access, "imageReference": f"{ref}@sha256:{'0' * 64}"})
        first.digest = ocm.DigestSpec.from_oci_artifact_digest(f"sha256:{'0' * 64}")
    with RegistryClient(registry.host) as c:
        push_descriptor(c, p.base, descriptor)


@pytest.mark.parametrize(("field", "error"), [
    ("digest", "its digest says sha256:"),
    ("both", "the source has no"),
    ("tags", "invalid tag '../x'"),
])
def test_an_altered_or_dangling_component_is_refused_and_nothing_is_copied(
        field: str, error: str, registry: Registry, registry2: Registry, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    p = publish(registry, tmp_path)
    _altered(registry, p, field)
    assert main(["mirror", "--component", f"{COMPONENT}:{VERSION}", p.base, f"{registry2.host}/airgap"]) == 2
    err = capsys.readouterr().err
    assert error in err and len(err.strip().splitlines()) == 2  # the error line and its hint
    assert repositories(registry2) == []


def test_a_release_component_naming_a_missing_image_is_refused_before_anything_is_pushed(
        registry: Registry, tmp_path: Path) -> None:
    p = publish(registry, tmp_path)
    gone = f"sha256:{'e' * 64}"
    with pytest.raises(UserError, match=rf"would list {registry.host}/gl/driver@{gone} .*which the registry does not"):
        describe(registry, p, [(UNITS[0], tags(UNITS[0]), gone)])
    assert not any(r.startswith("gl/component-descriptors") for r in repositories(registry))


def test_the_component_read_back_is_checked(registry: Registry, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = publish(registry, tmp_path)
    with RegistryClient(registry.host) as c:
        push_descriptor(c, p.base, describe(registry, p))
        descriptor = read_descriptor(c, p.base, COMPONENT, VERSION)
        assert descriptor.component.resources[0].digest.value == p.digests[0].removeprefix("sha256:")
        with pytest.raises(UserError, match=f"no OCM component {COMPONENT}:9.9.9 in {p.base}"):
            read_descriptor(c, p.base, COMPONENT, "9.9.9")
    for bad in ("nocolon", "Upper.example/x:1.0.0", f"{COMPONENT}:"):
        assert main(["mirror", "--component", bad, p.base, f"{registry.host}/x"]) == 2
        assert "is not NAME:VERSION" in capsys.readouterr().err
    for argv, error in ((["--key", str(p.pub)], "--key verifies the images of a component"),
                        (["--component", f"{COMPONENT}:{VERSION}", "--driver-branch", "580"],
                         "--component copies the whole component"),
                        (["--component", f"{COMPONENT}:{VERSION}", "--key", str(tmp_path / "none.pub")], "none.pub"),
                        (["--component", f"{COMPONENT}:{VERSION}"], "names a tag or digest")):
        dst = f"{registry.host}/x" + (":t" if error == "names a tag or digest" else "")
        assert main(["mirror", *argv, p.base, dst]) == 2
        err = capsys.readouterr().err
        assert error in err and len([line for line in err.splitlines() if "error" in line]) == 1, err
    assert not any(r.startswith("x") for r in repositories(registry))


def _release(registry: Registry, tmp_path: Path, digest: str | None = None) -> tuple[ReleaseResult, str]:
    """A release of the one-unit lock whose unit the registry holds (its image published, or `digest` instead)."""
    lock = load_lock(RELEASE_LOCK)
    resolved = lock_resolved(lock)
    matrix = build_matrix(lock.os.id, resolved, lock.policy.exclusions)
    (unit,) = matrix.units
    unit_tags = tags(unit)
    layout = Layout.create(tmp_path / "layout")
    layer = layers.write_layer(layout, [layers.Entry(PurePosixPath("/k"), data=b"k")])
    cfg = layout.write_blob(canonical_json({"architecture": "amd64", "os": "linux",
                                            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}), CONFIG)
    layout.add_image(Manifest.build(cfg, [layer.descriptor], {}), list(unit_tags))
    push(tmp_path / "layout", f"{registry.host}/gl/driver")
    published = digest or layout.tags()[unit_tags[0]]
    report = UnitReport(unit, unit_tags, published, "cached", "built", "pushed")
    return ReleaseResult((report,), tmp_path / "layout", f"{registry.host}/gl", 0, 1, 1, lock, matrix,
                         resolved), published


def test_a_versioned_release_is_one_component_version_in_its_registry(registry: Registry, tmp_path: Path) -> None:
    result, digest = _release(registry, tmp_path)
    assets = release_assets(result, "1.4.0", None, tmp_path / "release")
    assert [p.name for p in assets] == ["CHANGELOG.md", "component-descriptor.yaml",
                                        "gpu-operator-values-debian-12.yaml"]
    with RegistryClient(registry.host) as c:
        pushed = read_descriptor(c, f"{registry.host}/gl", COMPONENT, "1.4.0")
    (image,) = pushed.component.resources
    assert f"sha256:{image.digest.value}" == digest
    written = ocm.ComponentDescriptor.from_dict(YAML(typ="safe").load(assets[1].read_text()))
    assert written.component.resources[0].digest == image.digest


def test_a_release_whose_image_is_gone_writes_and_pushes_nothing(registry: Registry, tmp_path: Path) -> None:
    result, _ = _release(registry, tmp_path, digest=f"sha256:{'e' * 64}")
    with pytest.raises(UserError, match="which the registry does not have"):
        release_assets(result, "1.4.0", None, tmp_path / "release")
    assert not (tmp_path / "release").exists()
    assert not any(r.startswith("gl/component-descriptors") for r in repositories(registry))
