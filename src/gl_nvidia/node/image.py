"""What this driver image holds (node/layout.py paths under the image root): driver version, module sets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import layout
from .decide import MODULE_TYPES, NodeError


@dataclass(frozen=True)
class Image:
    root: Path  # "/" inside the driver container
    driver_version: str
    driver_branch: str
    # kernel -> module type -> version of the module source it was built from (from the manifest)
    source_versions: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> Image:
        path = root / str(layout.MANIFEST).lstrip("/")
        try:
            d = json.loads(path.read_text())
            versions = {
                k: {t: ms["source_version"] for t, ms in kb.get("module_sets", {}).items()}
                for k, kb in d.get("kernels", {}).items()
            }
            return cls(root, d["driver_version"], d["driver_branch"], versions)
        except (OSError, ValueError, KeyError) as exc:
            raise NodeError(
                f"this image has no readable driver manifest at {layout.MANIFEST} ({exc})",
                "the image was not built by `gl-nvidia image`; rebuild it",
            ) from exc

    def at(self, p: object) -> Path:
        return self.root / str(p).lstrip("/")

    def kernels(self) -> list[str]:
        d = self.at(layout.MODULES_ROOT)
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def present_types(self, kernel: str) -> list[str]:
        return [t for t in MODULE_TYPES if self.ko(kernel, t, "nvidia").is_file()]

    def module_types(self, kernel: str) -> list[str]:
        """Module types usable with this image's userspace: present, and of the same driver version
        (NVML refuses a kernel module of another version: "Driver/library version mismatch")."""
        return [t for t in self.present_types(kernel) if not self.mismatch(kernel, t)]

    def mismatch(self, kernel: str, module_type: str) -> str | None:
        """The module set's version when it differs from the userspace's, else None."""
        version = self.source_versions.get(kernel, {}).get(module_type)
        return version if version is not None and version != self.driver_version else None

    def ko(self, kernel: str, module_type: str, module: str) -> Path:
        return self.at(layout.modules_dir(kernel, module_type)) / f"{module}.ko"

    def has(self, binary: str) -> bool:
        return self.at(f"/usr/bin/{binary}").is_file()
