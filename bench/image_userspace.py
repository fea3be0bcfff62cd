"""The shared userspace layer and the first pull of one image, with the whole driver userspace (compute,
utility, video, graphics, ngx) against the userspace before it (libcuda, NVML, PTX JIT, nvidia-smi, ...).

Real: Debian's driver 535.309.01, proprietary modules for Debian's 6.1.0-56-cloud-amd64 (tests/fixtures/
bundle.py's unit), built by the build stage (modules from the build cache) and imaged by the image stage.
Per layer: compressed bytes (what a node pulls) and uncompressed bytes (what it unpacks). Run it from a
checkout of the commit to measure (PYTHONPATH=<checkout>/src for an older one). Prints one JSON line last.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.bundle import DEBIAN_UNIT

from gl_nvidia.image.assemble import ImageOptions, build_image
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit
from gl_nvidia.oci import Layout


def uncompressed(layout: Layout, digest: str) -> int:
    size = 0
    with gzip.open(layout.blob_path(digest), "rb") as fh:
        while chunk := fh.read(1 << 20):
            size += len(chunk)
    return size


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-bench-") as tmp:
        bundle = Path(tmp) / "bundle"
        result = build_unit(DEBIAN_UNIT, bundle, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
        assert result.ok, result.outcomes
        built = build_image(bundle, DEBIAN_UNIT.kernel, Path(tmp) / "layout",
                            options=ImageOptions(os_id="debian", os_versions=("12",)))
        layout = Layout.open(built.layout)
        layers = {x.name: {"compressed": x.size, "uncompressed": uncompressed(layout, x.digest)} for x in built.layers}
    for name, s in layers.items():
        print(f"  {name:<40} {s['compressed'] / 1e6:8.1f} MB  ({s['uncompressed'] / 1e6:8.1f} MB unpacked)")
    print(f"  {'first pull (all layers and config)':<40} {built.size / 1e6:8.1f} MB")
    print(json.dumps({"bench": "image_userspace", "tag": built.tags[0], "layers": layers, "first_pull": built.size}))


if __name__ == "__main__":
    main()
