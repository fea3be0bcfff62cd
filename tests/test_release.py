"""`release` end to end on the debian profile into a real local registry, then resume, resolve and preflight.

The lock is the debian profile narrowed to the unit the debian_bundle fixture builds (proprietary
535.309.01 for DEBIAN_KERNEL, found in the archive at run time), so the modules come from the build cache that fixture fills:
one compile per CI run, whichever test runs first. Cold cache: about 3 minutes (the compile);
warm: about 1 minute (base root filesystem, layers, push).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.release.conductor import release
from gl_nvidia.release.ocm import COMPONENT
from gl_nvidia.run import output
from tests.fixtures.ibt import ibt_kernels
from tests.fixtures.kube import CLUSTER_POLICY, FakeCluster, node_json, serve, write_kubeconfig
from tests.fixtures.registry import Registry
from tests.fixtures.release import KERNEL, TAGS, debian_lock

DATA = Path(__file__).parent / "data" / "deploy"
TWO_KERNELS = DATA / "release-debian-two-kernels.yaml"



def _uploads(reg: Registry) -> list[Path]:
    """Every file the registry has stored: an upload of any kind adds to it."""
    return sorted(p for p in (reg.root / "data").rglob("*") if p.is_file())


@pytest.mark.slow
def test_release_resume_resolve_preflight(registry: Registry, tmp_path: Path, lock: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    repo = f"{registry.host}/gl-nvidia"
    out = tmp_path / "out"

    first = release(lock, out, repo)
    assert first.ok, [u.status for u in first.units]
    (unit,) = first.units
    assert unit.tags == TAGS
    assert (unit.image, unit.push) == ("built", "pushed")
    assert first.blobs_uploaded > 0
    # An independent OCI client sees the pushed image under both tags, at the reported digest.
    for tag in TAGS:
        inspected = json.loads(output(["skopeo", "inspect", "--tls-verify=false", f"docker://{repo}/driver:{tag}"]))
        assert inspected["Digest"] == unit.digest
    stored = _uploads(registry)

    # The rerun, through the CLI as a user runs it: nothing compiled, nothing uploaded.
    assert main(["release", "--profile", str(lock), "--out", str(out), "--registry", repo, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert (report["compiled"], report["blobs_uploaded"], report["manifests_pushed"]) == (0, 0, 0)
    (again,) = report["units"]
    assert (again["build"], again["image"], again["push"], again["digest"]) == ("skipped", "-", "exists",
                                                                                unit.digest)
    assert _uploads(registry) == stored
    assert f"--values {out / 'gpu-operator-values.yaml'}" in captured.err
    values = out / "gpu-operator-values.yaml"
    assert f"repository: {repo}" in values.read_text()

    # resolve: the node's image exists; a kernel nobody built does not.
    os_release = str(DATA / "os-release-debian-12")
    assert main(["resolve", "--os-release", os_release, "--kernel", KERNEL, "--values", str(values), "--json"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["reference"] == f"{repo}/driver:{TAGS[0]}"
    assert resolved["exists"] is True
    assert main(["resolve", "--os-release", os_release, "--kernel", "6.1.0-99-cloud-amd64",
                 "--values", str(values)]) == 1  # the check ran and said no; bad input is 2
    assert f"{repo}/driver:535-6.1.0-99-cloud-amd64-debian12 does not exist" in capsys.readouterr().err

    # preflight for the profile's OS version: every branch form, flavour and arch is there.
    assert main(["preflight", "--lock", str(lock), "--gl-version", "12", "--registry", repo, "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)
    assert sorted(c["reference"] for c in checks) == sorted(f"{repo}/driver:{t}" for t in TAGS)
    assert all(c["ok"] and c["digest"] == unit.digest for c in checks)
    assert main(["preflight", "--lock", str(lock), "--gl-version", "13", "--registry", repo]) == 2
    assert "unknown debian version '13'" in capsys.readouterr().err

    # preflight against a live cluster: one node is fine, one runs a kernel without an image.
    fake = FakeCluster(nodes=[
        node_json("gpu-ok", gpu=True, kernel=KERNEL, os_id="debian", version_id="12"),
        node_json("gpu-new", gpu=True, kernel="6.1.0-99-cloud-amd64", os_id="debian", version_id="12"),
        node_json("gpu-bare", gpu=True, nfd=False),
    ])
    policy = json.loads(json.dumps(CLUSTER_POLICY))
    policy["spec"]["driver"] |= {"repository": repo, "version": "535"}
    fake.policies = [policy]
    fake.nodes[2]["metadata"]["labels"]["nvidia.com/gpu.present"] = "true"
    with serve(fake) as url:
        kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", url))
        assert main(["preflight", "--kubeconfig", kubeconfig, "--lock", str(lock), "--json"]) == 1
        live = {c["subject"]: c for c in json.loads(capsys.readouterr().out)}
        # Planning the upgrade to 12 (its kernel: 6.1.0-56): the node on the unbuilt kernel gets an image.
        assert main(["preflight", "--kubeconfig", kubeconfig, "--lock", str(lock), "--gl-version", "12",
                     "--json"]) == 1
        upgrade = {c["subject"]: c for c in json.loads(capsys.readouterr().out)}
    assert upgrade["gpu-new after upgrade to 12"]["ok"]
    assert upgrade["gpu-new after upgrade to 12"]["reference"] == f"{repo}/driver:{TAGS[0]}"
    assert not upgrade["gpu-new"]["ok"]
    assert live["gpu-ok"]["ok"] and live["gpu-ok"]["reference"] == f"{repo}/driver:{TAGS[0]}"
    assert live["gpu-new"]["status"] == "MISSING"
    assert live["gpu-new"]["reference"] == f"{repo}/driver:535-6.1.0-99-cloud-amd64-debian12"
    assert "no NFD" in live["gpu-bare"]["status"]

    # An unreachable registry is one clear line, not a traceback.
    registry.kill()
    assert main(["preflight", "--lock", str(lock), "--gl-version", "12", "--registry", repo]) == 2
    err = capsys.readouterr().err
    assert f"registry {registry.host} is unreachable" in err
    assert "Traceback" not in err
    # resolve still names the image; only the existence check fails.
    assert main(["resolve", "--os-release", os_release, "--kernel", KERNEL, "--values", str(values)]) == 2
    captured = capsys.readouterr()
    assert captured.out == f"{repo}/driver:{TAGS[0]}\n"
    assert "exists: unknown" in captured.err and f"registry {registry.host} is unreachable" in captured.err


@pytest.mark.slow
def test_a_kernel_only_upgrade_pulls_only_the_new_kernels_layer(debian_bundle: Path, ibt_bundle: Path,
                                                                registry: Registry, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Two Debian kernels released into a real registry, 6.1 and a 6.12 with IBT (the kernel line Garden
    Linux moves to): a node moving from one to the other (either way) lacks only the new kernel's modules
    layer and config, whatever module types the release left out."""
    repo = f"{registry.host}/gl-nvidia"
    lock = tmp_path / "versions.yaml"
    lock.write_text(TWO_KERNELS.read_text().replace("IBT_KERNEL", ibt_kernels().built)
                            .replace("DEBIAN_KERNEL", KERNEL))
    argv = ["release", "--profile", str(lock), "--out", str(tmp_path / "out"), "--registry", repo]
    assert main([*argv, "--json"]) == 0
    units = json.loads(capsys.readouterr().out)["units"]
    assert [u["unit"]["kernel"] for u in units] == [KERNEL, ibt_kernels().built]
    assert all(u["build"] == "cached" for u in units)  # the fixtures' compiles
    assert all(u["left_out"] == [{"module_type": "open", "reason": "open 535.261.03 is not the driver 535.309.01 "
                                  "(as the profile resolves it today)"}] for u in units)
    assert main(argv) == 0
    assert "no open:" in capsys.readouterr().out  # the release table says what was left out, and why
    # What a node's container runtime sees, read with an independent client.
    manifests = {u["unit"]["kernel"]: json.loads(output(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{repo}/driver:{u['tags'][1]}"]))
        for u in units}
    old, new = manifests.values()
    for have, want in ((old, new), (new, old)):
        held = {x["digest"] for x in have["layers"]}
        lacking = [x for x in want["layers"] if x["digest"] not in held]
        assert lacking == [want["layers"][-1]]  # the kernel's own modules layer, nothing below it
        assert lacking[0]["size"] < 5_000_000 < sum(x["size"] for x in want["layers"]) // 20


@pytest.mark.slow
def test_release_skips_a_unit_published_from_the_same_inputs_and_rebuilds_what_changed(
        registry: Registry, tmp_path: Path, lock: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    repo = f"{registry.host}/gl-nvidia"
    first = release(lock, tmp_path / "first", repo)
    (unit,) = first.units
    assert (unit.image, unit.push, unit.reason) == ("built", "pushed", f"not published: {TAGS[0]} and 1 more tag(s)")
    raw = json.loads(output(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{repo}/driver:{TAGS[1]}"]))
    recorded = json.loads(raw["annotations"]["io.gardenlinux.nvidia.inputs"])
    assert recorded["cell"]["kernel"] == KERNEL and recorded["base"]
    assert any(name.startswith("nvidia-kernel-source_535.309.01") for name in recorded["sources"])

    # Another machine, nothing local: the registry's record alone skips the unit; its build never starts.
    # As a versioned release it writes the assets: values naming the published image, and the changelog
    # since the previous release's lock (another driver patch and kernel then).
    stored = _uploads(registry)
    previous = tmp_path / "previous-versions.yaml"
    previous.write_text(lock.read_text().replace("version: 535.309.01}", "version: 535.288.01}")
                        .replace(f"kernel: {KERNEL}}}", "kernel: 6.1.0-47-cloud-amd64}"))
    argv = ["release", "--profile", str(lock), "--out", str(tmp_path / "second"), "--registry", repo]
    assert main([*argv, "--version", "1.2.0", "--since", str(previous), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (skipped,) = report["units"]
    assert (skipped["build"], skipped["image"], skipped["push"], skipped["digest"]) == ("skipped", "-", "exists",
                                                                                    unit.digest)
    assert skipped["reason"].startswith("published with the same inputs (sha256:") and report["compiled"] == 0
    assert not (tmp_path / "second" / "bundles").exists() and not (tmp_path / "second" / "oci").exists()
    assets = tmp_path / "second" / "release"
    values = assets / "gpu-operator-values-debian-12.yaml"
    assert report["release"] == {"version": "1.2.0", "assets": [str(assets / "CHANGELOG.md"),
                                                                str(assets / "component-descriptor.yaml"), str(values)]}
    # ... and pushes the release as one OCM component version: its descriptor (manifest, config, layer) is all
    # it uploaded
    added = sorted(set(_uploads(registry)) - set(stored))
    assert len([p for p in added if "/blobs/" in str(p)]) == 3
    assert all("/blobs/" in str(p) or "/component-descriptors/" in str(p) for p in added)
    assert json.loads(output(["skopeo", "list-tags", "--tls-verify=false", f"docker://{repo}/component-descriptors/"
                                                                           f"{COMPONENT}"]))["Tags"] == ["1.2.0"]
    stored = _uploads(registry)
    assert values.read_text().startswith("# gl-nvidia 1.2.0: GPU Operator values for debian 12\n")
    assert main(["resolve", "--os-release", str(DATA / "os-release-debian-12"), "--kernel", KERNEL,
                 "--values", str(values), "--json"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["reference"], resolved["exists"]) == (f"{repo}/driver:{TAGS[0]}", True)
    notes = (assets / "CHANGELOG.md").read_text()
    assert notes.startswith("# gl-nvidia driver images 1.2.0\n\n## Changes since the previous release\n\n"
                            "- new driver patch release 535.309.01 (was 535.288.01)\n"
                            f"- kernel of 12 cloud/amd64: {KERNEL} (was 6.1.0-47-cloud-amd64)\n")
    assert "- debian 12: driver.version 535 (`gpu-operator-values-debian-12.yaml`)\n" in notes
    assert f"- `{unit.digest}` (published before, same inputs): `{TAGS[0]}`, `{TAGS[1]}`\n" in notes
    assert main(argv) == 0
    assert "skipped:" in capsys.readouterr().out  # the table says so, and why
    # The publish workflow's fan-out: nothing to build; forced, the unit with the inputs its image records.
    assert main(["release", "--profile", str(lock), "--registry", repo, "--plan"]) == 0
    assert capsys.readouterr().out == '{"include":[]}\n'
    assert main(["release", "--profile", str(lock), "--registry", repo, "--plan", "--force"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["include"]
    assert row["key"] == f"535.309.01-{KERNEL}-amd64" and json.loads(row["inputs"]) == recorded
    assert _uploads(registry) == stored

    # A changed input (another gl-nvidia): built again from the build cache, and the tags move to it.
    monkeypatch.setattr("gl_nvidia.__version__", "0.1.0+changed")
    changed = release(lock, tmp_path / "third", repo)
    (rebuilt,) = changed.units
    assert (rebuilt.build, rebuilt.image, rebuilt.push) == ("cached", "built", "pushed")
    assert rebuilt.reason == f"{TAGS[0]}: gl-nvidia changed" and changed.compiled == 0
    assert rebuilt.digest != unit.digest
    for tag in TAGS:
        inspected = json.loads(output(["skopeo", "inspect", "--tls-verify=false", f"docker://{repo}/driver:{tag}"]))
        assert inspected["Digest"] == rebuilt.digest

    # --force builds what is published with the same inputs.
    assert main(["release", "--profile", str(lock), "--out", str(tmp_path / "fourth"), "--registry", repo,
                 "--force", "--json"]) == 0
    (forced,) = json.loads(capsys.readouterr().out)["units"]
    assert (forced["build"], forced["image"], forced["reason"]) == ("cached", "built", "forced (--force)")
    assert forced["digest"] == rebuilt.digest  # the same inputs make the same image


def test_release_of_an_unbuildable_unit_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "lock.yaml"
    lock.write_text(debian_lock(tmp_path).read_text().replace("535.309.01", "535.999.01"))
    out = tmp_path / "out"
    assert main(["release", "--profile", str(lock), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"1 of 1 build unit(s) failed; first, 535.999.01-{KERNEL}-amd64: driver 535.999.01 is not in" in err
    assert "Traceback" not in err
    # Nothing that looks finished: no image layout, no values pointing at images that do not exist.
    assert not (out / "oci").exists()
    assert not (out / "gpu-operator-values.yaml").exists()


@pytest.mark.parametrize("bad", ["Bad Repo", "registry.example:5000/gpu:latest"])
def test_release_refuses_a_bad_registry_before_building(bad: str, tmp_path: Path, lock: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["release", "--profile", str(lock), "--registry", bad, "--out", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists()  # nothing built, nothing half-written


@pytest.mark.slow
def test_release_to_a_registry_with_a_trailing_slash_writes_its_values(registry: Registry, tmp_path: Path, lock: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["release", "--profile", str(lock), "--registry", f"{registry.host}/gl/", "--out", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert f"repository: {registry.host}/gl\n" in (out / "gpu-operator-values.yaml").read_text()
