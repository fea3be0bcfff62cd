"""Gardener's view of Garden Linux: the versions a landscape offers (`CloudProfile`) and the versions a
cluster's worker pools run (`Shoot`), read from `core.gardener.cloud/v1beta1` documents as the garden's
API server serves them (`kubectl get cloudprofile NAME -o yaml`).

Only the fields preflight needs are typed; everything else in the documents is ignored. Where Gardener
defaults a field, the same default applies here (an image version without architectures offers amd64; a
pool without an architecture is amd64), so a document written by hand reads as Gardener would read it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML

from gl_nvidia import yamldoc
from gl_nvidia.catalog.lock import describe_validation_error
from gl_nvidia.errors import UserError

API_VERSION = "core.gardener.cloud/v1beta1"
IMAGE_NAME = "gardenlinux"  # the machine image name Gardener's CloudProfiles give Garden Linux
# Garden Linux builds every hyperscaler and cloud platform (aws, azure, gcp, alicloud, openstack, vsphere...)
# on its `cloud` feature, with the cloud kernel; the bare-metal providers boot its `metal` images.
METAL_PROVIDERS = frozenset({"metal", "ironcore-metal", "equinix-metal"})
DEFAULT_ARCH = "amd64"  # Gardener's default for image versions and worker pools that name none
NOT_OFFERED = ("expired", "unavailable")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Stage(_Model):
    classification: Literal["unavailable", "preview", "supported", "deprecated", "expired"]
    startTime: datetime | None = None


class _Flavor(_Model):
    architecture: list[str] = Field(default_factory=list)


class _ImageVersion(_Model):
    version: str = Field(min_length=1)
    expirationDate: datetime | None = None
    classification: Literal["preview", "supported", "deprecated"] | None = None
    lifecycle: list[_Stage] = Field(default_factory=list)
    architectures: list[str] = Field(default_factory=list)
    capabilityFlavors: list[_Flavor] = Field(default_factory=list)


class _MachineImage(_Model):
    name: str
    versions: list[_ImageVersion]


class _MachineType(_Model):
    name: str
    gpu: int = 0  # a Kubernetes quantity; GPUs come whole ("8" reads as 8)


class _Capability(_Model):
    name: str
    values: list[str] = Field(default_factory=list)


class _CloudProfileSpec(_Model):
    type: str
    machineImages: list[_MachineImage]
    machineTypes: list[_MachineType] = Field(default_factory=list)
    machineCapabilities: list[_Capability] = Field(default_factory=list)


class _Meta(_Model):
    name: str = ""


class _CloudProfile(_Model):
    apiVersion: Literal["core.gardener.cloud/v1beta1"]
    kind: Literal["CloudProfile"]
    metadata: _Meta = _Meta()
    spec: _CloudProfileSpec


class _ShootImage(_Model):
    name: str
    version: str | None = None


class _Machine(_Model):
    type: str
    image: _ShootImage | None = None
    architecture: str | None = None


class _Worker(_Model):
    name: str
    machine: _Machine


class _ShootProvider(_Model):
    type: str
    workers: list[_Worker] = Field(default_factory=list)


class _CloudProfileRef(_Model):
    name: str


class _ShootSpec(_Model):
    provider: _ShootProvider
    cloudProfileName: str | None = None
    cloudProfile: _CloudProfileRef | None = None


class _Shoot(_Model):
    apiVersion: Literal["core.gardener.cloud/v1beta1"]
    kind: Literal["Shoot"]
    metadata: _Meta = _Meta()
    spec: _ShootSpec


class ImageVersion(_Model):
    """One Garden Linux version of a CloudProfile, classified as of the time it was read."""

    version: str
    classification: str  # preview | supported | deprecated | expired | unavailable
    architectures: tuple[str, ...]

    @property
    def offered(self) -> bool:
        return self.classification not in NOT_OFFERED


class CloudProfile(_Model):
    name: str
    provider: str
    versions: tuple[ImageVersion, ...]  # Garden Linux's, in the profile's order
    gpu_machine_types: frozenset[str]  # machine types with at least one GPU


class WorkerPool(_Model):
    name: str
    machine_type: str
    image: str | None
    version: str | None
    arch: str


class Shoot(_Model):
    name: str
    provider: str
    cloud_profile: str | None
    pools: tuple[WorkerPool, ...]


def flavour_of(provider: str) -> str:
    """The Garden Linux kernel flavour a provider's machines boot."""
    return "metal" if provider in METAL_PROVIDERS else "cloud"


def classification(v: _ImageVersion, now: datetime) -> str:
    """A version's state now: the lifecycle stage in force, else `classification` (default supported) unless
    `expirationDate` has passed, as Gardener reads them."""
    if v.lifecycle:
        started = [s for s in v.lifecycle if s.startTime is None or _utc(s.startTime) <= now]
        return started[-1].classification if started else "unavailable"
    if v.expirationDate is not None and _utc(v.expirationDate) <= now:
        return "expired"
    return v.classification or "supported"


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _architectures(v: _ImageVersion, capabilities: list[_Capability]) -> tuple[str, ...]:
    if v.architectures:
        return tuple(v.architectures)
    flavoured = [a for f in v.capabilityFlavors for a in f.architecture]
    if flavoured:
        return tuple(dict.fromkeys(flavoured))
    defined = [c.values for c in capabilities if c.name == "architecture"]
    return tuple(defined[0]) if defined and defined[0] else (DEFAULT_ARCH,)


def _document(text: str, where: str) -> Any:
    doc = yamldoc.load(YAML(typ="safe"), text, where)
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a {API_VERSION} document (a mapping)",
                        "pass what `kubectl get cloudprofile|shoot NAME -o yaml` prints")
    return doc


def _invalid(where: str, kind: str, exc: ValidationError) -> UserError:
    return UserError(f"{where}: not a {API_VERSION} {kind}: {describe_validation_error(exc)}",
                     f"pass what `kubectl get {kind.lower()} NAME -o yaml` prints")


def parse_cloudprofile(text: str, where: str, now: datetime) -> CloudProfile:
    try:
        cp = _CloudProfile.model_validate(_document(text, where))
    except ValidationError as exc:
        raise _invalid(where, "CloudProfile", exc) from exc
    images = [i for i in cp.spec.machineImages if i.name == IMAGE_NAME]
    versions = tuple(ImageVersion(version=v.version, classification=classification(v, now),
                                  architectures=_architectures(v, cp.spec.machineCapabilities))
                     for i in images for v in i.versions)
    return CloudProfile(name=cp.metadata.name, provider=cp.spec.type, versions=versions,
                        gpu_machine_types=frozenset(t.name for t in cp.spec.machineTypes if t.gpu > 0))


def parse_shoot(text: str, where: str) -> Shoot:
    try:
        shoot = _Shoot.model_validate(_document(text, where))
    except ValidationError as exc:
        raise _invalid(where, "Shoot", exc) from exc
    spec = shoot.spec
    pools = tuple(WorkerPool(name=w.name, machine_type=w.machine.type,
                             image=w.machine.image.name if w.machine.image else None,
                             version=w.machine.image.version if w.machine.image else None,
                             arch=w.machine.architecture or DEFAULT_ARCH)
                  for w in spec.provider.workers)
    profile = spec.cloudProfile.name if spec.cloudProfile else spec.cloudProfileName
    return Shoot(name=shoot.metadata.name, provider=spec.provider.type, cloud_profile=profile, pools=pools)
