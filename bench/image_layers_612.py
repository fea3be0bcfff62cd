"""Per-kernel layer size and kernel-upgrade pull on real IBT kernels (Debian 12's 6.12 cloud kernels).

Real: Debian's proprietary 535.309.01 modules built for the archive's two newest 6.12 cloud ABIs
(tests/fixtures/ibt.py picks them), through the build stage (cached), where kbuild runs objtool over each
linked module. Our images carry per kernel the build's patches for nvidia.ko and nvidia-modeset.ko (what
the link and objtool add to NVIDIA's objects) and the small whole modules; NVIDIA's objects are one shared
layer. Today's layout (issue 4),
as in bench/image_layers.py: one image per kernel with, on the same base, a tarball carrying the node
runtime, userspace, ld.so.cache, firmware and the whole .ko files again.

Storage at N = 1, 5, 10 kernels in a real docker-registry: the first real kernel's per-kernel parts copied
under other kernel names (not rebuilt; layer sizes depend only on the bytes), both layouts.
Prints one JSON line last.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.image_layers import COUNTS, OPTIONS, monolithic, pull_bytes, stored
from tests.fixtures.ibt import ibt_kernels, ibt_unit

from gl_nvidia import bundle as b
from gl_nvidia.image.assemble import build_images
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit
from gl_nvidia.oci import Layout


def synthesize(bundle: Path, kernels: list[str]) -> None:
    """Give each of `kernels` the bundle's first kernel's proprietary set: byte copies."""
    manifest = b.BundleManifest.load(bundle)
    src = next(iter(manifest.kernels.values()))
    out = {}
    for k in kernels:
        for d in (b.modules_dir, b.interfaces_dir):
            shutil.copytree(d(bundle, src.kernel, "proprietary"), d(bundle, k, "proprietary"))
        out[k] = dataclasses.replace(src, kernel=k)
    (bundle / b.MANIFEST).write_text(dataclasses.replace(manifest, kernels=out).to_json())


def main() -> None:
    t0 = time.monotonic()
    pair = ibt_kernels()
    with tempfile.TemporaryDirectory(prefix="bench-image-612-") as tmp_s:
        tmp = Path(tmp_s)
        bundle = tmp / "bundle"
        for k in (pair.built, pair.next):
            res = build_unit(ibt_unit(k), bundle, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
            assert res.ok, res.outcomes
        manifest = b.BundleManifest.load(bundle)
        patched = {k: sorted(m.name for m in kb.module_sets["proprietary"].modules if m.patch)
                   for k, kb in manifest.kernels.items()}
        kernels = [pair.built, pair.next]
        built = build_images(bundle, kernels, tmp / "layered", options=OPTIONS)
        lay = Layout.open(tmp / "layered")
        ours = {x.kernel: lay.manifest(x.digest) for x in built}
        mono = Layout.create(tmp / "mono")
        theirs = {k: monolithic(lay, mono, m, bundle, k, [k.replace("+", "_")]) for k, m in ours.items()}
        upgrade = pull_bytes(ours[pair.built], ours[pair.next])
        mono_upgrade = pull_bytes(theirs[pair.built], theirs[pair.next])
        per_kernel = {k: m.layers[-1].size for k, m in ours.items()}
        layer_sizes = {x.name: x.size for x in built[0].layers if x.name != "base"}
        # Scaling: the first kernel's parts under other names.
        scaled = tmp / "scaled"
        shutil.copytree(bundle, scaled, symlinks=True)
        names = [f"6.12.{200 + i}+deb12-cloud-amd64" for i in range(max(COUNTS))]
        synthesize(scaled, names)
        sbuilt = build_images(scaled, names, tmp / "scaled-layered", options=OPTIONS)
        slay = Layout.open(tmp / "scaled-layered")
        sours = [slay.manifest(x.digest) for x in sbuilt]
        smono = Layout.create(tmp / "scaled-mono")
        stheirs = [monolithic(slay, smono, m, scaled, k, [f"k{i}"]) for i, (m, k) in enumerate(zip(sours, names, strict=True))]
        ours_stored, theirs_stored = stored(slay, sours, tmp, "layered"), stored(smono, stheirs, tmp, "mono")
    row = {
        "bench": "image_layers_612",
        "kernels": kernels,
        "rebuilt_from_patch": patched,
        "per_kernel_layer_bytes": per_kernel,
        "per_kernel_layer_target_bytes": 5_000_000,
        "layer_bytes": {k.split(" ")[0] if k.startswith("modules") else k: v for k, v in layer_sizes.items()},
        "upgrade_pull_bytes": upgrade,
        "monolithic_upgrade_pull_bytes": mono_upgrade,
        "upgrade_ratio": round(mono_upgrade / upgrade, 1),
        "upgrade_pulls_only_the_kernel_layer": upgrade == ours[pair.next].layers[-1].size + ours[pair.next].config.size,
        **{f"layered_{k}": v for k, v in ours_stored.items()},
        **{f"monolithic_{k}": v for k, v in theirs_stored.items()},
        **{f"storage_ratio_{n}": round(theirs_stored[f"stored_bytes_{n}"] / ours_stored[f"stored_bytes_{n}"], 2)
           for n in COUNTS},
        # what no per-kernel layer can beat: today's bytes at 10 kernels over ours with a per-kernel layer of 0
        "storage_ratio_10_bound": round(theirs_stored["stored_bytes_10"] / (
            ours_stored["stored_bytes_1"] - per_kernel[pair.built]), 2),
        "total_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
