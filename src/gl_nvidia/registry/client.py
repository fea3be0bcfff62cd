"""An OCI distribution API client over httpx.

Token auth (WWW-Authenticate Bearer realm flow, and Basic; a rejected token is renewed once per
request), blob HEAD before upload, cross-repository mount, monolithic PUT for small blobs and
chunked PATCH for large ones, resume after a dropped connection (ask the registry how far the
upload got, else start a fresh session), retries with exponential backoff, manifest GET/HEAD/PUT,
tag listing. Whatever is fetched by digest is checked against that digest before it is used.
Credentials are this host's only (`credentials.py`): every URL the registry hands back (an upload
`Location`, a tags-list `Link`) is followed without them when it names another origin, as httpx
follows a cross-origin redirect (a blob CDN). Answers are bounded: an answer other than a blob holds
at most `ANSWER_LIMIT` bytes, and every answer must be complete by a deadline (httpx times each
read, not the whole answer), so a registry cannot fill memory or hold a command forever.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from gl_nvidia import fs, net, oci
from gl_nvidia.errors import UserError
from gl_nvidia.net import RETRY_STATUS, Transient, retrying
from gl_nvidia.oci import Descriptor
from gl_nvidia.reference import check_digest, validate_tag
from gl_nvidia.registry.credentials import (
    Credentials,
    find_credentials,
    is_loopback,
    missing_credentials_hint,
    realm_may_receive_credentials,
    same_origin,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R", "Answer", httpx.Response)

CHUNK_SIZE = 16 << 20  # blobs above this go up in PATCH chunks; below, one PUT
# Bytes of any answer but a blob: docker-registry's own limit on a manifest; a tags page or a token is far smaller.
ANSWER_LIMIT = 4 << 20
MIN_RATE = 64 << 10  # bytes/s: an answer must be complete by timeout_s plus its bytes at this rate
_DONE = (200, 201, 202, 204)  # what a completing PUT may answer (containerd takes these too)
_B64TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")  # a Bearer token's syntax (RFC 6750), all a header may carry
_NEXT = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?')


@dataclass(frozen=True)
class Answer:
    """A registry's answer read whole (at most `ANSWER_LIMIT` bytes)."""

    status_code: int
    headers: httpx.Headers
    content: bytes


class RegistryClient:
    """One registry host. `on_progress(bytes)` is called as blob bytes go up."""

    def __init__(
        self,
        host: str,
        *,
        plain_http: bool | None = None,
        credentials: Credentials | None = None,
        retries: int = 6,
        backoff_s: float = 0.5,
        chunk_size: int = CHUNK_SIZE,
        timeout_s: float = 120.0,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.host = host
        loopback = is_loopback(urlsplit(f"//{host}").hostname)
        scheme = "http" if (plain_http if plain_http is not None else loopback) else "https"
        self.base = f"{scheme}://{host}"
        self._credentials = credentials
        self._look_up = credentials is None
        self.retries = retries
        self.backoff_s = backoff_s
        self.chunk_size = chunk_size
        self.on_progress = on_progress
        self.timeout_s = timeout_s
        self.resumed = 0  # uploads continued after a dropped connection (for reports and tests)
        self._http = net.client(timeout_s=timeout_s)
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._basic = False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests with auth and retries ---------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        scope: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        ok: tuple[int, ...] = (200,),
        missing_ok: bool = False,
        retry: bool = True,
    ) -> Answer | None:
        """One API call; None for 404 when `missing_ok`. Transient failures retry with backoff."""
        def attempt() -> Answer:
            resp = self._send(method, url, scope, headers or {}, content)
            if resp.status_code in RETRY_STATUS:
                raise Transient(f"HTTP {resp.status_code}")
            return resp

        resp = self._retrying(attempt, self.retries if retry else 0)
        if missing_ok and resp.status_code == 404:
            return None
        if resp.status_code not in ok:
            raise self._http_error(resp, method, url)
        return resp

    def _retrying(self, attempt: Callable[[], T], retries: int, before_retry: Callable[[], None] | None = None) -> T:
        try:
            return retrying(attempt, retries=retries, delay_s=self.backoff_s, what=f"registry {self.host}",
                            before_retry=before_retry, level=logging.INFO)
        except (httpx.TransportError, Transient) as exc:
            raise self._down(exc) from exc

    @property
    def credentials(self) -> Credentials | None:
        """This host's credentials, looked up at the first challenge (a registry that asks for none never needs them)."""
        if self._look_up:
            self._look_up = False
            self._credentials = find_credentials(self.host)
        return self._credentials

    def _send(self, method: str, url: str, scope: str, headers: dict[str, str], content: bytes | None) -> Answer:
        """One request, its answer read whole (bounded); a 401 is answered once, then the request resent."""
        deadline = self._deadline(len(content or b""))
        return self._authorized(method, url, scope, headers, content,
                                lambda req: self._bounded(lambda: _read(self._http.send(req, stream=True), self.host),
                                                          deadline))

    def _open(self, url: str, scope: str, size: int) -> tuple[httpx.Response, float]:
        """A GET whose body (`size` bytes) the caller streams, and the deadline it must arrive by."""
        deadline = self._deadline(size)
        return self._authorized("GET", url, scope, {}, None,
                                lambda req: self._bounded(lambda: self._http.send(req, stream=True), deadline)), deadline

    def _authorized(self, method: str, url: str, scope: str, headers: dict[str, str], content: bytes | None,
                    exchange: Callable[[httpx.Request], R]) -> R:
        """Send with this registry's credentials, but only to its own origin: a URL it handed back that
        names another host, port or scheme goes without them, and a challenge from there is not answered."""
        target = self._url(url)
        own = same_origin(str(target), self.base)
        for answered in (False, True):
            request = self._http.build_request(
                method, target, headers={**(self._auth_header(scope) if own else {}), **headers}, content=content)
            try:
                resp = exchange(request)
            except httpx.TooManyRedirects as exc:
                raise UserError(f"registry {self.host} redirects {method} {target.path} in a loop",
                                "the registry is misconfigured; tell its operator") from exc
            if resp.status_code != 401 or answered or not own:
                break
            _close(resp)
            if not self._authenticate(resp.headers, scope):
                break
        if resp.status_code == 401:
            _close(resp)
            if not own:
                raise UserError(f"registry {self.host} sent {method} to {_origin(target)}, which asks for credentials; "
                                f"refusing: {self.host}'s credentials go to {self.host} only")
            hint = (missing_credentials_hint(self.host) if self.credentials is None
                    else "check the username and password for this registry")
            raise UserError(f"authentication to registry {self.host} failed (401 Unauthorized)", hint)
        return resp

    def _url(self, url: str, base: httpx.URL | None = None) -> httpx.URL:
        """A URL this registry named (or a path of its API), resolved against `base` (default: the registry)."""
        try:
            target = (base or httpx.URL(self.base)).join(url)
        except httpx.InvalidURL:
            target = None
        if target is None or target.scheme not in ("http", "https") or not target.host:
            raise UserError(f"registry {self.host} named an unusable URL {_shown(url)}",
                            "the registry does not follow the OCI distribution API; tell its operator")
        return target

    def _deadline(self, size: int) -> float:
        return time.monotonic() + self.timeout_s + size / MIN_RATE

    def _bounded(self, work: Callable[[], T], deadline: float) -> T:
        """`work()` (a request and what of its answer it reads) in a thread that is given up at `deadline`:
        httpx's timeout is per read, so a registry sending a byte a minute would otherwise hold us forever.
        An answer that arrives after that is closed by the thread that waited for it."""
        done, lock = threading.Event(), threading.Lock()
        box: list[tuple[bool, Any]] = []
        given_up = False

        def run() -> None:
            try:
                result: tuple[bool, Any] = (True, work())
            except BaseException as exc:  # handed to the waiting thread, which raises it
                result = (False, exc)
            with lock:
                if given_up:
                    if result[0] and isinstance(result[1], httpx.Response):
                        result[1].close()
                    return
                box.append(result)
            done.set()

        threading.Thread(target=run, name=f"registry {self.host}", daemon=True).start()
        done.wait(max(0.0, deadline - time.monotonic()))
        with lock:
            if not box:
                given_up = True
                raise Transient(f"no complete answer within {self.timeout_s:g} s")
        ok, value = box[0]
        if not ok:
            raise value
        result: T = value
        return result

    def _auth_header(self, scope: str) -> dict[str, str]:
        if scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self._basic and self.credentials:
            return _basic(self.credentials)
        return {}

    def _authenticate(self, headers: httpx.Headers, scope: str) -> bool:
        """Answer a 401 challenge: Basic with the credentials, or a new Bearer token from the realm.

        A Bearer challenge to a request that carried a token means that token expired or was
        revoked: a new one is fetched, as docker and containerd do.
        """
        challenge = headers.get("www-authenticate", "")
        kind, _, params_s = challenge.partition(" ")
        params = dict(re.findall(r'(\w+)="([^"]*)"', params_s))
        if kind.lower() == "basic":
            if self.credentials is None or self._basic:
                return False
            self._basic = True
            return True
        if kind.lower() != "bearer" or "realm" not in params:
            return False
        realm, creds = self._url(params["realm"]), self.credentials
        if creds is not None and not realm_may_receive_credentials(str(realm), self.base):
            raise UserError(
                f"registry {self.host} names the token service {_origin(realm)}: not HTTPS and not its own host; "
                "refusing to send this registry's credentials there in clear text",
                "the registry's token service must use HTTPS",
            )
        query = {"service": params.get("service", ""), "scope": scope}
        request = self._http.build_request("GET", realm, params={k: v for k, v in query.items() if v},
                                           headers=_basic(creds) if creds else {})
        service = f"token service {_origin(realm)} of registry {self.host}"
        try:
            tok = self._bounded(lambda: _read(self._http.send(request, stream=True), self.host), self._deadline(0))
        except (httpx.TransportError, Transient) as exc:
            raise UserError(f"{service} is unreachable or failing: {exc}") from exc
        except httpx.TooManyRedirects as exc:
            raise UserError(f"{service} redirects in a loop", "the registry is misconfigured; tell its operator") from exc
        if tok.status_code != 200:
            hint = (missing_credentials_hint(self.host) if creds is None
                    else "check the username and password for this registry")
            raise UserError(f"authentication to registry {self.host} failed: token service answered {tok.status_code}",
                            hint)
        try:
            body = _json(tok.content)
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise UserError(f"{service} returned no token")
        if not _B64TOKEN.match(token):  # it would be an illegal header; never shown, it is a credential
            raise UserError(f"{service} returned a token that is not a Bearer token (RFC 6750 syntax); refusing it",
                            "the token service is broken or not what the registry should name; tell its operator")
        self._tokens[scope] = token
        return True

    def _down(self, exc: Exception) -> UserError:
        return UserError(
            f"registry {self.host} is unreachable or failing: {exc}",
            "check that it is up and reachable, then run the same command again (a push resumes: blobs it has are skipped)",
        )

    def _http_error(self, resp: Answer, method: str, url: str) -> UserError:
        detail = resp.content.decode(errors="replace")
        try:
            errors = _json(resp.content).get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or detail
        except (ValueError, AttributeError, TypeError):  # not the distribution API's error body
            pass
        path = url.split("?")[0].removeprefix(self.base)
        if resp.status_code < 400:  # a status the API does not give this request, not a refusal
            return UserError(f"registry {self.host} answered {method} {path} with HTTP {resp.status_code}, "
                             "which the OCI distribution API does not give it", "tell the registry's operator")
        return UserError(f"registry {self.host} refused {method} {path}: HTTP {resp.status_code} {_shown(detail, 300)}")

    # -- blobs ---------------------------------------------------------------------------------------

    def has_blob(self, repo: str, digest: str) -> bool:
        resp = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", _pull(repo), missing_ok=True)
        return resp is not None

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount: the registry links a blob it holds in another repository, no upload."""
        resp = self._request(
            "POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={from_repo}",
            f"{_push(repo)} {_pull(from_repo)}", ok=(201, 202),
        )
        assert resp is not None
        if resp.status_code == 202:  # not mountable: drop the session it opened instead
            self._cancel(resp, repo)
            return False
        return True

    def _cancel(self, resp: Answer, repo: str) -> None:
        location = resp.headers.get("location")
        if location:
            self._request("DELETE", location, _push(repo), ok=(204, 404), missing_ok=True, retry=False)

    def upload_blob(self, repo: str, path: Path, desc: Descriptor) -> None:
        """Upload one blob; a dropped connection resumes where the registry says the upload got to."""
        size = path.stat().st_size
        if size != desc.size:
            raise UserError(f"blob {desc.digest} at {path} has {size} bytes, its descriptor says {desc.size}")
        location, offset = self._start_upload(repo), 0
        with path.open("rb") as fh:
            def attempt() -> None:
                nonlocal location, offset
                if offset == 0 and size <= self.chunk_size:
                    fh.seek(0)
                    self._put_final(repo, location, desc.digest, fh.read())
                    self._progress(size)
                    return
                while offset < size:
                    fh.seek(offset)
                    chunk = fh.read(self.chunk_size)
                    location, offset = self._patch(repo, location, chunk, offset)
                    self._progress(len(chunk))
                self._put_final(repo, location, desc.digest, b"")

            def resume() -> None:
                nonlocal location, offset
                location, offset = self._upload_status(repo, location)
                if offset:
                    self.resumed += 1

            self._retrying(attempt, self.retries, before_retry=resume)

    def _start_upload(self, repo: str) -> str:
        resp = self._request("POST", f"/v2/{repo}/blobs/uploads/", _push(repo), ok=(202,))
        assert resp is not None
        if not resp.headers.get("location"):
            raise UserError(f"registry {self.host} opened an upload without saying where it goes (no Location)",
                            "the registry does not follow the OCI distribution API; tell its operator")
        return resp.headers["location"]

    def _patch(self, repo: str, location: str, chunk: bytes, offset: int) -> tuple[str, int]:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            "Content-Length": str(len(chunk)),
        }
        resp = self._once("PATCH", location, repo, headers, chunk, ok=(202,))
        return resp.headers.get("location", location), _range_end(resp, offset + len(chunk))

    def _put_final(self, repo: str, location: str, digest: str, data: bytes) -> None:
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        self._once("PUT", f"{location}{sep}digest={digest}", repo, headers, data, ok=_DONE)

    def _once(self, method: str, url: str, repo: str, headers: dict[str, str], data: bytes,
              ok: tuple[int, ...]) -> Answer:
        """An upload step: transient failures go back to `upload_blob`, which asks where to resume."""
        try:
            resp = self._send(method, url, _push(repo), headers, data)
        except httpx.TransportError as exc:
            raise Transient(str(exc) or type(exc).__name__) from exc
        if resp.status_code in RETRY_STATUS:
            raise Transient(f"HTTP {resp.status_code}")
        if resp.status_code not in ok:
            raise self._http_error(resp, method, url)
        return resp

    def _upload_status(self, repo: str, location: str) -> tuple[str, int]:
        """Where an interrupted upload stands: (location, next offset); a lost session starts again at 0."""
        resp = self._request("GET", location, _push(repo), ok=(204, 400, 404, 416))
        if resp is None or resp.status_code != 204:  # the registry dropped or invalidated the session
            return self._start_upload(repo), 0
        return resp.headers.get("location", location), _range_end(resp, 0)

    def _progress(self, n: int) -> None:
        if self.on_progress:
            self.on_progress(n)

    def download_blob(self, repo: str, desc: Descriptor, dest: Path) -> None:
        """Stream a blob to `dest`, refusing content that is not `desc`; retried from scratch on a dropped connection."""
        def attempt() -> None:
            resp, deadline = self._open(f"/v2/{repo}/blobs/{desc.digest}", _pull(repo), desc.size)
            try:
                if resp.status_code in RETRY_STATUS:
                    raise Transient(f"HTTP {resp.status_code}")
                if resp.status_code != 200:
                    raise UserError(f"registry {self.host} has no blob {desc.digest} in {repo} (HTTP {resp.status_code})")
                _write_stream(resp, dest, desc, self.host, deadline)
            finally:
                resp.close()

        self._retrying(attempt, self.retries)

    # -- manifests and tags ------------------------------------------------------------------------------

    def get_manifest(self, repo: str, ref: str, *, arch: str | None = None) -> oci.Manifest | None:
        """The image manifest `ref` names; with `arch`, a multi-platform index resolves to its linux/`arch`
        image (fetched by digest, so checked like any other)."""
        accept = (*oci.IMAGE_MANIFESTS, *(oci.IMAGE_INDEXES if arch else ()))
        resp = self._request("GET", f"/v2/{repo}/manifests/{ref}", _pull(repo),
                             headers={"Accept": ", ".join(accept)}, missing_ok=True)
        if resp is None:
            return None
        try:
            _json(resp.content)  # once, bounded, before oci reads it
        except ValueError as exc:
            raise UserError(f"registry {self.host} answered {repo}:{ref} with a manifest that is not JSON",
                            "the registry does not follow the OCI distribution API; tell its operator") from exc
        if ref.startswith("sha256:") and oci.digest_bytes(resp.content) != ref:
            raise UserError(
                f"registry {self.host} answered {repo}@{ref} with a manifest whose digest is "
                f"{oci.digest_bytes(resp.content)}; refusing it",
                "the registry (or something between us and it) serves other content than asked for",
            )
        media_type = resp.headers.get("content-type", "").split(";")[0] or None
        if arch and oci.is_index(resp.content, media_type):
            chosen = oci.platform_manifest(resp.content, arch, f"{self.host}/{repo}:{ref}")
            return self.get_manifest(repo, chosen.digest)
        return oci.Manifest.parse(resp.content, media_type)

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        """What a tag points at now (None: no such tag)."""
        resp = self._request("HEAD", f"/v2/{repo}/manifests/{tag}", _pull(repo),
                             headers={"Accept": ", ".join(oci.IMAGE_MANIFESTS)}, missing_ok=True)
        if resp is None:
            return None
        digest: str | None = resp.headers.get("docker-content-digest")
        if digest and _is_digest(digest):
            return digest
        m = self.get_manifest(repo, tag)
        return m.digest if m else None

    def put_manifest(self, repo: str, ref: str, manifest: oci.Manifest) -> None:
        self._request("PUT", f"/v2/{repo}/manifests/{ref}", _push(repo),
                      headers={"Content-Type": manifest.media_type}, content=manifest.raw, ok=_DONE)

    def list_tags(self, repo: str) -> list[str]:
        """Every tag of `repo`, page by page (`Link`); a malformed page, a page repeated, a page that adds
        nothing, pages on another host or more than `ANSWER_LIMIT` bytes of them stop with an error."""
        tags: set[str] = set()
        pages: set[httpx.URL] = set()
        listed = 0
        url: httpx.URL | None = self._url(f"/v2/{repo}/tags/list?n=1000")
        where = f"the tag list of {self.host}/{repo}"
        while url is not None:
            if not same_origin(str(url), self.base):
                raise UserError(f"{where} continues on {_origin(url)}, not this registry; refusing to follow it",
                                "the registry is misconfigured or hostile; tell its operator")
            if url in pages:
                raise UserError(f"{where} pages in a loop ({_shown(str(url))} again)",
                                "the registry is broken; tell its operator")
            pages.add(url)
            resp = self._request("GET", str(url), _pull(repo), missing_ok=True)
            if resp is None:
                raise UserError(f"repository {self.host}/{repo} does not exist", "check the source repository name")
            listed += len(resp.content)
            if listed > ANSWER_LIMIT:
                raise UserError(f"{where} is larger than {ANSWER_LIMIT >> 20} MiB; refusing to read more")
            page = _tag_page(resp.content, where)
            link = _NEXT.search(resp.headers.get("link", ""))
            if link and not set(page) - tags:
                raise UserError(f"{where} links on from a page with no new tag", "the registry is broken; tell its operator")
            tags.update(page)
            url = self._url(link.group(1), base=url) if link else None
        return sorted(tags)


def _pull(repo: str) -> str:
    return f"repository:{repo}:pull"


def _push(repo: str) -> str:
    return f"repository:{repo}:pull,push"


def _range_end(resp: Answer, default: int) -> int:
    """The next offset from a `Range: 0-N` header (N inclusive)."""
    m = re.match(r"^(?:bytes=)?0-(\d{1,18})$", resp.headers.get("range", ""))
    if not m:
        return default
    # "0-0" is what an empty upload reports; chunks are far larger than one byte.
    return int(m.group(1)) + 1 if int(m.group(1)) else 0


def _write_stream(resp: httpx.Response, dest: Path, desc: Descriptor, host: str, deadline: float) -> None:
    """Rename the content to `dest` only when it is exactly the blob asked for, and arrived by `deadline`."""
    with fs.staged_file(dest) as out:
        for block in resp.iter_bytes(1 << 20):
            if out.size + len(block) > desc.size:  # a registry that streams without end fills no disk
                raise _wrong_blob(host, desc, f"more than its {desc.size} bytes")
            if time.monotonic() > deadline:
                raise Transient(f"blob {desc.digest} not complete in time ({out.size} of {desc.size} bytes)")
            out.write(block)
        if "sha256:" + out.sha256 != desc.digest:
            raise _wrong_blob(host, desc, f"content with digest sha256:{out.sha256}")
        out.commit()


def _wrong_blob(host: str, desc: Descriptor, what: str) -> UserError:
    return UserError(f"registry {host} sent {what} for blob {desc.digest}; refusing it",
                     "the registry (or something between us and it) serves other content than asked for")


def _read(resp: httpx.Response, host: str) -> Answer:
    """The whole answer, refused past `ANSWER_LIMIT` bytes (a blob is streamed instead, see `_write_stream`)."""
    body = bytearray()
    try:
        for block in resp.iter_bytes():
            body += block
            if len(body) > ANSWER_LIMIT:
                raise UserError(f"registry {host} answered {resp.request.method} {resp.request.url.path} with more "
                                f"than {ANSWER_LIMIT >> 20} MiB; refusing to read more",
                                "no manifest, tag list or token is that large: the registry is broken or hostile")
    finally:
        resp.close()
    return Answer(resp.status_code, resp.headers, bytes(body))


def _is_digest(text: str) -> bool:
    try:
        check_digest(text)
    except UserError:
        return False
    return True


def _close(resp: Answer | httpx.Response) -> None:
    if isinstance(resp, httpx.Response):
        resp.close()


def _json(raw: bytes) -> Any:
    """JSON of an answer; ValueError for anything else (too deep included)."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


def _tag_page(raw: bytes, where: str) -> list[str]:
    try:
        body = _json(raw)
        tags = body.get("tags") or []
    except (ValueError, AttributeError) as exc:
        raise UserError(f"{where} is not the JSON object the OCI distribution API names",
                        "the registry is broken or hostile; tell its operator") from exc
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise UserError(f"{where} holds tags that are not a list of strings", "the registry is broken; tell its operator")
    for tag in tags:
        try:
            validate_tag(tag)
        except ValueError as exc:
            raise UserError(f"{where} names an invalid tag {_shown(tag)}", "the registry is broken; tell its operator") \
                from exc
    return tags


def _basic(creds: Credentials) -> dict[str, str]:
    raw = f"{creds.username}:{creds.password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def _shown(text: str, limit: int = 100) -> str:
    """Text a registry sent, safe for one error line: quoted, control characters escaped, cut short."""
    return repr(" ".join(text.split())[:limit])
