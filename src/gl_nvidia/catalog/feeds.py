"""The outside sources of the catalog, each read from a URL or a local file into typed data.

- Garden Linux Release Database (GLRD): `{"releases": [...]}` documents as published
  (`releases-major.json`, `releases-minor.json`) and printed by `glrd --output-format json`. Shape from
  gardenlinux/glrd `docs/reference/schema.md`: `type` "major" with `version.major` and
  `lifecycle.{released,extended,eol}.{isodate,timestamp}`; "minor" with `version.{major,minor}` (+ `patch`
  from 2017 on). Older GLRD data names them "stable"/"patch" with `version.micro`; both are read.
- NVIDIA's data-center `releases.json` (docs.nvidia.com/datacenter/tesla/drivers/releases.json): an object
  keyed by branch ("570"), each `{"type": "production branch" | "lts branch" | "new feature branch",
  "driver_info": [{"release_version": "570.172.08", "release_date": ..., ...}, ...]}`, newest first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from gl_nvidia import net
from gl_nvidia.catalog.lock import DriverVersion, describe_validation_error
from gl_nvidia.errors import UserError


def fetch(location: str, what: str) -> bytes:
    """The bytes at a URL (http/https) or a local path (file:// or plain)."""
    if location.startswith(("http://", "https://")):
        try:
            with net.client() as http:
                resp = net.get(http, location)
        except httpx.HTTPError as exc:
            raise UserError(f"{what} unreachable: {location}: {exc}", "check the URL and the network, or pass a local file") from exc
        if resp.status_code != 200:
            raise UserError(f"{what} answered HTTP {resp.status_code}: {location}", "check the URL")
        return resp.content
    path = Path(location.removeprefix("file://"))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{what} unreadable: {path}: {exc.strerror}", "check the path") from exc


def _json(data: bytes, what: str, location: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} is not valid JSON: {location}: {exc}", "check the source file or URL") from exc
    except ValueError as exc:  # a number Python refuses to read: more than 4300 digits
        problem = str(exc).split(" for integer string conversion")[0]
        raise UserError(f"{what} is not valid JSON: {location}: {problem}", "check the source file or URL") from exc
    except RecursionError as exc:
        raise UserError(f"{what} is not valid JSON: {location}: nested too deeply",
                        "check the source file or URL") from exc


# --- GLRD -------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class GLRelease:
    """One minor/patch release: "1877.3" (before 2017) or "2150.9.0"."""

    key: tuple[int, ...]
    version: str
    released: date


@dataclass(frozen=True)
class GLMajor:
    major: int
    released: date
    extended: date | None
    eol: date | None  # None: not announced yet
    releases: tuple[GLRelease, ...]  # oldest first

    def in_maintenance(self, today: date) -> bool:
        """Released, and its end of maintenance is after today (eol today means out)."""
        return self.released <= today and (self.eol is None or self.eol > today)

    def latest(self, today: date) -> GLRelease | None:
        out = [r for r in self.releases if r.released <= today]
        return out[-1] if out else None


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Date(_Loose):
    isodate: date | None = None
    timestamp: int | None = None


class _Lifecycle(_Loose):
    released: _Date
    extended: _Date | None = None
    eol: _Date | None = None


class _Version(_Loose):
    major: int | str
    minor: int | None = None
    patch: int | None = None
    micro: int | None = None


class _Release(_Loose):
    name: str
    type: str
    version: _Version
    lifecycle: _Lifecycle


class _GLRDDocument(_Loose):
    releases: list[_Release]


def parse_glrd(documents: list[tuple[str, bytes]]) -> list[GLMajor]:
    """Majors with their minor releases from one or more GLRD documents (location, bytes)."""
    majors: dict[int, _Release] = {}
    minors: dict[int, list[GLRelease]] = {}
    for location, data in documents:
        try:
            doc = _GLRDDocument.model_validate(_json(data, "GLRD data", location))
        except ValidationError as exc:
            raise UserError(f"GLRD data {location}: {describe_validation_error(exc)}",
                            "expected GLRD's {\"releases\": [...]} JSON") from exc
        for rel in doc.releases:
            if rel.type in ("major", "stable") and isinstance(rel.version.major, int):
                majors[rel.version.major] = rel
            elif rel.type in ("minor", "patch") and isinstance(rel.version.major, int):
                major, minor = rel.version.major, rel.version.minor
                patch = rel.version.patch if rel.version.patch is not None else rel.version.micro
                if minor is None or rel.lifecycle.released.isodate is None:
                    raise UserError(f"GLRD data {location}: release {rel.name} lacks version.minor or a release date")
                # From 2017 on versions have three parts (GLRD schema v2).
                parts = (major, minor) if major < 2017 or patch is None else (major, minor, patch)
                minors.setdefault(major, []).append(
                    GLRelease(parts, ".".join(map(str, parts)), rel.lifecycle.released.isodate)
                )
            # nightly, dev and next releases never get driver images
    out = []
    for major, rel in sorted(majors.items()):
        lc = rel.lifecycle
        if lc.released.isodate is None:
            raise UserError(f"GLRD major {major} has no release date")
        out.append(GLMajor(
            major=major,
            released=lc.released.isodate,
            extended=lc.extended.isodate if lc.extended else None,
            eol=lc.eol.isodate if lc.eol else None,
            releases=tuple(sorted(set(minors.get(major, [])))),
        ))
    if not out:
        raise UserError("GLRD data lists no major releases", "point sources.glrd at releases-major.json")
    return out


# --- NVIDIA -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriverRelease:
    version: str
    release_date: str | None


@dataclass(frozen=True)
class DriverBranch:
    branch: str
    type: str
    releases: tuple[DriverRelease, ...]  # newest first

    @property
    def number(self) -> int:
        return int(self.branch)


class _DriverInfo(_Loose):
    release_version: DriverVersion  # becomes a tag and a file name, and is sorted by its numbers
    release_date: str | None = None


class _Branch(_Loose):
    type: str
    driver_info: list[_DriverInfo]


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def parse_nvidia(data: bytes, location: str) -> list[DriverBranch]:
    raw = _json(data, "NVIDIA releases.json", location)
    if not isinstance(raw, dict):
        raise UserError(f"NVIDIA releases.json {location}: expected an object keyed by branch")
    out = []
    for branch, body in raw.items():
        if not re.fullmatch(r"\d+", str(branch)):
            continue  # not a driver branch entry
        try:
            parsed = _Branch.model_validate(body)
        except ValidationError as exc:
            raise UserError(f"NVIDIA releases.json {location}: branch {branch}: {describe_validation_error(exc)}") from exc
        releases = sorted(
            (DriverRelease(d.release_version, d.release_date) for d in parsed.driver_info),
            key=lambda r: version_key(r.version), reverse=True,
        )
        for r in releases:
            if not r.version.startswith(f"{branch}."):
                raise UserError(f"NVIDIA releases.json {location}: version {r.version} listed under branch {branch}")
        out.append(DriverBranch(str(branch), parsed.type, tuple(releases)))
    if not out:
        raise UserError(f"NVIDIA releases.json {location} lists no driver branches")
    return sorted(out, key=lambda b: b.number, reverse=True)
