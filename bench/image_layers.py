"""Registry storage and kernel-upgrade pull bytes: layered images (ours) vs monolithic, for N = 1, 5, 10 kernels.

Input: the build stage's real Debian bundle (driver 535.309.01; compiled once, then cached): proprietary
modules for 6.1.0-56-cloud-amd64 and open modules (535.261.03, Debian's open package) for
6.1.0-47-cloud-amd64, Debian's userspace and GSP firmware. Each of the N kernels holds both module sets:
the first is a real unit (proprietary of 6.1.0-56 + open of 6.1.0-47); the others are synthesized, the
same real module files copied under other kernel names (not rebuilt), which is all layer sizes depend
on. Per-kernel files (the interface objects of split modules, whole small modules) therefore compress
the same for every synthesized kernel as for the real one.

Layered: our images (base | node runtime | userspace | ld.so.cache | firmware | binaries | modules per
kernel); nvidia.ko and nvidia-modeset.ko ship split (per-kernel interface + NVIDIA's kernel-independent
object once in the binaries layer).
Monolithic, as today (issue 4): one image per (kernel, driver) with, on the same shared base, one
tarball per module type, each carrying the node runtime, the whole userspace, ld.so.cache and firmware
again plus that type's whole stripped .ko files.
Stored bytes: blob data in a real docker-registry after pushing the N images. Upgrade bytes: the blobs
of kernel 2's image that a node holding kernel 1's image lacks. Prints one JSON line last.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.bundle import DEBIAN_DRIVER, DEBIAN_UNIT
from tests.fixtures.registry import running_registry

from gl_nvidia import bundle as b
from gl_nvidia.build import AptEnv, DebianSource, build_unit
from gl_nvidia.image import layers, oci
from gl_nvidia.image.build import ImageOptions, build_images
from gl_nvidia.image.oci import Layout, Manifest
from gl_nvidia.node import layout as node_layout
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.transfer import copy_image

COUNTS = (1, 5, 10)
OPTIONS = ImageOptions(os_id="debian", os_versions=("12",))
OPEN_KERNEL = "6.1.0-47-cloud-amd64"  # Debian's open 535.261.03 tree builds there, not for 6.1.0-56
SHARED = ("node-runtime", "userspace", "ld.so.cache", "firmware")


def both_types(bundle: Path, kernels: list[str]) -> None:
    """Give every kernel in `kernels` the proprietary set of DEBIAN_UNIT's kernel and the open set of
    OPEN_KERNEL: byte copies (bundle files and manifest records), not rebuilt."""
    manifest = b.BundleManifest.load(bundle)
    prop, opn = manifest.kernels[DEBIAN_UNIT.kernel], manifest.kernels[OPEN_KERNEL]
    sources = {"proprietary": prop, "open": opn}
    out = {}
    for k in kernels:
        for t, src in sources.items():
            for d in (b.modules_dir, b.interfaces_dir):
                if d(bundle, src.kernel, t).is_dir() and not d(bundle, k, t).exists():
                    shutil.copytree(d(bundle, src.kernel, t), d(bundle, k, t))
        out[k] = dataclasses.replace(prop, kernel=k, module_sets={t: src.module_sets[t] for t, src in sources.items()})
    (bundle / b.MANIFEST).write_text(dataclasses.replace(manifest, kernels=out).to_json())


def _entries(layout: Layout, blobs: list[oci.Descriptor]) -> list[layers.Entry]:
    """The members of some layers, merged as a runtime unpacks them (later layers win)."""
    entries: dict[PurePosixPath, layers.Entry] = {}
    for blob in blobs:
        with tarfile.open(layout.blob_path(blob.digest), "r:gz") as tar:
            for member in tar.getmembers():
                path = PurePosixPath("/" + member.name.strip("/"))
                f = tar.extractfile(member) if member.isreg() else None
                entries[path] = layers.Entry(path, mode=member.mode, data=f.read() if f else None,
                                             link=member.linkname if member.issym() else None, is_dir=member.isdir())
    return list(entries.values())


def monolithic(layout: Layout, out: Layout, image: Manifest, names: list[str], bundle: Path, kernel: str,
               tags: list[str]) -> Manifest:
    """Today's image of one kernel: the shared base, then one tarball per module type, each holding the
    node runtime, userspace, ld.so.cache and firmware again plus that type's whole .ko files."""
    config = json.loads(layout.read_blob(image.config.digest))
    base = image.layers[0]
    payload = _entries(layout, [blob for name, blob in zip(names, image.layers, strict=True) if name in SHARED])
    tarballs = []
    for t in b.MODULE_TYPES:
        kos = b.modules_dir(bundle, kernel, t)
        mods = [layers.Entry(node_layout.modules_dir(kernel, t) / ko.name, source=ko) for ko in sorted(kos.iterdir())]
        tarballs.append(layers.write_layer(out, payload + mods))
    out.import_blob(layout.blob_path(base.digest), base)
    config["rootfs"]["diff_ids"] = [config["rootfs"]["diff_ids"][0], *(x.diff_id for x in tarballs)]
    config.pop("history", None)
    cfg = out.write_blob(oci.canonical_json(config), oci.CONFIG)
    m = Manifest.build(cfg, [base, *(x.descriptor for x in tarballs)], {})
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
        bundle = tmp / f"{DEBIAN_DRIVER}-amd64"
        for unit, mtype in ((DEBIAN_UNIT, "proprietary"), (dataclasses.replace(DEBIAN_UNIT, kernel=OPEN_KERNEL), "open")):
            res = build_unit(unit, bundle, source=DebianSource(), env=AptEnv(), module_types=(mtype,))
            assert res.ok, res.outcomes
        kernels = [DEBIAN_UNIT.kernel, *(f"6.1.0-{100 + i}-cloud-amd64" for i in range(max(COUNTS) - 1))]
        both_types(bundle, kernels)
        t1 = time.monotonic()
        built = build_images(bundle, kernels, tmp / "layered", options=OPTIONS)
        build_s = time.monotonic() - t1
        lay = Layout.open(tmp / "layered")
        layered_images = [lay.manifest(x.digest) for x in built]
        names = [x.name for x in built[0].layers]
        mono = Layout.create(tmp / "mono")
        mono_images = [monolithic(lay, mono, m, names, bundle, k, [f"k{i}"])
                       for i, (m, k) in enumerate(zip(layered_images, kernels, strict=True))]
        ours = measure(lay, layered_images, tmp, "layered")
        theirs = measure(mono, mono_images, tmp, "mono")
        layer_sizes = {x.name.split(" ")[0]: x.size for x in built[0].layers if x.name != "base"}
        mono_sizes = [x.size for x in mono_images[0].layers[1:]]
        manifest = b.BundleManifest.load(bundle)
        split = sorted({f"{t}/{m.name}" for kb in manifest.kernels.values() for t, ms in kb.module_sets.items()
                        for m in ms.modules if m.parts})
    row = {
        "bench": "image_layers",
        "driver": DEBIAN_DRIVER,
        "module_types": f"both: proprietary {DEBIAN_DRIVER} built for {DEBIAN_UNIT.kernel} and open 535.261.03 "
                        f"built for {OPEN_KERNEL} (Debian's packages), in every image",
        "synthesized_kernels": f"{len(kernels) - 1}: the real module files copied under other kernel names, not rebuilt",
        "split_modules": split,
        "layer_bytes": layer_sizes,
        "base_bytes": built[0].layers[0].size,
        "monolithic_module_type_tarball_bytes": mono_sizes,
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
