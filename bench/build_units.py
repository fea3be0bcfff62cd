"""Build-stage benchmark: wall and CPU time per unit, cold vs cached; compiles with and without dedup.

Cold: a fresh build cache (Debian's downloaded .debs are shared, so "cold" measures unpacking headers and
sources, compiling, stripping and gating, not the network). Cached: the same units again, run twice
back to back in the same process. Compile counts come from the bundled Garden Linux matrix snapshot
(versions.yaml): one compile per build unit and module type, against one per cell and module type as
the per-(GL version, flavour, driver) shell-script build does it. The `glrd_*` counts resolve the lock's
policy (every minor in maintenance) against the GLRD snapshot and its apt repositories in tests/data/catalog
(signed with a throwaway key, as the tests do), beside what the newest minor of each major alone needs.

    .venv/bin/python bench/build_units.py [--unit KERNEL:TYPE ...] [--make-jobs N] [--counts-only]

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the signing key fixture lives with the tests

from tests.fixtures.aptrepo import GL_APT, sign_repo, signing_key  # noqa: E402

from gl_nvidia.catalog.lock import read_lock  # noqa: E402
from gl_nvidia.catalog.matrix import build_matrix, load_matrix  # noqa: E402
from gl_nvidia.catalog.model import BuildUnit, Matrix  # noqa: E402
from gl_nvidia.catalog.refresh import SourceOverrides, refresh  # noqa: E402
from gl_nvidia.fs import cache_dir  # noqa: E402
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit  # noqa: E402

DRIVER = "535.309.01"
SNAPSHOT = REPO / "tests" / "data" / "catalog"
SNAPSHOT_DAY = date(2026, 11, 20)


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


def _compiles(m: Matrix) -> dict[str, int]:
    return {"cells": len(m.cells), "units": len(m.units),
            "compiles_per_cell": sum(2 for _ in m.cells), "compiles_deduped": sum(len(u.module_types) for u in m.units)}


def glrd_counts() -> dict[str, object]:
    """Every maintained minor (the lock's policy) vs only each major's newest, on the GLRD snapshot."""
    lock = read_lock(REPO / "versions.yaml")[0]
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-bench-") as tmp, signing_key("bench") as key:
        apt = Path(tmp, "gl-apt")
        shutil.copytree(GL_APT, apt)
        sign_repo(apt, key)
        os.environ["GL_APT_KEYRING"] = str(key.keyring)
        overrides = SourceOverrides((str(SNAPSHOT / "glrd-releases-major.json"), str(SNAPSHOT / "glrd-releases-minor.json")),
                                    str(SNAPSHOT / "nvidia-releases.json"), str(apt))
        resolved = refresh(lock, SNAPSHOT_DAY, overrides)
    newest = {v.major: v.version for v in resolved.os_versions}  # oldest first: the last of a major wins
    only_newest = resolved.model_copy(update={
        "os_versions": [v for v in resolved.os_versions if v.version in newest.values()],
        "kernels": [k for k in resolved.kernels if k.os_version in newest.values()]})
    every = _compiles(build_matrix(lock.os.id, resolved, lock.policy.exclusions))
    return {"glrd_minors": [v.version for v in resolved.os_versions],
            **{f"glrd_{k}": v for k, v in every.items()},
            **{f"glrd_newest_only_{k}": v for k, v in _compiles(build_matrix(lock.os.id, only_newest,
                                                                                lock.policy.exclusions)).items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unit", action="append", default=[], help="KERNEL:TYPE (default 6.1.0-56-cloud-amd64:proprietary)")
    ap.add_argument("--make-jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--counts-only", action="store_true", help="Only the compile counts (no compiles, seconds).")
    args = ap.parse_args()
    if args.counts_only:
        print(json.dumps({"bench": "build_units", **compile_counts(), **glrd_counts()}))
        return 0
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
    print(json.dumps({"bench": "build_units", "make_jobs": args.make_jobs, "units": results, **compile_counts(),
                      **glrd_counts()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
