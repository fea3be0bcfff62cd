"""Registry storage and kernel-upgrade pull bytes: layered images (ours) vs monolithic, for N = 1, 5, 10 kernels.

Input: the build stage's real Debian bundle (535.309.01 proprietary modules for 6.1.0-56-cloud-amd64,
Debian's userspace and GSP firmware; compiled once, then cached). The extra kernels are synthesized:
the real modules copied under other kernel names (not rebuilt), which is all layer sizes depend on.

Layered: our images (base | node runtime | userspace | ld.so.cache | firmware | modules per kernel).
Monolithic: one image per kernel whose single layer above the same shared base holds everything else
(node runtime, userspace, firmware, the kernel's module sets) tarred together, as today's images do.
Stored bytes: blob data in a real docker-registry after pushing the N images. Upgrade bytes: the blobs
of kernel 2's image that a node holding kernel 1's image lacks. Prints one JSON line last.
"""

from __future__ import annotations

import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.bundle import DEBIAN_DRIVER, DEBIAN_UNIT
from tests.fixtures.registry import running_registry
from tests.test_image_support import with_extra_kernels

from gl_nvidia.build import AptEnv, DebianSource, build_unit
from gl_nvidia.image import layers, oci
from gl_nvidia.image.build import ImageOptions, build_images
from gl_nvidia.image.oci import Layout, Manifest
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.transfer import copy_image

COUNTS = (1, 5, 10)
OPTIONS = ImageOptions(os_id="debian", os_versions=("12",))


def monolithic(layout: Layout, out: Layout, image: Manifest, tags: list[str]) -> Manifest:
    """The same image with every layer above the base merged into one (later layers win, as unpacked)."""
    config = json.loads(layout.read_blob(image.config.digest))
    base, rest = image.layers[0], image.layers[1:]
    entries: dict[PurePosixPath, layers.Entry] = {}
    for blob in rest:
        with tarfile.open(layout.blob_path(blob.digest), "r:gz") as tar:
            for member in tar.getmembers():
                path = PurePosixPath("/" + member.name.strip("/"))
                f = tar.extractfile(member) if member.isreg() else None
                entries[path] = layers.Entry(path, mode=member.mode, data=f.read() if f else None,
                                             link=member.linkname if member.issym() else None, is_dir=member.isdir())
    merged = layers.write_layer(out, entries.values())
    out.import_blob(layout.blob_path(base.digest), base)
    config["rootfs"]["diff_ids"] = [config["rootfs"]["diff_ids"][0], merged.diff_id]
    config.pop("history", None)
    cfg = out.write_blob(oci.canonical_json(config), oci.CONFIG)
    m = Manifest.build(cfg, [base, merged.descriptor], {})
    out.add_image(m, tags)
    return m


def measure(layout: Layout, images: list[Manifest], tmp: Path, name: str) -> dict[str, int]:
    result: dict[str, int] = {}
    for n in COUNTS:
        with running_registry(tmp / f"reg-{name}-{n}") as reg, RegistryClient(reg.host) as client:
            for i, m in enumerate(images[:n]):
                copy_image(m, lambda b, _s: layout.blob_path(b.digest), client, "driver", [f"k{i}"])
            result[f"stored_bytes_{n}"] = reg.blob_bytes()
    have = {b.digest for b in images[0].blobs}
    result["upgrade_pull_bytes"] = sum(b.size for b in images[1].blobs if b.digest not in have)
    return result


def main() -> None:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp_s:
        tmp = Path(tmp_s)
        real = tmp / f"{DEBIAN_DRIVER}-amd64"
        res = build_unit(DEBIAN_UNIT, real, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
        assert res.ok, res.outcomes
        extra = tuple(f"6.1.0-{100 + i}-cloud-amd64" for i in range(max(COUNTS) - 1))
        bundle = with_extra_kernels(real, tmp / "bundle", extra)
        kernels = [DEBIAN_UNIT.kernel, *extra]
        t1 = time.monotonic()
        built = build_images(bundle, kernels, tmp / "layered", options=OPTIONS)
        build_s = time.monotonic() - t1
        lay = Layout.open(tmp / "layered")
        layered_images = [lay.manifest(b.digest) for b in built]
        mono = Layout.create(tmp / "mono")
        mono_images = [monolithic(lay, mono, m, [f"k{i}"]) for i, m in enumerate(layered_images)]
        ours = measure(lay, layered_images, tmp, "layered")
        theirs = measure(mono, mono_images, tmp, "mono")
        layer_sizes = {x.name.split(" ")[0]: x.size for x in built[0].layers}
    row = {
        "bench": "image_layers",
        "driver": DEBIAN_DRIVER,
        "module_types": "proprietary (the Debian bundle has no open set)",
        "synthesized_kernels": "real modules copied under other kernel names, not rebuilt",
        "layer_bytes": layer_sizes,
        "layered_build_s_10_kernels": round(build_s, 1),
        **{f"layered_{k}": v for k, v in ours.items()},
        **{f"monolithic_{k}": v for k, v in theirs.items()},
        **{f"storage_ratio_{n}": round(theirs[f"stored_bytes_{n}"] / ours[f"stored_bytes_{n}"], 2) for n in COUNTS},
        "upgrade_ratio": round(theirs["upgrade_pull_bytes"] / ours["upgrade_pull_bytes"], 2),
        "upgrade_pulls_only_modules_layer": ours["upgrade_pull_bytes"]
        == built[1].layers[-1].size + layered_images[1].config.size,
        "total_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
