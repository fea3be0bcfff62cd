"""A small but real driver bundle for image tests: real ELF shared libraries and objects, tiny.

Written with bundle.py's dataclasses, exactly as `gl-nvidia build` lays a bundle out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
from pathlib import Path

from gl_nvidia import bundle as b

VERSION, BRANCH = "535.309.01", "535"
TRIPLET = "x86_64-linux-gnu"
KERNELS = ("6.1.0-47-cloud-amd64", "6.1.0-56-cloud-amd64")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _compile(src: str, out: Path, *args: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run(["gcc", "-O0", *args, "-o", str(out), str(c)], check=True)
    c.unlink()


def make_bundle(dest: Path, kernels: tuple[str, ...] = KERNELS) -> Path:
    """A bundle with libcuda/libnvidia-ml (real .so with sonames), nvidia-smi, GSP firmware, .ko per kernel."""
    us = b.userspace_dir(dest)
    lib = us / "usr/lib" / TRIPLET
    files: list[b.UserspaceFile] = []
    for name in ("libcuda", "libnvidia-ml"):
        so = lib / f"{name}.so.{VERSION}"
        _compile(f"int {name.replace('-', '_')}_probe(void) {{ return 1; }}\n", so,
                 "-shared", "-fPIC", f"-Wl,-soname,{name}.so.1")
        (lib / f"{name}.so.1").symlink_to(so.name)
        files += [
            b.UserspaceFile(f"usr/lib/{TRIPLET}/{so.name}", _sha(so), so.stat().st_size, 0o644),
            b.UserspaceFile(f"usr/lib/{TRIPLET}/{name}.so.1", "", 0, 0o777, link=so.name),
        ]
    smi = us / "usr/bin/nvidia-smi"
    _compile("int main(void) { return 0; }\n", smi)
    files.append(b.UserspaceFile("usr/bin/nvidia-smi", _sha(smi), smi.stat().st_size, 0o755))
    # fabric manager as the nvidia source lays out NVIDIA's archive
    for rel, text, mode in (("usr/bin/nv-fabricmanager", "#!/bin/sh\n", 0o755),
                            ("usr/share/nvidia/nvswitch/fabricmanager.cfg", "FABRIC_MODE=0\n", 0o644)):
        (us / rel).parent.mkdir(parents=True, exist_ok=True)
        (us / rel).write_text(text)
        (us / rel).chmod(mode)
        files.append(b.UserspaceFile(rel, _sha(us / rel), len(text), mode))
    fw = b.firmware_dir(dest) / "nvidia" / VERSION / "gsp_ga10x.bin"
    fw.parent.mkdir(parents=True)
    fw.write_bytes(b"GSP firmware " * 1000)
    firmware = (b.UserspaceFile(f"nvidia/{VERSION}/gsp_ga10x.bin", _sha(fw), fw.stat().st_size, 0o644),)
    builds = {}
    for k in kernels:
        sets = {}
        for t in b.MODULE_TYPES:
            mods = []
            for m in ("nvidia", "nvidia-uvm", "nvidia-modeset"):
                ko = b.modules_dir(dest, k, t) / f"{m}.ko"
                _compile(f'const char modinfo[] = "vermagic={k} SMP mod_unload modversions {t} {m}";\n', ko, "-c")
                mods.append(b.ModuleFile(ko.name, _sha(ko), ko.stat().st_size, ko.stat().st_size,
                                         f"{k} SMP mod_unload modversions", "0" * 24))
            sets[t] = b.ModuleSet(t, VERSION, "ok", tuple(mods), b.AbiGate(True))
        builds[k] = b.KernelBuild(k, "gcc (Debian 12.2.0-14) 12.2.0", "gcc-12 (Debian 12.2.0-14) 12.2.0",
                                  "0" * 64, sets, b.OSRecord("gardenlinux", ("1877.3",)))
    manifest = b.BundleManifest(VERSION, BRANCH, "amd64", "debian", {"nvidia-driver.deb": "0" * 64},
                                tuple(files), firmware, builds)
    (dest / b.MANIFEST).write_text(manifest.to_json())
    return dest


def with_extra_kernels(src: Path, dest: Path, extra: tuple[str, ...]) -> Path:
    """A copy of bundle `src` whose first kernel's modules also appear under the names in `extra`.

    The copies are byte-identical to the real modules (not rebuilt, vermagic unchanged): enough to
    measure layer sharing and sizes, not to load them.
    """
    shutil.copytree(src, dest, symlinks=True)
    manifest = b.BundleManifest.load(dest)
    first = next(iter(manifest.kernels.values()))
    kernels = dict(manifest.kernels)
    for k in extra:
        for t in first.module_sets:
            shutil.copytree(b.modules_dir(dest, first.kernel, t), b.modules_dir(dest, k, t))
            if b.interfaces_dir(dest, first.kernel, t).is_dir():
                shutil.copytree(b.interfaces_dir(dest, first.kernel, t), b.interfaces_dir(dest, k, t))
        kernels[k] = dataclasses.replace(first, kernel=k)
    (dest / b.MANIFEST).write_text(dataclasses.replace(manifest, kernels=kernels).to_json())
    return dest


def with_split_nvidia(bundle: Path) -> Path:
    """Ship every kernel's nvidia.ko of `bundle` split, as `build` does for NVIDIA's real modules: a
    per-kernel interface object and module.lds, and one kernel-independent binary per module type."""
    manifest = b.BundleManifest.load(bundle)
    kernels = {}
    for k, kb in manifest.kernels.items():
        sets = {}
        for t, ms in kb.module_sets.items():
            binary = b.binaries_dir(bundle, t) / "nv-kernel.o"
            if not binary.exists():
                _compile(f'const char nv_kernel[] = "NVIDIA {t} {VERSION}";\n', binary, "-c")
            iface = b.interfaces_dir(bundle, k, t)
            _compile(f'const char iface[] = "{k} {t}";\n', iface / "nvidia.o", "-c")
            (iface / "module.lds").write_text(f"/* {k} */\n")
            (b.modules_dir(bundle, k, t) / "nvidia.ko").unlink()
            parts = b.ModuleParts("nvidia.o", _sha(iface / "nvidia.o"), (iface / "nvidia.o").stat().st_size,
                                  "nv-kernel.o", _sha(binary), binary.stat().st_size,
                                  "module.lds", _sha(iface / "module.lds"), ("-r",), "GNU ld (test) 2.40")
            mods = tuple(dataclasses.replace(m, parts=parts) if m.name == "nvidia.ko" else m for m in ms.modules)
            sets[t] = dataclasses.replace(ms, modules=mods)
        kernels[k] = dataclasses.replace(kb, module_sets=sets)
    (bundle / b.MANIFEST).write_text(dataclasses.replace(manifest, kernels=kernels).to_json())
    return bundle


def with_patch(bundle: Path) -> Path:
    """Give the split nvidia.ko of `bundle` (with_split_nvidia) an IBT kernel's patch, as `build` does where
    the kernel runs objtool over linked modules: a real patch (bundle.write_patch) from the binary object."""
    manifest = b.BundleManifest.load(bundle)
    kernels = {}
    for k, kb in manifest.kernels.items():
        sets = {}
        for t, ms in kb.module_sets.items():
            binary = b.binaries_dir(bundle, t) / "nv-kernel.o"
            patch = b.interfaces_dir(bundle, k, t) / "nvidia.patch"
            head = f"module of {k} {t}: ".encode()
            patch.write_bytes(b.write_patch([["lit", len(head)], ["copy", 0, binary.stat().st_size]], head))
            record = b.ModulePatch("nv-kernel.o", _sha(binary), binary.stat().st_size,
                                   patch.name, _sha(patch), patch.stat().st_size)
            mods = tuple(dataclasses.replace(m, patch=record) if m.parts else m for m in ms.modules)
            sets[t] = dataclasses.replace(ms, modules=mods)
        kernels[k] = dataclasses.replace(kb, module_sets=sets)
    (bundle / b.MANIFEST).write_text(dataclasses.replace(manifest, kernels=kernels).to_json())
    return bundle


def edit_module_sets(bundle: Path, kernel: str, **changes: b.ModuleSet | None) -> Path:
    """Replace (or, with None, drop) module sets of one kernel in the bundle's manifest."""
    manifest = b.BundleManifest.load(bundle)
    kb = manifest.kernels[kernel]
    sets = {t: ms for t, ms in {**kb.module_sets, **changes}.items() if ms is not None}
    kernels = {**manifest.kernels, kernel: dataclasses.replace(kb, module_sets=sets)}
    (bundle / b.MANIFEST).write_text(dataclasses.replace(manifest, kernels=kernels).to_json())
    return bundle


def with_os(bundle: Path, record: b.OSRecord | None) -> Path:
    """The bundle's kernels recorded as built for `record` (None: a bundle from before the record)."""
    manifest = b.BundleManifest.load(bundle)
    kernels = {k: dataclasses.replace(kb, os=record) for k, kb in manifest.kernels.items()}
    (bundle / b.MANIFEST).write_text(dataclasses.replace(manifest, kernels=kernels).to_json())
    return bundle
