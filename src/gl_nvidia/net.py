"""The one HTTP seam: every HTTP client gl-nvidia talks through is made here, and the one retry loop.

A client says who calls (`User-Agent: gl-nvidia/<version>`), follows redirects, and gives up on a
connection, a write or a silence between two reads after `TIMEOUT_S` unless its caller waits longer
for reads (a 300 MB installer). What a caller adds stays the caller's: the registry client's answer cap,
deadline and same-origin credentials, GitHub's token, apt's signature checks. A client never repeats a
request by itself: whether that is safe is its caller's to say (a registry upload resumes where it got
to, a GitHub POST must not run twice), through `retrying`, or `get` for one small document.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

import gl_nvidia

log = logging.getLogger(__name__)
T = TypeVar("T")

USER_AGENT = f"gl-nvidia/{gl_nvidia.__version__}"
TIMEOUT_S = 30.0
RETRIES = 2  # of `get`: a dropped connection or a server error, tried again after 0.5 s, then 1 s
DELAY_S = 0.5
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})  # answers worth another try later


class Transient(Exception):
    """A failure worth another try: a dropped connection, a server error, a short read."""


def client(*, timeout_s: float = TIMEOUT_S, read_s: float | None = None) -> httpx.Client:
    """A client with the project's User-Agent, redirects and timeouts (`read_s`: between two reads, if longer)."""
    return httpx.Client(headers={"User-Agent": USER_AGENT}, follow_redirects=True,
                        timeout=httpx.Timeout(timeout_s, read=timeout_s if read_s is None else read_s))


def retrying(attempt: Callable[[], T], *, retries: int, delay_s: float, what: str,
             transient: tuple[type[Exception], ...] = (Transient, httpx.TransportError),
             before_retry: Callable[[], None] | None = None, level: int = logging.WARNING) -> T:
    """`attempt()`, tried again after a transient failure at most `retries` times, waiting `delay_s`,
    then twice as long each time (10 s at most); `before_retry` runs before each new try. The last
    transient failure is raised as it is, for the caller to say what it means."""
    failures = 0
    while True:
        try:
            return attempt()
        except transient as exc:
            failures += 1
            if failures > retries:
                raise
            delay = min(delay_s * 2 ** (failures - 1), 10.0)
            log.log(level, "%s: %s; retrying in %.1fs (%d/%d)", what, str(exc) or type(exc).__name__, delay,
                    failures, retries)
            time.sleep(delay)
            if before_retry is not None:
                before_retry()


class _Answered(Transient):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def get(http: httpx.Client, url: str) -> httpx.Response:
    """GET one small document, tried again after a dropped connection or a server error (`RETRIES`).
    The last answer is returned whatever its status, for the caller to say what it means; a connection
    that never worked raises httpx's error."""
    def attempt() -> httpx.Response:
        resp = http.get(url)
        if resp.status_code in RETRY_STATUS:
            raise _Answered(resp)
        return resp

    try:
        return retrying(attempt, retries=RETRIES, delay_s=DELAY_S, what=f"GET {url}")
    except _Answered as exc:
        return exc.response
