"""Kernel upgrade on a node, end to end, on Debian's real 6.12 (IBT) kernels: ours vs today's seed method.

A node runs the driver image for kernel A and reboots into kernel B (the archive's two newest 6.12 cloud
ABIs, tests/fixtures/ibt.py; Debian's proprietary 535.309.01, built through the build stage, cached).
Both layouts are pushed to a real docker-registry on 127.0.0.1; the node holds A's image (its blobs, and
for ours the shared layers unpacked, as a container runtime keeps them).
- ours: pull B, which fetches only the blobs the node lacks (B's per-kernel layer and config), unpack that
  layer, then `nvidia-driver init` (the real Runtime on a fake H100 host tree, as bench/node_install.py)
  up to "modules staged and driver root visible": it checks its inputs against the manifest, rebuilds
  nvidia.ko and nvidia-modeset.ko from NVIDIA's binary object and the build's per-kernel patch (standard
  library; the build ran ld, the kernel's objtool and ld), checks their sha256, and bind-mounts the root;
- today (issue 4): pull B's whole monolithic image (everything but the shared base), `tar xzf` its
  tarball (node runtime, userspace, firmware and whole .ko files) into staging, `cp -a` it to the driver
  root.
insmod is a no-op for both. Runs itself in a private mount namespace (`unshare -m`, needs root).
Median of --runs each, interleaved. Prints one JSON line last.

    .venv/bin/python bench/node_upgrade_612.py [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "src")]

from bench.image_layers import OPTIONS, monolithic  # noqa: E402
from bench.node_install import init_until_visible, pretend_daemons  # noqa: E402
from tests.fixtures.ibt import ibt_kernels, ibt_unit  # noqa: E402
from tests.fixtures.node import fake_node  # noqa: E402
from tests.fixtures.registry import running_registry  # noqa: E402

from gl_nvidia.bundle import apply_patch  # noqa: E402
from gl_nvidia.fs import cache_dir  # noqa: E402
from gl_nvidia.image.assemble import build_images  # noqa: E402
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit  # noqa: E402
from gl_nvidia.node.driverroot import DRIVER_ROOT  # noqa: E402
from gl_nvidia.node.imagefiles import Image  # noqa: E402
from gl_nvidia.node.link import STAGING_DIR  # noqa: E402
from gl_nvidia.oci import Layout, Manifest  # noqa: E402
from gl_nvidia.registry.client import RegistryClient  # noqa: E402
from gl_nvidia.registry.transfer import copy_image, pull  # noqa: E402


def holding(src: Layout, image: Manifest, dest: Path) -> Layout:
    """A node's blob store that holds `image` (what it ran before the upgrade)."""
    node = Layout.create(dest)
    for blob in [image.config, *image.layers]:
        node.import_blob(src.blob_path(blob.digest), blob)
    return node


def unpack(layout: Layout, blobs: list[str], root: Path) -> None:
    for digest in blobs:
        subprocess.run(["tar", "-xzf", str(layout.blob_path(digest)), "-C", str(root)], check=True)


def ours(reg: str, store: Layout, shared_root: Path, held: set[str], work: Path, kernel: str) -> tuple[float, int]:
    """Pull B, unpack what is new, init up to the driver root visible. Returns (seconds, bytes pulled)."""
    root = work / "root"
    shutil.copytree(shared_root, root, symlinks=True)  # the runtime's snapshots of the shared layers (not timed)
    t = time.monotonic()
    digest = pull(f"{reg}/driver:{kernel.replace('+', '_')}", store)
    image = store.manifest(digest)
    new = [x.digest for x in image.layers if x.digest not in held]
    unpack(store, new, root)
    rt, fake = fake_node(work, "h100", image=Image.load(root))
    (rt.host.path("/proc/sys/kernel")).mkdir(parents=True, exist_ok=True)
    rt.host.path("/proc/sys/kernel/osrelease").write_text(kernel + "\n")
    assert rt.image.patched_module(kernel, "proprietary", "nvidia") is not None
    visible = init_until_visible(rt, fake, {"mount", "umount", "mountpoint"})
    linked = rt.host.path(STAGING_DIR) / kernel / "proprietary"
    assert sorted(p.name for p in linked.iterdir()) == ["nvidia-modeset.ko", "nvidia.ko"]
    assert any("module rebuilt from its patch" in line and "sha256=\"the build's\"" in line
               for line in rt.log.lines), rt.log.lines
    pulled = sum(x.size for x in [image.config, *image.layers] if x.digest not in held)
    return visible - t, pulled


def rebuild_s(root: Path, kernel: str) -> dict[str, float]:
    """nvidia.ko on its own: reading its inputs, applying the patch, hashing the result (seconds each)."""
    patched = Image.load(root).patched_module(kernel, "proprietary", "nvidia")
    assert patched is not None
    t0 = time.monotonic()
    patch, binary = patched.patch.read_bytes(), patched.binary.read_bytes()
    t1 = time.monotonic()
    module = apply_patch(patch, binary)
    t2 = time.monotonic()
    assert hashlib.sha256(module).hexdigest() == patched.sha256
    t3 = time.monotonic()
    return {"read_s": round(t1 - t0, 2), "apply_patch_s": round(t2 - t1, 2), "sha256_s": round(t3 - t2, 2),
            "patch_bytes": len(patch), "module_bytes": len(module)}


def today(reg: str, store: Layout, held: set[str], work: Path, kernel: str) -> tuple[float, int]:
    staging, driver_root = work / "staging", work / "run-nvidia-driver"
    staging.mkdir()
    driver_root.mkdir()
    t = time.monotonic()
    digest = pull(f"{reg}/mono:{kernel.replace('+', '_')}", store)
    image = store.manifest(digest)
    unpack(store, [x.digest for x in image.layers[1:]], staging)  # the tarball; the base is the host's
    subprocess.run(["cp", "-a", f"{staging}/.", str(driver_root)], check=True)
    elapsed = time.monotonic() - t
    assert (driver_root / "usr/bin/nvidia-smi").is_file()
    return elapsed, sum(x.size for x in [image.config, *image.layers] if x.digest not in held)


def main() -> None:
    if os.environ.get("GL_NVIDIA_BENCH_NS") != "1":
        env = {**os.environ, "GL_NVIDIA_BENCH_NS": "1"}
        sys.exit(subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv], env=env).returncode)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    a, b = ibt_kernels().built, ibt_kernels().next
    with tempfile.TemporaryDirectory(prefix="bench-upgrade-", dir=cache_dir("bench-node")) as tmp_s:
        tmp = Path(tmp_s)
        bundle = tmp / "bundle"
        for k in (a, b):
            res = build_unit(ibt_unit(k), bundle, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
            assert res.ok, res.outcomes
        built = build_images(bundle, [a, b], tmp / "layered", options=OPTIONS)
        lay = Layout.open(tmp / "layered")
        ours_img = {x.kernel: lay.manifest(x.digest) for x in built}
        mono = Layout.create(tmp / "mono")
        mono_img = {k: monolithic(lay, mono, m, bundle, k, [k.replace("+", "_")]) for k, m in ours_img.items()}
        t_ours: list[float] = []
        t_today: list[float] = []
        with running_registry(tmp / "registry") as reg, RegistryClient(reg.host) as client:
            for k in (a, b):
                copy_image(ours_img[k], lambda blob, _s: lay.blob_path(blob.digest), client, "driver", [k.replace("+", "_")])
                copy_image(mono_img[k], lambda blob, _s: mono.blob_path(blob.digest), client, "mono", [k.replace("+", "_")])
            held_ours = {x.digest for x in [ours_img[a].config, *ours_img[a].layers]}
            held_mono = {x.digest for x in [mono_img[a].config, *mono_img[a].layers]}
            shared_root = tmp / "shared-root"
            shared_root.mkdir()
            unpack(lay, [x.digest for x in ours_img[a].layers[:-1]], shared_root)
            pretend_daemons(shared_root)
            for i in range(args.runs):  # interleaved: both see the same machine load
                w = tmp / f"today-{i}"
                w.mkdir()
                s, pulled_today = today(reg.host, holding(mono, mono_img[a], w / "store"), held_mono, w, b)
                t_today.append(s)
                shutil.rmtree(w)
                w = tmp / f"ours-{i}"
                w.mkdir()
                s, pulled_ours = ours(reg.host, holding(lay, ours_img[a], w / "store"), shared_root, held_ours, w, b)
                t_ours.append(s)
                subprocess.run(["umount", "-R", str(w / "host" / DRIVER_ROOT.lstrip("/"))], check=False,
                               capture_output=True)
                shutil.rmtree(w)
                print(f"run {i + 1}: today {t_today[-1]:.2f}s, ours {t_ours[-1]:.2f}s", file=sys.stderr)
            w = tmp / "steps"
            w.mkdir()
            root = w / "root"
            shutil.copytree(shared_root, root, symlinks=True)
            unpack(lay, [ours_img[b].layers[-1].digest], root)
            steps = rebuild_s(root, b)
    med_today, med_ours = statistics.median(t_today), statistics.median(t_ours)
    print(json.dumps({
        "bench": "node_upgrade_612",
        "from_kernel": a,
        "to_kernel": b,
        "runs": args.runs,
        "ours_pulled_bytes": pulled_ours,
        "today_pulled_bytes": pulled_today,
        "ours_pull_unpack_rebuild_bind_s": round(med_ours, 2),
        "today_pull_extract_copy_s": round(med_today, 2),
        "speedup": round(med_today / med_ours, 2),
        "ours_nvidia_ko_rebuild": steps,
        "target_speedup": 10,
    }))


if __name__ == "__main__":
    main()
