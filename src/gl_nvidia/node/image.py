"""What this driver image holds (node/layout.py paths under the image root): driver version, module sets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import ModuleFile, ModuleParts, PartPaths, module_file
from . import layout
from .decide import MODULE_TYPES, NodeError


@dataclass(frozen=True)
class SplitModule:
    """A module the node links before insmod: its parts in the image and what the link must give."""

    parts: ModuleParts
    interface: Path
    binary: Path
    lds: Path
    sha256: str  # of the module linked at build time (same linker, same bytes)
    srcversion: str
    objtool: Path | None = None  # the kernel's objtool and the final object, when its pipeline runs objtool
    final: Path | None = None

    @property
    def paths(self) -> PartPaths:
        return PartPaths(str(self.interface), str(self.binary), str(self.lds), str(self.objtool or ""),
                         str(self.final or ""))

    def files(self) -> list[Path]:
        return [self.interface, self.binary, self.lds, *(p for p in (self.objtool, self.final) if p is not None)]


@dataclass(frozen=True)
class Image:
    root: Path  # "/" inside the driver container
    driver_version: str
    driver_branch: str
    # kernel -> module type -> version of the module source it was built from (from the manifest)
    source_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    # (kernel, module type, module) -> manifest record, for modules shipped as interface + binary
    split: dict[tuple[str, str, str], ModuleFile] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> Image:
        path = root / str(layout.MANIFEST).lstrip("/")
        try:
            d = json.loads(path.read_text())
            versions = {
                k: {t: ms["source_version"] for t, ms in kb.get("module_sets", {}).items()}
                for k, kb in d.get("kernels", {}).items()
            }
            split = {
                (k, t, f.name.removesuffix(".ko")): f
                for k, kb in d.get("kernels", {}).items()
                for t, ms in kb.get("module_sets", {}).items()
                for f in map(module_file, ms.get("modules", ()))
                if f.parts is not None
            }
            return cls(root, d["driver_version"], d["driver_branch"], versions, split)
        except (OSError, ValueError, KeyError, TypeError) as exc:
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
        return [t for t in MODULE_TYPES if self.has_module(kernel, t, "nvidia")]

    def has_module(self, kernel: str, module_type: str, module: str) -> bool:
        parts = self.split_module(kernel, module_type, module)
        if parts is not None:
            return all(p.is_file() for p in parts.files())
        return self.ko(kernel, module_type, module).is_file()

    def split_module(self, kernel: str, module_type: str, module: str) -> SplitModule | None:
        """The parts of a module shipped split (None: the image holds the whole .ko)."""
        record = self.split.get((kernel, module_type, module))
        if record is None or record.parts is None:
            return None
        parts = record.parts
        here = self.at(layout.modules_dir(kernel, module_type))
        step = parts.objtool
        return SplitModule(parts, here / parts.interface, self.at(layout.binaries_dir(module_type)) / parts.binary,
                           here / parts.lds, record.sha256, record.srcversion,
                           here / step.tool if step else None, here / step.final if step else None)

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
