"""Node install time: start to "modules staged and driver root visible", ours vs today's method.

Same real payload for both: the debian bundle's userspace, GSP firmware and the modules of one kernel
(proprietary 535.309.01 for 6.1.0-56-cloud-amd64), built through the build stage (cached).
- today: extract the payload's gzip tarball (whole .ko files) into a staging dir, then `cp -a` it to
  the driver root (a temp dir standing in for /run/nvidia/driver);
- ours: `nvidia-driver init` (the real Runtime: detection on a fake H100 host tree, module choice,
  /drivers parsing, ld.so.cache check, and linking nvidia.ko and nvidia-modeset.ko from the image's
  interface objects and NVIDIA's binary objects with the real `ld`, verified against the manifest's
  sha256) up to the bind mount of the image root, timed to the moment it would wait; the kernel side
  (insmod/modprobe) is a no-op, as modprobe is excluded for both.
Runs itself in a private mount namespace (`unshare -m`, needs root). Median of --runs each.

    .venv/bin/python bench/node_install.py [--runs 3]

Prints one JSON line last.
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

from tests.fixtures.bundle import DEBIAN_KERNEL, DEBIAN_UNIT  # noqa: E402
from tests.fixtures.node import FAKE_DAEMON, FakeKernel, fake_node  # noqa: E402

from gl_nvidia import bundle as bundle_mod  # noqa: E402
from gl_nvidia.fs import cache_dir  # noqa: E402
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit  # noqa: E402
from gl_nvidia.node import layout  # noqa: E402
from gl_nvidia.node.driverroot import DRIVER_ROOT  # noqa: E402
from gl_nvidia.node.host import subprocess_runner  # noqa: E402
from gl_nvidia.node.imagefiles import Image  # noqa: E402
from gl_nvidia.node.link import STAGING_DIR  # noqa: E402
from gl_nvidia.node.runtime import Runtime  # noqa: E402


def payload_root(bundle: Path, dest: Path, *, split: bool) -> Path:
    """The driver image's root as the node sees it: userspace, firmware, this kernel's modules, manifest.

    `split`: as our image ships them (interfaces + module.lds per kernel, binaries apart); else whole .ko files.
    """
    shutil.copytree(bundle_mod.userspace_dir(bundle), dest, symlinks=True)
    shutil.copytree(bundle_mod.firmware_dir(bundle), dest / "usr/lib/firmware", symlinks=True)
    mods = dest / str(layout.modules_dir(DEBIAN_KERNEL, "proprietary")).lstrip("/")
    ms = bundle_mod.BundleManifest.load(bundle).kernels[DEBIAN_KERNEL].module_sets["proprietary"]
    mods.mkdir(parents=True)
    for m in ms.modules:
        if split and m.parts is not None:
            iface = bundle_mod.interfaces_dir(bundle, DEBIAN_KERNEL, "proprietary")
            shutil.copy2(iface / m.parts.interface, mods)
            shutil.copy2(iface / m.parts.lds, mods)
            bins = dest / str(layout.binaries_dir("proprietary")).lstrip("/")
            bins.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle_mod.binaries_dir(bundle, "proprietary") / m.parts.binary, bins)
        else:
            shutil.copy2(bundle_mod.modules_dir(bundle, DEBIAN_KERNEL, "proprietary") / m.name, mods)
    manifest = dest / str(layout.MANIFEST).lstrip("/")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(bundle / bundle_mod.MANIFEST, manifest)
    return dest


def pretend_daemons(root: Path) -> None:
    """The fake kernel runs the image's own daemons, and the real nvidia-persistenced needs a GPU: put
    the fixtures' pretend one in its place (not timed; the staging is what is measured)."""
    daemon = root / "usr/bin/nvidia-persistenced"
    daemon.unlink(missing_ok=True)
    daemon.write_text(FAKE_DAEMON)
    daemon.chmod(0o755)


def tarball(root: Path) -> Path:
    """Today's artefact: the payload as a gzip tarball (made once, cached by the manifest's digest)."""
    key = hashlib.sha256((root / str(layout.MANIFEST).lstrip("/")).read_bytes()).hexdigest()[:16]
    out = cache_dir("bench-node") / f"payload-{key}.tar.gz"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        subprocess.run(["tar", "-czf", str(tmp), "-C", str(root), "."], check=True)
        os.replace(tmp, out)
    return out


def today(tgz: Path, work: Path) -> float:
    staging, driver_root = work / "staging", work / "run-nvidia-driver"
    staging.mkdir()
    driver_root.mkdir()
    t = time.monotonic()
    subprocess.run(["tar", "-xzf", str(tgz), "-C", str(staging)], check=True)
    subprocess.run(["cp", "-a", f"{staging}/.", str(driver_root)], check=True)
    elapsed = time.monotonic() - t
    assert (driver_root / "usr/bin/nvidia-smi").is_file()
    return elapsed


def init_until_visible(rt: Runtime, fake: FakeKernel, real: set[str]) -> float:
    """Run `init` with the commands in `real` run for real and the rest faked; returns the moment the
    driver root became visible (init then tears down: umount)."""
    rt.host.runner = lambda argv: subprocess_runner(argv) if argv[0] in real else fake(argv)
    visible: list[float] = []
    target = rt.host.path(DRIVER_ROOT)

    def wait(timeout: float | None) -> bool:
        visible.append(time.monotonic())
        assert (target / "usr/bin/nvidia-smi").is_file()
        return True

    rt.wait = wait
    rt.init()
    return visible[0]


def ours(root: Path, work: Path) -> float:
    rt, kernel = fake_node(work, "h100", image=Image.load(root))
    t = time.monotonic()
    visible = init_until_visible(rt, kernel, {"mount", "umount", "mountpoint", "ld"})
    linked = rt.host.path(STAGING_DIR) / DEBIAN_KERNEL / "proprietary"
    assert sorted(p.name for p in linked.iterdir()) == ["nvidia-modeset.ko", "nvidia.ko"]
    return visible - t


def main() -> None:
    if os.environ.get("GL_NVIDIA_BENCH_NS") != "1":
        env = {**os.environ, "GL_NVIDIA_BENCH_NS": "1"}
        sys.exit(subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv], env=env).returncode)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-node-", dir=cache_dir("bench-node")) as tmp_s:
        tmp = Path(tmp_s)
        bundle = tmp / "bundle"
        result = build_unit(DEBIAN_UNIT, bundle, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
        assert result.ok, result.outcomes
        root = payload_root(bundle, tmp / "image-root", split=True)
        pretend_daemons(root)
        whole = payload_root(bundle, tmp / "today-root", split=False)
        size = sum(p.stat().st_size for p in whole.rglob("*") if p.is_file() and not p.is_symlink())
        files = sum(1 for p in whole.rglob("*") if p.is_file())
        tgz = tarball(whole)
        t_today, t_ours = [], []
        for i in range(args.runs):  # interleaved: both ways see the same machine load
            w = tmp / f"today-{i}"
            w.mkdir()
            t_today.append(today(tgz, w))
            shutil.rmtree(w)
            w = tmp / f"ours-{i}"
            w.mkdir()
            t_ours.append(ours(root, w))
            print(f"run {i + 1}: today {t_today[-1]:.3f}s, ours {t_ours[-1]:.4f}s", file=sys.stderr)
    med_today, med_ours = statistics.median(t_today), statistics.median(t_ours)
    print(json.dumps({
        "bench": "node_install",
        "payload_bytes": size,
        "payload_files": files,
        "tarball_bytes": tgz.stat().st_size,
        "runs": args.runs,
        "today_extract_and_copy_s": round(med_today, 3),
        "ours_link_and_bind_mount_s": round(med_ours, 4),
        "ours_links": "nvidia.ko, nvidia-modeset.ko from interface + binary objects with the real ld, sha256-verified",
        "speedup": round(med_today / med_ours, 1),
        "target_speedup": 20,
    }))


if __name__ == "__main__":
    main()
