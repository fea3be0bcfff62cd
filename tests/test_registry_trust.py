"""Trust nothing we did not verify: a hostile registry (a lying proxy in front of a real docker-registry)
serves wrong digests, cross-host token realms, redirects and expiring tokens; credentials stay per host."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.deploy.imagecheck import ImageChecker
from gl_nvidia.errors import UserError
from gl_nvidia.oci import Layout
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.credentials import realm_may_receive_credentials
from gl_nvidia.registry.transfer import ClientOptions, mirror, pull, push
from tests.fixtures.hostile_registry import HostileRegistry
from tests.fixtures.layouts import (
    FAST,
    env_credentials,
    make_layout,
    no_ambient_credentials,
    two_images,
)
from tests.fixtures.registry import BASIC, PASSWORD, USER, Registry

__all__ = ["no_ambient_credentials"]  # autouse: no credentials from this machine's docker config


def blob_files(layout: Layout) -> list[Path]:
    return [p for p in (layout.root / "blobs").rglob("*") if p.is_file()] if (layout.root / "blobs").exists() else []


# -- 3: everything fetched is checked against the digest it was asked for -------------------------


def test_pull_by_digest_refuses_a_manifest_with_another_digest(hostile_registry: HostileRegistry,
                                                               tmp_path: Path) -> None:
    a, b = two_images(hostile_registry, tmp_path)
    hostile_registry.swap_manifests = {a: b}
    dst = Layout.create(tmp_path / "pulled")
    with pytest.raises(UserError, match=f"answered driver@{a} with a manifest whose digest is {b}; refusing it"):
        pull(f"{hostile_registry.host}/driver@{a}", dst, options=FAST)
    assert blob_files(dst) == []
    with ImageChecker() as checker, pytest.raises(UserError, match="whose digest is"):
        checker.digest(f"{hostile_registry.host}/driver@{a}")  # preflight: a lie is not "the image exists"
    hostile_registry.swap_manifests = {}
    assert pull(f"{hostile_registry.host}/driver@{a}", dst, options=FAST) == a


def test_a_blob_with_other_content_is_refused_and_not_kept(hostile_registry: HostileRegistry, registry2: Registry,
                                                           tmp_path: Path) -> None:
    two_images(hostile_registry, tmp_path)
    hostile_registry.corrupt_blobs = True
    dst = Layout.create(tmp_path / "pulled")
    with pytest.raises(UserError, match=r"sent content with digest sha256:[0-9a-f]{64} for blob sha256:.*; refusing it"):
        pull(f"{hostile_registry.host}/driver:535-a", dst, options=FAST)
    assert blob_files(dst) == []
    with pytest.raises(UserError, match="refusing it"):
        mirror(f"{hostile_registry.host}/driver", f"{registry2.host}/driver", options=FAST)
    with RegistryClient(registry2.host) as c:
        assert c.manifest_digest("driver", "535-a") is None and c.manifest_digest("driver", "535-b") is None


# -- 2: credentials are scoped per registry host --------------------------------------------------


def test_mirror_sends_each_side_only_its_own_credentials(hostile_registry: HostileRegistry, auth_registry: Registry,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SRC (token realm on another port, blobs redirected to a CDN) never sees DST's credentials."""
    two_images(hostile_registry, tmp_path)
    hostile_registry.token_uses, hostile_registry.redirect_blobs = 1000, True
    env_credentials(monkeypatch, auth_registry.host)
    results = mirror(f"{hostile_registry.host}/driver", f"{auth_registry.host}/mirror/driver", options=FAST)
    assert sorted(t for r in results for t in r.tags) == ["535-a", "535-b"]
    assert hostile_registry.seen["realm"] and set(hostile_registry.seen["realm"]) == {None}  # anonymous tokens
    assert all(a is None or a.startswith("Bearer ") for a in hostile_registry.seen["registry"])
    assert hostile_registry.seen["cdn"] and set(hostile_registry.seen["cdn"]) == {None}  # no token on the redirect


def test_environment_credentials_apply_only_to_the_host_they_name(auth_registry: Registry, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    make_layout(tmp_path / "l", {"535-k": b"k"})
    env_credentials(monkeypatch, None)
    with pytest.raises(UserError, match=r"authentication to registry .* failed") as err:
        push(tmp_path / "l", f"{auth_registry.host}/driver")
    assert f"GL_NVIDIA_REGISTRY_HOST={auth_registry.host}" in (err.value.hint or "")
    monkeypatch.setenv("GL_NVIDIA_REGISTRY_HOST", "registry.example")
    with pytest.raises(UserError, match=r"authentication to registry .* failed"):
        push(tmp_path / "l", f"{auth_registry.host}/driver")
    monkeypatch.setenv("GL_NVIDIA_REGISTRY_HOST", f"https://{auth_registry.host}")
    [r] = push(tmp_path / "l", f"{auth_registry.host}/driver")
    assert r.uploaded == 3


def test_docker_config_credentials_are_keyed_by_host(hostile_registry: HostileRegistry, auth_registry: Registry,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docker's key forms (`https://host/v1/`) find a host's entry; no other host gets it."""
    make_layout(tmp_path / "l", {"535-k": b"k"})
    (tmp_path / "docker").mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {
        "https://registry.example/v1/": {"auth": base64.b64encode(b"other:other").decode()},
        f"https://{auth_registry.host}/v1/": {"auth": auth},
    }}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    [r] = push(tmp_path / "l", f"{auth_registry.host}/driver")
    assert r.uploaded == 3
    two_images(hostile_registry, tmp_path)
    hostile_registry.token_uses = 1000
    pull(f"{hostile_registry.host}/driver:535-a", Layout.create(tmp_path / "pulled"), options=FAST)
    assert set(hostile_registry.seen["realm"]) == {None}


def test_credentials_reach_a_token_realm_only_in_a_safe_way(hostile_registry: HostileRegistry, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's own credentials go to the realm it names on another (loopback) host; a plain-HTTP
    realm on a foreign host gets nothing: the request is refused before any connection."""
    two_images(hostile_registry, tmp_path)
    hostile_registry.token_uses = 1000
    env_credentials(monkeypatch, hostile_registry.host)
    pull(f"{hostile_registry.host}/driver:535-a", Layout.create(tmp_path / "one"), options=FAST)
    assert set(hostile_registry.seen["realm"]) == {BASIC}
    assert BASIC not in hostile_registry.seen["registry"]  # the registry itself only ever sees tokens
    hostile_registry.realm = "http://token.invalid/token"  # .invalid never resolves: nothing to connect to
    with pytest.raises(UserError, match="refusing to send this registry's credentials there in clear text"):
        pull(f"{hostile_registry.host}/driver:535-a", Layout.create(tmp_path / "two"), options=FAST)


@pytest.mark.parametrize(("realm", "registry", "ok"), [
    ("https://auth.example/token", "https://registry.example", True),  # Docker Hub: another host, HTTPS
    ("http://127.0.0.1:9000/token", "https://registry.example", True),  # loopback never leaves the machine
    ("http://[::1]:9000/token", "https://registry.example", True),
    ("http://registry.example:5000/token", "http://registry.example:5000", True),  # --plain-http for this host
    ("http://auth.example/token", "http://registry.example:5000", False),  # plain HTTP to another host
    ("http://registry.example/token", "https://registry.example", False),  # a downgrade from HTTPS
    ("ftp://auth.example/token", "https://registry.example", False),
])
def test_realm_rule(realm: str, registry: str, ok: bool) -> None:
    assert realm_may_receive_credentials(realm, registry) is ok


# -- 6: an expired token is renewed, once per request ---------------------------------------------


def test_expiring_tokens_are_renewed_during_a_long_push_and_a_mirror(hostile_registry: HostileRegistry,
                                                                     registry2: Registry, tmp_path: Path) -> None:
    hostile_registry.token_uses = 2  # every token expires after two requests
    make_layout(tmp_path / "l", {"535-k": b"k"}, big=3 << 20)
    opts = ClientOptions(retries=2, backoff_s=0.05, chunk_size=1 << 20)
    [pushed] = push(tmp_path / "l", f"{hostile_registry.host}/driver", options=opts)
    assert pushed.uploaded == 3 and hostile_registry.issued > 5
    with RegistryClient(hostile_registry.backend.host) as c:
        assert c.manifest_digest("driver", "535-k") == pushed.digest
    [mirrored] = mirror(f"{hostile_registry.host}/driver", f"{registry2.host}/driver", options=FAST)
    assert mirrored.digest == pushed.digest


def test_a_token_is_renewed_once_per_request(hostile_registry: HostileRegistry, tmp_path: Path) -> None:
    a, _b = two_images(hostile_registry, tmp_path)
    hostile_registry.token_uses = 1
    with RegistryClient(hostile_registry.host, retries=0) as c:
        for _ in range(3):  # each request after the first finds its token expired and renews it
            assert c.get_manifest("driver", "535-a") is not None
        assert hostile_registry.issued == 3
        hostile_registry.token_uses = 0  # now the registry refuses even a fresh token
        with pytest.raises(UserError, match=r"authentication to registry .* failed"):
            c.get_manifest("driver", a)
        assert hostile_registry.issued == 4  # one renewal, then a clear error: no loop


# -- 8: a malformed docker config is one error line -------------------------------------------------


@pytest.mark.parametrize(("config", "why"), [
    ('{"auths": {"HOST": {"auth": "%%%not-base64"}}}', "is not base64 of USER:PASSWORD"),
    ('{"auths": {"HOST": {"auth": "' + base64.b64encode(b"no-colon").decode() + '"}}}', "has no ':'"),
    ('{"auths": [{"HOST": {}}]}', "'auths' is not an object"),
    ('{"auths": {"HOST": "x"}}', "is not an object"),
    ("\udcff{}", "not UTF-8"),
    ('{"auths": ', "not JSON"),
])
def test_a_malformed_docker_config_is_one_error_line(auth_registry: Registry, tmp_path: Path, config: str, why: str,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    make_layout(tmp_path / "l", {"535-k": b"k"})
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_bytes(
        config.replace("HOST", auth_registry.host).encode("utf-8", "surrogateescape"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    assert main(["push", str(tmp_path / "l"), f"{auth_registry.host}/driver"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"gl-nvidia: error: docker config {tmp_path / 'docker' / 'config.json'} is malformed")
    assert why in err[0] and err[1].startswith("gl-nvidia: hint:") and len(err) == 2
