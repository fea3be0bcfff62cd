"""Build-stage benchmark: wall and CPU time per unit, cold vs cached; compiles with and without dedup.

Cold: a fresh build cache (Debian's downloaded .debs are shared, so "cold" measures unpacking headers and
sources, compiling, stripping and gating, not the network). Cached: the same units again, run twice
back to back in the same process. Compile counts come from the bundled Garden Linux matrix snapshot
(versions.yaml): one compile per build unit and module type, against one per cell and module type as
the per-(GL version, flavour, driver) shell-script build does it.

    .venv/bin/python bench/build_units.py [--unit KERNEL:TYPE ...] [--make-jobs N]

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

from gl_nvidia.build import AptEnv, DebianSource, build_unit
from gl_nvidia.catalog.matrix import load_matrix
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.fs import cache_dir

REPO = Path(__file__).resolve().parent.parent
DRIVER = "535.309.01"


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(unit: BuildUnit, mtype: str, out: Path, make_jobs: int) -> dict[str, object]:
    wall, cpu = time.monotonic(), _cpu()
    r = build_unit(unit, out, source=DebianSource(), env=AptEnv(), jobs=make_jobs, module_types=(mtype,))
    o = r.outcomes[mtype]
    return {"wall_s": round(time.monotonic() - wall, 2), "cpu_s": round(_cpu() - cpu, 2),
            "status": o.status, "cached": o.cached}


def compile_counts() -> dict[str, int]:
    m = load_matrix(REPO / "versions.yaml")
    per_cell = sum(2 for _ in m.cells)  # today: both module types for every cell
    deduped = sum(len(u.module_types) for u in m.units)
    return {"snapshot_cells": len(m.cells), "snapshot_units": len(m.units),
            "compiles_per_cell": per_cell, "compiles_deduped": deduped}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unit", action="append", default=[], help="KERNEL:TYPE (default 6.1.0-56-cloud-amd64:proprietary)")
    ap.add_argument("--make-jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    specs = [tuple(u.split(":", 1)) for u in args.unit] or [("6.1.0-56-cloud-amd64", "proprietary")]
    real_apt = cache_dir("apt")
    results = []
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-bench-") as tmp:
        cold_cache = Path(tmp, "cache")
        cold_cache.mkdir()
        (cold_cache / "apt").symlink_to(real_apt)  # share downloads: cold means compile, not network
        os.environ["GL_NVIDIA_CACHE"] = str(cold_cache)
        for kernel, mtype in specs:
            unit = BuildUnit(kernel=kernel, driver_version=DRIVER, driver_branch=DRIVER.split(".")[0], arch="amd64",
                             flavour="cloud", os_id="debian", os_versions=("12",))
            cold = _timed(unit, mtype, Path(tmp, "cold"), args.make_jobs)
            cached = _timed(unit, mtype, Path(tmp, "cached"), args.make_jobs)
            row = {"kernel": kernel, "type": mtype, "cold": cold, "cached": cached,
                   "speedup": round(float(cold["wall_s"]) / max(float(cached["wall_s"]), 0.001), 1)}  # type: ignore[arg-type]
            print(json.dumps(row), file=sys.stderr)
            results.append(row)
    print(json.dumps({"bench": "build_units", "make_jobs": args.make_jobs, "units": results, **compile_counts()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
