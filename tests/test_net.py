"""The one HTTP seam (net.py): every client says it is gl-nvidia, and the factory's retries and timeouts hold."""

from __future__ import annotations

import ast
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

import gl_nvidia
from gl_nvidia import net
from gl_nvidia.apt import AptRepo, AptSource
from gl_nvidia.catalog.feeds import fetch
from gl_nvidia.catalog.github import GitHub
from gl_nvidia.deploy.kube import Kube
from gl_nvidia.errors import UserError
from gl_nvidia.modbuild.nvidia import NvidiaRunSource
from gl_nvidia.registry.client import RegistryClient


@dataclass
class Server:
    """A local HTTP server: `answers` maps a path to (status, body), anything else is 404; the first
    `failures[path]` requests of a path get 503; `/stall` sends nothing for two seconds."""

    url: str = ""
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    seen: list[tuple[str, str]] = field(default_factory=list)  # (path, User-Agent)


@contextlib.contextmanager
def serve() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            state.seen.append((path, self.headers.get("User-Agent", "")))
            if path == "/stall":  # an answer that never comes (the client has gone when this returns)
                time.sleep(2)
                return
            status, body = state.answers.get(path, (404, b"{}"))
            if state.failures.get(path, 0) > 0:
                state.failures[path] -= 1
                status, body = 503, b"{}"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_every_network_use_says_it_is_gl_nvidia(tmp_path: Path) -> None:
    """A server's operator sees who calls (GLRD, NVIDIA, a mirror, a registry, GitHub, the API server)."""
    with serve() as srv:
        srv.answers = {"/releases.json": (200, b"{}"), "/v2/driver/tags/list": (200, b'{"tags": ["535-k"]}'),
                       "/api/v1/nodes": (200, b'{"kind": "NodeList", "apiVersion": "v1", "items": []}')}
        assert fetch(f"{srv.url}/releases.json", "NVIDIA releases") == b"{}"
        with pytest.raises(UserError):
            AptRepo([AptSource(srv.url, "bookworm", ("main",), tmp_path / "keyring.gpg")], cache=tmp_path).names()
        with pytest.raises(UserError, match="GitHub API"):
            GitHub(srv.url, "token", "owner/name").propose("branch", {}, "title", "body")
        with RegistryClient(srv.url.removeprefix("http://"), retries=0) as registry:
            assert registry.list_tags("driver") == ["535-k"]
        _, missing = NvidiaRunSource(redist=srv.url).components("535.309.01", "amd64")
        assert missing  # the tree lists no release: asked, and told so
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": srv.url}}], "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        assert Kube(kubeconfig).nodes() == []
    paths = {path for path, _ in srv.seen}
    assert {"/releases.json", "/dists/bookworm/InRelease", "/repos/owner/name", "/v2/driver/tags/list",
            "/redistrib_535.309.01.json", "/api/v1/nodes"} <= paths
    assert {agent for _, agent in srv.seen} == {f"gl-nvidia/{gl_nvidia.__version__}"}


def test_a_document_is_fetched_again_after_a_server_error() -> None:
    """A GLRD or NVIDIA document behind a briefly failing server (a CDN's 503) is read on the next try."""
    with serve() as srv:
        srv.answers["/releases.json"] = (200, b'{"570": {}}')
        srv.failures["/releases.json"] = net.RETRIES
        assert fetch(f"{srv.url}/releases.json", "NVIDIA releases") == b'{"570": {}}'
        assert [p for p, _ in srv.seen] == ["/releases.json"] * (net.RETRIES + 1)
        srv.seen.clear()
        srv.failures["/releases.json"] = net.RETRIES + 1
        with pytest.raises(UserError, match="NVIDIA releases answered HTTP 503"):
            fetch(f"{srv.url}/releases.json", "NVIDIA releases")
        assert len(srv.seen) == net.RETRIES + 1


def test_a_silent_server_is_given_up_after_the_factorys_timeout() -> None:
    with serve() as srv, net.client(timeout_s=0.3) as http:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            http.get(f"{srv.url}/stall")
        assert time.monotonic() - start < 1.5
    with net.client() as http:
        assert http.timeout == httpx.Timeout(net.TIMEOUT_S)
    with net.client(read_s=300.0) as http:
        assert http.timeout == httpx.Timeout(net.TIMEOUT_S, read=300.0)


def test_only_the_seam_makes_http_clients() -> None:
    """No module reaches the network past the factory: no client of its own, no module-level request."""
    src = Path(gl_nvidia.__file__).parent
    made = {"Client", "AsyncClient", "get", "post", "put", "patch", "delete", "head", "request", "stream"}
    found = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            call = node.func if isinstance(node, ast.Call) else None
            if (isinstance(call, ast.Attribute) and call.attr in made and isinstance(call.value, ast.Name)
                    and call.value.id == "httpx" and path.name != "net.py"):
                found.append(f"{path.relative_to(src)}: httpx.{call.attr}()")
            if isinstance(node, ast.ImportFrom) and node.module == "httpx":
                found += [f"{path.relative_to(src)}: from httpx import {a.name}" for a in node.names if a.name in made]
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path.relative_to(src)}: {n}" for n in names if n in ("urllib.request", "http.client",
                                                                                   "requests", "urllib3.poolmanager")]
    assert found == []
