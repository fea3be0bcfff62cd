"""The main job's shape on real bytes: the embedded debian profile released with its two OS versions side by
side, Debian 12 (6.1, 535 proprietary) and Debian 13 (6.12+deb13, 550 open and proprietary), read back
from the OCI layout with an independent client, pushed to a real registry, and `preflight` for a cluster
moving from 12 to 13 naming what exists there, what does not and why (the images excluded from the default,
and the operator's own tag rule, which cannot name Debian 13's `+` kernels).

The profile is narrowed to one cloud amd64 unit per OS version, the compiles other fixtures make
(`debian_bundle`'s kernel for 12, `trixie_unit` for 13), so this test compiles nothing of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.run import output

from .fixtures.bundle import DEBIAN_DRIVER, DEBIAN_KERNEL
from .fixtures.kube import CLUSTER_POLICY, FakeCluster, node_json, serve, write_kubeconfig
from .fixtures.registry import Registry
from .fixtures.trixie import TrixieUnit, narrowed_profile

pytestmark = pytest.mark.slow  # the compiles of two fixtures, two image builds (two bases) and a push

LEFT_OUT = "left out of the default for the main job's time: --profile a copy without this rule"


def test_the_release_holds_each_os_versions_branches_and_module_types_and_preflight_names_the_gaps(
        debian_bundle: Path, trixie_unit: TrixieUnit, registry: Registry, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    lock = narrowed_profile(tmp_path / "lock.yaml", (
        "{os_version: '12', flavour: metal, reason: one unit per OS version}",
        "{os_version: '12', arch: arm64, reason: one unit per OS version}"),
        (f"{{os_version: '12', flavour: cloud, arch: amd64, kernel: {DEBIAN_KERNEL}}}",))
    repo = f"{registry.host}/gl-nvidia"
    out = tmp_path / "out"
    assert main(["release", "--profile", str(lock), "--out", str(out), "--registry", repo, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    thirteen, version13 = trixie_unit.kernel, trixie_unit.result.unit.driver_version
    assert [(u["unit"]["kernel"], u["build"]) for u in report["units"]] == [
        (DEBIAN_KERNEL, "cached"), (thirteen, "cached")]  # the fixtures' compiles
    tag13 = thirteen.replace("+", "_")  # the tag rule: `+` is not allowed in a tag
    want = {  # tag -> (OS version, driver, module types)
        f"535-{DEBIAN_KERNEL}-debian12": ("12", DEBIAN_DRIVER, "proprietary"),
        f"{DEBIAN_DRIVER}-{DEBIAN_KERNEL}-debian12": ("12", DEBIAN_DRIVER, "proprietary"),
        f"550-{tag13}-debian13": ("13", version13, "open,proprietary"),
        f"{version13}-{tag13}-debian13": ("13", version13, "open,proprietary"),
    }
    # The layout as skopeo reads it: every tag, each image saying its OS version, driver and module types.
    index = json.loads((out / "oci" / "index.json").read_text())
    tags = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}
    assert set(want) <= tags, tags
    label = "io.gardenlinux.nvidia"
    labels = {tag: json.loads(output(["skopeo", "inspect", f"oci:{out / 'oci'}:{tag}"]))["Labels"] for tag in want}
    for tag, (os_version, driver, types) in want.items():
        seen = labels[tag]
        assert (seen[f"{label}.os"], seen[f"{label}.os.versions"], seen[f"{label}.driver.version"],
                seen[f"{label}.module-types"]) == ("debian", os_version, driver, types), (tag, seen)
    # 13's image is made on 13's own base, 12's on 12's
    assert "bookworm" in labels[f"535-{DEBIAN_KERNEL}-debian12"][f"{label}.base"]
    assert "trixie" in labels[f"550-{tag13}-debian13"][f"{label}.base"]

    # A cluster moving from 12 to 13 on the default profile: which images its nodes will find, and why not.
    assert main(["preflight", "--lock", "debian", "--gl-version", "13", "--registry", repo, "--json"]) == 1
    checks = {c["subject"]: c for c in json.loads(capsys.readouterr().out)}
    digest13 = next(u["digest"] for u in report["units"] if u["unit"]["kernel"] == thirteen)
    for form in ("550", version13):
        found = checks[f"{form} cloud/amd64"]
        # there, under the `_` tag; the operator's own rule asks for the `+` one, which no registry can hold
        assert (found["reference"], found["digest"]) == (f"{repo}/driver:{form}-{tag13}-debian13", digest13)
        assert found["status"] == (f"the GPU Operator asks for '{form}-{thirteen}-debian13', which is no valid "
                                   "tag: its precompiled path cannot pull this image"), found
        for cell in ("metal/amd64", "cloud/arm64", "metal/arm64"):
            assert checks[f"{form} {cell}"]["status"] == f"MISSING (excluded: {LEFT_OUT})", checks
    tesla = [c for s, c in checks.items() if s.startswith("535")]
    assert tesla and all(c["status"] == f"MISSING (excluded: {LEFT_OUT})" for c in tesla), tesla

    # The same move seen on a live cluster: a node on 12 today, planned onto 13.
    fake = FakeCluster(nodes=[node_json("gpu-12", gpu=True, kernel=DEBIAN_KERNEL, os_id="debian", version_id="12")])
    policy = json.loads(json.dumps(CLUSTER_POLICY))
    policy["spec"]["driver"] |= {"repository": repo, "version": "550"}
    fake.policies = [policy]
    with serve(fake) as url:
        kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", url))
        assert main(["preflight", "--kubeconfig", kubeconfig, "--lock", "debian", "--gl-version", "13",
                     "--json"]) == 1
    live = {c["subject"]: c for c in json.loads(capsys.readouterr().out)}
    assert live["gpu-12"]["status"] == "MISSING"  # no 550 image for a 12 kernel
    after = live["gpu-12 after upgrade to 13"]
    assert (after["reference"], after["digest"]) == (f"{repo}/driver:550-{tag13}-debian13", digest13)
    assert after["status"].startswith(f"the GPU Operator asks for '550-{thirteen}-debian13', which is no valid tag")
