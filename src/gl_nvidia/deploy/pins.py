"""Which driver versions deploy names, read from the catalog's typed lock (`versions.yaml` or a profile)."""

from __future__ import annotations

from datetime import date
from typing import Any

from gl_nvidia.catalog.feeds import version_key
from gl_nvidia.catalog.lock import Lock, Resolved
from gl_nvidia.catalog.refresh import refresh
from gl_nvidia.deploy.values import ValuesSettings, helm_values
from gl_nvidia.errors import UserError


def resolved(lock: Lock) -> Resolved:
    """The lock's `resolved` section; a profile without one (the embedded debian) is resolved now."""
    return lock.resolved or refresh(lock, date.today())


def default_driver_version(lock: Lock) -> str:
    """The newest tracked branch: a moving tag the precompiled images carry."""
    drivers = resolved(lock).drivers
    if not drivers:
        raise UserError("the lock tracks no driver branch", "run `gl-nvidia update`, or pass --driver-branch")
    return max(drivers, key=lambda d: version_key(d.version)).branch


def generated_values(lock: Lock) -> dict[str, Any]:
    """The Helm values `gl-nvidia values` writes for this lock: what a check assumes when it is given none."""
    return helm_values(ValuesSettings(default_driver_version(lock)))
