"""The image stage: bundle -> OCI layout, checked with skopeo, umoci and ldconfig; pushed to a real registry."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest

from gl_nvidia.bundle import BundleManifest, OSRecord, apply_patch
from gl_nvidia.cli import main
from gl_nvidia.cli.image import image_cmd
from gl_nvidia.errors import UserError
from gl_nvidia.image import layers
from gl_nvidia.image.assemble import BuiltImage, ImageOptions, build_image, build_images
from gl_nvidia.image.tags import image_tags, kernel_arch
from gl_nvidia.node import layout as node_layout
from gl_nvidia.node.imagefiles import Image as NodeImage
from gl_nvidia.oci import CONFIG, INDEX, Layout, Manifest, canonical_json
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.transfer import pull_base, push
from tests.fixtures.bundle import DEBIAN_DRIVER, DEBIAN_KERNEL
from tests.fixtures.images import sh
from tests.fixtures.registry import Registry
from tests.fixtures.small_bundle import (
    BRANCH,
    KERNELS,
    TRIPLET,
    VERSION,
    edit_module_sets,
    make_bundle,
    with_extra_kernels,
    with_os,
    with_patch,
    with_split_nvidia,
)

K1, K2 = KERNELS
GL = ImageOptions(os_versions=("1877.3",))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def built(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> list[BuiltImage]:
    """Both kernels' images in one layout, on the real mmdebstrap base (cached after the first run)."""
    return build_images(bundle, None, tmp_path_factory.mktemp("out") / "layout", options=GL)


def unpack(layout: Path, tag: str, dest: Path) -> Path:
    sh("umoci", "unpack", "--image", f"{layout}:{tag}", dest)
    return dest / "rootfs"


def test_tags_follow_the_operator_rule(built: list[BuiltImage]) -> None:
    assert [i.kernel for i in built] == [K1, K2]
    assert built[0].tags == (
        f"{BRANCH}-{K1}-gardenlinux0", f"{VERSION}-{K1}-gardenlinux0", f"{BRANCH}-{K1}-gardenlinux1877.3",
    )
    sboms = tuple(f"sha256-{i.digest.removeprefix('sha256:')}.sbom" for i in built)
    assert set(Layout.open(built[0].layout).tags()) == set(built[0].tags + built[1].tags + sboms)


def test_skopeo_sees_entrypoint_env_and_labels(built: list[BuiltImage]) -> None:
    img = built[0]
    config = json.loads(sh("skopeo", "inspect", "--config", f"oci:{img.layout}:{img.tags[0]}"))["config"]
    assert config["Entrypoint"] == ["nvidia-driver"] and config["Cmd"] == ["init"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["DRIVER_VERSION"] == VERSION and env["DRIVER_BRANCH"] == BRANCH and env["KERNEL_VERSION"] == K1
    assert "/usr/local/bin" in env["PATH"]
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"  # the toolkit's hook leaves the driver container alone
    assert config["Labels"]["io.gardenlinux.nvidia.kernel"] == K1
    assert config["Labels"]["io.gardenlinux.nvidia.gardenlinux.versions"] == "1877.3"
    raw = json.loads(sh("skopeo", "inspect", "--raw", f"oci:{img.layout}:{img.tags[0]}"))
    assert raw["annotations"]["org.opencontainers.image.version"] == VERSION


def test_provenance_annotations_name_the_time_and_the_base_by_digest(built: list[BuiltImage]) -> None:
    """created from SOURCE_DATE_EPOCH (unset: 0); the mmdebstrap base is an image of its own in the layout,
    named by its manifest digest, and its one layer is the driver image's first."""
    layout = Layout.open(built[0].layout)
    annotations = json.loads(layout.resolve(built[0].tags[0]).raw)["annotations"]
    assert annotations["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    base = layout.manifest(annotations["org.opencontainers.image.base.digest"])
    assert [b.digest for b in base.layers] == [built[0].layers[0].digest]
    assert "org.opencontainers.image.base.name" not in annotations  # no registry reference for an mmdebstrap base
    assert json.loads(layout.read_blob(base.config.digest))["rootfs"]["diff_ids"] == \
        json.loads(layout.read_blob(layout.resolve(built[0].tags[0]).config.digest))["rootfs"]["diff_ids"][:1]


def _sbom(layout_dir: Path, image_digest: str) -> tuple[Manifest, dict[str, Any]]:
    layout = Layout.open(layout_dir)
    referrer = layout.resolve(f"sha256-{image_digest.removeprefix('sha256:')}.sbom")
    (doc,) = referrer.layers
    return referrer, json.loads(layout.read_blob(doc.digest))


def test_sbom_is_valid_spdx_and_lists_base_packages_nvidia_inputs_and_modules(
        built: list[BuiltImage], bundle: Path, rootfs_k1: Path, tmp_path: Path) -> None:
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    img = built[0]
    referrer, doc = _sbom(img.layout, img.digest)
    raw = json.loads(referrer.raw)
    assert referrer.digest == img.sbom
    assert raw["artifactType"] == "application/spdx+json" and raw["subject"]["digest"] == img.digest
    assert raw["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert [x.media_type for x in referrer.layers] == ["application/spdx+json"]
    (tmp_path / "sbom.spdx.json").write_text(json.dumps(doc))
    assert [m.validation_message for m in validate_full_spdx_document(parse_file(str(tmp_path / "sbom.spdx.json")))] == []

    packages = {p["SPDXID"]: p for p in doc["packages"]}
    assert packages["SPDXRef-Image"]["checksums"] == [{"algorithm": "SHA256",
                                                       "checksumValue": img.digest.removeprefix("sha256:")}]
    # The base's packages are those dpkg records in the image itself (what scanners read), with versions.
    status = (rootfs_k1 / "var/lib/dpkg/status").read_text()
    libc = re.search(r"^Package: libc6\n(?:.+\n)*?Version: (.+)$", status, re.M)
    assert libc is not None
    by_name = {p["name"]: p for p in doc["packages"]}
    assert by_name["libc6"]["versionInfo"] == libc.group(1)
    assert by_name["libc6"]["externalRefs"][0]["referenceLocator"].startswith("pkg:deb/debian/libc6@")
    installed = set(re.findall(r"^Package: (\S+)$", status, re.M))
    contained = {r["relatedSpdxElement"] for r in doc["relationships"]
                 if r["spdxElementId"] == "SPDXRef-Base" and r["relationshipType"] == "CONTAINS"}
    assert {packages[i]["name"] for i in contained} == installed and "python3" in installed
    # The NVIDIA inputs with their checksums; every module with its sha256 and kernel.
    manifest = BundleManifest.load(bundle)
    for name, sha in manifest.source_digests.items():
        assert by_name[name]["checksums"] == [{"algorithm": "SHA256", "checksumValue": sha}]
    modules = [p for p in doc["packages"] if p["SPDXID"].startswith("SPDXRef-module-")]
    expected = {(t, m.name, m.sha256) for t in ("open", "proprietary")
                for m in manifest.kernels[K1].module_sets[t].modules}
    assert {(p["SPDXID"].split("-")[2], p["name"], p["checksums"][0]["checksumValue"]) for p in modules} == expected
    assert all(f"kernel={K1}" in p["externalRefs"][0]["referenceLocator"] and K1 in p["comment"] for p in modules)


@pytest.fixture(scope="module")
def rootfs_k1(built: list[BuiltImage], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first kernel's image unpacked by umoci (an independent OCI implementation)."""
    return unpack(built[0].layout, built[0].tags[0], tmp_path_factory.mktemp("unpacked") / "b")


def test_umoci_unpacks_a_root_filesystem_with_driver_and_runtime(rootfs_k1: Path) -> None:
    rootfs = rootfs_k1
    for t in ("open", "proprietary"):
        assert (rootfs / str(node_layout.modules_dir(K1, t)).lstrip("/") / "nvidia.ko").is_file()
    assert not (rootfs / str(node_layout.modules_dir(K2, "open")).lstrip("/")).exists()
    assert (rootfs / f"usr/lib/{TRIPLET}/libcuda.so.{VERSION}").is_file()
    assert os.readlink(rootfs / f"usr/lib/{TRIPLET}/libcuda.so.1") == f"libcuda.so.{VERSION}"
    assert (rootfs / "usr/bin/nvidia-smi").stat().st_mode & 0o111
    # fabric manager and its config, where the node starts them from
    assert (rootfs / "usr/bin/nv-fabricmanager").stat().st_mode & 0o111
    assert (rootfs / "usr/share/nvidia/nvswitch/fabricmanager.cfg").read_text() == "FABRIC_MODE=0\n"
    # /lib is the base's symlink to usr/lib: the firmware layer must not have replaced it with a dir.
    assert (rootfs / "lib").is_symlink()
    assert (rootfs / str(node_layout.FIRMWARE_ROOT).lstrip("/") / VERSION / "gsp_ga10x.bin").is_file()
    entry = rootfs / str(node_layout.ENTRYPOINT).lstrip("/")
    assert entry.stat().st_mode & 0o111 and b"-m gl_nvidia.node" in entry.read_bytes()
    assert (rootfs / str(node_layout.PYTHON_SITE).lstrip("/") / "gl_nvidia/node/layout.py").is_file()
    for tool in ("usr/bin/python3", "usr/sbin/modprobe", "usr/bin/nsenter"):
        assert (rootfs / tool).exists(), tool
    manifest = json.loads((rootfs / str(node_layout.MANIFEST).lstrip("/")).read_text())
    assert list(manifest["kernels"]) == [K1] and manifest["driver_version"] == VERSION


def test_the_node_runtime_as_shipped_imports_with_the_standard_library_alone(rootfs_k1: Path) -> None:
    """Every gl_nvidia module the node imports is in the image (bundle.py, arches.py beside its package):
    the image's python3 finds nothing else, so imported here with no site-packages, only the image's copy."""
    site = rootfs_k1 / str(node_layout.PYTHON_SITE).lstrip("/")
    assert (site / "gl_nvidia/arches.py").is_file()
    modules = sorted(f"gl_nvidia.node.{p.stem}" for p in (site / "gl_nvidia/node").glob("*.py") if p.stem != "__main__")
    code = f"import sys; sys.path.insert(0, {str(site)!r}); import {', '.join(modules)}; import gl_nvidia; print(gl_nvidia.__file__)"
    out = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == str(site / "gl_nvidia/__init__.py")


def test_base_carries_no_locales_manuals_or_perl_but_keeps_licenses(rootfs_k1: Path) -> None:
    """Every node pulls the base: nothing a driver container never reads, but copyright files stay."""
    share = rootfs_k1 / "usr/share"
    assert not any((share / "locale").rglob("*.mo"))
    assert not any((share / "man").rglob("*.gz"))
    assert not (share / "perl").exists()  # perl-modules, pulled in by the usrmerge package (perl-base is Essential)
    assert (share / "doc/libc6/copyright").is_file()
    assert (rootfs_k1 / "usr/bin/python3").exists() and (rootfs_k1 / "usr/bin/ld").exists()


def test_base_carries_ibstat_whose_libraries_the_cache_resolves(rootfs_k1: Path) -> None:
    """NVIDIA's nvidia-fabricmanager-start.sh runs ibstat on NVLink5 nodes: the binary (not infiniband-diags'
    perl scripts) with its license, and every DT_NEEDED of it listed by the image's ld.so.cache at a file
    the image has."""
    from elftools.elf.elffile import ELFFile

    ibstat = rootfs_k1 / "usr/sbin/ibstat"
    assert os.access(ibstat, os.X_OK) and (rootfs_k1 / "usr/share/doc/infiniband-diags/copyright").is_file()
    assert not (rootfs_k1 / "usr/sbin/ibhosts").exists()  # the rest of the package (perl, shell) stays out
    with ibstat.open("rb") as fh:
        dynamic = ELFFile(fh).get_section_by_name(".dynamic")
        needed = [str(t.needed) for t in dynamic.iter_tags("DT_NEEDED")]  # type: ignore[union-attr]
    assert {"libibmad.so.5", "libibumad.so.3", "libc.so.6"} <= set(needed)
    listing = sh("ldconfig", "-p", "-C", rootfs_k1 / "etc/ld.so.cache")
    for lib in needed:
        found = re.search(rf"^\t{re.escape(lib)} \(libc6,x86-64\) => (\S+)$", listing, re.M)
        assert found and (rootfs_k1 / found[1].lstrip("/")).resolve().is_file(), lib


def test_ld_so_cache_lists_the_nvidia_libraries(rootfs_k1: Path) -> None:
    listing = sh("ldconfig", "-p", "-C", rootfs_k1 / "etc/ld.so.cache")
    assert f"libcuda.so.1 (libc6,x86-64) => /usr/lib/{TRIPLET}/libcuda.so.1" in listing
    assert f"libnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/{TRIPLET}/libnvidia-ml.so.1" in listing
    assert "libc.so.6" in listing  # the base's libraries stay listed


def test_two_kernels_share_every_layer_but_the_modules(built: list[BuiltImage]) -> None:
    a, b = built
    assert [x.digest for x in a.layers[:-1]] == [x.digest for x in b.layers[:-1]]
    assert a.layers[-1].digest != b.layers[-1].digest and a.layers[-1].name == f"modules {K1}"
    assert [x.name for x in a.layers[-5:-1]] == ["node-runtime", "userspace", "ld.so.cache", "firmware"]


def test_same_inputs_give_the_same_digest(bundle: Path, built: list[BuiltImage], tmp_path: Path) -> None:
    again = build_image(bundle, K1, tmp_path / "again", options=GL)
    assert again.digest == built[0].digest
    assert again.layers == built[0].layers
    assert again.sbom == built[0].sbom


def test_kernels_with_different_module_types_share_every_layer_below_their_own(tmp_path: Path) -> None:
    """K2 lost its open modules to an exclusion: moving a node from K1 (open + proprietary) to K2 still
    pulls only K2's modules layer, because NVIDIA's objects are one layer per module type."""
    bundle = edit_module_sets(with_split_nvidia(make_bundle(tmp_path / "bundle")), K2, open=None)
    k1, k2 = build_images(bundle, None, tmp_path / "layout", options=GL)
    assert (k1.module_types, k2.module_types) == (("open", "proprietary"), ("proprietary",))
    assert [x.name for x in k1.layers[-3:]] == ["binaries open", "binaries proprietary", f"modules {K1}"]
    assert [x.name for x in k2.layers[-2:]] == ["binaries proprietary", f"modules {K2}"]
    node_has = {x.digest for x in k1.layers}
    assert [x.name for x in k2.layers if x.digest not in node_has] == [f"modules {K2}"]
    # Only the way back pulls the open objects, once: K2's image never carried them.
    assert [x.name for x in k1.layers if x.digest not in {x.digest for x in k2.layers}] == [
        "binaries open", f"modules {K1}"]


def test_modules_of_another_version_than_the_userspace_are_left_out(tmp_path: Path) -> None:
    """Debian's open 535.261.03 modules beside the 535.309.01 userspace: the node would refuse them, so the
    image does not carry them; asked for explicitly, that is one error line."""
    bundle = make_bundle(tmp_path / "bundle")
    lagging = dataclasses.replace(BundleManifest.load(bundle).kernels[K1].module_sets["open"], source_version="535.261.03")
    edit_module_sets(bundle, K1, open=lagging)
    img = build_image(bundle, K1, tmp_path / "both", options=GL)
    assert img.module_types == ("proprietary",)
    rootfs = unpack(tmp_path / "both", img.tags[0], tmp_path / "b")
    assert not (rootfs / str(node_layout.modules_dir(K1, "open")).lstrip("/")).exists()
    manifest = json.loads((rootfs / str(node_layout.MANIFEST).lstrip("/")).read_text())
    assert list(manifest["kernels"][K1]["module_sets"]) == ["proprietary"]
    with pytest.raises(UserError, match=r"open modules for kernel .* are 535.261.03, not the driver 535.309.01"):
        build_image(bundle, K1, tmp_path / "open", options=dataclasses.replace(GL, module_types="open"))
    assert not (tmp_path / "open").exists()


def test_open_only_image_leaves_out_the_proprietary_modules(bundle: Path, built: list[BuiltImage], tmp_path: Path) -> None:
    img = build_image(bundle, K1, tmp_path / "open", options=ImageOptions(module_types="open"))
    assert img.module_types == ("open",) and img.layers[-1].size < built[0].layers[-1].size
    assert img.layers[:-1] == built[0].layers[:-1]
    rootfs = unpack(tmp_path / "open", img.tags[0], tmp_path / "b")
    assert not (rootfs / str(node_layout.modules_dir(K1, "proprietary")).lstrip("/")).exists()


def test_missing_bundle_file_is_a_clear_error(bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-a", str(bundle), str(broken)], check=True)
    (broken / "kernels" / K2 / "open" / "nvidia.ko").unlink()
    with pytest.raises(UserError, match=r"incomplete: .*/kernels/6.1.0-56-cloud-amd64/open/nvidia.ko is missing"):
        build_image(broken, K2, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    (broken / "manifest.json").unlink()
    assert main(["image", str(broken), "--kernel", K1, "--out", str(tmp_path / "out")]) == 2


def test_gardenlinux_base_for_a_missing_bundle_is_a_clear_error(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", str(tmp_path / "nope"), "--all", "--gardenlinux-repo", "http://127.0.0.1:9/gl",
                 "--gl-version", "1877.3", "--out", str(tmp_path / "out")]) == 2
    assert "is not a driver bundle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_other_os_without_a_version_names_the_option_image_takes(bundle: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    old = with_os(Path(shutil.copytree(bundle, tmp_path / "old", symlinks=True)), None)  # before bundles recorded it
    assert main(["image", str(old), "--kernel", K1, "--os-id", "debian", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no OS version given for os id 'debian'" in err and "--gl-version" in err
    assert "--gl-version" in [p.opts[0] for p in image_cmd.params]
    assert not (tmp_path / "out").exists()


def test_the_image_is_for_the_os_the_bundle_records(bundle: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`build` defaults to Debian 12: imaged without options, its bundle is tagged for Debian 12, not for
    Garden Linux; an option may repeat the record, never contradict it."""
    debian = with_os(Path(shutil.copytree(bundle, tmp_path / "debian", symlinks=True)), OSRecord("debian", ("12",)))
    img = build_image(debian, K1, tmp_path / "layout")
    assert img.tags == (f"{BRANCH}-{K1}-debian12", f"{VERSION}-{K1}-debian12")
    out = tmp_path / "out"
    for flags, why in ((["--os-id", "gardenlinux"], f"--os-id gardenlinux disagrees with bundle {debian}: kernel {K1} "
                                                    "was built for debian"),
                       (["--gl-version", "13"], f"--gl-version 13 disagrees with bundle {debian}: kernel {K1} was built "
                                                "for debian 12")):
        assert main(["image", str(debian), "--kernel", K1, *flags, "--out", str(out)]) == 2
        assert capsys.readouterr().err.splitlines()[0] == f"gl-nvidia: error: {why}"
    assert main(["image", str(debian), "--kernel", K1, "--os-id", "debian", "--gl-version", "12", "--out", str(out),
                 "--base", f"{tmp_path / 'layout'}:{img.tags[0]}"]) == 0  # repeating the record is fine
    old = with_os(Path(shutil.copytree(bundle, tmp_path / "old", symlinks=True)), None)
    assert main(["image", str(old), "--kernel", K1, "--out", str(tmp_path / "old-out")]) == 2
    assert "does not record the OS kernel" in capsys.readouterr().err
    assert not (tmp_path / "old-out").exists()


def test_the_image_takes_only_what_the_bundle_lists(bundle: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    changed = Path(shutil.copytree(bundle, tmp_path / "changed", symlinks=True))
    (changed / "userspace/etc").mkdir()
    (changed / "userspace/etc/ld.so.preload").write_text("/tmp/evil.so\n")
    out = tmp_path / "out"
    assert main(["image", str(changed), "--kernel", K1, "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"gl-nvidia: error: bundle {changed} holds userspace/etc/ld.so.preload, which its manifest does not list")
    assert not out.exists()


@pytest.mark.parametrize(("field", "value"), [
    ("module", "../../../etc/cron.d/x"), ("module", "a/b.ko"), ("userspace", "../../etc/passwd"),
    ("userspace", "/etc/passwd"), ("kernel", ".."), ("deep", "[" * 100000), ("digits", "9" * 5000)])
def test_a_bundle_manifest_with_names_that_leave_the_bundle_is_refused(field: str, value: str, bundle: Path,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    hostile = Path(shutil.copytree(bundle, tmp_path / "hostile", symlinks=True))
    doc = json.loads((hostile / "manifest.json").read_text())
    text = None
    if field == "module":
        doc["kernels"][K1]["module_sets"]["open"]["modules"][0]["name"] = value
    elif field == "userspace":
        doc["userspace"][0]["path"] = value
    elif field == "kernel":
        doc["kernels"][value] = doc["kernels"].pop(K1)
    else:
        text = json.dumps(doc).replace('"schema": 1', f'"schema": 1, "x": {value}' + ("]" * 100000 if field == "deep"
                                                                                        else ""))
    (hostile / "manifest.json").write_text(text or json.dumps(doc))
    assert main(["image", str(hostile), "--all", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gl-nvidia: error: bundle manifest {hostile}/manifest.json is invalid: "), err
    assert not (tmp_path / "out").exists()


def test_unknown_kernel_names_the_kernels_the_bundle_holds(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"no modules for kernel 6.12.9-cloud-amd64 .*holds {K1}, {K2}"):
        build_image(bundle, "6.12.9-cloud-amd64", tmp_path / "out")


def test_unwritable_output_is_a_clear_error(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"cannot write image layout .*: {tmp_path}/file is a file, not a directory"):
        build_image(bundle, K1, tmp_path / "file" / "layout")
    with pytest.raises(UserError, match=f"cannot write image layout .*: {tmp_path}/file is a file, not a directory"):
        build_image(bundle, K1, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_tag_invalid_characters_are_refused(tmp_path: Path) -> None:
    bad = make_bundle(tmp_path / "bundle", kernels=("6.12.57~rc1-cloud-amd64",))
    with pytest.raises(UserError, match=r"invalid tag '535-6\.12\.57~rc1"):
        build_image(bad, "6.12.57~rc1-cloud-amd64", tmp_path / "out")


def test_arm64_images_are_tagged_apart_by_the_kernel_name_alone() -> None:
    """The operator's tag carries the kernel, not the arch: the kernel name's suffix keeps them apart."""
    assert image_tags("580.95.05", "580", "6.12.72-cloud-arm64", "gardenlinux", ("1877.3",)) == [
        "580-6.12.72-cloud-arm64-gardenlinux0", "580.95.05-6.12.72-cloud-arm64-gardenlinux0",
        "580-6.12.72-cloud-arm64-gardenlinux1877.3"]
    assert [kernel_arch(k) for k in ("6.12.72-cloud-arm64", "6.1.0-56-arm64", "6.12.117+deb12-amd64", "6.1.0")] == [
        "arm64", "arm64", "amd64", None]


def test_an_arm64_kernel_in_an_amd64_bundle_is_refused(tmp_path: Path) -> None:
    """Its image would carry amd64 files under the arm64 image's tags."""
    bad = make_bundle(tmp_path / "bundle", kernels=("6.1.0-56-cloud-arm64",))
    with pytest.raises(UserError, match=r"kernel 6\.1\.0-56-cloud-arm64 is an arm64 kernel, but bundle .* is amd64"):
        build_image(bad, "6.1.0-56-cloud-arm64", tmp_path / "out")


def test_base_without_the_node_tools_is_refused(bundle: Path, tmp_path: Path) -> None:
    base = Layout.create(tmp_path / "busy")
    layer = layers.write_layer(base, [layers.Entry(PurePosixPath("/bin/sh"), data=b"#!/bin/sh\n", mode=0o755)])
    cfg = base.write_blob(canonical_json({"architecture": "amd64", "os": "linux",
                                          "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}), CONFIG)
    base.add_image(Manifest.build(cfg, [layer.descriptor], {}), ["v1"])
    with pytest.raises(UserError, match="lacks python3, kmod \\(modprobe\\), util-linux"):
        build_image(bundle, K1, tmp_path / "out", base=f"{tmp_path / 'busy'}:v1")


def test_a_base_of_another_architecture_is_refused(bundle: Path, tmp_path: Path) -> None:
    """An arm64 base under an amd64 bundle's userspace and modules: refused before any layer is written."""
    base = Layout.create(tmp_path / "arm")
    layer = layers.write_layer(base, [layers.Entry(PurePosixPath("/bin/sh"), data=b"#!/bin/sh\n", mode=0o755)])
    cfg = base.write_blob(canonical_json({"architecture": "arm64", "os": "linux",
                                          "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}), CONFIG)
    base.add_image(Manifest.build(cfg, [layer.descriptor], {}), ["v1"])
    with pytest.raises(UserError, match=r"base image .*arm:v1 is for arm64, but bundle .* is amd64"):
        build_image(bundle, K1, tmp_path / "out", base=f"{tmp_path / 'arm'}:v1")
    assert not (tmp_path / "out").exists()  # no empty layout, no imported blobs
    kept = Layout.create(tmp_path / "kept")  # a layout added to: as it was, index and blobs
    kept.write_blob(b"an earlier image's blob", CONFIG)
    before = {p.name: p.read_bytes() for p in (tmp_path / "kept").rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"is for arm64"):
        build_image(bundle, K1, tmp_path / "kept", base=f"{tmp_path / 'arm'}:v1")
    assert {p.name: p.read_bytes() for p in (tmp_path / "kept").rglob("*") if p.is_file()} == before


def test_a_patched_module_ships_its_patch_per_kernel_and_its_binary_in_the_shared_layer(tmp_path: Path) -> None:
    """IBT kernels: the node rebuilds nvidia.ko from the patch, so the image carries neither the interface
    nor module.lds (nor any objtool) for it; the binary stays in the layer every kernel shares."""
    bundle = with_patch(with_split_nvidia(make_bundle(tmp_path / "bundle", kernels=(K1,))))
    img = build_image(bundle, K1, tmp_path / "out", options=GL)
    assert [x.name for x in img.layers[-3:]] == ["binaries open", "binaries proprietary", f"modules {K1}"]
    rootfs = unpack(tmp_path / "out", img.tags[0], tmp_path / "root")
    for t in ("open", "proprietary"):
        here = rootfs / str(node_layout.modules_dir(K1, t)).lstrip("/")
        assert sorted(p.name for p in here.iterdir()) == [
            "nvidia-modeset.ko", "nvidia-uvm.ko", "nvidia.patch"]
        node_image = NodeImage.load(rootfs)
        node_image.verify(K1, t, "nvidia")  # the patch and the binary are the manifest's
        patched = node_image.patched_module(K1, t, "nvidia")
        assert patched is not None and patched.binary.is_file()
        assert bytes(apply_patch(patched.patch.read_bytes(), patched.binary.read_bytes())).startswith(b"module of ")


def test_a_base_layout_whose_blobs_are_not_their_digests_is_refused(bundle: Path, tmp_path: Path) -> None:
    """--base LAYOUT: every blob imported from it must hash to the digest the manifest names."""
    base = Layout.create(tmp_path / "base")
    layer = layers.write_layer(base, [layers.Entry(PurePosixPath("/bin/sh"), data=b"#!/bin/sh\n", mode=0o755)])
    cfg = base.write_blob(canonical_json({"architecture": "amd64", "os": "linux",
                                          "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}), CONFIG)
    manifest = Manifest.build(cfg, [layer.descriptor], {})
    base.add_image(manifest, ["v1"])
    other = layers.write_layer(Layout.create(tmp_path / "other"), [layers.Entry(PurePosixPath("/x"), data=b"x")])
    layer_file = base.blob_path(layer.descriptor.digest)
    good = layer_file.read_bytes()
    layer_file.write_bytes(Layout(tmp_path / "other").read_blob(other.descriptor.digest))  # swapped content
    with pytest.raises(UserError, match=f"is not blob {layer.descriptor.digest}: its content has digest"):
        build_image(bundle, K1, tmp_path / "out", base=f"{tmp_path / 'base'}:v1")
    assert not Layout(tmp_path / "out").has_blob(layer.descriptor.digest)
    layer_file.write_bytes(good)
    base.blob_path(manifest.digest).write_bytes(manifest.raw.replace(b'"layers"', b'"layers" '))
    with pytest.raises(UserError, match=f"manifest {manifest.digest} in .* has digest"):
        build_image(bundle, K1, tmp_path / "out", base=f"{tmp_path / 'base'}:v1")


def test_existing_image_in_a_registry_as_base(bundle: Path, built: list[BuiltImage], registry: Registry,
                                              tmp_path: Path) -> None:
    """--base REGISTRY/REPO:TAG: a previous driver image (it has python3, kmod, util-linux) works as a base."""
    push(built[0].layout, f"{registry.host}/base:{built[0].tags[0]}")
    base = pull_base(f"{registry.host}/base:{built[0].tags[0]}", tmp_path / "pulled", "amd64")  # as `image --base`
    img = build_image(bundle, K1, tmp_path / "out", base=base, options=GL)
    assert [x.digest for x in img.layers[: len(built[0].layers)]] == [x.digest for x in built[0].layers]
    assert len(img.layers) == len(built[0].layers) * 2 - 1  # its layers, then ours above them
    annotations = json.loads(Layout.open(tmp_path / "out").resolve(img.tags[0]).raw)["annotations"]
    assert annotations["org.opencontainers.image.base.name"] == f"{registry.host}/base:{built[0].tags[0]}"
    assert annotations["org.opencontainers.image.base.digest"] == built[0].digest


def test_a_multi_platform_base_gives_the_bundles_arch(bundle: Path, built: list[BuiltImage], registry: Registry,
                                                     tmp_path: Path) -> None:
    """--base naming an index (how registries publish debian:bookworm): the linux/<arch> image is pulled,
    by digest; an index without that platform is one line naming what it has."""
    arm = Layout.create(tmp_path / "arm")
    layer = layers.write_layer(arm, [layers.Entry(PurePosixPath("/bin/sh"), data=b"arm64 sh", mode=0o755)])
    cfg = arm.write_blob(canonical_json({"architecture": "arm64", "os": "linux",
                                         "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}), CONFIG)
    arm.add_image(Manifest.build(cfg, [layer.descriptor], {}), ["arm64"])
    push(built[0].layout, f"{registry.host}/multi:{built[0].tags[0]}")
    push(tmp_path / "arm", f"{registry.host}/multi:arm64")
    amd_manifest = Layout.open(built[0].layout).resolve(built[0].tags[0])
    arm_manifest = arm.resolve("arm64")

    def index(*entries: tuple[Manifest, str]) -> bytes:
        return canonical_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
            {**m.descriptor.as_dict(), "platform": {"os": "linux", "architecture": a}} for m, a in entries]})

    def put_index(tag: str, body: bytes) -> None:
        httpx.put(f"http://{registry.host}/v2/multi/manifests/{tag}", content=body,
                  headers={"Content-Type": INDEX}).raise_for_status()

    put_index("bookworm", index((arm_manifest, "arm64"), (amd_manifest, "amd64")))
    raw = json.loads(sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/multi:bookworm"))
    assert raw["mediaType"] == INDEX  # what the registry serves is an index, not an image
    pulled = pull_base(f"{registry.host}/multi:bookworm", tmp_path / "pulled", "amd64")
    assert Layout.open(tmp_path / "pulled").resolve("base").digest == amd_manifest.digest
    img = build_image(bundle, K1, tmp_path / "out", base=pulled, options=GL)
    assert img.layers[0].digest == built[0].layers[0].digest
    pull_base(f"{registry.host}/multi:bookworm", tmp_path / "a", "arm64")
    assert Layout.open(tmp_path / "a").resolve("base").digest == arm_manifest.digest
    put_index("amd64-only", index((amd_manifest, "amd64")))
    with pytest.raises(UserError, match=rf"^{registry.host}/multi:amd64-only has no linux/arm64 image \(its index "
                                        r"lists linux/amd64\)"):
        pull_base(f"{registry.host}/multi:amd64-only", tmp_path / "b", "arm64")


def test_push_built_images_and_verify_in_the_registry(built: list[BuiltImage], registry: Registry, tmp_path: Path) -> None:
    repo = f"{registry.host}/gardenlinux/driver"
    first = push(built[0].layout, repo)
    shared = len(built[0].layers) - 1
    # shared layers once, 2 module layers, 2 configs; 2 SBOMs and their empty config
    assert sum(r.uploaded for r in first) == shared + 2 + 2 + 3
    second = push(built[0].layout, repo)
    assert sum(r.uploaded for r in second) == 0 and sum(r.bytes_uploaded for r in second) == 0

    tags = json.loads(sh("skopeo", "list-tags", "--tls-verify=false", f"docker://{repo}"))["Tags"]
    sboms = [f"sha256-{i.digest.removeprefix('sha256:')}.sbom" for i in built]
    assert set(tags) == {*built[0].tags, *built[1].tags, *sboms}
    # The SBOM by its tag (cosign's fallback) and by digest (the OCI 1.1 referrer), pointing at its image.
    for ref in (f"{repo}:{sboms[1]}", f"{repo}@{built[1].sbom}"):
        raw = json.loads(sh("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"))
        assert raw["subject"]["digest"] == built[1].digest and raw["artifactType"] == "application/spdx+json"
    info = json.loads(sh("skopeo", "inspect", "--tls-verify=false", f"docker://{repo}:{BRANCH}-{K2}-gardenlinux0"))
    assert info["Digest"] == built[1].digest
    assert any(e == f"KERNEL_VERSION={K2}" for e in info["Env"])
    # the registry holds the userspace layer once, shared by both kernels' manifests
    other = json.loads(sh("skopeo", "inspect", "--tls-verify=false", f"docker://{repo}:{BRANCH}-{K1}-gardenlinux0"))
    assert info["Layers"][:-1] == other["Layers"][:-1] and info["Layers"][-1] != other["Layers"][-1]

    sh("skopeo", "copy", "--src-tls-verify=false", f"docker://{repo}:{VERSION}-{K2}-gardenlinux0", f"oci:{tmp_path / 'copy'}:x")
    rootfs = unpack(tmp_path / "copy", "x", tmp_path / "b")
    assert (rootfs / str(node_layout.modules_dir(K2, "proprietary")).lstrip("/") / "nvidia-uvm.ko").is_file()
    assert (rootfs / f"usr/lib/{TRIPLET}/libnvidia-ml.so.{VERSION}").is_file()


def test_cli_builds_and_pushes(bundle: Path, registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "layout"
    assert main(["image", str(bundle), "--kernel", K1, "--out", str(out), "--json", "--revision", "0123abc",
                 "--source-url", "https://github.com/gardenlinux/gardenlinux-nvidia-installer"]) == 0
    images = json.loads(capsys.readouterr().out)
    annotations = json.loads(Layout.open(out).resolve(images[0]["tags"][0]).raw)["annotations"]
    assert annotations["org.opencontainers.image.revision"] == "0123abc"
    assert annotations["org.opencontainers.image.source"] == "https://github.com/gardenlinux/gardenlinux-nvidia-installer"
    assert images[0]["kernel"] == K1 and images[0]["tags"][0] == f"{BRANCH}-{K1}-gardenlinux0"
    assert main(["push", str(out), f"{registry.host}/driver:{images[0]['tags'][0]}", "--json"]) == 0
    pushed = json.loads(capsys.readouterr().out)
    assert pushed[0]["digest"] == images[0]["digest"]
    assert pushed[1]["tags"] == [f"sha256-{images[0]['digest'].removeprefix('sha256:')}.sbom"]  # one tag, its SBOM too
    assert main(["push", str(out), f"{registry.host}/driver:bad+tag"]) == 2
    assert "invalid tag 'bad+tag'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_debian_bundle_image_in_a_registry(debian_bundle: Path, registry: Registry, tmp_path: Path) -> None:
    """The build stage's real bundle (Debian's 535 driver, proprietary modules for 6.1.0-56) end to end:
    two kernels share every layer but the modules in the registry; the cache lists the real libraries."""
    real_kernel = DEBIAN_KERNEL
    two = with_extra_kernels(debian_bundle, tmp_path / "bundle", ("6.1.0-47-cloud-amd64",))
    images = sorted(build_images(two, None, tmp_path / "layout", options=ImageOptions(os_id="debian", os_versions=("12",))),
                    key=lambda i: i.kernel != real_kernel)
    assert images[0].tags == (f"535-{real_kernel}-debian12", f"{DEBIAN_DRIVER}-{real_kernel}-debian12")
    repo = f"{registry.host}/driver"
    first = [r for r in push(tmp_path / "layout", repo) if not r.tags[0].endswith(".sbom")]
    assert [r.skipped for r in first] == [0, len(images[0].layers) - 1]
    with RegistryClient(registry.host) as c:
        m1 = c.get_manifest("driver", images[0].tags[0])
        m2 = c.get_manifest("driver", images[1].tags[0])
    assert m1 is not None and m2 is not None
    assert m1.layers[:-1] == m2.layers[:-1] and m1.layers[-1] != m2.layers[-1]
    assert sum(r.uploaded for r in push(tmp_path / "layout", repo)) == 0

    sh("skopeo", "copy", "--src-tls-verify=false", f"docker://{repo}:{images[0].tags[0]}", f"oci:{tmp_path / 'copy'}:x")
    rootfs = unpack(tmp_path / "copy", "x", tmp_path / "b")
    # nvidia.ko and nvidia-modeset.ko ship split: per-kernel interface + module.lds in the modules layer,
    # NVIDIA's kernel-independent objects once in the binaries layer below it
    assert [x.name for x in images[0].layers[-6:]] == [
        "node-runtime", "userspace", "ld.so.cache", "firmware", "binaries proprietary", f"modules {real_kernel}"]
    kos = sorted(p.name for p in (rootfs / str(node_layout.modules_dir(real_kernel, "proprietary")).lstrip("/")).iterdir())
    assert kos == ["module.lds", "nvidia-drm.ko", "nvidia-modeset.o", "nvidia-peermem.ko", "nvidia-uvm.ko", "nvidia.o"]
    bins = rootfs / str(node_layout.binaries_dir("proprietary")).lstrip("/")
    assert sorted(p.name for p in bins.iterdir()) == ["nv-kernel.o", "nv-modeset-kernel.o"]
    assert images[0].layers[-1].size * 10 < images[0].layers[-2].size  # the per-kernel layer is the small one
    listing = sh("ldconfig", "-p", "-C", rootfs / "etc/ld.so.cache")
    assert "libcuda.so.1 (libc6,x86-64)" in listing and "libnvidia-ml.so.1 (libc6,x86-64)" in listing
    assert (rootfs / "usr/bin/nvidia-smi").is_file()
    assert list((rootfs / str(node_layout.FIRMWARE_ROOT).lstrip("/")).glob("*/gsp_*.bin"))
    # Debian packages no fabric manager, IMEX or nvlsm: the node reads why from the image (and says it
    # on NVSwitch nodes)
    node_manifest = json.loads((rootfs / str(node_layout.MANIFEST).lstrip("/")).read_text())
    assert node_manifest["left_out"]["fabricmanager"] == (f"no fabric manager for {DEBIAN_DRIVER} in Debian "
                                                          "(the archive's nvidia-fabricmanager: no such package)")
    assert sorted(node_manifest["left_out"]) == ["fabricmanager", "gdrcopy", "imex", "libnvidia_nscq", "libnvsdm",
                                               f"nvidia-fs {DEBIAN_KERNEL}", "nvlsm"]
    assert not (rootfs / "usr/bin/nv-fabricmanager").exists()
