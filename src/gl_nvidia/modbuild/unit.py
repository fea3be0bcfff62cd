"""Build units into driver bundles: the public entry points of the build stage.

`build_unit` compiles (or takes from the cache) the module sets of one (kernel, driver, arch) and
writes them into the bundle of that driver version; `build_all` does that for many units in parallel.
A failed compile or gate fails its cell, never the run: every other unit still builds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from gl_nvidia import bundle as b
from gl_nvidia import ui
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.errors import IntegrityError, UserError
from gl_nvidia.fs import (
    atomic_dir,
    atomic_write_text,
    cache_dir,
    cache_fill,
    cache_hit,
    sha256_file,
)
from gl_nvidia.modbuild import compat, nvfs
from gl_nvidia.modbuild.compile import CompiledSet, compile_set
from gl_nvidia.modbuild.kenv import KernelEnv, KernelHeaders, compiler_mismatch
from gl_nvidia.modbuild.modsign import ModuleSigner
from gl_nvidia.modbuild.sources import DriverInputs, DriverSource
from gl_nvidia.modbuild.split import module_patch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What happened to one module type of one unit in this run."""

    module_type: str
    status: str  # "ok" | "failed"
    cached: bool  # nothing was compiled for it in this run
    error: str | None = None
    log: Path | None = None  # the full build log
    fixes: tuple[b.SourceFix, ...] = ()  # gl-nvidia's compatibility fixes in the source it was compiled from

    @property
    def cell(self) -> str:
        """ok / failed / cached, as the summary table shows it."""
        return "failed" if self.status != "ok" else "cached" if self.cached else "ok"


@dataclass(frozen=True)
class UnitResult:
    unit: BuildUnit
    bundle: Path
    outcomes: dict[str, Outcome] = field(default_factory=dict)  # keyed by module type
    manifest: b.BundleManifest | None = None  # None when the unit failed before writing anything

    @property
    def ok(self) -> bool:
        return all(o.status == "ok" for o in self.outcomes.values())


def build_unit(
    unit: BuildUnit,
    out: Path,
    *,
    source: DriverSource,
    env: KernelEnv,
    jobs: int | None = None,
    module_types: Sequence[str] | None = None,
    keep_debug: bool = False,
    signer: ModuleSigner | None = None,
) -> UnitResult:
    """Build `unit`'s module sets and write them into the driver bundle at `out`.

    `out` is the bundle directory of the unit's (driver version, arch): created when missing, updated
    in place (atomically, part by part) when it already holds that driver. `jobs` is make's -j (default:
    all cores); `module_types` defaults to the unit's own (the catalog drops excluded types). Failed
    compiles and gate failures are recorded as `failed` module sets in the manifest and in the returned
    outcomes; problems with the inputs (unknown driver, missing headers, no space)
    raise `UserError` and leave `out` as it was. With `signer`, every module is signed for the kernel's
    module signature check as it goes into the bundle (from the build cache: signing never recompiles).
    """
    module_types = unit.module_types if module_types is None else module_types
    unknown = set(module_types) - set(b.MODULE_TYPES)
    if unknown:
        raise UserError(f"unknown module type(s): {', '.join(sorted(unknown))}", "use open and/or proprietary")
    inputs = source.prepare(unit.driver_version, unit.arch)
    hdrs = env.headers(unit.kernel, unit.arch)
    if hdrs.arch != unit.arch:
        raise UserError(f"the headers of {unit.kernel} are for an {hdrs.arch} kernel, but the unit is {unit.arch}",
                        f"build it as an {hdrs.arch} unit, or point at the {unit.arch} kernel's headers")
    toolchain = env.toolchain(hdrs)
    mismatch = compiler_mismatch(toolchain, hdrs.kernel_compiler, hdrs.cross_compile)
    if mismatch:
        log.warning("%s: %s", unit.kernel, mismatch)
    sets: dict[str, CompiledSet] = {}
    outcomes: dict[str, Outcome] = {}
    module_sources = dict(inputs.module_sources)  # each as compiled: with its compatibility fixes
    for mtype in module_types:
        src = module_sources.get(mtype)
        if src is None:
            outcomes[mtype] = Outcome(mtype, "failed", True, f"the {source.name} source has no {mtype} module tree")
            continue
        try:
            src = compat.apply(src)
        except UserError as exc:  # a fix that does not fit this source fails its type, not the other
            outcomes[mtype] = Outcome(mtype, "failed", False, str(exc))
            continue
        module_sources[mtype] = src
        for fix in src.fixes:
            log.info("%s %s modules (%s): compatibility fix %s: %s", unit.key, mtype, src.version, fix.id, fix.why)
        with ui.progress() as prog, ui.task(prog, f"{mtype} modules for {unit.kernel} ({src.version})"):
            cs = compile_set(src, hdrs, env, toolchain, jobs=jobs or os.cpu_count() or 1, keep_debug=keep_debug)
        sets[mtype] = cs
        # The bundle's copy of the log: the cache's is an implementation detail.
        outcomes[mtype] = Outcome(mtype, cs.status, cs.cached, cs.error, out / log_path(unit.kernel, mtype), cs.fixes)
    # GPUDirect Storage's nvidia-fs joins each built set whose nvidia.ko it passes the gate against.
    sets, left_out = nvfs.add_to_sets(sets, module_sources, hdrs, env, toolchain,
                                      nvfs.repo_for(source, unit.arch), jobs=jobs or os.cpu_count() or 1)
    inputs = dataclasses.replace(inputs, module_sources=module_sources, left_out={**inputs.left_out, **left_out})
    manifest = write_bundle(out, inputs, hdrs, toolchain, sets, keep_debug=keep_debug, signer=signer,
                            os_record=b.OSRecord(unit.os_id, unit.os_versions))
    for component, why in inputs.left_out.items():
        log.warning("%s: %s left out of the image: %s", unit.key, component, why)
    for name, why in inputs.lacks.items():  # the container toolkit's names for a capability
        log.warning("%s: the image has no %s: %s", unit.key, name, why)
    for o in outcomes.values():
        if o.status != "ok":
            log.error("%s %s failed: %s" + (" (log: %s)" if o.log else ""), unit.key, o.module_type, o.error,
                      *([o.log] if o.log else []))
    return UnitResult(unit, out, outcomes, manifest)


def build_all(
    units: Sequence[BuildUnit],
    out: Path,
    *,
    source: DriverSource,
    env_for: Callable[[BuildUnit], KernelEnv],
    jobs: int = 1,
    make_jobs: int | None = None,
    module_types: Sequence[str] | None = None,
    keep_debug: bool = False,
    signer: ModuleSigner | None = None,
) -> list[UnitResult]:
    """Build many units, `jobs` at a time, into `out/<driver version>-<arch>/` bundles.

    A unit whose inputs cannot be had (say, its headers are not in the repository) fails every one of
    its module types with that reason; the other units go on.
    """
    per_unit = make_jobs or max(1, (os.cpu_count() or 1) // max(1, jobs))

    def one(unit: BuildUnit) -> UnitResult:
        bundle_dir = out / bundle_name(unit.driver_version, unit.arch)
        types = [t for t in (module_types or unit.module_types) if t in unit.module_types]
        try:
            return build_unit(unit, bundle_dir, source=source, env=env_for(unit), jobs=per_unit,
                              module_types=types, keep_debug=keep_debug, signer=signer)
        except IntegrityError:
            raise  # an input that is not what it claims fails the run, never one cell (no exclusion offered)
        except UserError as exc:
            log.error("%s: %s", unit.key, exc)
            return UnitResult(unit, bundle_dir, {t: Outcome(t, "failed", False, str(exc)) for t in types})

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, units))


def bundle_name(driver_version: str, arch: str) -> str:
    return f"{driver_version}-{arch}"


def log_path(kernel: str, module_type: str) -> str:
    """Bundle-relative path of a module set's build log."""
    return f"logs/{kernel}-{module_type}.log"


# --- writing the bundle -------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(bundle: Path) -> Iterator[None]:
    """One writer per bundle at a time, across threads and processes (the lock lives in the cache)."""
    key = hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()[:32]
    with (cache_dir("build", "locks") / key).open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_bundle(out: Path, inputs: DriverInputs, hdrs: KernelHeaders, toolchain: str,
                 sets: dict[str, CompiledSet], *, keep_debug: bool = False,
                 signer: ModuleSigner | None = None, os_record: b.OSRecord | None = None) -> b.BundleManifest:
    """Add one kernel's module sets to the bundle at `out` (created with its userspace when new);
    `os_record`: the nodes the kernel is built for, which its image's tags name."""
    with _locked(out):
        old = _existing(out, inputs)
        if old is None:
            # A new bundle appears whole or not at all.
            with atomic_dir(out) as tmp:
                return _write_parts(tmp, None, inputs, hdrs, toolchain, sets, keep_debug, signer, os_record)
        return _write_parts(out, old, inputs, hdrs, toolchain, sets, keep_debug, signer, os_record)


def _existing(out: Path, inputs: DriverInputs) -> b.BundleManifest | None:
    if not (out / b.MANIFEST).is_file():
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not a driver bundle", "choose an empty or new --out")
        return None
    old = b.BundleManifest.load(out)
    if (old.driver_version, old.arch) != (inputs.driver_version, inputs.arch):
        raise UserError(f"{out} is the bundle of driver {old.driver_version} {old.arch}, "
                        f"not {inputs.driver_version} {inputs.arch}", "use one --out per driver version and arch")
    return old


def _write_parts(root: Path, old: b.BundleManifest | None, inputs: DriverInputs, hdrs: KernelHeaders,
                 toolchain: str, sets: dict[str, CompiledSet], keep_debug: bool,
                 signer: ModuleSigner | None, os_record: b.OSRecord | None) -> b.BundleManifest:
    if (old is None or old.source_digests != inputs.digests or not _same_files(old.userspace, inputs.userspace)
            or not _same_files(old.firmware, inputs.firmware)):
        with atomic_dir(b.userspace_dir(root)) as tmp:
            userspace = _copy_tree(inputs.userspace, tmp)
        with atomic_dir(b.firmware_dir(root)) as tmp:
            firmware = _copy_tree(inputs.firmware, tmp)
    else:
        userspace, firmware = old.userspace, old.firmware
    module_sets = dict(old.kernels[hdrs.kernel].module_sets) if old and hdrs.kernel in old.kernels else {}
    for mtype, cs in sets.items():
        log_rel = log_path(hdrs.kernel, mtype)
        modules = cs.modules
        atomic_write_text(root / log_rel, cs.log_file.read_text(errors="replace"))
        if cs.status != "ok":
            # A failed set ships nothing, not even what an earlier good build of it left here.
            shutil.rmtree(b.modules_dir(root, hdrs.kernel, mtype), ignore_errors=True)
            shutil.rmtree(b.interfaces_dir(root, hdrs.kernel, mtype), ignore_errors=True)
            shutil.rmtree(b.debug_dir(root, hdrs.kernel, mtype), ignore_errors=True)
        else:
            # Signed from the cache's gated bytes: split modules as the node will link them.
            signed = {ko.name: signer.sign(ko) for ko in cs.ko_files()} if signer else {}
            with atomic_dir(b.modules_dir(root, hdrs.kernel, mtype)) as tmp:
                for ko in cs.ko_files():
                    shutil.copyfile(ko, tmp / ko.name)
                    if ko.name in signed:
                        with (tmp / ko.name).open("ab") as fh:
                            fh.write(signed[ko.name])
            modules = tuple(dataclasses.replace(m, signature=signer.signature(m.name, ko.read_bytes(), signed[m.name]))
                            if signer else m for m, ko in zip(cs.modules, cs.ko_files(), strict=True))
            modules = _write_split_parts(root, hdrs.kernel, cs, modules, signed)
        if keep_debug and cs.status == "ok" and (cs.entry / "debug").is_dir():
            with atomic_dir(b.debug_dir(root, hdrs.kernel, mtype)) as tmp:
                for ko in (*(cs.entry / "debug").iterdir(), *cs.debug_files()):
                    shutil.copyfile(ko, tmp / ko.name)
        module_sets[mtype] = b.ModuleSet(mtype, cs.source_version, cs.status, modules, cs.abi_gate, cs.error, log_rel,
                                         cs.fixes)
    kernels = dict(old.kernels) if old else {}
    kernels[hdrs.kernel] = b.KernelBuild(hdrs.kernel, toolchain, hdrs.kernel_compiler, hdrs.digest, module_sets,
                                         os_record)
    manifest = b.BundleManifest(
        driver_version=inputs.driver_version, driver_branch=inputs.branch, arch=inputs.arch,
        source=inputs.source, source_digests=dict(inputs.digests), userspace=userspace, firmware=firmware,
        kernels=kernels, left_out={**nvfs.other_kernels(old.left_out if old else {}, hdrs.kernel), **inputs.left_out},
    )
    atomic_write_text(root / b.MANIFEST, manifest.to_json())
    return manifest


def _write_split_parts(root: Path, kernel: str, cs: CompiledSet, modules: tuple[b.ModuleFile, ...],
                       signed: dict[str, bytes]) -> tuple[b.ModuleFile, ...]:
    """Per-kernel parts (ModuleParts.per_kernel) and signatures per kernel; each binary once per bundle and
    module type.

    Modules whose kernel runs objtool over them also get their patch from the binary (bundle.ModulePatch),
    which is what the image ships of them. Returns `modules` with their patches."""
    split = [m.parts for m in modules if m.parts is not None]
    iface_dir = b.interfaces_dir(root, kernel, cs.module_type)
    if not split:
        shutil.rmtree(iface_dir, ignore_errors=True)
        return modules
    patched = []
    with atomic_dir(iface_dir) as tmp:
        for p in split:
            for name, _sha in p.per_kernel():  # interface, module.lds; on IBT kernels the final object, objtool
                shutil.copy2(cs.parts_dir / name, tmp / name)
        for m in modules:
            if m.parts is not None and m.signature is not None:
                (tmp / m.signature.file).write_bytes(signed[m.name])
            if m.parts is not None and m.parts.objtool is not None:
                patch = tmp / f"{m.name.removesuffix('.ko')}.patch"
                _patch(cs.parts_dir / m.parts.binary, cs.entry / "ko" / m.name, patch)
                m = replace(m, patch=b.ModulePatch(
                    m.parts.binary, m.parts.binary_sha256, m.parts.binary_size,
                    patch.name, sha256_file(patch), patch.stat().st_size))
            patched.append(m)
    bins = b.binaries_dir(root, cs.module_type)
    bins.mkdir(parents=True, exist_ok=True)
    for p in split:
        dest = bins / p.binary
        if not dest.is_file() or sha256_file(dest) != p.binary_sha256:
            # Another source of the same driver version had another binary: the newest build wins, and
            # the image stage refuses kernels whose interfaces were built against the old one.
            tmp_file = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(cs.parts_dir / p.binary, tmp_file)
            os.replace(tmp_file, dest)
    return tuple(patched)


def _patch(binary: Path, module: Path, dest: Path) -> None:
    """`module_patch` to `dest`, kept in the cache by the bytes it is made of (it takes seconds)."""
    key = hashlib.sha256(b.PATCH_MAGIC + f" {sha256_file(binary)} {sha256_file(module)}".encode()).hexdigest()
    entry = cache_dir("build", "patches") / key
    if not cache_hit(entry):
        with cache_fill(entry) as tmp:
            (tmp / "patch").write_bytes(module_patch(binary, module))
    shutil.copyfile(entry / "patch", dest)


def _same_files(listed: tuple[b.UserspaceFile, ...], tree: Path) -> bool:
    """Whether a bundle's list of a tree has the names, sizes, modes and links of `tree` (a cache entry
    verified just now): a bundle written from a damaged entry is then rewritten, not kept, by a rebuild."""
    have = {f.path: (f.size, f.mode, f.link) for f in listed}
    found: dict[str, tuple[int, int, str | None]] = {}
    for path in tree.rglob("*"):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            found[str(path.relative_to(tree))] = (0, 0o777, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            found[str(path.relative_to(tree))] = (st.st_size, stat.S_IMODE(st.st_mode), None)
    return have == found


def _copy_tree(src: Path, dest: Path) -> tuple[b.UserspaceFile, ...]:
    """Copy a root-relative tree (files keep their modes, setuid included) and list it for the manifest."""
    entries: list[b.UserspaceFile] = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        target = dest / rel
        if path.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            link = os.readlink(path)
            target.symlink_to(link)
            entries.append(b.UserspaceFile(str(rel), "", 0, 0o777, link))
        elif path.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            st = path.stat()
            entries.append(b.UserspaceFile(str(rel), sha256_file(target), st.st_size, stat.S_IMODE(st.st_mode)))
    return tuple(entries)
