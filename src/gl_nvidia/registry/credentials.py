"""Registry credentials, scoped to one registry host, and where they may be sent.

A host's credentials come from the environment (`GL_NVIDIA_REGISTRY_USERNAME`/`_PASSWORD`, only
for the host `GL_NVIDIA_REGISTRY_HOST` names) or from the docker config's `auths` entry for that
host, with docker's key rules: `host`, `https://host`, `http://host/v1/` all name `host`.
Credential helpers (`credsStore`, `credHelpers`) and identity tokens are not read.

They go to that host's registry (plain HTTP only for loopback or `--plain-http` hosts) and to the
token service its challenge names (the distribution spec's token flow, which may live on another
host) only when that realm is HTTPS, loopback, or the registry's own `--plain-http` host: a
password never crosses the network in clear text to a host the user did not choose. Any other URL
the registry names (an upload `Location`, a redirect) gets them only on the registry's own origin.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gl_nvidia.errors import UserError

ENV_HOST = "GL_NVIDIA_REGISTRY_HOST"
ENV_USERNAME = "GL_NVIDIA_REGISTRY_USERNAME"
ENV_PASSWORD = "GL_NVIDIA_REGISTRY_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def registry_host(key: str) -> str:
    """docker's ConvertToHostname: `https://host:5000/v1/` -> `host:5000` (config keys, env values)."""
    return key.removeprefix("http://").removeprefix("https://").split("/", 1)[0]


def find_credentials(host: str) -> Credentials | None:
    """This host's credentials, never another host's: the environment's, else the docker config's."""
    user, password = os.environ.get(ENV_USERNAME), os.environ.get(ENV_PASSWORD)
    if user and password and registry_host(os.environ.get(ENV_HOST, "")) == host:
        return Credentials(user, password)
    return docker_credentials(host, docker_config_path())


def docker_config_path() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker", "config.json")


def docker_credentials(host: str, config: Path) -> Credentials | None:
    """The `auths` entry for `host`: the exact key first, then any key naming the same host."""
    auths = _auths(config)
    keys = [host] if host in auths else [k for k in auths if registry_host(k) == host]
    for key in keys:
        entry = auths[key]
        if not isinstance(entry, dict):
            raise _malformed(config, f"auths[{key!r}] is not an object")
        auth = entry.get("auth")
        if not auth:
            continue
        if not isinstance(auth, str):
            raise _malformed(config, f"auths[{key!r}].auth is not a string")
        try:
            user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:  # their messages quote the credential's bytes
            raise _malformed(config, f"auths[{key!r}].auth is not base64 of USER:PASSWORD in UTF-8") from exc
        if not sep:
            raise _malformed(config, f"auths[{key!r}].auth has no ':' between user and password")
        return Credentials(user, password)
    return None


def _docker_config(config: Path) -> dict[str, Any]:
    try:
        text = config.read_bytes().decode()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UserError(f"cannot read docker config {config}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise _malformed(config, f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _malformed(config, f"not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _malformed(config, "not a JSON object")
    return data


def _auths(config: Path) -> dict[str, Any]:
    auths = _docker_config(config).get("auths") or {}
    if not isinstance(auths, dict):
        raise _malformed(config, "'auths' is not an object keyed by registry host")
    return auths


def _malformed(config: Path, why: str) -> UserError:
    return UserError(f"docker config {config} is malformed: {why}",
                     "fix or remove it (docker login rewrites it), or point DOCKER_CONFIG at another directory")


def missing_credentials_hint(host: str) -> str:
    """What to do when `host` asks for credentials we do not have for it."""
    named = os.environ.get(ENV_HOST)
    if os.environ.get(ENV_USERNAME) and (named is None or registry_host(named) != host):
        return (f"{ENV_USERNAME}/{ENV_PASSWORD} apply only to the host {ENV_HOST} names "
                f"({'unset' if named is None else repr(named)}); set {ENV_HOST}={host}, or docker login {host}")
    config = _docker_config(docker_config_path())
    helper = (config.get("credHelpers") or {}).get(host) if isinstance(config.get("credHelpers"), dict) else None
    if helper or config.get("credsStore"):
        return (f"the docker config keeps credentials in a credential helper, which gl-nvidia does not read; "
                f"set {ENV_HOST}={host}, {ENV_USERNAME} and {ENV_PASSWORD}")
    return f"set {ENV_HOST}={host}, {ENV_USERNAME} and {ENV_PASSWORD} (or docker login {host})"


def is_loopback(hostname: str | None) -> bool:
    if hostname is None:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


_PORTS = {"http": 80, "https": 443}


def same_origin(url: str, registry_base: str) -> bool:
    """Is `url` on the registry's own origin (scheme, host, port), the only place its credentials go?"""
    try:
        a, b = urlsplit(url), urlsplit(registry_base)
        return a.scheme in _PORTS and (a.scheme, a.hostname, a.port or _PORTS[a.scheme]) == \
            (b.scheme, b.hostname, b.port or _PORTS.get(b.scheme))
    except ValueError:  # a port that is no number: not the registry's
        return False


def realm_may_receive_credentials(realm: str, registry_base: str) -> bool:
    """May a registry's credentials go to the token service its challenge names?

    HTTPS realms on any host (Docker Hub's registry and token service are different hosts), loopback
    realms, and a plain-HTTP realm on the registry's own host when the registry itself was chosen
    to be talked to over plain HTTP (loopback or `--plain-http`). Never a plain-HTTP realm elsewhere.
    """
    realm_url, registry_url = urlsplit(realm), urlsplit(registry_base)
    if realm_url.scheme == "https":
        return True
    if realm_url.scheme != "http":
        return False
    return is_loopback(realm_url.hostname) or (
        registry_url.scheme == "http" and realm_url.netloc == registry_url.netloc
    )
