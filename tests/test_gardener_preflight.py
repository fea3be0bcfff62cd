"""preflight on Gardener's documents: every Garden Linux version a CloudProfile offers, each GPU worker pool
of a Shoot, against a real registry holding the images `image` tags; bad documents are one line, exit 2."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pytest

from gl_nvidia.cli import main
from gl_nvidia.deploy.gardener import flavour_of, parse_cloudprofile, parse_shoot
from gl_nvidia.errors import UserError
from gl_nvidia.image import layers
from gl_nvidia.image.tags import image_tags
from gl_nvidia.oci import CONFIG, Layout, Manifest, canonical_json
from gl_nvidia.registry.transfer import push
from tests.fixtures.registry import Registry

DATA = Path(__file__).parent / "data" / "gardener"
NOW = datetime(2026, 12, 5, tzinfo=UTC)
KERNELS = {"1877.2": "6.12.44", "1877.3": "6.12.72", "2150.8.0": "6.18.3", "2150.9.0": "6.18.9"}
DRIVERS = {"590": "590.48.01", "580": "580.105.08"}
LOCK = """\
schema: 1
os: {id: gardenlinux}
policy:
  arches: [amd64, arm64]
  flavours: [cloud]
sources:
  glrd: [glrd.json]
  nvidia: releases.json
  apt: file:///nonexistent
resolved:
  today: 2026-12-01
  os_versions: [""" + ", ".join(f"{{version: '{v}'}}" for v in KERNELS) + """]
  drivers:
    - {branch: '590', type: new feature branch, version: 590.48.01}
    - {branch: '580', type: production branch, version: 580.105.08}
  kernels:
""" + "".join(f"    - {{os_version: '{v}', flavour: cloud, arch: {a}, kernel: {k}-cloud-{a}}}\n"
              for v, k in KERNELS.items() for a in ("amd64", "arm64"))


def publish(registry: Registry, tmp_path: Path, cells: Iterable[tuple[str, str]], branches: Iterable[str] = DRIVERS
            ) -> None:
    """The tags `image` gives each (GL version, arch) cell's image for these branches: one tiny image, many tags."""
    tags = [t for version, arch in cells for b, full in DRIVERS.items() if b in branches
            for t in image_tags(full, b, f"{KERNELS[version]}-cloud-{arch}", "gardenlinux", (version,))]
    layout = Layout.create(tmp_path / "layout")
    layer = layers.write_layer(layout, [layers.Entry(PurePosixPath("/x"), data=b"x")])
    cfg = layout.write_blob(canonical_json({"architecture": "amd64", "os": "linux",
                                            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}), CONFIG)
    layout.add_image(Manifest.build(cfg, [layer.descriptor], {}), tags)
    push(tmp_path / "layout", f"{registry.host}/gl/driver")


def preflight(tmp_path: Path, registry: Registry, *args: str) -> int:
    lock = tmp_path / "versions.yaml"
    lock.write_text(LOCK)
    return main(["preflight", "--lock", str(lock), "--registry", f"{registry.host}/gl", *args])


OFFERED = [(v, a) for v in ("2150.9.0", "2150.8.0") for a in ("amd64", "arm64")] + [("1877.3", "amd64")]


def test_every_version_the_landscape_offers_has_its_images(registry: Registry, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # preview, supported and deprecated versions count; 1877.2.0 and 1443.3.0 expired: none of their images exist
    publish(registry, tmp_path, OFFERED)
    assert preflight(tmp_path, registry, "--cloudprofile", str(DATA / "cloudprofile.yaml"), "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["subject"].split(" ", 2)[:2][0] for r in rows} == {"2150.9.0", "2150.8.0", "1877.3.0"}
    assert len(rows) == 5 * 2 * 2  # 5 (version, arch) cells x 2 branches x (branch, full version) tags
    assert all(r["ok"] for r in rows)
    # 1877.3.0 names no architectures: Gardener's default, amd64, only
    assert not [r for r in rows if r["subject"].startswith("1877.3.0") and "arm64" in r["subject"]]


def test_an_offered_version_without_images_fails_and_names_them(registry: Registry, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    publish(registry, tmp_path, [c for c in OFFERED if c != ("2150.9.0", "arm64")])
    assert preflight(tmp_path, registry, "--cloudprofile", str(DATA / "cloudprofile.yaml")) == 1
    err = capsys.readouterr().err
    assert "4 of 20 driver images are missing" in err
    assert f"{registry.host}/gl/driver:590-6.18.9-cloud-arm64-gardenlinux0" in err


def test_each_gpu_pool_on_its_version_and_arch(registry: Registry, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # gpu-h100 (amd64) and gpu-graviton (arm64) run 2150.8.0, which has images; gpu-next runs 2150.9.0, which has
    # none; cpu-worker's 1877.2.0 has none either, but its m5.large has no GPU
    publish(registry, tmp_path, [("2150.8.0", "amd64"), ("2150.8.0", "arm64")])
    assert preflight(tmp_path, registry, "--shoot", str(DATA / "shoot.yaml"), "--cloudprofile",
                     str(DATA / "cloudprofile.yaml"), "--json") == 1
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    pools = {r["subject"].split(" ")[1] for r in rows}
    assert pools == {"gpu-h100", "gpu-graviton", "gpu-next"}
    assert all(r["ok"] for r in rows if not r["subject"].startswith("pool gpu-next"))
    assert any("cloud/arm64" in r["subject"] for r in rows if r["subject"].startswith("pool gpu-graviton"))
    missing = [r["reference"] for r in rows if not r["ok"]]
    assert len(missing) == 4 and all("6.18.9-cloud-amd64" in m for m in missing)
    assert "4 of 12 driver images are missing" in captured.err
    assert f"{registry.host}/gl/driver:590-6.18.9-cloud-amd64-gardenlinux0" in captured.err


def test_without_the_cloudprofile_every_garden_linux_pool_counts(registry: Registry, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    publish(registry, tmp_path, [("2150.8.0", "amd64"), ("2150.8.0", "arm64"), ("2150.9.0", "amd64")])
    assert preflight(tmp_path, registry, "--shoot", str(DATA / "shoot.yaml")) == 1
    err = capsys.readouterr().err
    assert "which machine types have GPUs is unknown" in caplog.text
    assert "4 of 16 driver images are missing" in err
    assert "590-6.12.44-cloud-amd64-gardenlinux0" in err  # cpu-worker's 1877.2.0


def test_with_values_only_the_driver_they_deploy_counts(registry: Registry, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # only the 590 branch is published for the GPU pools' versions: enough for a cluster whose values say 590
    publish(registry, tmp_path, [(v, a) for v in ("2150.8.0", "2150.9.0") for a in ("amd64", "arm64")], ["590"])
    lock = tmp_path / "versions.yaml"
    lock.write_text(LOCK)
    values = tmp_path / "values.yaml"
    args = ["--shoot", str(DATA / "shoot.yaml"), "--cloudprofile", str(DATA / "cloudprofile.yaml")]
    for branch, rc in (("590", 0), ("580", 1)):
        assert main(["values", "--lock", str(lock), "--repository", f"{registry.host}/gl", "--driver-branch", branch,
                     "--out", str(values)]) == 0
        assert main(["preflight", "--lock", str(lock), *args, "--values", str(values), "--json"]) == rc
        rows = json.loads(capsys.readouterr().out)
        assert len(rows) == 3 and all(f" {branch} cloud/" in r["subject"] for r in rows)  # one image per pool
    assert preflight(tmp_path, registry, *args) == 1  # every tracked branch: 580 is missing
    values.write_text(values.read_text().replace("version: '580'", "version: '470'"))
    assert main(["preflight", "--lock", str(lock), *args, "--values", str(values)]) == 1
    assert "driver.version 470 is not a driver the lock tracks" in capsys.readouterr().err
    values.write_text("driver: {usePrecompiled: false, version: '590'}\n")
    assert main(["preflight", "--lock", str(lock), *args, "--values", str(values)]) == 2
    assert "does not deploy precompiled driver images" in capsys.readouterr().err


def test_lifecycle_and_expiry_as_gardener_reads_them() -> None:
    text = (DATA / "cloudprofile.yaml").read_text()
    states = {v.version: v.classification for v in parse_cloudprofile(text, "cp", NOW).versions}
    assert states == {"2150.9.0": "preview", "2150.8.0": "supported", "1877.3.0": "deprecated",
                      "1877.2.0": "expired", "1443.3.0": "expired"}
    staged = parse_cloudprofile(text.replace("          classification: preview\n", """\
          lifecycle:
          - classification: preview
          - classification: supported
            startTime: "2026-12-01T00:00:00Z"
          - classification: expired
            startTime: "2027-06-01T00:00:00Z"
"""), "cp", NOW)
    assert staged.versions[0].classification == "supported"
    assert parse_cloudprofile(text.replace("          classification: preview\n", """\
          lifecycle:
          - classification: preview
            startTime: "2027-01-01T00:00:00Z"
"""), "cp", NOW).versions[0].classification == "unavailable"  # announced, not yet offered
    assert flavour_of("aws") == "cloud" and flavour_of("openstack") == "cloud" and flavour_of("metal") == "metal"
    assert parse_shoot((DATA / "shoot.yaml").read_text(), "s").cloud_profile == "aws"


def test_a_bare_metal_landscape_needs_metal_kernels(registry: Registry, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cp = tmp_path / "metal.yaml"
    cp.write_text((DATA / "cloudprofile.yaml").read_text().replace("  type: aws\n", "  type: metal\n"))
    publish(registry, tmp_path, OFFERED)
    assert preflight(tmp_path, registry, "--cloudprofile", str(cp)) == 1
    assert "no metal/amd64 kernel of gardenlinux 2150.9.0 in the lock" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "text", "error"), [
    ("cloudprofile", "kind: CloudProfile\napiVersion: core.gardener.cloud/v1beta1\nspec: {type: aws}\n",
     "not a core.gardener.cloud/v1beta1 CloudProfile: spec.machineImages: Field required"),
    ("cloudprofile", (DATA / "cloudprofile.yaml").read_text().replace("- version: 2150.8.0", "- versio: 2150.8.0"),
     "spec.machineImages.0.versions.1.version: Field required"),
    ("cloudprofile", (DATA / "shoot.yaml").read_text(), "not a core.gardener.cloud/v1beta1 CloudProfile: kind"),
    ("cloudprofile", (DATA / "cloudprofile.yaml").read_text().replace("classification: preview",
                                                                       "classification: beta"),
     "spec.machineImages.0.versions.0.classification"),
    ("cloudprofile", "spec: [", "malformed YAML"),
    ("cloudprofile", "- a\n", "expected a core.gardener.cloud/v1beta1 document"),
    ("shoot", (DATA / "shoot.yaml").read_text().replace("    type: aws\n", ""), "spec.provider.type: Field required"),
    ("shoot", (DATA / "shoot.yaml").read_text().replace("          version: 2150.9.0\n", ""),
     "worker pool gpu-next names no machine image version"),
    ("shoot", (DATA / "shoot.yaml").read_text().replace("core.gardener.cloud/v1beta1", "core.gardener.cloud/v1alpha1"),
     "not a core.gardener.cloud/v1beta1 Shoot: apiVersion"),
])
def test_malformed_documents_are_one_line_and_exit_two(name: str, text: str, error: str, registry: Registry,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / f"{name}.yaml"
    doc.write_text(text)
    assert preflight(tmp_path, registry, f"--{name}", str(doc)) == 2
    err = capsys.readouterr().err
    assert error in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_gardener_checks_do_not_mix_with_the_others(tmp_path: Path, registry: Registry,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert preflight(tmp_path, registry, "--cloudprofile", str(DATA / "cloudprofile.yaml"),
                     "--gl-version", "1877.3") == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main(["preflight", "--lock", "debian", "--cloudprofile", str(DATA / "cloudprofile.yaml")]) == 2
    assert "the lock is of debian" in capsys.readouterr().err
    with pytest.raises(UserError, match="uses CloudProfile aws, not gcp"):
        from gl_nvidia.catalog.lock import parse_lock_text
        from gl_nvidia.deploy.imagecheck import ImageChecker
        from gl_nvidia.deploy.preflight import Wanted, shoot_results

        lock = parse_lock_text(LOCK, "lock")[0]
        assert lock.resolved is not None
        profile = parse_cloudprofile((DATA / "cloudprofile.yaml").read_text().replace("name: aws", "name: gcp"),
                                     "cp", NOW)
        with ImageChecker() as checker:
            shoot_results(parse_shoot((DATA / "shoot.yaml").read_text(), "s"), profile, lock, lock.resolved,
                          Wanted(f"{registry.host}/gl"), checker)
