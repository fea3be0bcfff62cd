"""Fetching one file: streamed to a temp file beside its destination, retried, checksum-checked, renamed.

The one way the build stage and the apt client bring files in, so both retry, verify and clean up alike:
a download that fails or does not match its sha256 leaves nothing under `dest`. `net.retrying` is the
one retry-with-backoff loop; `fs.staged_file` the one stream-hash-rename.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx

from gl_nvidia import fs, ui
from gl_nvidia.errors import UserError
from gl_nvidia.net import Transient, retrying

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
    try:
        retrying(lambda: _attempt(client, url, dest, sha256, mismatch_hint, not_found), retries=ATTEMPTS - 1,
                 delay_s=retry_delay, what=f"download {url}", transient=(Transient, httpx.HTTPError))
    except (Transient, httpx.HTTPError) as exc:
        raise UserError(f"download failed after {ATTEMPTS} attempts: {url}: {str(exc) or type(exc).__name__}",
                        "check the network and the URL") from exc


def _attempt(client: httpx.Client, url: str, dest: Path, sha256: str | None, mismatch_hint: str,
             not_found: UserError | None) -> None:
    """One try: `dest` is in place, or Transient says why it is worth another."""
    try:
        with fs.staged_file(dest) as out, _open(client, url, not_found) as (chunks, total):
            with ui.progress(transfer=True) as prog, ui.task(prog, f"download {dest.name}", total) as t:
                for chunk in chunks:
                    out.write(chunk)
                    t.advance(len(chunk))
            if total is not None and out.size != total:
                raise Transient(f"short read ({out.size} of {total} bytes)")
            if sha256 and out.sha256 != sha256:
                raise UserError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {out.sha256}",
                                mismatch_hint)
            out.commit()
    except OSError as exc:
        raise UserError(f"cannot write {dest}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _open(client: httpx.Client, url: str, not_found: UserError | None) -> Iterator[tuple[Iterator[bytes], int | None]]:
    """(chunks, expected size) of `url`; a server-side failure is Transient."""
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
            raise Transient(f"HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise UserError(f"downloading {url} failed: HTTP {resp.status_code}")
        yield resp.iter_bytes(1 << 20), int(resp.headers.get("content-length", 0)) or None
