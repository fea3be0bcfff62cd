"""What this driver image holds (node/layout.py paths under the image root): driver version, module sets,
and the manifest's sha256 of every file a module is made from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import ModuleFile, ModuleParts, ModulePatch, PartPaths, module_file
from . import layout
from .decide import MODULE_TYPES, NodeError

PULL_AGAIN = ("the image on this node is damaged or was altered after it was built: remove the node's copy "
              "(crictl rmi) and pull it again, or rebuild it with gl-nvidia image")


@dataclass(frozen=True)
class SplitModule:
    """A module the node links before insmod: its parts in the image and what the link must give."""

    parts: ModuleParts
    interface: Path
    binary: Path
    lds: Path
    sha256: str  # of the module linked at build time (same linker, same bytes)
    srcversion: str
    signature: Path | None = None  # the kernel's module signature over the gated bytes, to append once linked

    @property
    def paths(self) -> PartPaths:
        return PartPaths(str(self.interface), str(self.binary), str(self.lds))


@dataclass(frozen=True)
class PatchedModule:
    """A module the node rebuilds from NVIDIA's binary object and the build's patch (bundle.ModulePatch)."""

    patch: Path
    binary: Path
    sha256: str  # what the patch must give: the module the build gated
    srcversion: str
    signature: Path | None = None  # the kernel's module signature over the gated bytes, appended once rebuilt


@dataclass(frozen=True)
class Input:
    """A file a module is inserted or linked from, with the sha256 the image's manifest gives it."""

    path: Path
    sha256: str


@dataclass(frozen=True)
class Image:
    root: Path  # "/" inside the driver container
    driver_version: str
    driver_branch: str
    # kernel -> module type -> version of the module source it was built from (from the manifest)
    source_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    # (kernel, module type, module) -> manifest record (with `parts` for modules shipped as interface + binary)
    records: dict[tuple[str, str, str], ModuleFile] = field(default_factory=dict)
    # what the build could not ship and why ("fabricmanager" -> "no fabric manager for 535.309.01 in Debian")
    left_out: dict[str, str] = field(default_factory=dict)
    arch: str = ""  # the bundle's: amd64, arm64

    @classmethod
    def load(cls, root: Path) -> Image:
        path = root / str(layout.MANIFEST).lstrip("/")
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            kernels = d.get("kernels", {})
            versions = {
                k: {t: ms["source_version"] for t, ms in kb.get("module_sets", {}).items()}
                for k, kb in kernels.items()
            }
            records = {
                (k, t, f.name.removesuffix(".ko")): f
                for k, kb in kernels.items()
                for t, ms in kb.get("module_sets", {}).items()
                for f in map(module_file, ms.get("modules", ()))
            }
            left_out = {str(k): str(v) for k, v in (d.get("left_out") or {}).items()}
            return cls(root, _text(d, "driver_version"), _text(d, "driver_branch"), versions, records, left_out,
                       _text(d, "arch"))
        # A manifest of the wrong shape fails where it is read (a list for an object, a number for a name);
        # one nested past the parser's recursion limit fails in json itself.
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise NodeError(
                f"this image has no readable driver manifest at {layout.MANIFEST} ({_why(exc)})",
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
        """The manifest lists the module and every file it is made from is there."""
        inputs = self.inputs(kernel, module_type, module)
        return bool(inputs) and all(i.path.is_file() for i in inputs)

    def inputs(self, kernel: str, module_type: str, module: str) -> list[Input]:
        """The files insmod or ld reads for a module, with their manifest sha256 (none: not in the manifest).

        A whole module is its .ko; a split one its interface object, NVIDIA's binary object and the
        kernel's module.lds (the link recipe's flags are in the manifest itself); a patched one (IBT
        kernels) its patch and NVIDIA's binary object.
        """
        record = self.record(kernel, module_type, module)
        if record is None:
            return []
        patched = self.patched_module(kernel, module_type, module)
        if patched is not None and record.patch is not None:
            sig = [Input(patched.signature, record.signature.sha256)] if patched.signature and record.signature else []
            return [Input(patched.patch, record.patch.patch_sha256), Input(patched.binary, record.patch.binary_sha256),
                    *sig]
        split = self.split_module(kernel, module_type, module)
        if split is None:
            return [Input(self.ko(kernel, module_type, module), record.file_sha256)]  # signed in place if signed
        p = split.parts
        sig = [Input(split.signature, record.signature.sha256)] if split.signature and record.signature else []
        return [Input(split.interface, p.interface_sha256), Input(split.binary, p.binary_sha256),
                Input(split.lds, p.lds_sha256), *sig]

    def verify(self, kernel: str, module_type: str, module: str) -> None:
        """Refuse a module unless the manifest lists it and every file it is made from has the bytes the
        manifest names."""
        inputs = self.inputs(kernel, module_type, module)
        if not inputs:
            raise NodeError(f"this image's manifest does not list {module}.ko for kernel {kernel} ({module_type}); "
                            "refusing to load it", PULL_AGAIN)
        for i in inputs:
            where = "/" + i.path.relative_to(self.root).as_posix()
            try:
                actual = sha256_file(i.path)
            except OSError as exc:
                raise NodeError(f"cannot read {where} to verify it against this image's manifest: "
                                f"{exc.strerror or exc}; refusing to load {module}.ko", PULL_AGAIN) from exc
            if actual != i.sha256:
                raise NodeError(f"{where} has sha256 {actual}, but this image's manifest says {i.sha256}; "
                                f"refusing to load {module}.ko", PULL_AGAIN)

    def record(self, kernel: str, module_type: str, module: str) -> ModuleFile | None:
        return self.records.get((kernel, module_type, module))

    def split_module(self, kernel: str, module_type: str, module: str) -> SplitModule | None:
        """The parts of a module the node links (None: the image holds the whole .ko, or a patch)."""
        record = self.record(kernel, module_type, module)
        if record is None or record.parts is None or record.patch is not None:
            return None
        parts = record.parts
        here = self.at(layout.modules_dir(kernel, module_type))
        return SplitModule(parts, here / parts.interface, self.at(layout.binaries_dir(module_type)) / parts.binary,
                           here / parts.lds, record.sha256, record.srcversion,
                           here / record.signature.file if record.signature else None)

    def patched_module(self, kernel: str, module_type: str, module: str) -> PatchedModule | None:
        """The patch and binary of a module the node rebuilds (None: linked, or shipped whole)."""
        record = self.record(kernel, module_type, module)
        if record is None or record.patch is None:
            return None
        p: ModulePatch = record.patch
        here = self.at(layout.modules_dir(kernel, module_type))
        return PatchedModule(here / p.patch, self.at(layout.binaries_dir(module_type)) / p.binary, record.sha256,
                             record.srcversion, here / record.signature.file if record.signature else None)

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


def _text(d: dict[str, object], key: str) -> str:
    value = d[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} is not a string")
    return value


def _why(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc)
    return text if len(text) <= 120 else text[:120] + "..."


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
