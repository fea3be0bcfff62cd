"""Image references and their rules, owned here only: registry host, repository, tag, digest.

`host[:port]/repo[:tag][@digest]` as container runtimes read it (the distribution spec's grammar).
The image, registry, deploy and release stages all ask this module, so a reference one stage accepts
is a reference every other stage accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gl_nvidia.errors import UserError

# A registry host: DNS labels or a bracketed IPv6 address, then an optional port.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
# Repository path components: lower case, separated by one of the spec's separators.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_DIGEST = r"sha256:[0-9a-f]{64}"  # the only algorithm accepted
_REFERENCE = re.compile(rf"(?P<host>{_HOST})/(?P<repo>{_PATH})(?::(?P<tag>[^@/]+))?(?:@(?P<digest>{_DIGEST}))?")
# driver.repository: an optional host, then path components; the operator appends `/<driver.image>:<tag>`.
_REPOSITORY = re.compile(rf"(?:{_HOST}/)?{_PATH}|{_HOST}")
# OCI distribution spec: a tag is [A-Za-z0-9_][A-Za-z0-9._-]{0,127}
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def names_host(first: str) -> bool:
    """The host rule: runtimes read a reference's first component as a registry host only with a dot,
    a port or as localhost; anything else is a path on Docker Hub."""
    return "." in first or ":" in first or first == "localhost"


def validate_tag(tag: str) -> str:
    """The tag rule; ValueError says what is wrong, for the caller to name where the tag came from."""
    if not _TAG.fullmatch(tag):
        raise ValueError(
            f"invalid tag {tag!r}: tags are 1-128 characters of letters, digits, '_', '.', '-' "
            "and may not start with '.' or '-'"
        )
    return tag


def check_digest(digest: str) -> str:
    """The digest rule."""
    if not re.fullmatch(_DIGEST, digest):
        raise UserError(f"unsupported or malformed digest {digest!r}", "only sha256 digests are supported")
    return digest


def check_repository(repository: str, image: str) -> str:
    """`repository` when container runtimes pull `<repository>/<image>` from the registry it names."""
    if not _REPOSITORY.fullmatch(repository):
        raise UserError(f"invalid repository {repository!r}", "pass e.g. registry.example:5000/gl-nvidia")
    if not names_host(repository.split("/", 1)[0]):
        raise UserError(f"repository {repository!r} names no registry host: the operator would pull "
                        f"docker.io/{repository}/{image}", f"pass e.g. registry.example:5000/{repository}")
    return repository


@dataclass(frozen=True)
class Reference:
    """`host[:port]/repo[:tag][@digest]`."""

    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        m = _REFERENCE.fullmatch(ref)
        if not m or not names_host(m["host"]):
            raise UserError(
                f"invalid image reference {ref!r}",
                "write REGISTRY/REPOSITORY[:TAG], e.g. registry.example.com:5000/nvidia/driver "
                "(lower-case repository path)",
            )
        if m["tag"] is not None:
            try:
                validate_tag(m["tag"])
            except ValueError as exc:
                raise UserError(str(exc)) from exc
        return cls(m["host"], m["repo"], m["tag"], m["digest"])

    @property
    def repository(self) -> str:
        return f"{self.host}/{self.repo}"

    def __str__(self) -> str:
        return self.repository + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")
