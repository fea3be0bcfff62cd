"""Split NVIDIA's modules into a per-kernel interface object and the kernel-independent binary object.

nvidia.ko embeds nv-kernel.o_binary and nvidia-modeset.ko nv-modeset-kernel.o_binary: prebuilt objects,
byte-identical for every kernel, that make up most of each module. kbuild lists a module's objects in
`<module>.mod`; a listed object with an `<object>_binary` beside it in the tree is such a part. The rest
(objects compiled against the kernel's headers, modpost's `<module>.mod.o`, whatever modfinal adds) is
linked into one interface object. The module is then linked from the two with the kernel's own modfinal
command (`.<module>.ko.cmd`), the way NVIDIA's precompiled packages do it at install time.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from gl_nvidia.bundle import ModuleParts
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


def read_cmd(cmd_file: Path, base: Path) -> KbuildLink:
    """Parse kbuild's saved command (`cmd_X := ...` / `savedcmd_X := ...`) up to its first `;`.

    Relative paths are relative to `base`, the directory kbuild ran the command in (the kernel's
    build headers for out-of-tree modules).
    """
    line = next(ln for ln in cmd_file.read_text().splitlines() if " := " in ln and "cmd_" in ln)
    argv = shlex.split(line.partition(" := ")[2].partition(";")[0])
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


def mod_objects(tree: Path, module: str, base: Path) -> list[Path]:
    """The objects kbuild linked into `<module>.o` (its `<module>.mod` list)."""
    return [base / p for p in (tree / f"{module}.mod").read_text().split()]


def binary_object(objects: list[Path]) -> Path | None:
    """The object that is a copy of (or link to) a prebuilt `<object>_binary`, when the module has one."""
    found = [o for o in objects if o.with_name(o.name + "_binary").is_file()]
    return found[0] if len(found) == 1 else None


def linker_version(ld: str = "ld") -> str:
    return output([ld, "--version"]).splitlines()[0].strip()


@dataclass(frozen=True)
class Split:
    """A module's parts in a directory: `interface`, `binary` (stripped), the kernel's `lds`."""

    parts: ModuleParts
    interface: Path
    binary: Path
    lds: Path


def split_module(tree: Path, module: str, base: Path, dest: Path, linker: str) -> Split | None:
    """Write `<module>.o` (interface), the stripped binary and module.lds into `dest` (None: not split).

    A module is left whole when it has no binary object, or when kbuild ran objtool over the linked
    `<module>.o` (kernels with IBT or LTO): objtool's output then covers the binary's code too, per kernel.
    """
    objects = mod_objects(tree, module, base)
    binary = binary_object(objects)
    multi_cmd = tree / f".{module}.o.cmd"
    if binary is None or "objtool" in multi_cmd.read_text():
        return None
    multi = read_cmd(multi_cmd, base)
    final = read_cmd(tree / f".{module}.ko.cmd", base)
    if final.lds is None:
        return None
    module_o, mod_o = tree / f"{module}.o", tree / f"{module}.mod.o"
    extra = [p for p in final.inputs if p.resolve() not in (module_o.resolve(), mod_o.resolve())]
    interface = dest / f"{module}.o"
    rest = [o for o in objects if o != binary]
    run([multi.ld, *multi.flags, "-o", interface, *rest, mod_o, *extra])
    run(["strip", "--strip-debug", interface])
    bin_out = dest / binary.name
    run(["strip", "--strip-debug", "-o", bin_out, binary.with_name(binary.name + "_binary")])
    lds = dest / LDS
    lds.write_bytes(final.lds.read_bytes())
    flags = tuple(f for f in final.flags if f != "-r")
    parts = ModuleParts(
        interface=interface.name, interface_sha256=sha256_file(interface), interface_size=interface.stat().st_size,
        binary=bin_out.name, binary_sha256=sha256_file(bin_out), binary_size=bin_out.stat().st_size,
        lds=LDS, lds_sha256=sha256_file(lds), ld_flags=("-r", *flags), linker=linker,
    )
    return Split(parts, interface, bin_out, lds)


def link(parts: ModuleParts, interface: Path, binary: Path, lds: Path, out: Path, ld: str = "ld") -> Path:
    """Link a module from its parts with the recorded recipe (what the node does before insmod)."""
    run(parts.link_argv(ld, str(interface), str(binary), str(lds), str(out)))
    return out
