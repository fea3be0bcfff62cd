"""Fakes for the node runtime's host seam: a copied fake host tree, a kernel that remembers modules.

Kept beside the tests that use them; the decision logic under test is the real one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from gl_nvidia.node import layout
from gl_nvidia.node.host import Host, Result
from gl_nvidia.node.image import Image
from gl_nvidia.node.log import Log
from gl_nvidia.node.runtime import Runtime

DATA = Path(__file__).parent / "data" / "node"
KERNEL = "6.1.0-56-cloud-amd64"
BUILD_LINKER = "GNU ld (GNU Binutils for Debian) 2.40"  # what the fake manifest says the build linked with
BUILD_LIBELF = "libelf-0.188.so"  # ... and which libelf the build's objtool ran with
OBJTOOL_ARGS = ("--hacks=jump_label", "--ibt", "--orc", "--link", "--module")
OBJTOOL_MARK = b"+objtool"  # what the fake objtool appends to the object it processes
SPLIT = {"nvidia": "nv-kernel.o", "nvidia-modeset": "nv-modeset-kernel.o"}  # module -> its binary object


def make_ko(path: Path, **info: str) -> Path:
    """A minimal ELF64 relocatable with a `.modinfo` section, as the kernel build writes it."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    modinfo_off, shstr_off = body_off, body_off + len(modinfo)
    shoff = (shstr_off + len(shstrtab) + 7) & ~7
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def sh(name: int, typ: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)

    sections = sh(0, 0, 0, 0) + sh(1, 1, modinfo_off, len(modinfo)) + sh(10, 3, shstr_off, len(shstrtab))
    data = header + modinfo + shstrtab
    data += bytes(shoff - len(data)) + sections
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_image(
    root: Path,
    version: str = "535.309.01",
    kernels: dict[str, tuple[str, ...]] | None = None,
    binaries: Sequence[str] = ("nvidia-smi", "nvidia-modprobe", "nvidia-persistenced"),
    source_versions: dict[str, str] | None = None,
    objtool: bool = False,
) -> Image:
    """A driver image root as the image stage lays it out (node/layout.py); `source_versions` gives a
    module type a source version other than the userspace's; `objtool`: split modules of an IBT kernel
    (the kernel's objtool and a final object beside the interface)."""
    kernels = {KERNEL: ("proprietary", "open")} if kernels is None else kernels
    sv = source_versions or {}
    sets: dict[str, dict[str, object]] = {}
    for kernel, types in kernels.items():
        for t in types:
            d = root / str(layout.modules_dir(kernel, t)).lstrip("/")
            records = []
            for m, deps in (("nvidia", ""), ("nvidia-uvm", "nvidia"), ("nvidia-modeset", "nvidia"),
                            ("nvidia-peermem", "nvidia,ib_core")):
                info = {"version": version, "depends": deps, "srcversion": f"{t}-{m}",
                        "vermagic": f"{kernel} SMP mod_unload modversions "}
                if m not in SPLIT:
                    ko = make_ko(d / f"{m}.ko", **info)
                    records.append({"name": ko.name, "sha256": _sha(ko.read_bytes()), "size": 0,
                                    "size_unstripped": 0, "vermagic": info["vermagic"], "srcversion": info["srcversion"]})
                    continue
                # Split like the build stage ships nvidia.ko: interface + module.lds here, binary elsewhere.
                iface = make_ko(d / f"{m}.o", **info)
                (d / "module.lds").write_text("SECTIONS { }\n")
                binary = root / str(layout.binaries_dir(t)).lstrip("/") / SPLIT[m]
                binary.parent.mkdir(parents=True, exist_ok=True)
                binary.write_bytes(f"binary {t} {m}".encode())
                parts: dict[str, object] = {
                    "interface": iface.name, "interface_sha256": "", "interface_size": 0, "binary": binary.name,
                    "binary_sha256": "", "binary_size": 0, "lds": "module.lds", "lds_sha256": "",
                    "ld_flags": ["-r", "-m", "elf_x86_64", "--build-id=sha1"], "linker": BUILD_LINKER}
                linked = fake_link(iface, binary)
                if objtool:
                    final = d / f"{m}.final.o"
                    final.write_bytes(f"modpost {t} {m}".encode())
                    (d / "objtool").write_text("#!/bin/sh\n")
                    parts["objtool"] = {"tool": "objtool", "tool_sha256": "", "args": list(OBJTOOL_ARGS),
                                        "ld_flags": ["-m", "elf_x86_64", "-r"], "final": final.name,
                                        "final_sha256": "", "final_size": 0, "libelf": BUILD_LIBELF}
                    linked = linked + OBJTOOL_MARK + final.read_bytes()
                records.append({"name": f"{m}.ko", "sha256": _sha(linked), "size": 0, "size_unstripped": 0,
                                "vermagic": info["vermagic"], "srcversion": info["srcversion"], "parts": parts})
            sets.setdefault(kernel, {})[t] = {"source_version": sv.get(t, version), "modules": records}
    manifest = root / str(layout.MANIFEST).lstrip("/")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "driver_version": version, "driver_branch": version.split(".")[0],
        "kernels": {k: {"module_sets": ms} for k, ms in sets.items()},
    }))
    for b in binaries:
        p = root / "usr/bin" / b
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/ld.so.cache").write_bytes(b"glibc-ld.so.cache1.1\0libnvidia-ml.so.1\0")
    return Image.load(root)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_link(interface: Path, binary: Path) -> bytes:
    """What the fake `ld` makes of the parts: the interface (its .modinfo stays readable) + the binary."""
    return interface.read_bytes() + binary.read_bytes()


class FakeKernel:
    """Runner for the fake host: insmod/rmmod update /proc/modules and /sys/module; mounts are remembered."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, ...]] = []
        self.mounts: set[str] = set()
        self.fail: dict[str, Result] = {}  # argv[0] (or "insmod:<module>") -> forced result
        self.dmesg: list[str] = ["[    0.000000] Linux version " + KERNEL]
        self.pids: set[int] = set()
        self.linker = "GNU ld (fake node binutils) 1.0"  # set to BUILD_LINKER: the same linker as the build
        self.libelf = "/usr/lib/x86_64-linux-gnu/libelf.so.1"  # what ldd says objtool loads

    def names(self) -> list[str]:
        return [" ".join(c) for c in self.calls]

    def _modules(self) -> list[str]:
        return (self.root / "proc/modules").read_text().splitlines()

    def _set_modules(self, lines: list[str]) -> None:
        (self.root / "proc/modules").write_text("".join(line + "\n" for line in lines))

    def __call__(self, argv: Sequence[str]) -> Result:
        argv = tuple(argv)
        self.calls.append(argv)
        cmd = argv[0]
        if cmd == "insmod":
            module = Path(argv[1]).stem.replace("-", "_")
            forced = self.fail.get(f"insmod:{module}") or self.fail.get("insmod")
            if forced:
                self.dmesg.append(f"[   12.000000] {module}: forced failure")
                return forced
            info = {"version": "535.309.01"}
            sysmod = self.root / "sys/module" / module
            sysmod.mkdir(parents=True, exist_ok=True)
            (sysmod / "refcnt").write_text("0\n")
            if module == "nvidia":
                (sysmod / "version").write_text(info["version"] + "\n")
                (sysmod / "srcversion").write_text(Path(argv[1]).parent.name + "-nvidia\n")
            else:
                nv = self.root / "sys/module/nvidia/refcnt"
                nv.write_text(f"{int(nv.read_text()) + 1}\n")
            self._set_modules([f"{module} 1 0 - Live 0x0", *self._modules()])
            return Result(0)
        if cmd == "ld":
            if argv[1:] == ("--version",):
                return Result(0, self.linker + "\nCopyright\n")
            out = Path(argv[argv.index("-o") + 1])
            out.write_bytes(fake_link(Path(argv[-2]), Path(argv[-1])))
            return Result(0)
        if Path(cmd).name == "objtool":
            if "objtool" in self.fail:
                return self.fail["objtool"]
            with Path(argv[-1]).open("ab") as f:
                f.write(OBJTOOL_MARK)
            return Result(0)
        if cmd == "ldd":
            return Result(0, f"\tlibelf.so.1 => {self.libelf} (0x00007f1cceac4000)\n"
                             "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1cce01e000)\n")
        if cmd == "rmmod":
            for m in argv[1:]:
                name = m.replace("-", "_")
                shutil.rmtree(self.root / "sys/module" / name, ignore_errors=True)
                self._set_modules([line for line in self._modules() if line.split()[0] != name])
            return Result(0)
        if cmd == "mount":
            self.mounts.add(argv[-1])
            return Result(0)
        if cmd == "umount":
            self.mounts.discard(argv[-1])
            return Result(0)
        if cmd == "mountpoint":
            return Result(0 if argv[-1] in self.mounts else 1)
        if cmd == "dmesg":
            return Result(0, "\n".join(self.dmesg) + "\n")
        if cmd in self.fail:
            return self.fail[cmd]
        if cmd in ("nvidia-persistenced", "nv-fabricmanager"):
            pid = 4000 + len(self.pids)
            self.pids.add(pid)
            d = "nvidia-persistenced" if cmd == "nvidia-persistenced" else "nvidia-fabricmanager"
            pidfile = self.root / "var/run" / d / f"{cmd}.pid"
            pidfile.parent.mkdir(parents=True, exist_ok=True)
            pidfile.write_text(f"{pid}\n")
            return Result(0)
        return Result(0)


class FakeHost(Host):
    """Signals go to the fake kernel's pretend daemons, never to real processes."""

    kernel: FakeKernel

    def exit(self) -> None:
        """What the process's exit does to its locks (a container killed without teardown)."""
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()

    def kill(self, pid: int, sig: int = 15) -> bool:
        if pid in self.kernel.pids:
            if sig:
                self.kernel.pids.discard(pid)
            return True
        return False


def fake_node(tmp_path: Path, tree: str, image: Image | None = None, **env: str) -> tuple[Runtime, FakeKernel]:
    root = tmp_path / "host"
    shutil.copytree(DATA / tree, root, symlinks=True)
    kernel = FakeKernel(root)
    host = FakeHost(root, kernel)
    host.kernel = kernel
    image = image or make_image(tmp_path / "image")
    rt = Runtime(host, image, dict(env), Log(stream=io.StringIO()), wait=lambda timeout: True, sleep=lambda s: None)
    return rt, kernel
