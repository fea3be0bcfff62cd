"""The ABI gate: would the target kernel accept these modules? Decided from the ELF files alone.

First the ELF machine: a module of another architecture than the kernel's (an aarch64 module for an
x86_64 kernel, or the reverse) fails with that one line and nothing else. Then three checks per module,
the same ones the kernel's loader makes: vermagic equals the kernel's release and flags; every undefined
symbol is exported by the kernel (Module.symvers) or by a sibling module; every modversions CRC equals
the kernel's. A fourth for kernels built with objtool: the module carries
the ORC unwind table that kernel's objtool writes, so objtool did process it; on IBT kernels it runs over
the linked module, which is what the split's node-side link repeats.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

from gl_nvidia.arches import ARCHES, by_elf_machine
from gl_nvidia.bundle import AbiGate, BundleManifest, modules_dir
from gl_nvidia.errors import UserError
from gl_nvidia.modbuild.kenv import config_arch, kernel_release, read_config

_KSYMTAB = "__ksymtab_"
# The section the kernel's objtool writes into every module with code, by the option that makes it write
# it: a module without it was never processed by objtool. (Others, like .return_sites, depend on the code:
# a module whose only function ends in a tail call has none.)
OBJTOOL_REQUIRED = {".orc_unwind": "CONFIG_UNWINDER_ORC"}
# Every section objtool writes, reported as evidence when present (a module may have no such site).
OBJTOOL_SECTIONS = (".orc_unwind", ".orc_unwind_ip", ".return_sites", ".retpoline_sites", ".call_sites",
                    ".ibt_endbr_seal", ".static_call_sites")


@dataclass(frozen=True)
class KernelAbi:
    release: str
    vermagic: str
    symvers: dict[str, int]  # exported symbol -> CRC
    arch: str  # the kernel's Debian architecture: "amd64" | "arm64"
    objtool: tuple[tuple[str, str], ...] = ()  # (section, the option that has objtool write it) every module has


@dataclass(frozen=True)
class ModuleElf:
    name: str
    modinfo: dict[str, str]
    undefined: frozenset[str]
    exported: frozenset[str]
    versions: dict[str, int]  # __versions: symbol -> CRC the module was built against
    machine: str  # ELF e_machine: "EM_X86_64" | "EM_AARCH64"
    sections: dict[str, int] = field(default_factory=dict)  # section name -> size
    ibt_note: bool = False  # .note.gnu.property marks all its code IBT-enabled (-fcf-protection=branch)

    @property
    def vermagic(self) -> str:
        return self.modinfo.get("vermagic", "")

    @property
    def srcversion(self) -> str:
        return self.modinfo.get("srcversion", "")


def expected_vermagic(release: str, config: dict[str, str]) -> str:
    """The kernel's VERMAGIC_STRING (include/linux/vermagic.h) from its release and .config."""
    on = {k for k, v in config.items() if v == "y"}
    parts = [release + " "]
    parts.append("SMP " if "CONFIG_SMP" in on else "")
    # 6.1 tests PREEMPT_BUILD first, 6.12 PREEMPT_RT first; an RT kernel has both, so RT wins on 6.12.
    if "CONFIG_PREEMPT_RT" in on:
        parts.append("preempt_rt ")
    elif "CONFIG_PREEMPT_BUILD" in on or "CONFIG_PREEMPT" in on:
        parts.append("preempt ")
    parts.append("mod_unload " if "CONFIG_MODULE_UNLOAD" in on else "")
    parts.append("modversions " if "CONFIG_MODVERSIONS" in on else "")
    parts += [a.vermagic for a in ARCHES.values() if a.kconfig in on]  # the arch's, after the generic flags
    return "".join(parts)


def kernel_abi(sysout: Path) -> KernelAbi:
    """Read a kernel's ABI from its build headers: release, vermagic, Module.symvers."""
    symvers_file = sysout / "Module.symvers"
    if not symvers_file.is_file():
        raise UserError(f"{sysout} has no Module.symvers", "point at a kernel's build headers directory")
    symvers: dict[str, int] = {}
    for line in symvers_file.read_text(errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            symvers[fields[1]] = int(fields[0], 16)
    release = kernel_release(sysout)
    config = read_config(sysout)
    objtool = tuple((sec, opt) for sec, opt in OBJTOOL_REQUIRED.items()
                    if config.get("CONFIG_OBJTOOL") == "y" and config.get(opt) == "y")
    return KernelAbi(release, expected_vermagic(release, config), symvers, config_arch(config, sysout), objtool)


def read_module(path: Path) -> ModuleElf:
    try:
        with path.open("rb") as fh:
            elf = ELFFile(fh)
            machine = str(elf["e_machine"])
            modinfo_sec = elf.get_section_by_name(".modinfo")
            if modinfo_sec is None:
                raise UserError(f"{path} is not a kernel module (no .modinfo section)")
            modinfo: dict[str, str] = {}
            for entry in modinfo_sec.data().split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    modinfo.setdefault(key, value)
            sections = {sec.name: sec["sh_size"] for sec in elf.iter_sections() if sec.name}
            ibt_note = _ibt_note(elf)
            undefined: set[str] = set()
            exported: set[str] = set()
            symtab = elf.get_section_by_name(".symtab")
            if isinstance(symtab, SymbolTableSection):
                for sym in symtab.iter_symbols():
                    if not sym.name:
                        continue
                    if sym["st_shndx"] == "SHN_UNDEF":
                        undefined.add(sym.name)
                    elif sym.name.startswith(_KSYMTAB):
                        exported.add(sym.name[len(_KSYMTAB):])
            versions: dict[str, int] = {}
            vsec = elf.get_section_by_name("__versions")
            if vsec is not None:
                # struct modversion_info { unsigned long crc; char name[64 - sizeof(unsigned long)]; }
                word = 8 if elf.elfclass == 64 else 4
                fmt = ("<" if elf.little_endian else ">") + ("Q" if word == 8 else "I")
                data = vsec.data()
                for off in range(0, len(data) - 63, 64):
                    (crc,) = struct.unpack_from(fmt, data, off)
                    name = data[off + word: off + 64].split(b"\0", 1)[0].decode(errors="replace")
                    versions[name] = crc & 0xFFFFFFFF
    except (ELFError, OSError, struct.error) as exc:
        raise UserError(f"cannot read kernel module {path}: {exc}") from exc
    return ModuleElf(path.name, modinfo, frozenset(undefined), frozenset(exported), versions, machine, sections,
                     ibt_note)


def _ibt_note(elf: ELFFile) -> bool:
    """GNU_PROPERTY_X86_FEATURE_1_IBT in .note.gnu.property: `ld` keeps it only when every input has it."""
    notes = elf.get_section_by_name(".note.gnu.property")
    if not isinstance(notes, NoteSection):
        return False
    return any(prop["pr_type"] == "GNU_PROPERTY_X86_FEATURE_1_AND" and prop["pr_data"] & 1
               for note in notes.iter_notes() if note["n_type"] == "NT_GNU_PROPERTY_TYPE_0"
               for prop in note["n_desc"])


def machine_problem(modules: Sequence[ModuleElf], arch: str, whose: str) -> str | None:
    """One line naming the modules that are not ELF of `arch` (`whose`: what is of that arch, for the line)."""
    wrong = [m for m in modules if m.machine != ARCHES[arch].elf_machine]
    if not wrong:
        return None
    found = ", ".join(sorted({a.machine if (a := by_elf_machine(m.machine)) else m.machine for m in wrong}))
    return (f"{', '.join(m.name for m in wrong)}: {found} ELF, but {whose} is {arch} "
            f"({ARCHES[arch].machine}): modules of another architecture never load")


def gate(modules: Sequence[ModuleElf], abi: KernelAbi) -> AbiGate:
    """Check one module set (siblings may use each other's exports) against one kernel."""
    wrong_arch = machine_problem(modules, abi.arch, f"kernel {abi.release}")
    if wrong_arch:
        # Every other check would only repeat it (vermagic, each symbol's CRC).
        return AbiGate(ok=False, problems=(wrong_arch,), evidence=tuple(evidence(m) for m in modules))
    problems: list[str] = []
    siblings = {sym: m.name for m in modules for sym in m.exported}
    for m in modules:
        if m.vermagic.strip() != abi.vermagic.strip():
            problems.append(f"{m.name}: vermagic {m.vermagic.strip()!r} != kernel's {abi.vermagic.strip()!r}")
        for sym in sorted(m.undefined):
            if sym not in abi.symvers and siblings.get(sym, m.name) == m.name:
                problems.append(f"{m.name}: symbol {sym} is not exported by {abi.release}")
        for sym, crc in sorted(m.versions.items()):
            if sym in siblings:
                continue  # built together with the module that exports it
            want = abi.symvers.get(sym)
            if want is None:
                if sym not in m.undefined:  # undefined ones were reported above
                    problems.append(f"{m.name}: symbol {sym} is not exported by {abi.release}")
            elif want != crc:
                problems.append(f"{m.name}: symbol {sym} CRC {crc:#010x} != kernel's {want:#010x}")
        for sec, opt in abi.objtool:
            if sec not in m.sections:
                problems.append(f"{m.name}: no {sec} section, which objtool writes on {abi.release} ({opt}): "
                                "the kernel's objtool did not process it")
    return AbiGate(ok=not problems, problems=tuple(problems), evidence=tuple(evidence(m) for m in modules))


def evidence(m: ModuleElf) -> str:
    """What the gate saw beyond symbols: objtool's sections (with sizes), the retpoline modinfo tag and the
    IBT property note (modules holding NVIDIA's binary object have none: it was not built with IBT; objtool's
    --ibt pass over the linked module is what covers it)."""
    found = [f"{sec} {m.sections[sec]}" for sec in OBJTOOL_SECTIONS if sec in m.sections]
    return (f"{m.name}: objtool sections: {', '.join(found) or 'none'}; "
            f"modinfo retpoline={m.modinfo.get('retpoline', '-')}; IBT property note: {'yes' if m.ibt_note else 'no'}")


def gate_files(paths: Sequence[Path], sysout: Path) -> AbiGate:
    return gate([read_module(p) for p in paths], kernel_abi(sysout))


def check_bundle(bundle: Path, sysout: Path) -> dict[tuple[str, str], AbiGate]:
    """Gate every built module set of a bundle against another kernel: (kernel, type) -> verdict."""
    try:
        manifest = BundleManifest.load(bundle)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{bundle} is not a driver bundle: {exc}", "pass a directory `gl-nvidia build` wrote") from exc
    abi = kernel_abi(sysout)
    verdicts: dict[tuple[str, str], AbiGate] = {}
    for kernel, kb in sorted(manifest.kernels.items()):
        for mtype, ms in sorted(kb.module_sets.items()):
            if ms.status == "ok":
                d = modules_dir(bundle, kernel, mtype)
                verdicts[(kernel, mtype)] = gate([read_module(d / m.name) for m in ms.modules], abi)
    if not verdicts:
        raise UserError(f"{bundle} holds no successfully built modules to check")
    return verdicts
