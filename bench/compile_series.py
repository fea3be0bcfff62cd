"""Compile reuse across kernels (issue 25): a series' second kernel built with the first one's compiles.

For two consecutive ABIs of each kernel series Debian's archive serves here (picked at run time: the newest
and the one before; 6.1 from bookworm, 6.12 from bookworm-backports, IBT) and each module type of Debian's
535.309.01 sources, in a fresh private cache (headers and driver sources shared with ~/.cache/gl-nvidia):
the first kernel cold, the second kernel warm (from the first one's built tree when their headers differ only
where they name the release, modbuild.treereuse; else through the compiler cache, modbuild.reuse), and the second
kernel cold for reference (the gate's own cold build); the ratio, and whether every module's sha256 is the same
warm and cold.
Prints one line per case to stderr as it goes and one JSON line last.

    .venv/bin/python bench/compile_series.py [--series 6.1 --series 6.12] [--type proprietary --type open]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gl_nvidia.catalog.kernels import kernel_sort_key
from gl_nvidia.fs import cache_dir
from gl_nvidia.modbuild import AptEnv, DebianSource
from gl_nvidia.modbuild.compile import compile_set

DRIVER = "535.309.01"
SERIES = {"6.1": r"linux-headers-6\.1\.0-\d+-cloud-amd64", "6.12": r"linux-headers-6\.12\.\d+\+deb12-cloud-amd64"}
SHARED = ("build/headers", "build/driver", "apt")  # inputs, not compiles: taken from the real cache


def pair(env: AptEnv, pattern: str) -> tuple[str, str]:
    kernels = sorted({p.name.removeprefix("linux-headers-") for p in env.repo("amd64").search(pattern)},
                     key=kernel_sort_key)
    return kernels[-2], kernels[-1]


def private_cache(tmp: Path) -> Path:
    real = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gl-nvidia"
    for rel in SHARED:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (real / rel).mkdir(parents=True, exist_ok=True)
        (tmp / rel).symlink_to(real / rel)
    return tmp


def case(series: str, mtype: str, kernels: tuple[str, str]) -> dict[str, object]:
    env = AptEnv()
    src = DebianSource().prepare(DRIVER, "amd64").module_sources[mtype]
    row: dict[str, object] = {"series": series, "type": mtype, "source": src.version, "kernels": list(kernels)}
    runs = []
    for k in kernels:
        hdrs = env.headers(k, "amd64")
        start, load = time.monotonic(), os.getloadavg()[0]
        cs = compile_set(src, hdrs, env, env.toolchain(hdrs), jobs=2)
        wall = round(time.monotonic() - start, 1)
        # the machine's load average (1 min) before and after: timings on shared cores compare only side by side
        runs.append({"kernel": k, "status": cs.status, "error": cs.error, "wall_s": wall,
                     "load": [round(load, 1), round(os.getloadavg()[0], 1)],
                     **json.loads((cs.entry / "reuse.json").read_text())})
        # The gate compares once per case: forget a verdict the first kernel made (from objects it compiled
        # twice itself), so the second kernel's build is compared with its cold build.
        shutil.rmtree(cache_dir("build", "reuse"))
    first, second = runs
    row["first_cold_s"] = first["seconds"]
    row["second_warm_s"] = round(float(str(second["seconds"])) + float(str(second.get("prepare_seconds", 0))), 1)
    row["second_cold_s"] = second.get("cold_seconds")
    row["status"] = [first["status"], second["status"]]
    row["reuse"] = second.get("reuse")  # "tree": the first kernel's built tree; "objects": its compiles
    tree = second.get("tree")
    if isinstance(tree, dict):
        row["rebuilt"] = tree["rebuilt"]
    row["reused"] = f"{second.get('reused')}/{second.get('compiles')}"
    if second.get("cold_seconds"):
        row["ratio"] = round(float(str(second["cold_seconds"])) / float(str(row["second_warm_s"])), 1)
    row["identical"] = second.get("identical")
    row["runs"] = runs
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", action="append", choices=sorted(SERIES))
    ap.add_argument("--type", action="append", choices=("proprietary", "open"))
    args = ap.parse_args()
    env = AptEnv()
    rows = []
    for series in args.series or ["6.1", "6.12"]:
        kernels = pair(env, SERIES[series])
        for mtype in args.type or ["proprietary", "open"]:
            with tempfile.TemporaryDirectory(prefix="bench-series-") as tmp:
                os.environ["GL_NVIDIA_CACHE"] = str(private_cache(Path(tmp)))
                row = case(series, mtype, kernels)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), file=sys.stderr, flush=True)
            rows.append(row)
    print(json.dumps({"bench": "compile_series", "driver": DRIVER, "cases": rows}))


if __name__ == "__main__":
    main()
