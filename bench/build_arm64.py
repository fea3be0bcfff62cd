"""arm64 cross-compile against amd64: wall and CPU time per unit, same driver, same process, side by side.

Each round gets a fresh build cache of its own (Debian's downloaded .debs are shared through a link to the
apt cache, so nothing is fetched twice); the unit's inputs (headers unpacked, driver source unpacked) are
prepared first and timed apart, so `compile` is make, strip, split, link and gate only. Rounds alternate
the order (amd64 first, then arm64 first) so a load change on a shared machine hits both alike.

    .venv/bin/python bench/build_arm64.py [--rounds N] [--make-jobs N] [--type proprietary|open]

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from gl_nvidia import bundle as b
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.fs import cache_dir
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit

DRIVER = "535.309.01"
KERNEL = "6.1.0-56-cloud-{arch}"


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def unit(arch: str) -> BuildUnit:
    return BuildUnit(kernel=KERNEL.format(arch=arch), driver_version=DRIVER, driver_branch=DRIVER.split(".")[0],
                     arch=arch, flavour="cloud", os_id="debian", os_versions=("12",))


def one(arch: str, mtype: str, out: Path, make_jobs: int) -> tuple[float, float, dict[str, object]]:
    """Compile wall and CPU seconds of one cold unit, and its row."""
    u = unit(arch)
    source, env = DebianSource(), AptEnv()
    start = time.monotonic()
    source.prepare(u.driver_version, arch)
    env.headers(u.kernel, arch)
    inputs_s = time.monotonic() - start
    wall, cpu = time.monotonic(), _cpu()
    r = build_unit(u, out, source=source, env=env, jobs=make_jobs, module_types=(mtype,))
    wall, cpu = time.monotonic() - wall, _cpu() - cpu
    o = r.outcomes[mtype]
    assert r.manifest is not None and not o.cached, "a cold cache compiles"
    ms = r.manifest.kernels[u.kernel].module_sets[mtype]
    return wall, cpu, {"arch": arch, "kernel": u.kernel, "status": o.status, "inputs_s": round(inputs_s, 2),
                       "compile_wall_s": round(wall, 2), "compile_cpu_s": round(cpu, 2),
                       "toolchain": r.manifest.kernels[u.kernel].toolchain,
                       "modules_bytes": sum(m.size for m in ms.modules),
                       "split": sorted(m.name for m in ms.modules if m.parts is not None)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--make-jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--type", default="proprietary", choices=b.MODULE_TYPES)
    args = ap.parse_args()
    real_apt = cache_dir("apt")
    rows: list[dict[str, object]] = []
    wall = {"amd64": 0.0, "arm64": 0.0}
    cpu = dict(wall)
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-bench-") as tmp:
        for n in range(args.rounds):
            cold = Path(tmp, f"cache-{n}")
            cold.mkdir()
            (cold / "apt").symlink_to(real_apt)  # share downloads: cold means compile, not network
            os.environ["GL_NVIDIA_CACHE"] = str(cold)
            for arch in ("amd64", "arm64") if n % 2 == 0 else ("arm64", "amd64"):
                w, c, row = one(arch, args.type, Path(tmp, f"out-{n}", arch), args.make_jobs)
                wall[arch] += w
                cpu[arch] += c
                rows.append({"round": n, **row})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"bench": "build_arm64", "driver": DRIVER, "type": args.type, "make_jobs": args.make_jobs,
                      "rounds": args.rounds, "units": rows,
                      "amd64_compile_wall_s": round(wall["amd64"] / args.rounds, 2),
                      "arm64_compile_wall_s": round(wall["arm64"] / args.rounds, 2),
                      "arm64_over_amd64_wall": round(wall["arm64"] / max(wall["amd64"], 0.001), 2),
                      "arm64_over_amd64_cpu": round(cpu["arm64"] / max(cpu["amd64"], 0.001), 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
