"""`release --sign-key`: every pushed image is signed (cosign's format) and carries its SBOM; with
`--module-sign-key/--module-sign-cert` its modules are signed for the kernel too. The keys go nowhere but
into the signatures. Same narrowed debian lock and build cache as test_release.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.release.inputs import INPUTS
from gl_nvidia.run import output
from tests.fixtures.bundle import ModuleKey
from tests.fixtures.registry import Registry
from tests.fixtures.release import TAGS


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "keys" / "cosign.key", tmp_path / "keys" / "cosign.pub"
    private.parent.mkdir()
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", str(private)], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True,
                   capture_output=True)
    return private, public


@pytest.mark.slow
def test_release_signs_every_pushed_image_and_attaches_its_sbom(registry: Registry, tmp_path: Path, lock: Path,
                                                                key: tuple[Path, Path], module_key: ModuleKey,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    private, public = key
    repo, out = f"{registry.host}/gl-nvidia", tmp_path / "out"
    argv = ["-v", "release", "--profile", str(lock), "--out", str(out), "--registry", repo,
            "--sign-key", str(private), "--module-sign-key", str(module_key.key),
            "--module-sign-cert", str(module_key.cert), "--json"]
    assert main(argv) == 0
    first = capsys.readouterr()
    report = json.loads(first.out)
    (unit,) = report["units"]
    assert (unit["push"], report["signed"]) == ("pushed", 1)
    digest = unit["digest"]

    assert main(["verify-image", f"{repo}/driver:{TAGS[0]}", "--key", str(public)]) == 0
    assert f"{repo}/driver@{digest}: 1 valid signature(s)" in capsys.readouterr().out
    sbom = json.loads(output(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{repo}/driver:sha256-{digest.removeprefix('sha256:')}.sbom"]))
    assert sbom["subject"]["digest"] == digest and sbom["artifactType"] == "application/spdx+json"
    # the modules' signing certificate is in the image's provenance and among the unit's inputs
    annotations = json.loads(output(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                     f"docker://{repo}/driver@{digest}"]))["annotations"]
    assert annotations["io.gardenlinux.nvidia.modules.signing-cert.sha256"] == module_key.fingerprint
    assert json.loads(annotations[INPUTS])["module-signing-cert"] == module_key.fingerprint

    # A rerun signs nothing again (the key's signature is there) and uploads nothing.
    assert main(argv) == 0
    again = capsys.readouterr()
    report = json.loads(again.out)
    assert (report["units"][0]["push"], report["signed"], report["blobs_uploaded"]) == ("exists", 0, 0)

    # The key is in no blob of the image layout and in no output, verbose as it was.
    body = "".join(line for line in private.read_text().splitlines() if not line.startswith("-----"))
    der = subprocess.run(["openssl", "pkey", "-in", str(private), "-outform", "DER"], check=True,
                         capture_output=True).stdout
    for blob in (out / "oci" / "blobs" / "sha256").iterdir():
        data = blob.read_bytes()
        assert der not in data and body.encode() not in data
    for text in (first.out, first.err, again.out, again.err):
        assert body[:32] not in text and body[-32:] not in text
        assert not [line for line in module_key.body if line in text]


def test_release_with_an_unusable_key_fails_before_building(registry: Registry, tmp_path: Path, lock: Path,
                                                            key: tuple[Path, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    repo = f"{registry.host}/gl-nvidia"
    for path in (tmp_path / "missing.key", key[1]):
        assert main(["release", "--profile", str(lock), "--out", str(out), "--registry", repo,
                     "--sign-key", str(path)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and str(path) in err[0]
    assert main(["release", "--profile", str(lock), "--out", str(out), "--sign-key", str(key[0])]) == 2
    assert "--sign-key signs pushed images" in capsys.readouterr().err
    assert main(["release", "--profile", str(lock), "--out", str(out), "--module-sign-key", str(key[0])]) == 2
    assert "gl-nvidia: error: --module-sign-key and --module-sign-cert go together" in capsys.readouterr().err
    assert not out.exists()  # nothing built, nothing half-written
