"""Fetching one file: streamed to a temp file beside its destination, retried, checksum-checked, renamed.

The one way the build stage and the apt client bring files in, so both retry, verify and clean up alike:
a download that fails or does not match its sha256 leaves nothing under `dest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx

from gl_nvidia import ui
from gl_nvidia.errors import UserError

log = logging.getLogger(__name__)

ATTEMPTS = 4


def download(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    mismatch_hint: str,
    not_found: UserError | None = None,
    retry_delay: float = 1.0,
) -> None:
    """Fetch `url` (http(s), file:// or a plain path) to `dest`.

    Server errors, dropped connections and short reads are retried with backoff; a 404 is an answer
    (`not_found`, when given, says what it means to the caller); a checksum mismatch is final.
    """
    error: str | None = None
    for attempt in range(ATTEMPTS):
        if error is not None:
            log.warning("download %s: %s; retrying (%d/%d)", url, error, attempt + 1, ATTEMPTS)
            time.sleep(retry_delay * 2 ** (attempt - 1))
        try:
            error = _attempt(client, url, dest, sha256, mismatch_hint, not_found)
        except httpx.HTTPError as exc:
            error = str(exc) or type(exc).__name__
        if error is None:
            return
    raise UserError(f"download failed after {ATTEMPTS} attempts: {url}: {error}", "check the network and the URL")


def _attempt(client: httpx.Client, url: str, dest: Path, sha256: str | None, mismatch_hint: str,
             not_found: UserError | None) -> str | None:
    """One try: None when `dest` is in place, else why it failed in a way worth retrying."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as fh, _open(client, url, not_found) as (chunks, total):
            if isinstance(chunks, str):
                return chunks
            with ui.progress(transfer=True) as prog, ui.task(prog, f"download {dest.name}", total) as t:
                for chunk in chunks:
                    fh.write(chunk)
                    h.update(chunk)
                    t.advance(len(chunk))
            if total is not None and fh.tell() != total:
                return f"short read ({fh.tell()} of {total} bytes)"
        got = h.hexdigest()
        if sha256 and got != sha256:
            raise UserError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}", mismatch_hint)
        os.replace(tmp, dest)
        return None
    except OSError as exc:
        raise UserError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _open(
    client: httpx.Client, url: str, not_found: UserError | None
) -> Iterator[tuple[Iterator[bytes] | str, int | None]]:
    """(chunks, expected size) of `url`, or (reason to retry, None) for a server-side failure."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else url)
        try:
            fh = path.open("rb")
        except FileNotFoundError as exc:
            raise not_found or UserError(f"no such file: {path}") from exc
        with fh:
            yield iter(lambda: fh.read(1 << 20), b""), os.fstat(fh.fileno()).st_size
        return
    with client.stream("GET", url) as resp:
        if resp.status_code == 404:
            raise not_found or UserError(f"downloading {url} failed: HTTP 404 (not found)")
        if resp.status_code >= 500:
            yield f"HTTP {resp.status_code}", None
            return
        if resp.status_code != 200:
            raise UserError(f"downloading {url} failed: HTTP {resp.status_code}")
        yield resp.iter_bytes(1 << 20), int(resp.headers.get("content-length", 0)) or None
