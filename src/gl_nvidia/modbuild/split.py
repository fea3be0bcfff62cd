"""Split NVIDIA's modules into a per-kernel interface object and the kernel-independent binary object.

nvidia.ko embeds nv-kernel.o_binary and nvidia-modeset.ko nv-modeset-kernel.o_binary: prebuilt objects,
byte-identical for every kernel, that make up most of each module. kbuild lists a module's objects in
`<module>.mod`; a listed object with an `<object>_binary` beside it in the tree is such a part. The rest
(objects compiled against the kernel's headers, modpost's `<module>.mod.o`, whatever modfinal adds) is
linked into one interface object. The module is then linked from the two with the kernel's own modfinal
command (`.<module>.ko.cmd`), the way NVIDIA's precompiled packages do it at install time.

Kernels with IBT (Debian's and Garden Linux's 6.12) run objtool over the linked `<module>.o` instead of
over each object, so its annotations cover the binary's code too. There the interface holds only the
module's own objects, modpost's objects go into a separate `final` object, and the recipe records the
`<module>.o` link and objtool's exact arguments; the kernel's objtool (from its kbuild package) ships per
kernel, and the build runs the same three steps kbuild ran (bundle.ObjtoolStep). objtool takes seconds and
half a gigabyte over nvidia.o, so the node does not: it gets a patch from the binary object to the linked
module (`module_patch`, bundle.ModulePatch) and rebuilds the gated bytes with the standard library.
"""

from __future__ import annotations

import io
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from gl_nvidia.bundle import (
    ModuleParts,
    ObjtoolStep,
    PartPaths,
    apply_patch,
    rela_columns,
    write_patch,
)
from gl_nvidia.fs import sha256_file
from gl_nvidia.run import output, run

LDS = "module.lds"


@dataclass(frozen=True)
class KbuildLink:
    """One `ld` command kbuild ran, split into its flags, linker script and input objects."""

    ld: str
    flags: tuple[str, ...]
    lds: Path | None
    inputs: tuple[Path, ...]


def _commands(cmd_file: Path) -> list[list[str]]:
    """kbuild's saved command (`cmd_X := ...` / `savedcmd_X := ...`), split at its `;`s."""
    line = next(ln for ln in cmd_file.read_text().splitlines() if " := " in ln and "cmd_" in ln)
    return [argv for part in line.partition(" := ")[2].split(";") if (argv := shlex.split(part))]


def read_cmd(cmd_file: Path, base: Path) -> KbuildLink:
    """Parse the link of kbuild's saved command (its first part, up to the first `;`).

    Relative paths are relative to `base`, the directory kbuild ran the command in (the kernel's
    build headers for out-of-tree modules).
    """
    argv = _commands(cmd_file)[0]
    flags: list[str] = []
    inputs: list[Path] = []
    lds: Path | None = None
    it = iter(argv[1:])
    for arg in it:
        if arg == "-o":
            next(it)
        elif arg == "-T":
            lds = base / next(it)
        elif arg.endswith(".o"):
            inputs.append(base / arg)
        elif arg.startswith("@"):
            continue  # the object list file: mod_objects() reads it
        else:
            flags.append(arg)
    return KbuildLink(argv[0], tuple(flags), lds, tuple(inputs))


@dataclass(frozen=True)
class KbuildObjtool:
    """The objtool run kbuild appended to a `<module>.o` link: the real binary and its arguments."""

    tool: Path
    args: tuple[str, ...]  # without the object, which is the last argument kbuild passed


def read_objtool(cmd_file: Path, base: Path) -> KbuildObjtool | None:
    """The objtool run in kbuild's saved `<module>.o` command (None: the kernel runs none there).

    Debian's kbuild package installs `objtool` as a wrapper that executes `objtool.real-$SRCARCH`;
    the real binary is the one that runs (and ships), so it is taken when it is there.
    """
    for argv in _commands(cmd_file)[1:]:
        if Path(argv[0]).name == "objtool":
            tool = base / argv[0]
            arch = sorted(p.name for p in (base / "arch").iterdir()) if (base / "arch").is_dir() else []
            real = [tool.with_name(f"objtool.real-{a}") for a in arch]
            tool = next((r for r in real if r.is_file()), tool)
            return KbuildObjtool(tool, tuple(argv[1:-1]))
    return None


def mod_objects(tree: Path, module: str, base: Path) -> list[Path]:
    """The objects kbuild linked into `<module>.o` (its `<module>.mod` list)."""
    return [base / p for p in (tree / f"{module}.mod").read_text().split()]


def binary_object(objects: list[Path]) -> Path | None:
    """The object that is a copy of (or link to) a prebuilt `<object>_binary`, when the module has one."""
    found = [o for o in objects if o.with_name(o.name + "_binary").is_file()]
    return found[0] if len(found) == 1 else None


def linker_version(ld: str = "ld", runner: Sequence[str] = ()) -> str:
    return output([*runner, ld, "--version"]).splitlines()[0].strip()


def libelf_of(tool: Path, runner: Sequence[str] = ()) -> str:
    """The file name of the libelf `tool` loads ("libelf-0.188.so"); "" when it loads none."""
    for line in output([*runner, "ldd", tool]).splitlines():
        name, _, rest = line.strip().partition(" => ")
        if name.startswith("libelf.so") and rest.startswith("/"):
            return Path(rest.split()[0]).resolve().name
    return ""


@dataclass(frozen=True)
class Split:
    """A module's parts in a directory: the per-kernel ones (interface, module.lds, with objtool also the
    final object and objtool itself) and the stripped binary."""

    parts: ModuleParts
    dir: Path

    def paths(self) -> PartPaths:
        return self.parts.paths(str(self.dir), str(self.dir))


def split_module(tree: Path, module: str, base: Path, dest: Path, linker: str, strip: str = "strip",
                 runner: Sequence[str] = ()) -> Split | None:
    """Write the parts of `<module>.ko` into `dest` (None: not split, the module ships whole).

    `strip`: the binutils `strip` of the kernel's architecture (`aarch64-linux-gnu-strip` when cross-compiling);
    `runner`: what runs the tools as make ran them (the kernel's toolchain root, modbuild.toolroot).

    A module is left whole when it has no binary object or the kernel's modfinal has no linker script.
    When kbuild ran objtool over the linked `<module>.o`, modpost's objects stay out of the interface
    (objtool never saw them) and the recipe records that link and objtool's run.
    """
    objects = mod_objects(tree, module, base)
    binary = binary_object(objects)
    if binary is None:
        return None
    multi_cmd = tree / f".{module}.o.cmd"
    multi = read_cmd(multi_cmd, base)
    objtool = read_objtool(multi_cmd, base)
    final = read_cmd(tree / f".{module}.ko.cmd", base)
    if final.lds is None:
        return None
    module_o, mod_o = tree / f"{module}.o", tree / f"{module}.mod.o"
    extra = [p for p in final.inputs if p.resolve() not in (module_o.resolve(), mod_o.resolve())]
    rest = [o for o in objects if o != binary]
    interface = dest / f"{module}.o"
    if objtool is None:
        _ld_r(multi, interface, [*rest, mod_o, *extra], strip, runner)
    else:
        _ld_r(multi, interface, rest, strip, runner)
        _ld_r(multi, dest / f"{module}.final.o", [mod_o, *extra], strip, runner)
    bin_out = dest / binary.name
    run([*runner, strip, "--strip-debug", "-o", bin_out, binary.with_name(binary.name + "_binary")])
    lds = dest / LDS
    lds.write_bytes(final.lds.read_bytes())
    step = None
    if objtool is not None:
        tool = dest / "objtool"
        shutil.copyfile(objtool.tool, tool)
        tool.chmod(0o755)
        final_o = dest / f"{module}.final.o"
        step = ObjtoolStep(tool=tool.name, tool_sha256=sha256_file(tool), args=objtool.args,
                           ld_flags=multi.flags, final=final_o.name, final_sha256=sha256_file(final_o),
                           final_size=final_o.stat().st_size, libelf=libelf_of(tool, runner))
    flags = tuple(f for f in final.flags if f != "-r")
    parts = ModuleParts(
        interface=interface.name, interface_sha256=sha256_file(interface), interface_size=interface.stat().st_size,
        binary=bin_out.name, binary_sha256=sha256_file(bin_out), binary_size=bin_out.stat().st_size,
        lds=LDS, lds_sha256=sha256_file(lds), ld_flags=("-r", *flags), linker=linker, objtool=step,
    )
    return Split(parts, dest)


def _ld_r(recipe: KbuildLink, out: Path, objects: list[Path], strip: str, runner: Sequence[str]) -> None:
    """`ld -r` with the flags of kbuild's `<module>.o` link, then without debug info (it is not shipped)."""
    run([*runner, recipe.ld, *recipe.flags, "-o", out, *objects])
    run([*runner, strip, "--strip-debug", out])


def link(parts: ModuleParts, at: PartPaths, out: Path, ld: str = "ld", runner: Sequence[str] = ()) -> Path:
    """Link a module from its parts with the recorded recipe (what the node does before insmod)."""
    for argv in parts.link_steps(ld, at, str(out)):
        run([*runner, *argv])
    Path(f"{out}.o").unlink(missing_ok=True)
    return out


def _sections(data: bytes) -> list[tuple[str, int, int, bool]]:
    """(name, file offset, size, is a relocation section) of every section with bytes in the file, in file
    order."""
    elf = ELFFile(io.BytesIO(data))
    found = [(s.name, s["sh_offset"], s["sh_size"], s["sh_type"] == "SHT_RELA") for s in elf.iter_sections()
             if s["sh_type"] != "SHT_NOBITS" and s["sh_size"]]
    return sorted(found, key=lambda x: x[1])


def module_patch(binary: Path, module: Path) -> bytes:
    """A patch (bundle.apply_patch) that makes `module` of `binary`, the object linked into it.

    The linker puts each of the binary's sections, whole, into the module's section of the same name
    (after the interface's part): those bytes are copied, or, where the link or objtool changed them
    (symbols renumbered, relocation offsets moved), copied with their difference added. objtool's new
    relocation sections go column by column; everything else (the interface's code, modpost's objects,
    the rest of what objtool wrote) is literal.
    """
    src, dst = binary.read_bytes(), module.read_bytes()
    theirs = {name: (off, size) for name, off, size, _ in _sections(src)}
    ops: list[list[int | str]] = []
    literals = bytearray()

    def lit(data: bytes) -> None:
        if not data:
            return
        if ops and ops[-1][0] == "lit":
            ops[-1][1] = int(ops[-1][1]) + len(data)
        else:
            ops.append(["lit", len(data)])
        literals.extend(data)

    pos = 0
    for name, off, size, rela in _sections(dst):
        lit(dst[pos:off])
        pos = off + size
        here = dst[off:pos]
        if name not in theirs or not 0 < theirs[name][1] <= size:
            columns = rela_columns(here) if rela else None
            if columns is None:
                lit(here)
            else:  # objtool's new relocation sections: most of what it writes
                ops.append(["rela", size])
                literals.extend(columns)
            continue
        s_off, s_size = theirs[name]
        piece = src[s_off:s_off + s_size]
        at = here.find(piece[:64])  # where the link put it: the interface's part comes first
        at = at if 0 <= at <= size - s_size else size - s_size
        lit(here[:at])
        mine = here[at:at + s_size]
        if mine == piece:
            ops.append(["copy", s_off, s_size])
        else:
            diff = int.from_bytes(mine, "little") - int.from_bytes(piece, "little")
            encoded = diff.to_bytes((diff.bit_length() + 8) // 8, "little", signed=True)
            ops.append(["add", s_off, s_size, len(encoded)])
            literals.extend(encoded)
        lit(here[at + s_size:])
    lit(dst[pos:])
    patch = write_patch(ops, bytes(literals))
    if apply_patch(patch, src) != dst:
        raise AssertionError(f"the patch from {binary.name} does not give {module.name}")
    return patch
