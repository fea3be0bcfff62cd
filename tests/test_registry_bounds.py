"""What a registry hands back is bounded and never widens trust: URLs it names (upload `Location`, tags
`Link`) get its credentials only on its own origin, answers have a size cap and a deadline, pagination
cannot loop, and every malformed answer is one error line with exit 2. Pushes are all or nothing.
A hostile proxy in front of Debian's real docker-registry plays the registry."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.oci import Layout
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.credentials import same_origin
from gl_nvidia.registry.transfer import ClientOptions, pull, pull_base, push
from tests.fixtures.hostile_registry import HostileRegistry, Request, Response
from tests.fixtures.layouts import (
    FAST,
    env_credentials,
    make_layout,
    no_ambient_credentials,
    two_images,
)
from tests.fixtures.registry import BASIC, Registry

__all__ = ["no_ambient_credentials"]  # autouse: no credentials from this machine's docker config


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("gl-nvidia: error:")]
    assert len(errors) == (1 if rc else 0), err
    return rc, err


def tags_page(req: Request) -> bool:
    return req.method == "GET" and "/tags/list" in req.path


def manifest_by_tag(req: Request) -> bool:
    return req.method == "GET" and re.search(r"/manifests/[^/]+$", req.path) is not None and "sha256:" not in req.path


# -- 1: credentials go to the registry's own origin only ------------------------------------------------


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_an_upload_location_on_another_host_gets_no_credentials(hostile_registry: HostileRegistry, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, auth: str) -> None:
    """The registry sends uploads to a frontend on another port; the push completes there without the
    registry's Basic password or its token, as a redirect to a CDN does."""
    hostile = hostile_registry
    hostile.basic_auth, hostile.token_uses = auth == "basic", 1000 if auth == "bearer" else None
    env_credentials(monkeypatch, hostile.host)

    def upload_elsewhere(req: Request, resp: Response) -> Response:
        if req.method == "POST" and "location" in resp.headers:
            resp.headers["location"] = resp.headers["location"].replace(hostile.host, hostile.cdn)
        return resp

    hostile.rewrite = upload_elsewhere
    make_layout(tmp_path / "l", {"535-k": b"k"}, big=3 << 20)
    [r] = push(tmp_path / "l", f"{hostile.host}/driver",
               options=ClientOptions(retries=1, backoff_s=0.05, chunk_size=1 << 20))
    assert r.uploaded == 3
    assert hostile.seen["cdn"] and set(hostile.seen["cdn"]) == {None}
    sent = set(hostile.seen["registry"]) - {None}
    assert sent and all(a == BASIC if auth == "basic" else a.startswith("Bearer ") for a in sent if a)


def test_a_location_that_asks_for_credentials_elsewhere_is_refused(hostile_registry: HostileRegistry,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = hostile_registry
    hostile.basic_auth = True
    env_credentials(monkeypatch, hostile.host)

    def another_name(req: Request, resp: Response) -> Response:  # localhost is not 127.0.0.1: another origin
        if req.method == "POST" and "location" in resp.headers:
            resp.headers["location"] = resp.headers["location"].replace("127.0.0.1", "localhost")
        return resp

    hostile.rewrite = another_name
    make_layout(tmp_path / "l", {"535-k": b"k"})
    with pytest.raises(UserError, match=r"sent PUT to http://localhost:\d+, which asks for credentials; refusing"):
        push(tmp_path / "l", f"{hostile.host}/driver", options=FAST)
    assert hostile.seen["registry"][-1] is None  # the request to localhost carried nothing


@pytest.mark.parametrize(("url", "ok"), [
    ("https://registry.example/v2/x", True),
    ("https://REGISTRY.example:443/v2/x", True),  # the same origin, spelt otherwise
    ("http://registry.example/v2/x", False),  # a downgrade from HTTPS
    ("https://registry.example:5000/v2/x", False),  # another port
    ("https://uploads.example/v2/x", False),
    ("https://registry.example@evil.example/v2/x", False),  # userinfo: the host is evil.example
    ("https://registry.example:99999/", False),
    ("ftp://registry.example/v2/x", False),
])
def test_same_origin_rule(url: str, ok: bool) -> None:
    assert same_origin(url, "https://registry.example") is ok


# -- 7, 11: tag-list pagination ends, on this host ---------------------------------------------------------


def link_to(target: str, limit: int = 30) -> tuple[dict[str, int], Callable[[Request, Response], Response]]:
    """A rewrite adding `Link: <target(n)>` to every tags page, for at most `limit` pages (main looped forever)."""
    count = {"n": 0}

    def rewrite(req: Request, resp: Response) -> Response:
        if tags_page(req):
            count["n"] += 1
            if count["n"] <= limit:
                resp.headers["Link"] = f'<{target.format(n=count["n"])}>; rel="next"'
        return resp

    return count, rewrite


@pytest.mark.parametrize(("target", "why"), [
    ("http://{cdn}/v2/driver/tags/list?n=1000&last=535-b", r"continues on http://127\.0\.0\.1:\d+, not this registry"),
    ("/v2/driver/tags/list?n=1000", r"pages in a loop"),  # links to itself
    ("/v2/driver/tags/list?n=1000&last=x{n}", r"links on from a page with no new tag"),  # endless new URLs
])
def test_tag_pagination_that_loops_or_leaves_the_host_is_an_error(hostile_registry: HostileRegistry,
                                                                   registry: Registry, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   target: str, why: str) -> None:
    two_images(hostile_registry, tmp_path)
    count, rewrite = link_to(target.replace("{cdn}", hostile_registry.cdn))
    hostile_registry.rewrite = rewrite
    rc, err = cli(["mirror", f"{hostile_registry.host}/driver", f"{registry.host}/driver"], capsys)
    assert rc == 2 and re.search(why, err), err
    assert count["n"] <= 2 and hostile_registry.seen["cdn"] == []
    with RegistryClient(registry.host) as c:
        assert c.manifest_digest("driver", "535-a") is None


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"tags": "535-a"}', b'{"tags": [5]}', b'{"tags": ["../x"]}', b'{"tags": ["a\\u001b[2J"]}',
    b"[" * 100_000,
])
def test_a_malformed_tag_list_is_an_error_not_an_empty_mirror(hostile_registry: HostileRegistry, registry: Registry,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              body: bytes) -> None:
    two_images(hostile_registry, tmp_path)
    hostile_registry.rewrite = lambda req, resp: Response(200, {"Content-Type": "application/json"}, body) \
        if tags_page(req) else resp
    rc, err = cli(["mirror", f"{hostile_registry.host}/driver", f"{registry.host}/driver"], capsys)
    assert rc == 2 and "the tag list of" in err and "\x1b" not in err, err


def test_mirror_copying_nothing_is_an_error(hostile_registry: HostileRegistry, registry: Registry, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Every listed tag answers 404: the mirror copied nothing, which is no success."""
    two_images(hostile_registry, tmp_path)
    hostile_registry.rewrite = lambda req, resp: Response(404, {}, b"") if manifest_by_tag(req) else resp
    rc, err = cli(["mirror", f"{hostile_registry.host}/driver", f"{registry.host}/driver"], capsys)
    assert rc == 2 and "none of the 2 tags" in err


# -- 7: size caps and deadlines ------------------------------------------------------------------------------


def endless(chunk: bytes = b" " * (1 << 20)) -> Iterator[bytes]:
    while True:
        yield chunk


@pytest.mark.parametrize("what", ["manifest", "tags", "token"])
def test_an_oversize_answer_is_cut_off_at_the_cap(hostile_registry: HostileRegistry, registry: Registry,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  what: str) -> None:
    two_images(hostile_registry, tmp_path)
    if what == "token":
        hostile_registry.token_uses = 1000
        hostile_registry.token_body = b'{"token": "' + b"a" * (5 << 20) + b'"}'
    else:
        hit = manifest_by_tag if what == "manifest" else tags_page
        hostile_registry.rewrite = lambda req, resp: Response(200, {"Content-Type": "application/json"}, endless()) \
            if hit(req) else resp
    start = time.monotonic()
    rc, err = cli(["mirror", f"{hostile_registry.host}/driver", f"{registry.host}/driver"], capsys)
    assert rc == 2 and "more than 4 MiB; refusing to read more" in err, err
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("what", ["headers", "blob"])
def test_a_trickling_answer_meets_a_deadline(hostile_registry: HostileRegistry, tmp_path: Path, what: str) -> None:
    """A byte every 50 ms never trips a 1 s per-read timeout; the whole answer's deadline stops it."""
    two_images(hostile_registry, tmp_path)

    def trickle(req: Request, resp: Response) -> Response:
        blob = "/blobs/sha256:" in req.path
        if req.method == "GET" and (blob if what == "blob" else manifest_by_tag(req)):
            resp.trickle_s = 0.05
        return resp

    hostile_registry.rewrite = trickle
    start = time.monotonic()
    with pytest.raises(UserError, match=r"no complete answer within 1 s|not complete in time"):
        pull(f"{hostile_registry.host}/driver:535-a", Layout.create(tmp_path / "p"),
             options=ClientOptions(retries=0, timeout_s=1.0))
    assert time.monotonic() - start < 5


# -- 13, 14: each malformed answer is exit 2 and one line, and shows no credential ---------------------------


def test_hostile_answers_exit_2_with_one_line(hostile_registry: HostileRegistry, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    hostile = hostile_registry
    two_images(hostile, tmp_path)
    make_layout(tmp_path / "l", {"590-k": b"new"})
    key = tmp_path / "cosign.pub"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    pull_argv = ["verify-image", f"{hostile.host}/driver:535-a", "--key", str(key)]  # reads manifests by tag
    push_argv = ["push", str(tmp_path / "l"), f"{hostile.host}/driver"]
    token_secret = "s3cr3t-t0ken"
    cases: list[tuple[str, list[str], str]] = [
        ("redirect loop", pull_argv, "redirects GET /v2/driver/manifests/535-a in a loop"),
        ("realm http://[::1", pull_argv, "named an unusable URL 'http://[::1'"),
        ("non-ASCII token", pull_argv, "returned a token that is not a Bearer token"),
        ("CR/LF token", pull_argv, "returned a token that is not a Bearer token"),
        ("upload without Location", push_argv, "opened an upload without saying where it goes"),
        ("error body that is a list", push_argv, "refused POST /v2/driver/blobs/uploads/: HTTP 400"),
    ]
    for name, argv, why in cases:
        hostile.rewrite, hostile.token_uses, hostile.realm, hostile.token_body = None, None, None, None
        hostile.issued, hostile.seen["realm"] = 0, []
        if name == "redirect loop":
            hostile.rewrite = lambda req, resp: Response(307, {"Location": req.path}, b"") \
                if manifest_by_tag(req) else resp
        elif name.startswith("realm"):
            hostile.token_uses, hostile.realm = 1000, "http://[::1"
        elif name.endswith("token"):
            hostile.token_uses = 1000
            bad = "tökén" if name.startswith("non-ASCII") else f"{token_secret}\r\nX-Injected: 1"
            hostile.token_body = json.dumps({"token": bad}).encode()
        elif name == "upload without Location":
            hostile.rewrite = lambda req, resp: Response(202, {}, b"") if req.method == "POST" else resp
        else:
            hostile.rewrite = lambda req, resp: Response(400, {}, b'[{"errors": 5}]') if req.method == "POST" else resp
        start = time.monotonic()
        rc, err = cli(argv, capsys)
        assert rc == 2 and why in err, (name, err)
        assert token_secret not in err and "tökén" not in err, (name, err)
        assert time.monotonic() - start < 5, name  # no retries of what is not transient
        assert len(hostile.seen["realm"]) <= 1, name


def test_a_completing_put_answered_200_is_taken(hostile_registry: HostileRegistry, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """containerd takes 200 where the API says 201; it was reported as `refused PUT ... HTTP 200`."""
    hostile_registry.rewrite = lambda req, resp: Response(200, resp.headers, resp.body) \
        if req.method == "PUT" and resp.status == 201 else resp
    make_layout(tmp_path / "l", {"535-k": b"k"})
    rc, err = cli(["push", str(tmp_path / "l"), f"{hostile_registry.host}/driver"], capsys)
    assert rc == 0, err
    with RegistryClient(hostile_registry.backend.host) as c:
        assert c.manifest_digest("driver", "535-k") == Layout.open(tmp_path / "l").tags()["535-k"]


def test_a_docker_config_auth_that_is_not_utf8_shows_no_byte(auth_registry: Registry, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    make_layout(tmp_path / "l", {"535-k": b"k"})
    (tmp_path / "docker").mkdir()
    auth = base64.b64encode(b"ci:\xe9t\xe9-secret").decode()
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    rc, err = cli(["push", str(tmp_path / "l"), f"{auth_registry.host}/driver"], capsys)
    assert rc == 2 and "is not base64 of USER:PASSWORD in UTF-8" in err
    assert "0xe9" not in err and "position" not in err


def test_a_base_that_is_neither_a_layout_nor_a_reference_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--base /nonexistent:v1: no OCI layout directory /nonexistent, "
                                        r"and not a registry reference"):
        pull_base("/nonexistent:v1", tmp_path / "base", "amd64")


# -- 5, 6: push checks everything first, then uploads, then tags ----------------------------------------------


def test_push_refuses_a_layout_blob_that_changed_before_uploading_anything(registry: Registry, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    layout = make_layout(tmp_path / "l", {"535-a": b"a", "535-b": b"b"})
    layer = layout.manifest(layout.tags()["535-b"]).layers[-1]
    path = layout.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    rc, err = cli(["push", str(tmp_path / "l"), f"{registry.host}/driver"], capsys)
    assert rc == 2 and f"blob {layer.digest} in layout {tmp_path / 'l'} has changed" in err, err
    assert registry.blob_bytes() == 0


def test_a_conflicting_tag_of_the_second_image_pushes_nothing(registry: Registry, tmp_path: Path) -> None:
    make_layout(tmp_path / "other", {"535-b": b"other"})
    push(tmp_path / "other", f"{registry.host}/driver")
    stored = registry.blob_bytes()
    make_layout(tmp_path / "l", {"535-a": b"a", "535-b": b"b"})
    with pytest.raises(UserError, match=r"535-b already points to other content"):
        push(tmp_path / "l", f"{registry.host}/driver")
    assert registry.blob_bytes() == stored
    with RegistryClient(registry.host) as c:
        assert c.manifest_digest("driver", "535-a") is None


def test_a_tag_written_by_another_push_during_ours_is_not_moved(registry: Registry, tmp_path: Path) -> None:
    """The window of check-then-act: another push tags 535-k while ours uploads; ours must not move it."""
    other = make_layout(tmp_path / "other", {"535-k": b"other"})
    make_layout(tmp_path / "l", {"535-k": b"ours"}, big=2 << 20)
    raced = threading.Event()

    def meanwhile(_n: int) -> None:
        if not raced.is_set():
            raced.set()
            push(tmp_path / "other", f"{registry.host}/driver")

    with pytest.raises(UserError, match=r"535-k already points to other content"):
        push(tmp_path / "l", f"{registry.host}/driver", options=ClientOptions(on_progress=meanwhile))
    assert raced.is_set()
    with RegistryClient(registry.host) as c:
        assert c.manifest_digest("driver", "535-k") == other.tags()["535-k"]
