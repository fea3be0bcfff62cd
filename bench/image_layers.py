"""Registry storage and kernel-upgrade pull bytes: our layered images vs one image per kernel (today's).

Real: `gl-nvidia release --profile debian` output, as a user gets it: Debian's driver 535.309.01 for the
profile's two real cloud kernels (the archive's current one and the ABI before it), images in the release's
OCI layout. For every ordered pair of kernels it prints the bytes a node holding the first image pulls
to run the second (blobs it lacks: layers and config), ours and monolithic. The Debian profile ships
only the proprietary modules (Debian's open source is 535.261.03, which the node would refuse beside
the 535.309.01 userspace), so its kernels have the same module types.

Synthetic scaling, N = 1, 5, 10 kernels in a real docker-registry: the real release bundle's first
kernel copied under other kernel names (not rebuilt; layer sizes depend only on the bytes). Every
other synthetic kernel also gets an open set, the real open 535.261.03 modules built for 6.1.0-47
relabelled as the driver's version (Debian has no matching open package; only the bytes matter
here), so upgrades between kernels with different module types are measured too.

Layered: our images (base | node runtime | userspace | ld.so.cache | firmware | NVIDIA's objects, one
layer per module type | modules per kernel). Monolithic, as today (issue 4): one image per (kernel,
driver) with, on the same shared base, one tarball per module type, each carrying the node runtime,
the whole userspace, ld.so.cache and firmware again plus that type's whole stripped .ko files.
Prints one JSON line last.
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

from tests.fixtures.registry import running_registry

from gl_nvidia import bundle as b
from gl_nvidia import oci
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.image import layers
from gl_nvidia.image.assemble import ImageOptions, build_images
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit
from gl_nvidia.node import layout as node_layout
from gl_nvidia.oci import Layout, Manifest
from gl_nvidia.registry.client import RegistryClient
from gl_nvidia.registry.transfer import copy_image
from gl_nvidia.release.conductor import release

COUNTS = (1, 5, 10)
OPTIONS = ImageOptions(os_id="debian", os_versions=("12",))
OPEN_KERNEL = "6.1.0-47-cloud-amd64"  # Debian's open 535.261.03 tree builds there (not for 6.1.0-56 and later)
SHARED = ("node-runtime", "userspace", "ld.so.cache", "firmware")


def layer_names(layout: Layout, image: Manifest) -> list[str]:
    config = json.loads(layout.read_blob(image.config.digest))
    return [h["created_by"].removeprefix("gl-nvidia image: ") for h in config["history"]]


def pull_bytes(have: Manifest, want: Manifest) -> int:
    """What a node holding `have` downloads to run `want`: the blobs it lacks."""
    held = {x.digest for x in have.blobs}
    return sum(x.size for x in want.blobs if x.digest not in held)


def synthesize(bundle: Path, open_bundle: Path, kernels: list[str]) -> dict[str, tuple[str, ...]]:
    """Give each kernel of `kernels` the proprietary set of the bundle's first kernel and every other one
    also OPEN_KERNEL's open set from `open_bundle`, relabelled as the driver's version: byte copies."""
    manifest = b.BundleManifest.load(bundle)
    prop = next(iter(manifest.kernels.values()))
    opn = dataclasses.replace(b.BundleManifest.load(open_bundle).kernels[OPEN_KERNEL].module_sets["open"],
                              source_version=manifest.driver_version)
    shutil.copytree(b.binaries_dir(open_bundle, "open"), b.binaries_dir(bundle, "open"), dirs_exist_ok=True)
    out, types = {}, {}
    for i, k in enumerate(kernels):
        sets = {"proprietary": (bundle, prop.kernel, prop.module_sets["proprietary"])}
        if i % 2:
            sets["open"] = (open_bundle, OPEN_KERNEL, opn)
        for t, (src, src_kernel, _ms) in sets.items():
            for d in (b.modules_dir, b.interfaces_dir):
                if d(src, src_kernel, t).is_dir() and not d(bundle, k, t).exists():
                    shutil.copytree(d(src, src_kernel, t), d(bundle, k, t))
        out[k] = dataclasses.replace(prop, kernel=k, module_sets={t: ms for t, (_s, _k, ms) in sets.items()})
        types[k] = tuple(t for t in b.MODULE_TYPES if t in sets)
    (bundle / b.MANIFEST).write_text(dataclasses.replace(manifest, kernels=out).to_json())
    return types


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


def monolithic(layout: Layout, out: Layout, image: Manifest, bundle: Path, kernel: str, tags: list[str]) -> Manifest:
    """Today's image of one kernel: the shared base, then one tarball per module type, each holding the
    node runtime, userspace, ld.so.cache and firmware again plus that type's whole .ko files."""
    config = json.loads(layout.read_blob(image.config.digest))
    names = layer_names(layout, image)
    base = image.layers[0]
    payload = _entries(layout, [blob for name, blob in zip(names, image.layers, strict=True) if name in SHARED])
    tarballs = []
    for t in b.MODULE_TYPES:
        kos = b.modules_dir(bundle, kernel, t)
        if not kos.is_dir():
            continue
        mods = [layers.Entry(node_layout.modules_dir(kernel, t) / ko.name, source=ko) for ko in sorted(kos.iterdir())]
        tarballs.append(layers.write_layer(out, payload + mods))
    out.import_blob(layout.blob_path(base.digest), base)
    config["rootfs"]["diff_ids"] = [config["rootfs"]["diff_ids"][0], *(x.diff_id for x in tarballs)]
    config.pop("history", None)
    cfg = out.write_blob(oci.canonical_json(config), oci.CONFIG)
    m = Manifest.build(cfg, [base, *(x.descriptor for x in tarballs)], {})
    out.add_image(m, tags)
    return m


def stored(layout: Layout, images: list[Manifest], tmp: Path, name: str) -> dict[str, int]:
    """Blob bytes in a real docker-registry after pushing the first N images, for each N."""
    result: dict[str, int] = {}
    for n in COUNTS:
        with running_registry(tmp / f"reg-{name}-{n}") as reg, RegistryClient(reg.host) as client:
            for i, m in enumerate(images[:n]):
                copy_image(m, lambda blob, _s: layout.blob_path(blob.digest), client, "driver", [f"k{i}"])
            result[f"stored_bytes_{n}"] = reg.blob_bytes()
    return result


def real_release(tmp: Path) -> tuple[dict[str, object], Path]:
    """`release --profile debian` as a user runs it, then every kernel-to-kernel upgrade, ours and today's."""
    result = release("debian", tmp / "release")
    assert result.ok, [u.status for u in result.units]
    lay = Layout.open(result.layout)
    ours = {u.unit.kernel: lay.manifest(u.digest or "") for u in result.units}
    bundle = next(iter(result.layout.parent.glob("bundles/*")))
    mono = Layout.create(tmp / "release-mono")
    theirs = {k: monolithic(lay, mono, m, bundle, k, [k]) for k, m in ours.items()}
    pairs = [(a, c) for a in ours for c in ours if a != c]
    pulls = {f"{a} -> {c}": pull_bytes(ours[a], ours[c]) for a, c in pairs}
    mono_pulls = {f"{a} -> {c}": pull_bytes(theirs[a], theirs[c]) for a, c in pairs}
    return {
        "kernels": {u.unit.kernel: ",".join(u.unit.module_types) for u in result.units},
        "left_out": sorted({f"{t}: {r}" for u in result.units for t, r in u.left_out}),
        "per_kernel_layer_bytes": {k: m.layers[-1].size for k, m in ours.items()},
        "upgrade_pull_bytes": pulls,
        "monolithic_upgrade_pull_bytes": mono_pulls,
        "upgrade_ratio": round(min(mono_pulls.values()) / max(pulls.values()), 1),
        "upgrade_pulls_only_the_kernel_layer": all(
            pull_bytes(ours[a], ours[c]) == ours[c].layers[-1].size + ours[c].config.size for a, c in pairs),
    }, bundle


def main() -> None:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-image-") as tmp_s:
        tmp = Path(tmp_s)
        real, release_bundle = real_release(tmp)
        driver = b.BundleManifest.load(release_bundle).driver_version
        open_bundle = tmp / "open" / f"{driver}-amd64"
        unit = BuildUnit(kernel=OPEN_KERNEL, driver_version=driver, driver_branch=driver.split(".")[0],
                         arch="amd64", flavour="cloud", os_id="debian", os_versions=("12",))
        res = build_unit(unit, open_bundle, source=DebianSource(), env=AptEnv(), module_types=("open",))
        assert res.ok, res.outcomes
        bundle = tmp / "synthetic"
        shutil.copytree(release_bundle, bundle, symlinks=True)
        kernels = [f"6.1.0-{100 + i}-cloud-amd64" for i in range(max(COUNTS))]
        types = synthesize(bundle, open_bundle, kernels)
        t1 = time.monotonic()
        built = build_images(bundle, kernels, tmp / "layered", options=OPTIONS)
        build_s = time.monotonic() - t1
        lay = Layout.open(tmp / "layered")
        ours = [lay.manifest(x.digest) for x in built]
        mono = Layout.create(tmp / "mono")
        theirs = [monolithic(lay, mono, m, bundle, k, [f"k{i}"]) for i, (m, k) in enumerate(zip(ours, kernels, strict=True))]
        ours_stored, theirs_stored = stored(lay, ours, tmp, "layered"), stored(mono, theirs, tmp, "mono")
        # Upgrades between synthetic kernels, by the module types on each side.
        by_kind: dict[str, list[tuple[int, int]]] = {}
        for i, j in ((i, j) for i in range(len(kernels)) for j in range(len(kernels)) if i != j):
            kind = f"{'+'.join(types[kernels[i]])} -> {'+'.join(types[kernels[j]])}"
            by_kind.setdefault(kind, []).append((pull_bytes(ours[i], ours[j]), pull_bytes(theirs[i], theirs[j])))
        layer_sizes = {x.name: x.size for x in built[1].layers if x.name != "base"}
    row = {
        "bench": "image_layers",
        "driver": driver,
        "real_release": real,
        "synthetic_kernels": f"{len(kernels)}: the release's proprietary modules under other kernel names, every "
                             "other one also with the real open 535.261.03 modules relabelled (bytes only)",
        "layer_bytes": {k.split(" ")[0] if k.startswith("modules") else k: v for k, v in layer_sizes.items()},
        "base_bytes": built[0].layers[0].size,
        "monolithic_module_type_tarball_bytes": [x.size for x in theirs[1].layers[1:]],
        "layered_build_s_10_kernels": round(build_s, 1),
        **{f"layered_{k}": v for k, v in ours_stored.items()},
        **{f"monolithic_{k}": v for k, v in theirs_stored.items()},
        **{f"storage_ratio_{n}": round(theirs_stored[f"stored_bytes_{n}"] / ours_stored[f"stored_bytes_{n}"], 2)
           for n in COUNTS},
        "synthetic_upgrade_pull_bytes": {kind: {"layered_max": max(o for o, _ in v), "monolithic_min": min(m for _, m in v)}
                                         for kind, v in sorted(by_kind.items())},
        "total_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
