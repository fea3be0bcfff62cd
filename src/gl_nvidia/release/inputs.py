"""What a published image was built from, and whether a unit must be built again.

Everything here is known before anything is compiled: the unit's lock cell, the driver source's checksums
(from the apt index, or the installer's URL or sha256 and each redist archive's sha256 as NVIDIA's manifest
lists it), the base image spec's digest and the gl-nvidia version, and the module signing certificate's
fingerprint when modules are signed. The image carries them as manifest annotations; `decide` compares
them with the registry's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gl_nvidia.image.assemble import LABEL_PREFIX

INPUTS = f"{LABEL_PREFIX}.inputs"  # the inputs as canonical JSON
INPUTS_DIGEST = f"{LABEL_PREFIX}.inputs.digest"


@dataclass(frozen=True)
class UnitInputs:
    cell: Mapping[str, Any]  # the build unit as the lock resolves it (kernel, driver, arch, OS versions, types)
    sources: Mapping[str, str]  # driver source file -> sha256 (or the URL that names it)
    base: str  # digest of the base image spec
    tool: str  # gl-nvidia version
    module_cert: str = ""  # sha256 of the module signing certificate ("": unsigned modules)

    def as_dict(self) -> dict[str, Any]:
        # Absent when unsigned, so the digests of units published before module signing stay the same.
        signing = {"module-signing-cert": self.module_cert} if self.module_cert else {}
        return {"cell": dict(self.cell), "sources": dict(self.sources), "base": self.base, "gl-nvidia": self.tool,
                **signing}

    def text(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.text().encode()).hexdigest()

    def annotations(self) -> dict[str, str]:
        return {INPUTS: self.text(), INPUTS_DIGEST: self.digest}


def annotations_from_text(text: str) -> dict[str, str]:
    """The annotations for inputs given as their JSON text (the publish workflow passes them on)."""
    data = json.loads(text)
    return UnitInputs(data["cell"], data["sources"], data["base"], data["gl-nvidia"],
                      data.get("module-signing-cert", "")).annotations()


@dataclass(frozen=True)
class Decision:
    build: bool
    reason: str
    # The registry's tags may move to the new image: they hold one of other (or unrecorded) inputs, or forced.
    replace: bool = False


def _changed(recorded: str | None, now: UnitInputs) -> str:
    try:
        old = json.loads(recorded) if recorded else None
    except json.JSONDecodeError:
        old = None
    if not isinstance(old, dict):
        return "no inputs recorded"
    parts = [k for k, v in now.as_dict().items() if old.get(k) != v]
    return f"{', '.join(parts) or 'inputs'} changed"


def decide(inputs: UnitInputs, published: Mapping[str, Mapping[str, str] | None], force: bool) -> Decision:
    """Build a unit unless every tag exists with a manifest built from the same inputs.

    `published`: each of the unit's tags -> the annotations of the manifest it points at (None: no such tag).
    """
    differs = any(ann is not None and ann.get(INPUTS_DIGEST) != inputs.digest for ann in published.values())
    if force:
        return Decision(True, "forced (--force)", replace=True)
    for tag, ann in published.items():
        if ann is not None and ann.get(INPUTS_DIGEST) != inputs.digest:
            return Decision(True, f"{tag}: {_changed(ann.get(INPUTS), inputs)}", replace=True)
    missing = [tag for tag, ann in published.items() if ann is None]
    if missing:
        more = f" and {len(missing) - 1} more tag(s)" if len(missing) > 1 else ""
        return Decision(True, f"not published: {missing[0]}{more}", replace=differs)
    return Decision(False, f"published with the same inputs ({inputs.digest[:19]})")
