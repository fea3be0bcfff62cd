"""The registry client against Debian's real docker-registry: dedup, tags, resume, auth, mirror."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.image import sbom
from gl_nvidia.oci import Layout
from gl_nvidia.reference import Reference, check_repository
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.sign import sign_digest
from gl_nvidia.registry.transfer import ClientOptions, branch_tags, mirror, pull, push
from tests.fixtures.layouts import FAST, make_layout
from tests.fixtures.registry import PASSWORD, USER, Registry


def skopeo_tags(ref: str) -> list[str]:
    out = subprocess.run(["skopeo", "list-tags", "--tls-verify=false", f"docker://{ref}"],
                         check=True, capture_output=True, text=True).stdout
    return sorted(json.loads(out)["Tags"])


def test_second_push_uploads_nothing(registry: Registry, tmp_path: Path) -> None:
    make_layout(tmp_path / "l", {"535-a": b"a", "535-b": b"b"})
    first = push(tmp_path / "l", f"{registry.host}/driver")
    assert [r.uploaded for r in first] == [3, 2]  # config + 2 layers, then the shared layer is skipped
    assert [r.skipped for r in first] == [0, 1]
    stored = registry.blob_bytes()
    second = push(tmp_path / "l", f"{registry.host}/driver")
    assert [r.uploaded for r in second] == [0, 0] and registry.blob_bytes() == stored
    assert skopeo_tags(f"{registry.host}/driver") == ["535-a", "535-b"]


def test_moving_a_tag_needs_force(registry: Registry, tmp_path: Path) -> None:
    make_layout(tmp_path / "one", {"535-k": b"one"})
    make_layout(tmp_path / "two", {"535-k": b"two"})
    push(tmp_path / "one", f"{registry.host}/driver")
    with pytest.raises(UserError, match=r"already points to other content .*refusing to move it"):
        push(tmp_path / "two", f"{registry.host}/driver")
    with RegistryClient(registry.host) as c:
        assert c.manifest_digest("driver", "535-k") == Layout.open(tmp_path / "one").tags()["535-k"]
    push(tmp_path / "two", f"{registry.host}/driver", force=True)
    with RegistryClient(registry.host) as c:
        assert c.manifest_digest("driver", "535-k") == Layout.open(tmp_path / "two").tags()["535-k"]


def test_push_resumes_after_the_registry_dies_mid_upload(registry: Registry, tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "l", {"535-k": b"k"}, big=6 << 20)
    size = max(b.size for b in layout.resolve("535-k").layers)
    sent = {"n": 0, "killed": False}

    def on_progress(n: int) -> None:
        sent["n"] += n
        if sent["n"] >= 2 << 20 and not sent["killed"]:  # after two 1 MiB chunks: kill, restart in 1 s
            sent["killed"] = True
            registry.kill()
            threading.Timer(1.0, registry.start).start()

    opts = ClientOptions(retries=8, backoff_s=0.3, chunk_size=1 << 20, on_progress=on_progress)
    [result] = push(tmp_path / "l", f"{registry.host}/driver", options=opts)
    assert sent["killed"]
    assert sent["n"] < size + (2 << 20)  # resumed, not restarted from byte 0
    info = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/driver:535-k"],
                          check=True, capture_output=True, text=True).stdout
    assert json.loads(info)["Digest"] == result.digest


def test_registry_down_mid_push_leaves_no_tag_and_a_rerun_completes(registry: Registry, tmp_path: Path) -> None:
    make_layout(tmp_path / "l", {"535-k": b"k"}, big=3 << 20)

    def kill_once(_n: int) -> None:
        registry.kill()

    with pytest.raises(UserError, match=f"registry {registry.host} is unreachable.*") as err:
        push(tmp_path / "l", f"{registry.host}/driver",
             options=ClientOptions(retries=2, backoff_s=0.05, chunk_size=1 << 20, on_progress=kill_once))
    assert "run the same command again" in (err.value.hint or "")
    registry.start()
    with RegistryClient(registry.host) as c:
        assert c.manifest_digest("driver", "535-k") is None  # no tag points at the partial image
    [again] = push(tmp_path / "l", f"{registry.host}/driver")
    assert again.skipped >= 1 and skopeo_tags(f"{registry.host}/driver") == ["535-k"]


def test_auth_failure_is_clear_and_credentials_work(auth_registry: Registry, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    make_layout(tmp_path / "l", {"535-k": b"k"})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    with pytest.raises(UserError, match=r"authentication to registry .* failed") as err:
        push(tmp_path / "l", f"{auth_registry.host}/driver")
    assert "GL_NVIDIA_REGISTRY_USERNAME" in (err.value.hint or "")
    monkeypatch.setenv("GL_NVIDIA_REGISTRY_HOST", auth_registry.host)
    monkeypatch.setenv("GL_NVIDIA_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("GL_NVIDIA_REGISTRY_PASSWORD", "wrong")
    with pytest.raises(UserError, match=r"authentication to registry .* failed") as err:
        push(tmp_path / "l", f"{auth_registry.host}/driver")
    assert "check the username and password" in (err.value.hint or "")
    monkeypatch.setenv("GL_NVIDIA_REGISTRY_PASSWORD", PASSWORD)
    [r] = push(tmp_path / "l", f"{auth_registry.host}/driver")
    assert r.uploaded == 3
    assert httpx.get(f"http://{auth_registry.host}/v2/driver/tags/list").status_code == 401


def test_invalid_references_and_tags_are_refused(registry: Registry, tmp_path: Path) -> None:
    make_layout(tmp_path / "l", {"535-k": b"k"})
    for bad in (f"{registry.host}/Driver", "driver", f"{registry.host}/driver:-x"):
        with pytest.raises(UserError):
            push(tmp_path / "l", bad)
    with pytest.raises(UserError, match="no image tagged '590-k'"):
        push(tmp_path / "l", f"{registry.host}/driver:590-k")
    assert Reference.parse("r.example:5000/a/b:535-k") == Reference("r.example:5000", "a/b", "535-k")


@pytest.mark.parametrize("repository", [
    "localhost/gpu", "localhost:5000/gpu", "registry.example/gpu", "[::1]:5000/gpu", "r.example:5000/a/b",
    "gpu/drivers", "Registry/gpu", "-registry.example/gpu", "registry..example/gpu", "registry.example:x/gpu",
    "registry.example/GPU", "registry.example//gpu",
])
def test_a_registry_host_is_one_rule_for_references_and_repositories(repository: str) -> None:
    """`release --registry R` checks R as values' driver.repository and then pushes to R/driver: a host
    one accepts and the other refuses would fail a release after its build, or write values no runtime pulls."""
    def accepted(check: Callable[[], object]) -> bool:
        try:
            check()
        except UserError:
            return False
        return True

    assert accepted(lambda: check_repository(repository, "driver")) == \
        accepted(lambda: Reference.parse(f"{repository}/driver:590-k"))


def test_mirror_copies_a_branch_between_registries(registry: Registry, registry2: Registry, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    make_layout(tmp_path / "l", {"535-k1-gardenlinux0": b"1", "535.309.01-k1-gardenlinux0": b"1",
                                 "590-k1-gardenlinux0": b"9"})
    push(tmp_path / "l", f"{registry.host}/nvidia/driver")
    results = mirror(f"{registry.host}/nvidia/driver", f"{registry2.host}/mirror/driver", driver_branch="535")
    assert len(results) == 1 and sorted(results[0].tags) == ["535-k1-gardenlinux0", "535.309.01-k1-gardenlinux0"]
    assert skopeo_tags(f"{registry2.host}/mirror/driver") == ["535-k1-gardenlinux0", "535.309.01-k1-gardenlinux0"]
    again = mirror(f"{registry.host}/nvidia/driver", f"{registry2.host}/mirror/driver")
    assert sum(r.uploaded for r in again) == 2  # only the 590 image's own layer and config
    assert main(["mirror", f"{registry.host}/nvidia/driver", f"{registry2.host}/mirror/driver"]) == 0
    assert f"--set driver.repository={registry2.host}/mirror --set driver.image=driver" in capsys.readouterr().out


def test_mirror_within_one_registry_mounts_blobs(registry: Registry, tmp_path: Path) -> None:
    make_layout(tmp_path / "l", {"535-k": b"k"})
    push(tmp_path / "l", f"{registry.host}/a/driver")
    [r] = mirror(f"{registry.host}/a/driver", f"{registry.host}/b/driver")
    assert r.mounted == 3 and r.uploaded == 0


def test_pull_gives_back_the_same_image(registry: Registry, tmp_path: Path) -> None:
    src = make_layout(tmp_path / "l", {"535-k": b"k"}, big=1 << 20)
    push(tmp_path / "l", f"{registry.host}/driver")
    dst = Layout.create(tmp_path / "pulled")
    digest = pull(f"{registry.host}/driver:535-k", dst)
    assert digest == src.tags()["535-k"]
    for blob in dst.manifest(digest).blobs:
        assert dst.read_blob(blob.digest) == src.read_blob(blob.digest)


def test_branch_tags() -> None:
    tags = ["535-k", "535.309.01-k", "5350-k", "590-k"]
    assert branch_tags(tags, "535") == ["535-k", "535.309.01-k"]
    assert branch_tags(tags, None) == tags


def test_retries_then_a_clear_error_when_nothing_listens(tmp_path: Path) -> None:
    from tests.fixtures.registry import free_port

    make_layout(tmp_path / "l", {"535-k": b"k"})
    start = time.monotonic()
    with pytest.raises(UserError, match="is unreachable"):
        push(tmp_path / "l", f"127.0.0.1:{free_port()}/driver", options=FAST)
    assert time.monotonic() - start < 5


def test_bearer_token_realm_flow(token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker Hub / GHCR style auth: a 401 names a token realm; the client fetches a scoped token there."""
    make_layout(tmp_path / "l", {"535-k": b"k"})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker"))
    challenge = httpx.get(f"http://{token_registry.host}/v2/").headers["www-authenticate"]
    assert challenge.startswith("Bearer realm=")
    with pytest.raises(UserError, match="token service answered 401"):
        push(tmp_path / "l", f"{token_registry.host}/driver")
    monkeypatch.setenv("GL_NVIDIA_REGISTRY_HOST", token_registry.host)
    monkeypatch.setenv("GL_NVIDIA_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("GL_NVIDIA_REGISTRY_PASSWORD", PASSWORD)
    [r] = push(tmp_path / "l", f"{token_registry.host}/driver")
    assert r.uploaded == 3
    [again] = push(tmp_path / "l", f"{token_registry.host}/driver")
    assert again.uploaded == 0
    assert token_registry.token is not None and token_registry.token.issued >= 2


def test_mirror_carries_each_copied_images_signature_and_sbom(registry: Registry, registry2: Registry,
                                                               tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "l", {"535-k1-gardenlinux0": b"1", "590-k1-gardenlinux0": b"9"})
    digests = layout.tags()
    for tag in ("535-k1-gardenlinux0", "590-k1-gardenlinux0"):
        sbom.attach(layout, layout.manifest(digests[tag]), {"spdxVersion": "SPDX-2.3", "name": tag})
    push(tmp_path / "l", f"{registry.host}/nvidia/driver")
    key = ec.generate_private_key(ec.SECP256R1())
    with RegistryClient(registry.host) as c:
        for digest in digests.values():
            sign_digest(c, "nvidia/driver", digest, key)
    ours, other = (digests[t].replace(":", "-") for t in ("535-k1-gardenlinux0", "590-k1-gardenlinux0"))
    mirror(f"{registry.host}/nvidia/driver", f"{registry2.host}/mirror/driver", driver_branch="535")
    assert skopeo_tags(f"{registry2.host}/mirror/driver") == ["535-k1-gardenlinux0", f"{ours}.sbom", f"{ours}.sig"]
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry2.host}/mirror/driver:{ours}.sbom"], check=True, capture_output=True).stdout
    assert json.loads(raw)["subject"]["digest"] == digests["535-k1-gardenlinux0"]
    pub = tmp_path / "cosign.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    assert main(["verify-image", f"{registry2.host}/mirror/driver:535-k1-gardenlinux0", "--key", str(pub)]) == 0
    # a signature added at the source since moves the mirror's .sig tag on the next run, without --force
    with RegistryClient(registry.host) as c:
        sign_digest(c, "nvidia/driver", digests["590-k1-gardenlinux0"], ec.generate_private_key(ec.SECP256R1()))
        sign_digest(c, "nvidia/driver", digests["535-k1-gardenlinux0"], ec.generate_private_key(ec.SECP256R1()))
    mirror(f"{registry.host}/nvidia/driver", f"{registry2.host}/mirror/driver")
    assert skopeo_tags(f"{registry2.host}/mirror/driver") == sorted(
        ["535-k1-gardenlinux0", "590-k1-gardenlinux0", *(f"{d}.{k}" for d in (ours, other) for k in ("sbom", "sig"))])
    with RegistryClient(registry2.host) as c:
        sig = c.get_manifest("mirror/driver", f"{ours}.sig")
    assert sig is not None and len(sig.layers) == 2
