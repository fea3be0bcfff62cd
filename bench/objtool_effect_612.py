"""What the kernel's objtool changes in nvidia.ko on Debian's real 6.12 (IBT) kernels, and what the patch
the node applies instead costs (issue 9's evidence for bundle.ModulePatch).

For the archive's two newest 6.12 cloud ABIs (tests/fixtures/ibt.py; modules from the build cache) it
links `<module>.o` from the interface and NVIDIA's binary object as kbuild does (X), runs the kernel's
objtool over a copy twice (Y; deterministic?), and reports the sections objtool added or changed, the
symbols it added, its time and memory, the patch from the binary object to the gated module (bytes, time to
apply, to hash), and how many bytes of the gated module are the same in both kernels' modules (section by
section). Prints one JSON line last.

    .venv/bin/python bench/objtool_effect_612.py
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from elftools.elf.elffile import ELFFile
from tests.fixtures.ibt import ibt_kernels, ibt_unit

from gl_nvidia import bundle as b
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit


def sections(data: bytes) -> dict[str, bytes]:
    elf = ELFFile(io.BytesIO(data))
    return {s.name: data[s["sh_offset"]:s["sh_offset"] + s["sh_size"]] for s in elf.iter_sections()
            if s["sh_type"] != "SHT_NOBITS"}


def symbols(data: bytes) -> int:
    symtab = ELFFile(io.BytesIO(data)).get_section_by_name(".symtab")
    return int(symtab.num_symbols()) if symtab is not None else 0  # type: ignore[attr-defined]


def main() -> None:
    pair = ibt_kernels()
    row: dict[str, object] = {"bench": "objtool_effect_612", "kernels": [pair.built, pair.next]}
    with tempfile.TemporaryDirectory(prefix="bench-objtool-") as tmp_s:
        tmp = Path(tmp_s)
        bundle = tmp / "bundle"
        for k in (pair.built, pair.next):
            assert build_unit(ibt_unit(k), bundle, source=DebianSource(), env=AptEnv(), module_types=("proprietary",)).ok
        manifest = b.BundleManifest.load(bundle)
        modules: dict[str, bytes] = {}
        for k in (pair.built, pair.next):
            nvidia = next(m for m in manifest.kernels[k].module_sets["proprietary"].modules if m.name == "nvidia.ko")
            assert nvidia.parts is not None and nvidia.parts.objtool is not None and nvidia.patch is not None
            parts, step = nvidia.parts, nvidia.parts.objtool
            iface, bins = b.interfaces_dir(bundle, k, "proprietary"), b.binaries_dir(bundle, "proprietary")
            x = tmp / f"{k}.X.o"
            subprocess.run(["ld", *step.ld_flags, "-o", x, iface / parts.interface, bins / parts.binary], check=True)
            runs = []
            for i in range(2):
                y = tmp / f"{k}.Y{i}.o"
                y.write_bytes(x.read_bytes())
                t = time.monotonic()
                proc = subprocess.run(["/usr/bin/time", "-f", "%M", iface / step.tool, *step.args, y],
                                      capture_output=True, text=True, check=True)
                runs.append((time.monotonic() - t, int(proc.stderr.strip().splitlines()[-1]) // 1024,
                             hashlib.sha256(y.read_bytes()).hexdigest()))
            xs, ys = sections(x.read_bytes()), sections((tmp / f"{k}.Y0.o").read_bytes())
            patch = (iface / nvidia.patch.patch).read_bytes()
            binary = (bins / nvidia.patch.binary).read_bytes()
            t0 = time.monotonic()
            module = b.apply_patch(patch, binary)
            t1 = time.monotonic()
            assert hashlib.sha256(module).hexdigest() == nvidia.sha256
            t2 = time.monotonic()
            modules[k] = bytes(module)
            row[k] = {
                "objtool_s": round(min(r[0] for r in runs), 2),
                "objtool_max_rss_mb": runs[0][1],
                "objtool_deterministic": runs[0][2] == runs[1][2],
                "x_bytes": x.stat().st_size,
                "y_bytes": (tmp / f"{k}.Y0.o").stat().st_size,
                "sections_added": {n: len(v) for n, v in ys.items() if n not in xs},
                "sections_changed": {n: len(v) for n, v in ys.items() if n in xs and xs[n] != v and v},
                "symbols_added": symbols((tmp / f"{k}.Y0.o").read_bytes()) - symbols(x.read_bytes()),
                "module_bytes": len(module),
                "patch_bytes": len(patch),
                "apply_patch_s": round(t1 - t0, 2),
                "sha256_s": round(t2 - t1, 2),
            }
        a, c = sections(modules[pair.built]), sections(modules[pair.next])
        row["next_kernel_module_section_bytes_same"] = sum(len(v) for n, v in c.items() if a.get(n) == v)
        row["next_kernel_module_section_bytes_differ"] = {n: len(v) for n, v in c.items() if a.get(n) != v}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
