"""The SPDX 2.3 SBOM of a driver image, and the OCI 1.1 referrer manifest that attaches it.

What an image is made of, as syft would say it: the base's Debian packages (read from its dpkg
status, the record scanners read too), the NVIDIA inputs of the bundle (.debs or the .run, by
sha256) and every kernel module the image ships (sha256 of the module as the node loads it, and
its kernel). Same inputs, same bytes: times come from SOURCE_DATE_EPOCH, the namespace from the
image digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from debian.deb822 import Deb822

import gl_nvidia
from gl_nvidia import oci
from gl_nvidia.bundle import BundleManifest
from gl_nvidia.image import layers, unpack
from gl_nvidia.node import layout as node_layout
from gl_nvidia.oci import Layout, Manifest
from gl_nvidia.reference import check_digest

MEDIA_TYPE = "application/spdx+json"  # cosign's `attach sbom --type spdxjson`, and the referrer's artifactType
_DEB_FILE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9+.-]*)_(?P<version>[^_]+)_(?P<arch>[a-z0-9-]+)\.deb$")


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    arch: str
    source: str | None = None  # the source package, when it has another name


@dataclass(frozen=True)
class BasePackages:
    """The base root filesystem's installed packages and the distribution they come from."""

    distro: str  # os-release ID ("debian"); the purl namespace
    distro_version: str  # os-release VERSION_ID ("12"), "" when it has none
    packages: tuple[DebPackage, ...]


def base_packages(root: Path, what: str) -> BasePackages:
    """What dpkg says is installed in the flattened base `root` (nothing for a base without dpkg).

    Both files are read inside `root` (unpack.read_in_root): a base whose `var/lib/dpkg/status`, `var` or
    os-release is a symlink names a file of the image, never one of the build machine."""
    release = _os_release(root, what)
    status = unpack.read_in_root(root, "var/lib/dpkg/status", what)
    found: list[DebPackage] = []
    if status is not None:
        for para in Deb822.iter_paragraphs(status.decode(errors="replace").splitlines()):
            # unpacked: an extract base's packages (base.py), whose maintainer scripts never ran
            if para.get("Status", "").split()[-1:] not in (["installed"], ["unpacked"]) or "Package" not in para:
                continue
            source = (para.get("Source") or "").split(" ")[0] or None
            found.append(DebPackage(para["Package"], para.get("Version", ""), para.get("Architecture", ""),
                                    source if source != para["Package"] else None))
    return BasePackages(release.get("ID", "debian"), release.get("VERSION_ID", ""),
                        tuple(sorted(found, key=lambda p: (p.name, p.arch))))


def _os_release(root: Path, what: str) -> dict[str, str]:
    # etc/os-release is usually a link, perhaps absolute: resolved inside the root, never on the host.
    for path in ("etc/os-release", "usr/lib/os-release"):
        data = unpack.read_in_root(root, path, what, limit=1 << 20)
        if data is not None:
            return dict(_pair(line) for line in data.decode(errors="replace").splitlines() if "=" in line)
    return {}


def _pair(line: str) -> tuple[str, str]:
    key, _, value = line.partition("=")
    return key.strip(), value.strip().strip('"')


@dataclass(frozen=True)
class ImageFacts:
    """What the SBOM says about the image itself."""

    digest: str  # the image manifest's
    kernel: str
    module_types: tuple[str, ...]
    base_digest: str
    base_name: str


def document(manifest: BundleManifest, image: ImageFacts, base: BasePackages) -> dict[str, Any]:
    """The SPDX 2.3 document (JSON form) of one driver image."""
    ids = _Ids()
    packages: list[dict[str, Any]] = []
    relationships: list[dict[str, str]] = []

    def add(pkg: dict[str, Any], relation: str, of: str = "SPDXRef-Image") -> None:
        packages.append(pkg)
        relationships.append({"spdxElementId": of, "relationshipType": relation, "relatedSpdxElement": pkg["SPDXID"]})

    image_pkg = _package("SPDXRef-Image", "driver", f"{manifest.driver_version}-{image.kernel}", image.digest,
                         purpose="CONTAINER",
                         comment=f"NVIDIA driver {manifest.driver_version} for kernel {image.kernel} "
                                 f"({', '.join(image.module_types)} modules)")
    packages.append(image_pkg)
    relationships.append({"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                          "relatedSpdxElement": "SPDXRef-Image"})
    add(_package("SPDXRef-Base", image.base_name, None, image.base_digest, purpose="CONTAINER",
                 comment="the base root filesystem"), "DESCENDANT_OF")
    distro = quote(f"{base.distro}-{base.distro_version}" if base.distro_version else base.distro, safe="")
    for p in base.packages:
        qualifiers = f"arch={quote(p.arch, safe='')}" + (f"&upstream={quote(p.source, safe='')}" if p.source else "")
        add(_package(ids.new(f"deb-{p.name}-{p.arch}"), p.name, p.version, None,
                     purl=f"pkg:deb/{quote(base.distro, safe='')}/{quote(p.name, safe='')}@{quote(p.version, safe='')}"
                          f"?{qualifiers}&distro={distro}"),
            "CONTAINS", of="SPDXRef-Base")
    for file_name, sha256 in sorted(manifest.source_digests.items()):
        add(_input(ids, manifest, file_name, sha256), "GENERATED_FROM")
    kb = manifest.kernels[image.kernel]
    for t in image.module_types:
        ms = kb.module_sets[t]
        for mod in sorted(ms.modules, key=lambda m: m.name):
            where = node_layout.modules_dir(image.kernel, t) / mod.name
            how = ("rebuilt on the node from NVIDIA's binary object and the patch the image ships; this is the "
                   "sha256 the node checks before loading it") if mod.patch else (
                   "linked on the node from the parts the image ships; this is the sha256 the node checks "
                   "before loading it") if mod.parts else f"shipped as {where}"
            sig = mod.signature
            if sig is not None:
                how += (f"; signed by {sig.signer!r} (certificate sha256 {sig.cert_sha256})"
                        + (f", sha256 {sig.signed_sha256} with the signature appended" if mod.parts else ""))
            purl = (f"pkg:generic/{quote(mod.name, safe='')}@{quote(ms.source_version, safe='')}"
                    f"?kernel={quote(image.kernel, safe='')}&type={t}")
            add(_package(ids.new(f"module-{t}-{mod.name}"), mod.name, ms.source_version,
                         "sha256:" + (mod.sha256 if mod.parts else mod.file_sha256),
                         purl=purl, comment=f"Linux kernel module for kernel {image.kernel} ({t}, vermagic "
                                            f"{mod.vermagic.strip()!r}), {how}"),
                "CONTAINS")
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"gl-nvidia driver {manifest.driver_version} {image.kernel}",
        "documentNamespace": f"https://spdx.org/spdxdocs/gl-nvidia/{image.digest.removeprefix('sha256:')}",
        "creationInfo": {"created": layers.created(), "creators": [f"Tool: gl-nvidia-{gl_nvidia.__version__}"]},
        "packages": packages,
        "relationships": relationships,
    }


def _input(ids: _Ids, manifest: BundleManifest, file_name: str, sha256: str) -> dict[str, Any]:
    """One NVIDIA input of the bundle: a Debian package (name_version_arch.deb) or NVIDIA's .run."""
    m = _DEB_FILE.match(file_name)
    if m:
        purl = f"pkg:deb/debian/{quote(m['name'], safe='')}@{quote(m['version'], safe='')}?arch={m['arch']}"
        pkg = _package(ids.new(f"input-{m['name']}"), m["name"], m["version"], "sha256:" + sha256, purl=purl)
    else:
        pkg = _package(ids.new(f"input-{file_name}"), file_name, manifest.driver_version, "sha256:" + sha256,
                       supplier="Organization: NVIDIA Corporation")
    pkg["packageFileName"] = file_name
    return pkg


def _package(spdx_id: str, name: str, version: str | None, digest: str | None, *, purpose: str | None = None,
             purl: str | None = None, comment: str | None = None, supplier: str | None = None) -> dict[str, Any]:
    pkg: dict[str, Any] = {"SPDXID": spdx_id, "name": name, "downloadLocation": "NOASSERTION", "filesAnalyzed": False}
    if version:
        pkg["versionInfo"] = version
    if supplier:
        pkg["supplier"] = supplier
    if digest:
        pkg["checksums"] = [{"algorithm": "SHA256", "checksumValue": check_digest(digest).removeprefix("sha256:")}]
    if purpose:
        pkg["primaryPackagePurpose"] = purpose
    if purl:
        pkg["externalRefs"] = [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                "referenceLocator": purl}]
    if comment:
        pkg["comment"] = comment
    return pkg


class _Ids:
    """SPDX element ids (`SPDXRef-[A-Za-z0-9.-]+`), unique within the document."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def new(self, name: str) -> str:
        base = "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]+", "-", name)
        spdx_id, n = base, 1
        while spdx_id in self._seen:
            n += 1
            spdx_id = f"{base}-{n}"
        self._seen.add(spdx_id)
        return spdx_id


def attach(layout: Layout, image: Manifest, doc: dict[str, Any]) -> Manifest:
    """Store the SBOM in `layout` as a referrer of `image` (`subject`, `artifactType`), tagged the way
    cosign attaches SBOMs (`sha256-<hex>.sbom`) for registries without the referrers API."""
    blob = layout.write_blob(oci.canonical_json(doc), MEDIA_TYPE)
    empty = layout.write_blob(b"{}", oci.EMPTY)
    referrer = Manifest.build(empty, [blob], {"org.opencontainers.image.created": layers.created()},
                              artifact_type=MEDIA_TYPE, subject=image.descriptor)
    layout.add_image(referrer, [oci.attachment_tag(image.digest, "sbom")])
    return referrer

