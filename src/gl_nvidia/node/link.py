"""The .ko files init inserts: checked against the manifest, split modules linked from their parts and patched
modules rebuilt from the build's patch on this node, each held to the module the build gated and signed."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

from ..bundle import apply_patch
from . import decide
from .context import Context, reason
from .decide import NodeError
from .imagefiles import PULL_AGAIN, PatchedModule, SplitModule, sha256_file
from .modinfo import modinfo

# Modules linked from their parts (interface + NVIDIA's binary object) before insmod: inside the
# container, never under the driver root the host sees.
STAGING_DIR = "/run/gl-nvidia/modules"


class Linker:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._version: str | None = None  # `ld --version`'s first line, read once

    def verify(self, kernel: str, module_type: str, modules: tuple[str, ...]) -> None:
        for m in modules:
            self.ctx.image.verify(kernel, module_type, m)

    def prepare(self, kernel: str, module_type: str, modules: tuple[str, ...], running: str) -> list[Path]:
        """`modules` of the image's set, or the one line naming what the image lacks (and, for nvidia-fs,
        why the build left it out)."""
        image = self.ctx.image
        missing = [f"{m}.ko" for m in modules if not image.has_module(kernel, module_type, m)]
        if missing:
            left = [f"{m}: {image.left_out[k]}" for m in (decide.NVIDIA_FS,) if f"{m}.ko" in missing
                    and (k := f"{m} {kernel}") in image.left_out]  # GDS: why the build shipped none
            raise NodeError(f"this image lacks {', '.join(missing)} for kernel {kernel}"
                            + (f" (the build left out {'; '.join(left)})" if left else ""),
                            "rebuild the image from a complete bundle")
        return self.modules(kernel, module_type, modules, running)

    def modules(self, kernel: str, module_type: str, modules: tuple[str, ...], running: str) -> list[Path]:
        """The .ko files to insert, in order: every file they are made from is checked against the manifest
        first (whatever the linker), then split modules are linked into STAGING_DIR and checked again."""
        self.verify(kernel, module_type, modules)
        return [self._link(kernel, module_type, m, running) for m in modules]

    def _link(self, kernel: str, module_type: str, module: str, running: str) -> Path:
        host, image = self.ctx.host, self.ctx.image
        patched = image.patched_module(kernel, module_type, module)
        split = image.split_module(kernel, module_type, module)
        if patched is None and split is None:
            return image.ko(kernel, module_type, module)
        stage = f"{STAGING_DIR}/{kernel}/{module_type}"
        host.makedirs(stage)
        out = host.path(f"{stage}/{module}.ko")
        tmp = out.with_name(f".{out.name}.tmp")
        problem = None
        try:
            if patched is not None:
                actual = self._rebuild(patched, tmp, module, kernel)
                problem = link_problem(tmp, module, patched.sha256, patched.srcversion, running, actual=actual)
            elif split is not None:
                for argv in split.parts.link_steps("ld", split.paths, str(tmp)):
                    res = host.run(*argv)
                    if res.rc != 0:
                        raise NodeError(f"could not link {module}.ko for kernel {kernel} from its parts: "
                                        f"{reason(res.stderr or res.stdout)}", "the image needs a working ld (binutils)")
                same = self._ld_version() == split.parts.linker
                problem = link_problem(tmp, module, split.sha256 if same else "", split.srcversion, running,
                                       split.parts.linker)
            if problem:
                raise NodeError(problem, "rebuild the image from one bundle; do not mix parts of different builds")
            if patched is not None and patched.signature is not None:  # the gated bytes: checked above
                with tmp.open("ab") as f:
                    f.write(patched.signature.read_bytes())
            elif split is not None and split.signature is not None:
                self._sign(tmp, module, split)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)  # a failed or killed ld can leave a partial output behind
        if patched is not None:
            self.ctx.log.info("module rebuilt from its patch", module=module, type=module_type, path=str(out),
                              sha256="the build's", signed="yes" if patched.signature else "no")
        elif split is not None:
            self.ctx.log.info("module linked", module=module, type=module_type, path=str(out),
                              sha256="the build's" if split.signature or self._ld_version() == split.parts.linker
                              else "not compared (other ld)", signed="yes" if split.signature else "no")
        return out

    def _rebuild(self, patched: PatchedModule, out: Path, module: str, kernel: str) -> str:
        """Write the module made of NVIDIA's binary object and the build's patch to `out`, and return its
        sha256: no linker, no objtool (they ran at build time); `link_problem` holds it to the gated one."""
        try:
            with patched.binary.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as binary:
                data = apply_patch(patched.patch.read_bytes(), binary)
        except (OSError, ValueError) as exc:
            raise NodeError(f"could not rebuild {module}.ko for kernel {kernel} from its patch: {exc}",
                            PULL_AGAIN) from exc
        out.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def _sign(self, ko: Path, module: str, split: SplitModule) -> None:
        """Append the build's signature, which covers exactly the gated bytes: only to those bytes, whatever
        the linker (a kernel that enforces signatures would refuse any other module under it)."""
        assert split.signature is not None
        actual = sha256_file(ko)
        if actual != split.sha256:
            raise NodeError(f"{module}.ko linked on this node (sha256 {actual[:16]}) is not the module the build "
                            f"gated and signed (sha256 {split.sha256[:16]}); its signature would not verify, "
                            "refusing to load it",
                            f"link with the build's linker ({split.parts.linker}): the image's own, unchanged")
        with ko.open("ab") as f:
            f.write(split.signature.read_bytes())

    def _ld_version(self) -> str:
        if self._version is None:
            res = self.ctx.host.run("ld", "--version")
            self._version = res.stdout.splitlines()[0].strip() if res.rc == 0 and res.stdout.strip() else "unknown"
        return self._version


def link_problem(ko: Path, module: str, sha256: str, srcversion: str, running: str, linker: str = "",
                 actual: str = "") -> str | None:
    """Why a module made on this node must not be loaded (None: it is the module the build gated).

    `sha256`: the bytes it must have ("": not compared, another linker may lay it out otherwise);
    `linker`: the build's linker when it was linked with it, "" when it was rebuilt from the build's patch;
    `actual`: its sha256 when the caller has it ("": read from `ko`).
    """
    how, source = ("linked", "parts") if linker else ("rebuilt", "patch")
    info = modinfo(ko)
    vermagic = info.get("vermagic", "").split(" ")[0]
    actual_srcversion = info.get("srcversion", "")
    if vermagic != running or actual_srcversion != srcversion:
        return (f"{module}.ko {how} from this image's {source} has vermagic {vermagic or '?'} and srcversion "
                f"{actual_srcversion or '?'}, but the running kernel is {running} and the manifest's srcversion is "
                f"{srcversion}; refusing to load it")
    if sha256:
        actual = actual or sha256_file(ko)
        if actual != sha256:
            return (f"{module}.ko {how} on this node (sha256 {actual[:16]}) differs from the module the "
                    f"build linked and gated (sha256 {sha256[:16]})"
                    f"{f' with the same linker ({linker})' if linker else ''}; refusing to load it")
    return None
