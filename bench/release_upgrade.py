"""Kernel-only and OS upgrades as a node sees them, read from the OCI layout the main job wrote.

`scripts/release-debian` leaves its images in `out/oci`. For every two images of one OS version, arch,
driver and kernel flavour and series (the profile's upgrade pair: the archive's newest cloud ABI and the
one before it), this prints what a node holding the older image pulls to run the newer one: the blobs it
lacks (layers and config), per driver and module type, against the newer image's whole size (what one
image per kernel would pull). And for an OS upgrade (Debian 12 -> 13: a new userland, a new kernel series and
other driver branches), what a node on the older OS version's newest image pulls for the newer one's newest
image of the same arch and flavour, per driver of the newer one. Nothing is built or pulled: the layout is
read as the release wrote it.
Usage: bench/release_upgrade.py [OUT] (default: out). Prints one JSON line last.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

from debian.debian_support import Version

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gl_nvidia.catalog.kernels import kernel_sort_key, series
from gl_nvidia.image.assemble import LABEL_PREFIX
from gl_nvidia.oci import Layout, Manifest
from gl_nvidia.osprofile import os_profile


def images(layout: Layout) -> list[tuple[dict[str, str], str, Manifest]]:
    """Every driver image in the layout once (an image has several tags; the base is no driver image)."""
    out = {}
    for digest in set(layout.tags().values()):
        manifest = layout.manifest(digest)
        config = json.loads(layout.read_blob(manifest.config.digest))
        labels = config.get("config", {}).get("Labels") or {}
        if f"{LABEL_PREFIX}.kernel" in labels:
            out[digest] = (labels, config["architecture"], manifest)
    return list(out.values())


@dataclass(frozen=True)
class Upgrade:
    os: str  # "debian 12"
    arch: str
    flavour: str
    driver: str
    module_type: str
    old: str  # the kernel the node runs
    new: str  # the kernel it moves to
    pull_bytes: int  # the blobs of the new image the node lacks
    blobs: int
    image_bytes: int  # the new image whole: what one image per kernel would pull


def upgrades(layout: Layout) -> list[Upgrade]:
    groups: dict[tuple[str, ...], list[tuple[str, Manifest, str]]] = {}
    for labels, arch, manifest in images(layout):
        os_id, kernel = labels[f"{LABEL_PREFIX}.os"], labels[f"{LABEL_PREFIX}.kernel"]
        distro = os_profile(os_id)
        key = (os_id, labels.get(f"{LABEL_PREFIX}.{distro.versions_label}", ""), arch,
               labels[f"{LABEL_PREFIX}.driver.version"], distro.kernel_flavour(kernel), series(kernel, distro))
        groups.setdefault(key, []).append((kernel, manifest, labels[f"{LABEL_PREFIX}.module-types"]))
    rows = []
    for (os_id, versions, arch, driver, flavour, _), members in sorted(groups.items()):
        members.sort(key=lambda m: kernel_sort_key(m[0], os_profile(os_id)))
        for (old, old_manifest, _), (new, new_manifest, types) in pairwise(members):
            rows += pulls(f"{os_id} {versions}", arch, flavour, driver, types, (old, old_manifest), (new, new_manifest))
    return rows


def pulls(what: str, arch: str, flavour: str, driver: str, types: str, old: tuple[str, Manifest],
          new: tuple[str, Manifest]) -> list[Upgrade]:
    """What a node holding `old` (kernel, image) lacks of `new`, once per module type of `new`."""
    held = {d.digest for d in old[1].blobs}
    lacking = [d for d in new[1].blobs if d.digest not in held]
    return [Upgrade(what, arch, flavour, driver, module_type, old[0], new[0], sum(d.size for d in lacking),
                    len(lacking), sum(d.size for d in new[1].blobs)) for module_type in types.split(",")]


def os_upgrades(layout: Layout) -> list[Upgrade]:
    """Per (arch, flavour): each OS version's newest image of each driver, against the image a node of the
    OS version before it runs (that version's newest kernel, newest driver)."""
    newest: dict[tuple[str, str, str, str], tuple[Version, str, Manifest, str]] = {}  # (os, arch, flavour, driver)
    for labels, arch, manifest in images(layout):
        os_id, kernel = labels[f"{LABEL_PREFIX}.os"], labels[f"{LABEL_PREFIX}.kernel"]
        distro = os_profile(os_id)
        key = (f"{os_id} {labels.get(f'{LABEL_PREFIX}.{distro.versions_label}', '')}", arch,
               distro.kernel_flavour(kernel), labels[f"{LABEL_PREFIX}.driver.version"])
        entry = (kernel_sort_key(kernel, distro), kernel, manifest, labels[f"{LABEL_PREFIX}.module-types"])
        if key not in newest or entry[0] > newest[key][0]:
            newest[key] = entry
    rows = []
    for old_os, new_os in pairwise(sorted({k[0] for k in newest}, key=lambda v: Version(v.split()[-1] or "0"))):
        for (os_name, arch, flavour, driver), (_, new, new_manifest, types) in sorted(newest.items()):
            olds = [(Version(k[3]), v) for k, v in newest.items() if k[:3] == (old_os, arch, flavour)]
            if os_name != new_os or not olds:
                continue
            _, (_, old, old_manifest, _) = max(olds, key=lambda o: (o[0], o[1][0]))
            rows += pulls(f"{old_os} -> {new_os}", arch, flavour, driver, types, (old, old_manifest),
                          (new, new_manifest))
    return rows


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
    rows = upgrades(Layout.open(out / "oci"))
    moves = os_upgrades(Layout.open(out / "oci"))
    for r in (*rows, *moves):
        print(f"{r.os} {r.arch} {r.flavour} {r.driver} {r.module_type}: {r.old} -> {r.new}: pulls "
              f"{r.pull_bytes / 1e6:.2f} MB in {r.blobs} blobs (the image: {r.image_bytes / 1e6:.1f} MB)")
    print(json.dumps({"bench": "release_upgrade", "layout": str(out / "oci"),
                      "kernel_only_upgrades": [asdict(r) for r in rows],
                      "max_pull_bytes": max((r.pull_bytes for r in rows), default=None),
                      "os_upgrades": [asdict(r) for r in moves]}))


if __name__ == "__main__":
    main()
