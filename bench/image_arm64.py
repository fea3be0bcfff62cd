"""arm64 driver image sizes, per layer and in all, beside the amd64 image of the same driver and kernel ABI.

Real: Debian's driver 535.309.01, proprietary modules cross-compiled for Debian's 6.1.0-56-cloud-arm64
(tests/fixtures/arm64.py's unit) and compiled for 6.1.0-56-cloud-amd64 (tests/fixtures/bundle.py's unit),
both through the build stage (cached after the first run), each imaged by the image stage on this amd64
machine: the arm64 one on its extract base (no binfmt/qemu-user), the amd64 one on its essential base.
Per layer: compressed bytes (what a node pulls) and uncompressed bytes (what it unpacks); the image
build's wall time with the base already cached. Prints one JSON line last.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.arm64 import ARM64_UNIT
from tests.fixtures.bundle import DEBIAN_UNIT

from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.image.assemble import BuiltImage, ImageOptions, build_image
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit
from gl_nvidia.oci import Layout

OPTIONS = ImageOptions(os_id="debian", os_versions=("12",))


def uncompressed(layout: Layout, digest: str) -> int:
    size = 0
    with gzip.open(layout.blob_path(digest), "rb") as fh:
        while chunk := fh.read(1 << 20):
            size += len(chunk)
    return size


def image_of(unit: BuildUnit, tmp: Path) -> tuple[BuiltImage, float]:
    bundle = tmp / f"bundle-{unit.arch}"
    result = build_unit(unit, bundle, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
    assert result.ok, result.outcomes
    build_image(bundle, unit.kernel, tmp / f"warm-{unit.arch}", options=OPTIONS)  # the base into the cache
    t0 = time.monotonic()
    built = build_image(bundle, unit.kernel, tmp / f"layout-{unit.arch}", options=OPTIONS)
    return built, time.monotonic() - t0


def main() -> None:
    row: dict[str, object] = {"bench": "image_arm64", "driver": ARM64_UNIT.driver_version}
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-bench-") as tmp:
        for unit in (ARM64_UNIT, DEBIAN_UNIT):
            built, seconds = image_of(unit, Path(tmp))
            layout = Layout.open(built.layout)
            per_layer = {x.name: {"compressed": x.size, "uncompressed": uncompressed(layout, x.digest)}
                         for x in built.layers}
            print(f"{unit.arch} {unit.kernel} ({built.tags[0]}), image built in {seconds:.1f} s:")
            for name, s in per_layer.items():
                print(f"  {name:<40} {s['compressed'] / 1e6:8.1f} MB  ({s['uncompressed'] / 1e6:8.1f} MB unpacked)")
            total = sum(s["compressed"] for s in per_layer.values())
            unpacked = sum(s["uncompressed"] for s in per_layer.values())
            print(f"  {'total (with config)':<40} {built.size / 1e6:8.1f} MB  ({unpacked / 1e6:8.1f} MB unpacked)")
            row[unit.arch] = {"kernel": unit.kernel, "tag": built.tags[0], "layers": per_layer,
                              "total_compressed": built.size, "layers_compressed": total,
                              "total_uncompressed": unpacked, "image_build_s": round(seconds, 1)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
