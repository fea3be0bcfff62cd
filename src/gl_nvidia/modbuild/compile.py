"""Compile one module set (one tree, one kernel), strip it, gate it, and keep the result in the cache.

The cache key is everything the result depends on: the module tree's digest, the module type, the
kernel headers' digest, the compiler and the recipe. A hit costs no compiling, a miss compiles once.
Failed compiles are cached too, so an unchanged matrix with a known-bad cell does not retry it.
Where it can, the compile reuses other kernels' objects (modbuild.reuse), behind a byte-identity gate.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from gl_nvidia.bundle import AbiGate, ModuleFile, SourceFix, module_file, source_fix
from gl_nvidia.fs import cache_dir, cache_fill, cache_hit, sha256_file
from gl_nvidia.modbuild import compat, reuse, treereuse
from gl_nvidia.modbuild.abi import OBJTOOL_SECTIONS, ModuleElf, gate, kernel_abi, read_module
from gl_nvidia.modbuild.kenv import KernelEnv, KernelHeaders
from gl_nvidia.modbuild.sources import ModuleSource
from gl_nvidia.modbuild.split import link, linker_version, split_module
from gl_nvidia.run import run

log = logging.getLogger(__name__)

# Bump when the way modules are built or stripped changes: old cache entries then stop matching.
# (Building at modbuild.reuse's constant paths changed the bytes, not what the modules are: not bumped.)
RECIPE = 2  # 2: split modules (interface + kernel-independent binary, linked from parts)
_ERROR = re.compile(r"(\berror\b|\*\*\*)", re.I)


@dataclass(frozen=True)
class CompiledSet:
    """A module set in the cache: stripped modules under `entry/ko` (split ones linked from their parts),
    the parts of split modules under `entry/parts`, unstripped modules under `entry/debug`, and
    `entry/build.log`."""

    entry: Path
    module_type: str
    source_version: str
    status: str  # "ok" | "failed"
    modules: tuple[ModuleFile, ...]
    abi_gate: AbiGate | None
    error: str | None
    cached: bool  # True when nothing was compiled for it in this run
    # modules kept in another cache entry of the same layout (ko/, debug/): nvidia-fs.ko
    files: dict[str, Path] = field(default_factory=dict)
    fixes: tuple[SourceFix, ...] = ()  # the compatibility fixes of the source it was compiled from

    @property
    def log_file(self) -> Path:
        return self.entry / "build.log"

    def ko_files(self) -> list[Path]:
        return [self.files.get(m.name, self.entry / "ko" / m.name) for m in self.modules]

    def debug_files(self) -> list[Path]:
        """The unstripped copies of `files` (those of the set's own modules are under `entry/debug`)."""
        return [ko.parent.parent / "debug" / ko.name for ko in self.files.values()]

    @property
    def parts_dir(self) -> Path:
        return self.entry / "parts"


def cache_key(src: ModuleSource, hdrs: KernelHeaders, toolchain: str, env_name: str,
              runner: Sequence[str] = ()) -> str:
    inputs: dict[str, object] = {"recipe": RECIPE, "source": src.digest, "type": src.module_type,
                                 "headers": hdrs.digest, "toolchain": toolchain, "env": env_name}
    if runner:  # the kernel's toolchain root the build ran in (modbuild.toolroot): its path names its packages' digests
        inputs["runner"] = list(runner)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def first_error(log_text: str) -> str:
    """The first compiler error of a build log ("nv-pci.c:123: error: too few arguments ...")."""
    lines = log_text.splitlines()
    for line in lines:
        if ": error:" in line or ": fatal error:" in line:
            return line.strip()
    for line in lines:
        if _ERROR.search(line):
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def compile_set(src: ModuleSource, hdrs: KernelHeaders, env: KernelEnv, toolchain: str, *,
                jobs: int, keep_debug: bool = False) -> CompiledSet:
    """Return the cached module set for these inputs, compiling it first when the cache has none.

    Concurrent builds of the same inputs (parallel units, or CI jobs sharing one machine's cache)
    wait for the one compile instead of repeating it.
    """
    key = cache_key(src, hdrs, toolchain, env.name, env.runner(hdrs))
    entry = cache_dir("build", "modules") / key
    with (cache_dir("build", "locks") / key).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _compile_locked(entry, src, hdrs, env, toolchain, jobs, keep_debug)


def _compile_locked(entry: Path, src: ModuleSource, hdrs: KernelHeaders, env: KernelEnv, toolchain: str,
                    jobs: int, keep_debug: bool) -> CompiledSet:
    hit = _load(entry, src.module_type) if cache_hit(entry) else None
    # Entries from before debug copies were cached have none: only --keep-debug needs them rebuilt.
    if hit is not None and (not keep_debug or hit.status != "ok" or (entry / "debug").is_dir()):
        return hit
    why_not = reuse.unavailable(hdrs, env.name)
    if why_not:
        log.info("%s %s modules: no reuse of other kernels' compiles: %s", hdrs.kernel, src.module_type, why_not)
    work = Path(tempfile.mkdtemp(prefix=f"{hdrs.kernel}-{src.module_type}-", dir=cache_dir("build", "work")))
    try:
        tree = work / "tree"
        if why_not:
            build = _make(src, tree, env.make_argv(hdrs, tree, jobs), work / "build.log")
            record: dict[str, object] = {"mode": "off", "why": why_not, "seconds": build.seconds}
        else:
            build, record = _reuse_gated(src, hdrs, env, toolchain, jobs, work)
        with cache_fill(entry) as tmp:
            # the log says first what of the source is not NVIDIA's
            (tmp / "build.log").write_bytes(compat.log_lines(src.fixes).encode() + build.log.read_bytes())
            result = _collect(build.tree, tmp, src, hdrs, build.returncode, build.log, env.runner(hdrs))
            (tmp / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True))
            (tmp / "reuse.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    done = _load(entry, src.module_type)
    assert done is not None
    return replace(done, cached=False)


@dataclass(frozen=True)
class _Build:
    tree: Path
    log: Path
    returncode: int
    seconds: float


def _make(src: ModuleSource, tree: Path, argv: list[str], build_log: Path, env: dict[str, str] | None = None) -> _Build:
    """Run make in `tree`, a copy of the module tree made first unless a kept tree was restored there."""
    if not tree.exists():
        shutil.copytree(src.tree, tree, symlinks=True)
    start = time.monotonic()
    proc = run(argv, log_file=build_log, check=False, env=env)
    return _Build(tree, build_log, proc.returncode, round(time.monotonic() - start, 1))


def _outside(b: _Build, view: reuse.View, hdrs: KernelHeaders) -> _Build:
    """A build made in modbuild.reuse's view, its log and kbuild's saved commands naming paths as they are outside."""
    for f in [b.log, *b.tree.glob(".*.cmd"), *b.tree.glob("*.mod")]:
        f.write_text(view.back(f.read_text(errors="replace"), hdrs, b.tree))
    return b


def _reuse_gated(src: ModuleSource, hdrs: KernelHeaders, env: KernelEnv, toolchain: str, jobs: int,
                 work: Path) -> tuple[_Build, dict[str, object]]:
    """Build in the view, from the tree kept for a kernel whose headers differ only where they name the release
    (modbuild.treereuse) or else through the compiler cache. The first build of a case that reused anything is
    built again without either and compared (reuse.compare), and the cold one kept when they differ."""
    start = time.monotonic()
    view = reuse.view()
    cases = {m: reuse.case_key(RECIPE, src.digest, src.module_type, toolchain, hdrs, m) for m in ("tree", "objects")}
    ident = reuse.identity(hdrs)
    kept = treereuse.entry(cases["tree"], ident)
    inner = env.make_argv(view.headers(hdrs), view.tree, jobs)

    def make(name: str, cold: bool) -> tuple[_Build, int, int]:
        stats = work / f"{name}.ccache"
        b = _make(src, work / name, reuse.make_argv(view, hdrs, work / name, inner), work / f"{name}.log",
                  reuse.ccache_env(stats, src.digest, cold=cold))
        return (b, *reuse.cache_hits(stats, view.tree))

    verdicts = {m: reuse.verdict(c) for m, c in cases.items()}
    off = next((v for v in verdicts.values() if v is not None and not v.ok), None)
    if off is not None:
        log.warning("%s %s modules: reuse of other kernels' builds is off for this driver source and kernel "
                    "series: %s", hdrs.kernel, src.module_type, off.why)
        cold, _, calls = make("tree", cold=True)
        return _outside(cold, view, hdrs), {"mode": "off", "why": off.why, "seconds": cold.seconds, "compiles": calls}
    restored = treereuse.restore(kept, work / "tree", ident, lambda dep: view.outside(dep, hdrs, work / "tree"))
    mode = "tree" if restored is not None else "objects"
    known = verdicts[mode]
    prepare = round(time.monotonic() - start, 1)  # the headers' identity, the tree restored
    warm, hits, calls = make("tree", cold=False)
    record: dict[str, object] = {"mode": "warm", "reuse": mode, "seconds": warm.seconds, "prepare_seconds": prepare,
                                 "reused": hits, "compiles": calls, **({"tree": restored} if restored else {})}
    # A tree that fails to build is compared with a cold build (which may fail the same way) even when known.
    if (mode == "objects" and (known is not None or hits == 0 or warm.returncode != 0)) or \
            (mode == "tree" and known is not None and warm.returncode == 0):
        if mode == "objects":
            _keep_tree(kept, warm, ident, hdrs)
        return _outside(warm, view, hdrs), {**record, "verdict": known.why if known else None}
    cold, _, _ = make("cold", cold=True)
    warm_kos, cold_kos = _kos(warm.tree), _kos(cold.tree)
    verdict = reuse.compare(warm_kos, cold_kos)
    checked = {"cold_seconds": cold.seconds, "kernel": hdrs.kernel, "identical": verdict.ok,
               "modules": {n: [warm_kos.get(n), cold_kos.get(n)] for n in sorted(warm_kos.keys() | cold_kos.keys())}}
    reuse.keep_verdict(cases[mode], verdict, checked)
    if not verdict.ok:
        log.warning("%s %s modules: reuse of other kernels' builds turned off for this driver source and kernel "
                    "series (built from %s), the cold build kept: %s", hdrs.kernel, src.module_type, _REUSED[mode],
                    verdict.why)
        return _outside(cold, view, hdrs), {**record, **checked, "mode": "off", "why": verdict.why}
    if mode == "objects":
        _keep_tree(kept, warm, ident, hdrs)
    return _outside(warm, view, hdrs), {**record, **checked, "verdict": verdict.why}


_REUSED = {"tree": "another kernel's built tree", "objects": "other kernels' compiles"}


def _keep_tree(at: Path, b: _Build, ident: treereuse.Identity, hdrs: KernelHeaders) -> None:
    """Keep a successful build's tree, as it is in the view, for the next kernels of its identity."""
    if b.returncode == 0:
        treereuse.keep(at, b.tree, ident, hdrs.kernel)


def _kos(tree: Path) -> dict[str, str]:
    """kbuild's modules in `tree` (unstripped: debug info compared too), by name."""
    return {ko.name: sha256_file(ko) for ko in sorted(tree.glob("*.ko"))}


def _collect(tree: Path, dest: Path, src: ModuleSource, hdrs: KernelHeaders, returncode: int,
             build_log: Path, runner: list[str]) -> dict[str, object]:
    result: dict[str, object] = {"module_type": src.module_type, "source_version": src.version,
                                 "fixes": [asdict(f) for f in src.fixes]}
    kos = sorted(tree.glob("*.ko"))
    if returncode != 0 or not kos:
        err = first_error(build_log.read_text(errors="replace")) if returncode else "make built no .ko files"
        err = err.replace(f"{tree}/", "")  # the temp work tree's path means nothing later
        return {**result, "status": "failed", "error": err, "modules": [], "abi_gate": None}
    (dest / "ko").mkdir()
    # Unstripped copies stay in the cache, so --keep-debug never means compiling again.
    (dest / "debug").mkdir()
    (dest / "parts").mkdir()
    # The kernel's architecture's binutils: aarch64-linux-gnu-ld and -strip for an arm64 kernel on amd64;
    # those of the kernel's toolchain root when make ran there (`runner`).
    ld, strip = hdrs.tool("ld"), hdrs.tool("strip")
    linker = linker_version(ld, runner)
    modules = []
    for ko in kos:
        shipped = dest / "ko" / ko.name
        split = split_module(tree, ko.name.removesuffix(".ko"), hdrs.sysout, dest / "parts", linker, strip, runner)
        if split is not None:
            # What ships is the module linked from its parts, the way the node will link it.
            link(split.parts, split.paths(), shipped, ld, runner)
            problem = _differs(read_module(ko), read_module(shipped))
            if problem:
                log.warning("%s: linked from parts, %s; shipping it whole", ko.name, problem)
                split = None
        if split is None:
            run([*runner, strip, "--strip-debug", "-o", shipped, ko])
        info = read_module(shipped)
        modules.append(ModuleFile(ko.name, sha256_file(shipped), shipped.stat().st_size, ko.stat().st_size,
                                  info.vermagic, info.srcversion, split.parts if split else None))
        os.replace(ko, dest / "debug" / ko.name)
    verdict = gate([read_module(dest / "ko" / m.name) for m in modules], kernel_abi(hdrs.sysout))
    status, error = "ok", None
    if not verdict.ok:
        status, error = "failed", f"ABI gate: {len(verdict.problems)} problem(s), first: {verdict.problems[0]}"
    return {**result, "status": status, "error": error, "modules": [asdict(m) for m in modules],
            "abi_gate": asdict(verdict)}


def _differs(kbuild: ModuleElf, linked: ModuleElf) -> str | None:
    """How a module linked from parts differs from kbuild's in what the kernel's loader checks, or in what
    objtool wrote (the same sites annotated: each section's size equals kbuild's)."""
    for what in ("vermagic", "srcversion", "undefined", "exported", "versions"):
        if getattr(kbuild, what) != getattr(linked, what):
            return f"its {what} differs from kbuild's"
    for sec in OBJTOOL_SECTIONS:
        if kbuild.sections.get(sec) != linked.sections.get(sec):
            return f"its {sec} section differs from kbuild's ({linked.sections.get(sec)} != {kbuild.sections.get(sec)} bytes)"
    return None


def _load(entry: Path, module_type: str) -> CompiledSet | None:
    try:
        d = json.loads((entry / "result.json").read_text())
    except (OSError, ValueError):
        return None
    g = d.get("abi_gate")
    return CompiledSet(
        entry=entry, module_type=module_type, source_version=d["source_version"], status=d["status"],
        modules=tuple(module_file(m) for m in d["modules"]),
        abi_gate=AbiGate(g["ok"], tuple(g["problems"]), tuple(g.get("evidence", ()))) if g else None,
        error=d.get("error"), cached=True, fixes=tuple(source_fix(f) for f in d.get("fixes", ())),
    )
