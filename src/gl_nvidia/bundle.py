"""The driver bundle: what `build` writes and `image` (and, inside the image, `node`) reads.

Standard library only: the node runtime ships this module inside the driver image.
The on-disk layout is documented in docs/bundle.md; this module is its single reader and writer.
"""

from __future__ import annotations

import json
import mmap
import sys
import zlib
from array import array
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

from gl_nvidia.arches import check_arch

SCHEMA = 1
MANIFEST = "manifest.json"
MODULE_TYPES = ("open", "proprietary")


@dataclass(frozen=True)
class ObjtoolStep:
    """kbuild's `<module>.o` link and objtool run, on kernels that run objtool over the whole module.

    With IBT (or LTO) kbuild links every object of a module into `<module>.o`, runs the kernel's objtool
    over it (its annotations cover NVIDIA's binary object too) and only then adds modpost's objects in
    modfinal. The node repeats exactly that: `ld <ld_flags> -o <module>.o interface binary`, `objtool
    <args> <module>.o`, then the modfinal link of `<module>.o` with `final`.
    """

    tool: str  # the kernel's objtool (its kbuild package's), shipped beside the interface
    tool_sha256: str
    args: tuple[str, ...]  # objtool's arguments as kbuild ran them, without the object: --ibt --orc ... --module
    ld_flags: tuple[str, ...]  # kbuild's `<module>.o` link flags: -m elf_x86_64 -z noexecstack -r
    final: str  # modpost's `<module>.mod.o` and whatever else modfinal adds (.module-common.o), linked in one
    final_sha256: str
    final_size: int
    libelf: str  # the libelf objtool ran with at build time ("libelf-0.188.so"): it writes objtool's output


@dataclass(frozen=True)
class PartPaths:
    """Where a module's parts are on this machine (bundle or image), for `ModuleParts.link_steps`."""

    interface: str
    binary: str
    lds: str
    objtool: str = ""  # ObjtoolStep.tool's path, for modules that have one
    final: str = ""  # ObjtoolStep.final's path


@dataclass(frozen=True)
class ModuleParts:
    """A module split into a per-kernel interface object and a kernel-independent binary object.

    NVIDIA's nvidia.ko and nvidia-modeset.ko embed a prebuilt object (nv-kernel.o_binary,
    nv-modeset-kernel.o_binary) that is byte-identical for every kernel: it ships once per driver
    version and module type, and the node links it to the kernel's interface with `link_steps`.
    """

    interface: str  # bundle: interfaces/<kernel>/<type>/<interface>; image: next to the whole modules
    interface_sha256: str
    interface_size: int
    binary: str  # bundle: binaries/<type>/<binary>; image: layout.binaries_dir(<type>)/<binary>
    binary_sha256: str
    binary_size: int
    lds: str  # the kernel's module linker script (scripts/module.lds), shipped beside the interface
    lds_sha256: str
    ld_flags: tuple[str, ...]  # the kernel's modfinal link flags: -r -m ... --build-id=...
    linker: str  # `ld --version`'s first line at build time: the same linker gives the same bytes
    objtool: ObjtoolStep | None = None  # None: the kernel runs no objtool over linked modules (6.1)

    def per_kernel(self) -> tuple[tuple[str, str], ...]:
        """(file name, sha256) of every part shipped per kernel, beside the interface."""
        files = [(self.interface, self.interface_sha256), (self.lds, self.lds_sha256)]
        if self.objtool is not None:
            files += [(self.objtool.final, self.objtool.final_sha256), (self.objtool.tool, self.objtool.tool_sha256)]
        return tuple(files)

    def paths(self, per_kernel: str, binaries: str) -> PartPaths:
        """The parts' paths when the per-kernel ones are in `per_kernel` and the binary in `binaries`."""
        final = f"{per_kernel}/{self.objtool.final}" if self.objtool else ""
        tool = f"{per_kernel}/{self.objtool.tool}" if self.objtool else ""
        return PartPaths(f"{per_kernel}/{self.interface}", f"{binaries}/{self.binary}", f"{per_kernel}/{self.lds}",
                         tool, final)

    def link_steps(self, ld: str, at: PartPaths, out: str) -> list[list[str]]:
        """The kernel's own pipeline, as commands: without objtool modfinal's link
        `ld -r <flags> -T module.lds -o <module>.ko <interface> <binary>`; with objtool first
        `<module>.o` (left at `<out>.o`) and objtool over it, then modfinal's link of it with `final`."""
        if self.objtool is None:
            return [[ld, *self.ld_flags, "-T", at.lds, "-o", out, at.interface, at.binary]]
        obj = out + ".o"
        return [
            [ld, *self.objtool.ld_flags, "-o", obj, at.interface, at.binary],
            [at.objtool, *self.objtool.args, obj],
            [ld, *self.ld_flags, "-T", at.lds, "-o", out, obj, at.final],
        ]


@dataclass(frozen=True)
class ModulePatch:
    """A module the node rebuilds from NVIDIA's kernel-independent binary object and a per-kernel patch.

    On kernels that run objtool over the whole linked module (IBT: 6.12) the build computes the patch that
    turns the binary object into the gated module (`apply_patch`): ranges of the binary copied as they
    are or with a small difference added, and the bytes the link and objtool wrote. The node needs
    neither ld nor objtool, and the result is always the gated bytes (sha256 checked).
    """

    binary: str  # as ModuleParts.binary: binaries/<type>/<binary>, shared by every kernel
    binary_sha256: str
    binary_size: int
    patch: str  # "<module>.patch", shipped per kernel beside the interface
    patch_sha256: str
    patch_size: int


@dataclass(frozen=True)
class ModuleSignature:
    """The kernel's module signature over a module's gated bytes, in the format of its scripts/sign-file.

    The bytes sign-file appends (a detached PKCS#7 signature in DER, `struct module_signature`, the magic
    "~Module signature appended~\n") ship as they are: appended to a whole module, and beside the parts
    of a split one, for the node to append to the module it linked once that is the gated sha256.
    """

    file: str  # "<module>.ko.sig", beside the interface of a split module
    sha256: str  # of that file
    size: int
    signed_sha256: str  # of the module with it appended: a whole module's shipped file, a split one's on the node
    signer: str  # the certificate issuer's common name: modinfo's `signer`
    key_id: str  # the certificate's serial number: modinfo's `sig_key`
    hash_algo: str  # modinfo's `sig_hashalgo` ("sha256")
    cert_sha256: str  # the signing certificate's fingerprint (sha256 of its DER); never the key


@dataclass(frozen=True)
class ModuleFile:
    name: str  # "nvidia.ko"
    sha256: str  # of the stripped, gated module (linked from `parts` when it has them), before any signature
    size: int  # shipped (stripped) bytes, before any signature
    size_unstripped: int  # as compiled, with debug info
    vermagic: str
    srcversion: str
    parts: ModuleParts | None = None  # None: the image ships the whole .ko
    patch: ModulePatch | None = None  # set: the image ships the patch and the binary, not `parts`
    signature: ModuleSignature | None = None  # None: unsigned

    @property
    def file_sha256(self) -> str:
        """sha256 of the .ko file a bundle's kernels/ (and an image, for a whole module) holds: signed if signed."""
        return self.signature.signed_sha256 if self.signature else self.sha256


@dataclass(frozen=True)
class AbiGate:
    ok: bool
    problems: tuple[str, ...] = ()  # one human line per offending symbol or vermagic mismatch
    evidence: tuple[str, ...] = ()  # per module, what the gate saw beyond symbols: objtool's sections


@dataclass(frozen=True)
class SourceFix:
    """A compatibility fix gl-nvidia applied to the module source before compiling it (modbuild/compat.py)."""

    id: str  # "pci-resize-resource-exclude-bars"
    why: str  # one line for the user
    files: tuple[str, ...]  # the files it changed, relative to the module tree


@dataclass(frozen=True)
class ModuleSet:
    module_type: str  # "open" | "proprietary"
    source_version: str  # version of the kernel-module source tree it was built from
    status: str  # "ok" | "failed"
    modules: tuple[ModuleFile, ...] = ()
    abi_gate: AbiGate | None = None
    error: str | None = None  # first compiler error or gate summary when status == "failed"
    log: str | None = None  # bundle-relative path of the build log
    fixes: tuple[SourceFix, ...] = ()  # what was changed in the source it was built from: NVIDIA's as shipped when empty


@dataclass(frozen=True)
class OSRecord:
    """The nodes a kernel's modules were built for: what its image's tags and labels name."""

    id: str  # NFD's system-os_release.ID ("debian", "gardenlinux")
    versions: tuple[str, ...]  # the OS versions that ship the kernel ("12"; Garden Linux versions)


@dataclass(frozen=True)
class KernelBuild:
    kernel: str  # uname -r
    toolchain: str  # compiler the modules were built with ("gcc (Debian 12.2.0-14) 12.2.0")
    kernel_compiler: str  # compiler the kernel itself was built with (from its headers)
    headers_digest: str  # sha256 over the headers packages/tree used
    module_sets: dict[str, ModuleSet] = field(default_factory=dict)  # keyed by module type
    os: OSRecord | None = None  # None: a bundle written before bundles recorded it


@dataclass(frozen=True)
class UserspaceFile:
    path: str  # root-relative: "usr/bin/nvidia-smi", "usr/lib/x86_64-linux-gnu/libcuda.so.535.309.01"
    sha256: str
    size: int
    mode: int
    link: str | None = None  # symlink target, when the entry is a symlink


@dataclass(frozen=True)
class BundleManifest:
    driver_version: str  # userspace driver version ("535.309.01")
    driver_branch: str  # "535"
    arch: str  # "amd64" | "arm64"
    source: str  # "nvidia" | "dir" | "debian"
    source_digests: dict[str, str]  # input file name -> sha256 (the .run, or each .deb)
    userspace: tuple[UserspaceFile, ...] = ()
    firmware: tuple[UserspaceFile, ...] = ()  # paths relative to the bundle's firmware/ dir
    kernels: dict[str, KernelBuild] = field(default_factory=dict)
    schema: int = SCHEMA
    # what the driver source had no copy of, and why ({"fabricmanager": "no fabric manager for ... in Debian"}):
    # the image ships without it and the node names the reason where it would need it
    left_out: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BundleManifest:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"unsupported bundle manifest schema {d.get('schema')!r} (expected {SCHEMA})")
        kernels = {
            k: KernelBuild(
                kernel=kb["kernel"],
                toolchain=kb["toolchain"],
                kernel_compiler=kb["kernel_compiler"],
                headers_digest=kb["headers_digest"],
                module_sets={t: _module_set(ms) for t, ms in kb["module_sets"].items()},
                os=_os_record(kb["os"]) if kb.get("os") else None,
            )
            for k, kb in d["kernels"].items()
        }
        manifest = cls(
            driver_version=d["driver_version"],
            driver_branch=d["driver_branch"],
            arch=check_arch(d["arch"]),  # refused here, where a bundle enters, not as a KeyError in a stage
            source=d["source"],
            source_digests=dict(d["source_digests"]),
            userspace=tuple(UserspaceFile(**f) for f in d["userspace"]),
            firmware=tuple(UserspaceFile(**f) for f in d["firmware"]),
            kernels=kernels,
            schema=d["schema"],
            left_out=dict(d.get("left_out") or {}),
        )
        _check_paths(manifest)
        return manifest

    @classmethod
    def load(cls, bundle_dir: Path) -> BundleManifest:
        d = read_json((bundle_dir / MANIFEST).read_bytes())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return cls.from_dict(d)


def read_json(data: bytes | str) -> Any:
    """JSON we did not write ourselves in this run (a bundle's manifest, NVIDIA's redist manifest, a base's
    config): whatever is wrong with it (not UTF-8, not JSON, an integer of thousands of digits, nesting
    deeper than Python recurses) is one ValueError."""
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise ValueError("it is nested too deeply") from exc


def _check_paths(m: BundleManifest) -> None:
    """Every name the manifest joins to a bundle or image path stays where it is joined: a module, part
    or kernel name is one path component, a userspace or firmware path relative and without `..`."""
    for f in (*m.userspace, *m.firmware):
        _relative(f.path, "file")
    for kernel, kb in m.kernels.items():
        _name(kernel, "kernel")
        for mtype, ms in kb.module_sets.items():
            if mtype not in MODULE_TYPES:
                raise ValueError(f"kernel {kernel!r} has module type {mtype!r}, not one of {', '.join(MODULE_TYPES)}")
            if ms.log is not None:
                _relative(ms.log, "log")
            for mod in ms.modules:
                names = [mod.name]
                if mod.parts:
                    names += [mod.parts.interface, mod.parts.binary, mod.parts.lds]
                    if mod.parts.objtool:
                        names += [mod.parts.objtool.tool, mod.parts.objtool.final]
                if mod.patch:
                    names += [mod.patch.patch, mod.patch.binary]
                if mod.signature:
                    names.append(mod.signature.file)
                for name in names:
                    _name(name, f"module file of {kernel} {mtype}")


def _name(value: object, what: str) -> None:
    if not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\0" in value:
        raise ValueError(f"{what} {value!r} is not a plain file name")


def _relative(value: object, what: str) -> None:
    if (not isinstance(value, str) or value.startswith("/") or "\0" in value
            or any(p in ("", ".", "..") for p in value.split("/"))):
        raise ValueError(f"{what} {value!r} is not a relative path inside the bundle")


def _os_record(d: dict[str, Any]) -> OSRecord:
    if not isinstance(d["id"], str) or not isinstance(d["versions"], list):
        raise ValueError(f"os record {d!r} is not an id and a list of versions")
    return OSRecord(d["id"], tuple(str(v) for v in d["versions"]))


def _module_set(d: dict[str, Any]) -> ModuleSet:
    gate = d.get("abi_gate")
    return ModuleSet(
        module_type=d["module_type"],
        source_version=d["source_version"],
        status=d["status"],
        modules=tuple(module_file(m) for m in d.get("modules", ())),
        abi_gate=AbiGate(ok=gate["ok"], problems=tuple(gate["problems"]), evidence=tuple(gate.get("evidence", ())))
        if gate else None,
        error=d.get("error"),
        log=d.get("log"),
        fixes=tuple(source_fix(f) for f in d.get("fixes", ())),
    )


def source_fix(d: dict[str, Any]) -> SourceFix:
    return SourceFix(**{**d, "files": tuple(d["files"])})


def module_file(d: dict[str, Any]) -> ModuleFile:
    parts, patch, sig = d.get("parts"), d.get("patch"), d.get("signature")
    return ModuleFile(**{**d, "parts": _parts(parts) if parts else None,
                         "patch": ModulePatch(**patch) if patch else None,
                         "signature": ModuleSignature(**sig) if sig else None})


def _parts(d: dict[str, Any]) -> ModuleParts:
    step = d.get("objtool")
    objtool = ObjtoolStep(**{**step, "args": tuple(step["args"]), "ld_flags": tuple(step["ld_flags"])}) if step else None
    return ModuleParts(**{**d, "ld_flags": tuple(d["ld_flags"]), "objtool": objtool})


# A module patch (ModulePatch.patch): PATCH_MAGIC, the length of the operations' JSON (4 bytes, little
# endian), the operations, then the zlib-compressed literal bytes they consume in order. Operations:
# ["lit", n]: the next n literal bytes; ["copy", off, n]: the source's bytes off..off+n; ["add", off, n, d]:
# the source's bytes off..off+n read as one little-endian integer, plus the next d literal bytes read as
# one signed little-endian integer (a relocation section whose offsets moved by the same amount is a
# difference of few distinct bytes), written back in n bytes; ["rela", n]: a relocation section of n bytes
# (24-byte entries) that is not in the source, its next n literal bytes the entries' offsets, infos and
# addends column by column, offsets and addends as differences from the entry before (objtool's sections
# list sites in order: the differences repeat, and compress three times better than the entries; infos
# repeat as they are).
PATCH_MAGIC = b"GLNVPAT2"
RELA = 24  # bytes per Elf64_Rela entry: offset, info, addend
_SUMMED = (True, False, True)  # which columns "rela" stores as differences


def rela_columns(section: bytes) -> bytes | None:
    """`section` (little-endian Elf64_Rela entries) as the "rela" operation's literal, or None when it has
    no whole entries or a difference does not fit in 64 bits."""
    if len(section) % RELA:
        return None
    rows = _int64s(section)
    out = array("q")
    for i, summed in enumerate(_SUMMED):
        col = rows[i::3]
        diffs = [y - x for x, y in zip([0, *col[:-1]], col, strict=True)] if summed else col.tolist()
        if any(not -(1 << 63) <= d < 1 << 63 for d in diffs):
            return None
        out.extend(diffs)
    return _le(out)


def _int64s(data: bytes | memoryview) -> array[int]:
    a = array("q")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _le(a: array[int]) -> bytes:
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _rela_rows(columns: memoryview) -> bytes:
    """The entries `rela_columns` encoded: prefix sums (itertools.accumulate), interleaved by slices."""
    diffs = _int64s(columns)
    count = len(diffs) // 3
    rows = array("q", bytes(len(diffs) * 8))
    for i, summed in enumerate(_SUMMED):
        col = diffs[i * count:(i + 1) * count]
        rows[i::3] = array("q", accumulate(col)) if summed else col
    return _le(rows)


def write_patch(ops: list[list[Any]], literals: bytes) -> bytes:
    encoded = json.dumps(ops, separators=(",", ":")).encode()
    return PATCH_MAGIC + len(encoded).to_bytes(4, "little") + encoded + zlib.compress(literals, 6)


def apply_patch(patch: bytes, source: bytes | mmap.mmap) -> bytearray:
    """The bytes `patch` makes of `source` (ValueError: not a patch this code wrote, or not for `source`).

    Every step runs in C (slices, zlib, int conversions): about 0.4 s for nvidia.ko's 89 MB."""
    head = len(PATCH_MAGIC) + 4
    if patch[:len(PATCH_MAGIC)] != PATCH_MAGIC:
        raise ValueError("not a module patch")
    size = int.from_bytes(patch[len(PATCH_MAGIC):head], "little")
    try:
        ops = json.loads(patch[head:head + size])
        literals = zlib.decompress(patch[head + size:])
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"damaged module patch: {exc}") from exc
    at = pos = 0
    with memoryview(source) as src, memoryview(literals) as lit:  # released here, even when raising
        try:
            out = bytearray(sum(op[1] if op[0] in ("lit", "rela") else op[2] for op in ops))  # no regrowing
            for op in ops:
                if op[0] == "lit":
                    piece: bytes | memoryview = lit[at:at + op[1]]
                    at += op[1]
                elif op[0] == "rela" and op[1] % RELA == 0:
                    piece = _rela_rows(lit[at:at + op[1]])
                    at += op[1]
                elif op[0] == "copy" and op[1] + op[2] <= len(src):
                    piece = src[op[1]:op[1] + op[2]]
                elif op[0] == "add" and op[1] + op[2] <= len(src):
                    diff = int.from_bytes(lit[at:at + op[3]], "little", signed=True)
                    at += op[3]
                    piece = (int.from_bytes(src[op[1]:op[1] + op[2]], "little") + diff).to_bytes(op[2], "little")
                elif op[0] in ("copy", "add"):
                    raise ValueError("module patch does not fit its source: it reads past the source's end")
                else:
                    raise ValueError(f"bad operation {op[:3]!r}")
                if len(piece) != (op[1] if op[0] in ("lit", "rela") else op[2]):
                    raise ValueError(f"operation {op[:3]!r} runs past the literal bytes")
                out[pos:pos + len(piece)] = piece
                pos += len(piece)
        except (TypeError, IndexError, OverflowError) as exc:
            raise ValueError(f"module patch does not fit its source: {exc}") from exc
    if at != len(literals):
        raise ValueError("module patch does not fit its source: literal bytes left over")
    return out


# Paths inside a bundle directory (see docs/bundle.md).
def userspace_dir(bundle: Path) -> Path:
    return bundle / "userspace"


def firmware_dir(bundle: Path) -> Path:
    return bundle / "firmware"


def modules_dir(bundle: Path, kernel: str, module_type: str) -> Path:
    return bundle / "kernels" / kernel / module_type


def interfaces_dir(bundle: Path, kernel: str, module_type: str) -> Path:
    """Per-kernel interface objects and the kernel's module.lds of split modules (ModuleParts)."""
    return bundle / "interfaces" / kernel / module_type


def binaries_dir(bundle: Path, module_type: str) -> Path:
    """Kernel-independent binary objects of split modules, once per bundle and module type."""
    return bundle / "binaries" / module_type


def debug_dir(bundle: Path, kernel: str, module_type: str) -> Path:
    return bundle / "debug" / kernel / module_type
