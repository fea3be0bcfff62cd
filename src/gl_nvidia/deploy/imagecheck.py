"""Does an image reference exist? Asked through the registry stage's client, one connection per host."""

from __future__ import annotations

from types import TracebackType

from gl_nvidia.reference import Reference
from gl_nvidia.registry.client import RegistryClient


class ImageChecker:
    """Answers `digest(reference)` for many references, reusing one client per registry host."""

    def __init__(self, retries: int = 1) -> None:
        # Few retries: a check that cannot reach the registry should say so in seconds, not minutes.
        self._retries = retries
        self._clients: dict[str, RegistryClient] = {}

    def _client(self, host: str) -> RegistryClient:
        if host not in self._clients:
            self._clients[host] = RegistryClient(host, retries=self._retries, backoff_s=0.2, timeout_s=20.0)
        return self._clients[host]

    def digest(self, reference: str) -> str | None:
        """The manifest digest the reference points at, or None when the registry has no such image."""
        ref = Reference.parse(reference)
        client = self._client(ref.host)
        if ref.digest:
            return ref.digest if client.get_manifest(ref.repo, ref.digest) is not None else None
        return client.manifest_digest(ref.repo, ref.tag or "latest")

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def __enter__(self) -> ImageChecker:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def image_exists(reference: str) -> bool:
    with ImageChecker() as checker:
        return checker.digest(reference) is not None
