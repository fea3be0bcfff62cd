"""GPUDirect Storage's kernel module, nvidia-fs, built per kernel so the node needs no compiler.

The source is Debian's `nvidia-fs-dkms` (bookworm: 2.13.5, trixie: 2.19.7), read from the same signed apt
indexes as the driver. It is compiled with its own Makefile's `module` target (its configure probes the
kernel, then kbuild), against the kernel's headers and the `nv-p2p.h` of the driver it binds to, and cached
like the driver's modules.

nvidia-fs calls NVIDIA's `nvidia_p2p_*` functions of nvidia.ko. Up to 2.17.0 it binds them at run time
with `__symbol_get` (2.13.5: on the first open of /dev/nvidia-fs*); from 2.17.1 it links them. The gate
checks both ways against the nvidia.ko built for the same kernel and driver, as the kernel would:
- linked: each symbol's CRC must equal nvidia.ko's, and a module that uses GPL-only kernel symbols may not
  link a proprietary module's ("module using GPL-only symbols uses symbols ... from proprietary module");
- symbol_get: Linux 6.6 (and the stable series that took the change: 6.1.52, 6.4.15, 6.5.2) refuses it
  for exports that are not EXPORT_SYMBOL_GPL ("failing symbol_get of non-GPLONLY symbol"). NVIDIA's
  proprietary modules export with EXPORT_SYMBOL, the open ones with EXPORT_SYMBOL_GPL.
A module that fails either is left out of the image, with the reason in the bundle's `left_out`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from gl_nvidia import apt, ui
from gl_nvidia import bundle as b
from gl_nvidia.arches import ARCHES
from gl_nvidia.errors import UserError
from gl_nvidia.fs import cache_dir, cache_fill, cache_hit, sha256_file
from gl_nvidia.modbuild.abi import KernelAbi, ModuleElf, gate, kernel_abi, read_module
from gl_nvidia.modbuild.compile import CompiledSet, first_error
from gl_nvidia.modbuild.kenv import KernelEnv, KernelHeaders
from gl_nvidia.modbuild.sources import DEBIAN_NVIDIA_FS, DebianSource, DriverSource, ModuleSource
from gl_nvidia.run import run

log = logging.getLogger(__name__)

PACKAGE = DEBIAN_NVIDIA_FS
MODULE = "nvidia-fs.ko"
COMPONENT = "nvidia-fs"  # left_out["nvidia-fs <kernel>"]: why that kernel's image has none
# gdrdrv (GDRCopy) is the other module the GPU Operator's sidecars compile on the node.
GDRCOPY_LEFT_OUT = ("no gdrdrv source is reachable from the build: NVIDIA publishes it only on GitHub "
                    "(NVIDIA/gdrcopy) and Debian packages no gdrcopy; GDRCopy needs the operator's "
                    "on-node compile (usePrecompiled: false)")
RECIPE = 2  # 2: the unstripped module kept under debug/ (--keep-debug)
# include/linux/license.h: license_is_gpl_compatible
GPL_COMPATIBLE = ("GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL")
# Where __symbol_get of an export that is not EXPORT_SYMBOL_GPL fails: every series from 6.6, and these
# stable series from the named sublevel ("modules: only allow symbol_get of EXPORT_SYMBOL_GPL modules").
SYMBOL_GET_GPL_ONLY = ((6, 6), {(6, 1): 52, (6, 4): 15, (6, 5): 2})
_P2P = re.compile(rb"nvidia_p2p_[a-z0-9_]+")
# Debian's configure hard-codes the headers of the running kernel; the build passes the target's.
_CONFIGURE_KDIR = "export KDIR=$MODULES_DIR/build\n"


@dataclass(frozen=True)
class NvfsSource:
    version: str  # nvidia-fs's own version: "2.13.5"
    tree: Path  # the unpacked /usr/src/nvidia-fs-<x.y>
    digest: str  # sha256 of the .deb


@dataclass(frozen=True)
class Export:
    crc: int | None
    gpl: bool  # EXPORT_SYMBOL_GPL


@dataclass(frozen=True)
class NvidiaExports:
    """What nvidia.ko offers a module that binds to it."""

    exports: dict[str, Export]
    license: str  # modinfo's: "NVIDIA" (proprietary), "Dual MIT/GPL" (open)

    @property
    def gpl_compatible(self) -> bool:
        return self.license in GPL_COMPATIBLE


@dataclass(frozen=True)
class NvfsBuild:
    entry: Path  # cache entry: ko/nvidia-fs.ko (stripped), debug/nvidia-fs.ko, build.log, result.json
    status: str  # "ok" | "failed"
    module: b.ModuleFile | None
    abi_gate: b.AbiGate | None
    error: str | None

    @property
    def ko(self) -> Path:
        return self.entry / "ko" / MODULE


def upstream_version(deb_version: str) -> str:
    """"2.13.5~11.8.0-5~deb12u1" -> "2.13.5" (Debian builds it from the CUDA toolkit's source package)."""
    return deb_version.split("~", 1)[0].split("-", 1)[0]


def source(repo: apt.AptRepo) -> NvfsSource | str:
    """The newest nvidia-fs-dkms of `repo`, unpacked into the cache; or why there is none."""
    pkgs = repo.versions(PACKAGE)
    if not pkgs:
        return f"no {PACKAGE} for {repo.arch} in {repo.describe()}"
    pkg = pkgs[0]
    root = cache_dir("build", "driver") / f"{PACKAGE}-{upstream_version(pkg.version)}-{pkg.sha256[:16]}"
    if not cache_hit(root):
        deb = repo.download(pkg)
        with cache_fill(root) as tmp:
            apt.extract(deb, tmp)
    trees = sorted((root / "usr/src").glob("nvidia-fs-*/Makefile"))
    if len(trees) != 1:
        raise UserError(f"unexpected layout in {pkg.deb_name}: expected one usr/src/nvidia-fs-*/Makefile")
    return NvfsSource(upstream_version(pkg.version), trees[0].parent, pkg.sha256)


def repo_for(driver_source: DriverSource, arch: str) -> apt.AptRepo | None:
    """The Debian source's own repository view; for the others this machine's apt sources (None: none)."""
    if isinstance(driver_source, DebianSource):
        return driver_source.repo(arch)
    try:
        return apt.AptRepo(apt.system_sources(), arch=arch)
    except UserError:
        return None


# --- the gate -------------------------------------------------------------------------------------

def nvidia_exports(ko: Path) -> NvidiaExports:
    """nvidia.ko's exported symbols (CRC, GPL-only or not) and its license, from its ELF file."""
    try:
        with ko.open("rb") as fh:
            elf = ELFFile(fh)
            symtab = elf.get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                raise UserError(f"{ko} has no symbol table")
            fmt = "<I" if elf.little_endian else ">I"
            gpl: dict[str, bool] = {}
            crcs: dict[str, int] = {}
            for sym in symtab.iter_symbols():
                if not isinstance(sym["st_shndx"], int):
                    continue
                if sym.name.startswith("__ksymtab_"):
                    gpl[sym.name[len("__ksymtab_"):]] = elf.get_section(sym["st_shndx"]).name == "__ksymtab_gpl"
                elif sym.name.startswith("__crc_"):
                    # a CRC symbol's value is its offset into __kcrctab(_gpl), which holds the CRC
                    data = elf.get_section(sym["st_shndx"]).data()
                    crcs[sym.name[len("__crc_"):]] = struct.unpack_from(fmt, data, sym["st_value"])[0]
    except (ELFError, OSError, struct.error) as exc:
        raise UserError(f"cannot read kernel module {ko}: {exc}") from exc
    return NvidiaExports({name: Export(crcs.get(name), g) for name, g in gpl.items()},
                         read_module(ko).modinfo.get("license", ""))


def symbol_get_names(ko: Path) -> frozenset[str]:
    """The nvidia_p2p_* names a module asks `__symbol_get` for (string constants in its .rodata)."""
    with ko.open("rb") as fh:
        elf = ELFFile(fh)
        found = {m.decode() for sec in elf.iter_sections() if sec.name.startswith(".rodata")
                 for m in _P2P.findall(sec.data())}
    return frozenset(found)


def kernel_version(sysout: Path) -> tuple[int, int, int]:
    """The kernel's upstream version (6.1.192 for Debian's 6.1.0-56), from its generated version.h."""
    version_h = sysout / "include/generated/uapi/linux/version.h"
    fields = dict(re.findall(r"#define LINUX_VERSION_(MAJOR|PATCHLEVEL|SUBLEVEL) (\d+)",
                             version_h.read_text() if version_h.is_file() else ""))
    if len(fields) != 3:
        raise UserError(f"{version_h} does not give the kernel's version", "point at a kernel's build headers (5.15 or later)")
    return int(fields["MAJOR"]), int(fields["PATCHLEVEL"]), int(fields["SUBLEVEL"])


def symbol_get_gpl_only(version: tuple[int, int, int]) -> bool:
    first, stable = SYMBOL_GET_GPL_ONLY
    return version[:2] >= first or version[2] >= stable.get(version[:2], 1 << 16)


def gpl_only_symbols(sysout: Path) -> frozenset[str]:
    """The kernel's EXPORT_SYMBOL_GPL symbols (Module.symvers' fourth field)."""
    rows = (line.split("\t") for line in (sysout / "Module.symvers").read_text(errors="replace").splitlines())
    return frozenset(f[1] for f in rows if len(f) >= 4 and f[3] == "EXPORT_SYMBOL_GPL")


def gate_nvfs(m: ModuleElf, asked: frozenset[str], abi: KernelAbi, version: tuple[int, int, int],
              kernel_gpl: frozenset[str], nvidia: NvidiaExports) -> b.AbiGate:
    """The kernel's checks with nvidia.ko's exports beside the kernel's, then how it binds NVIDIA's.

    `asked`: the names it asks `__symbol_get` for; `kernel_gpl`: the kernel's GPL-only exports."""
    crcs = {s: e.crc for s, e in nvidia.exports.items() if e.crc is not None}
    verdict = gate([m], replace(abi, symvers={**abi.symvers, **crcs}))
    problems = list(verdict.problems)
    linked = sorted(s for s in m.undefined if s in nvidia.exports)
    by_get = sorted(asked) if "__symbol_get" in m.undefined else []
    ver = ".".join(map(str, version))
    lic = f"nvidia.ko (license {nvidia.license!r})"
    missing = [s for s in by_get if s not in nvidia.exports]
    if missing:
        problems.append(f"{m.name}: asks for {', '.join(missing)} with symbol_get, which {lic} does not export")
    non_gpl = [s for s in by_get if s in nvidia.exports and not nvidia.exports[s].gpl]
    if non_gpl and symbol_get_gpl_only(version):
        problems.append(f"{m.name}: binds {', '.join(non_gpl)} with symbol_get, which Linux {ver} refuses for "
                        f"exports that are not EXPORT_SYMBOL_GPL, and {lic} exports them with EXPORT_SYMBOL: "
                        "GDS needs the open kernel modules")
    gpl_used = sorted(m.undefined & kernel_gpl)
    if linked and not nvidia.gpl_compatible and gpl_used:
        problems.append(f"{m.name}: links {', '.join(linked)} of the proprietary {lic} and uses GPL-only kernel "
                        f"symbols ({', '.join(gpl_used[:3])}, ...): the kernel refuses such a module: "
                        "GDS needs the open kernel modules")
    if not linked and not by_get:
        problems.append(f"{m.name}: binds no nvidia_p2p_* symbol of nvidia.ko")
    how = "links" if linked else "binds with symbol_get"
    bound = linked or by_get
    kinds = sorted({"EXPORT_SYMBOL_GPL" if nvidia.exports[s].gpl else "EXPORT_SYMBOL"
                    for s in bound if s in nvidia.exports})
    evidence = (*verdict.evidence,
                f"{m.name}: {how} {len(bound)} nvidia_p2p_* symbol(s) of {lic}, exported with "
                f"{' and '.join(kinds) or 'nothing'}; kernel {abi.release} is Linux {ver}")
    return b.AbiGate(ok=not problems, problems=tuple(problems), evidence=evidence)


# --- compiling ------------------------------------------------------------------------------------

def cache_key(src: NvfsSource, hdrs: KernelHeaders, toolchain: str, nvidia: b.ModuleFile, nv_source: ModuleSource) -> str:
    inputs = {"recipe": RECIPE, "source": src.digest, "headers": hdrs.digest, "toolchain": toolchain,
              "nvidia.ko": nvidia.sha256, "nv-p2p.h": nv_source.digest}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def build(src: NvfsSource, hdrs: KernelHeaders, toolchain: str, nvidia: CompiledSet, nv_source: ModuleSource,
          *, jobs: int, runner: list[str]) -> NvfsBuild:
    """nvidia-fs for one kernel and one nvidia.ko (a built module set), from the cache or compiled now;
    `runner`: what runs make and strip (the kernel environment's: its toolchain root, or nothing)."""
    nv = next(m for m in nvidia.modules if m.name == "nvidia.ko")
    key = cache_key(src, hdrs, toolchain, nv, nv_source)
    entry = cache_dir("build", "nvidia-fs") / key
    with (cache_dir("build", "locks") / key).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache_hit(entry):
            _compile(entry, src, hdrs, nvidia.entry / "ko" / "nvidia.ko", nv_source, jobs, runner)
        return _load(entry)


def _compile(entry: Path, src: NvfsSource, hdrs: KernelHeaders, nvidia_ko: Path, nv_source: ModuleSource,
             jobs: int, runner: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"{hdrs.kernel}-nvidia-fs-", dir=cache_dir("build", "work")))
    try:
        tree = work / "tree"
        shutil.copytree(src.tree, tree, symlinks=True)
        configure = tree / "configure"
        text = configure.read_text()
        if _CONFIGURE_KDIR not in text:
            raise UserError(f"{PACKAGE} {src.version}: its configure no longer sets KDIR as expected",
                            "update gl_nvidia/modbuild/nvfs.py for this version")
        configure.write_text(text.replace(_CONFIGURE_KDIR, "export KDIR=${KDIR:-$MODULES_DIR/build}\n"))
        nvidia = nvidia_exports(nvidia_ko)
        # what NVIDIA's create_nv.symvers.sh makes from an installed nvidia.ko: its nvidia_p2p_* exports
        (tree / "nv.symvers").write_text("".join(
            f"0x{e.crc:08x}\t{s}\tnvidia\t{'EXPORT_SYMBOL_GPL' if e.gpl else 'EXPORT_SYMBOL'}\t\n"
            for s, e in sorted(nvidia.exports.items()) if s.startswith("nvidia_p2p_") and e.crc is not None))
        cross = ([f"ARCH={ARCHES[hdrs.arch].kbuild}", f"CROSS_COMPILE={hdrs.cross_compile}", f"CC={hdrs.cc}"]
                 + (["CONFIG_AARCH64=1"] if hdrs.arch == "arm64" else [])) if hdrs.cross_compile else []
        build_log = work / "build.log"
        # -o nv_symbols: the module target's symvers step reads the running host's nvidia.ko; nv.symvers is above
        proc = run([*runner, "make", f"-j{jobs}", "-C", tree, "-o", "nv_symbols", "module", f"KVER={hdrs.kernel}",
                    f"KDIR={hdrs.sysout}", f"NVIDIA_SRC_DIR={nv_source.tree / 'nvidia'}",
                    f"KBUILD_EXTRA_SYMBOLS={tree / 'nv.symvers'}", *cross],
                   env={"KDIR": str(hdrs.sysout)}, log_file=build_log, check=False)
        with cache_fill(entry) as tmp:
            shutil.copyfile(build_log, tmp / "build.log")
            result = _collect(tree, tmp, src, hdrs, nvidia, proc.returncode, build_log, runner)
            (tmp / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _collect(tree: Path, dest: Path, src: NvfsSource, hdrs: KernelHeaders, nvidia: NvidiaExports, returncode: int,
             build_log: Path, runner: list[str]) -> dict[str, object]:
    ko = tree / MODULE
    result: dict[str, object] = {"version": src.version, "module": None, "abi_gate": None}
    if returncode != 0 or not ko.is_file():
        err = first_error(build_log.read_text(errors="replace")) if returncode else f"make built no {MODULE}"
        return {**result, "status": "failed", "error": err.replace(f"{tree}/", "")}
    (dest / "ko").mkdir()
    (dest / "debug").mkdir()
    shipped = dest / "ko" / MODULE
    run([*runner, hdrs.tool("strip"), "--strip-debug", "-o", shipped, ko])
    shutil.copyfile(ko, dest / "debug" / MODULE)
    info = read_module(shipped)
    module = b.ModuleFile(MODULE, sha256_file(shipped), shipped.stat().st_size, ko.stat().st_size,
                          info.vermagic, info.srcversion)
    verdict = gate_nvfs(info, symbol_get_names(shipped), kernel_abi(hdrs.sysout), kernel_version(hdrs.sysout),
                        gpl_only_symbols(hdrs.sysout), nvidia)
    error = None if verdict.ok else f"ABI gate: {verdict.problems[0]}"
    return {**result, "status": "ok" if verdict.ok else "failed", "error": error, "module": asdict(module),
            "abi_gate": asdict(verdict)}


def _load(entry: Path) -> NvfsBuild:
    d = json.loads((entry / "result.json").read_text())
    g = d["abi_gate"]
    return NvfsBuild(entry, d["status"], b.module_file(d["module"]) if d["module"] else None,
                     b.AbiGate(g["ok"], tuple(g["problems"]), tuple(g["evidence"])) if g else None, d.get("error"))


# --- into the unit's module sets ------------------------------------------------------------------

def add_to_sets(sets: Mapping[str, CompiledSet], module_sources: Mapping[str, ModuleSource], hdrs: KernelHeaders,
                env: KernelEnv, toolchain: str, repo: apt.AptRepo | None, *,
                jobs: int) -> tuple[dict[str, CompiledSet], dict[str, str]]:
    """Each built module set with nvidia-fs built against its nvidia.ko, when that passes the gate; and
    what the image will lack ({"nvidia-fs <kernel>": why, "gdrcopy": why}).

    `repo`: where nvidia-fs-dkms comes from (None: no apt repository here)."""
    left, key = {"gdrcopy": GDRCOPY_LEFT_OUT}, f"{COMPONENT} {hdrs.kernel}"
    built = {t: cs for t, cs in sets.items()
             if cs.status == "ok" and t in module_sources and any(m.name == "nvidia.ko" for m in cs.modules)}
    if not built:
        return dict(sets), left
    if env.name not in ("apt", "dir"):
        return dict(sets), {**left, key: f"built only with --env apt or dir (this unit: --env {env.name})"}
    try:
        src = source(repo) if repo is not None else f"no apt repository to take {PACKAGE} from"
    except UserError as exc:  # GDS is optional: the driver's modules still ship
        src = f"{PACKAGE}: {exc}"
    if isinstance(src, str):
        return dict(sets), {**left, key: src}
    out, why = dict(sets), []
    for mtype, cs in sorted(built.items()):
        try:
            with ui.progress() as prog, ui.task(prog, f"nvidia-fs {src.version} for {hdrs.kernel} ({mtype})"):
                nvfs = build(src, hdrs, toolchain, cs, module_sources[mtype], jobs=jobs, runner=env.runner(hdrs))
        except UserError as exc:  # a package this code does not know how to build: the driver still ships
            why.append(f"{mtype}: {exc}")
            continue
        if nvfs.status == "ok" and nvfs.module is not None and cs.abi_gate is not None and nvfs.abi_gate is not None:
            log.info("%s: nvidia-fs %s built for the %s modules", hdrs.kernel, src.version, mtype)
            out[mtype] = replace(cs, modules=(*cs.modules, nvfs.module), files={**cs.files, MODULE: nvfs.ko},
                                 abi_gate=replace(cs.abi_gate, evidence=cs.abi_gate.evidence + nvfs.abi_gate.evidence))
        else:
            why.append(f"{mtype}: {nvfs.error}")
    if why:
        left[key] = f"nvidia-fs {src.version}: " + "; ".join(why)
    return out, left


def other_kernels(left_out: Mapping[str, str], kernel: str) -> dict[str, str]:
    """A bundle's nvidia-fs reasons for its other kernels: a unit rewrites only its own kernel's."""
    return {k: v for k, v in left_out.items() if k.startswith(f"{COMPONENT} ") and k != f"{COMPONENT} {kernel}"}
