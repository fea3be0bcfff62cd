"""Release benchmark: a first release into an empty layout and registry vs the rerun that finds everything.

Uses the release test's lock (the debian profile narrowed to proprietary 535.309.01 for
6.1.0-56-cloud-amd64) and a real docker-registry on 127.0.0.1. The first run takes the modules from the
build cache when it is warm (else it compiles once); it builds the image and pushes it. The rerun must
compile nothing, build no image and upload nothing: it only asks the registry for its tags.

    .venv/bin/python bench/release_resume.py

Prints one JSON line last.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the registry fixture lives with the tests

from tests.fixtures.registry import running_registry  # noqa: E402

from gl_nvidia.release.conductor import release  # noqa: E402

LOCK = REPO / "tests" / "data" / "deploy" / "release-debian-lock.yaml"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-bench-") as tmp, running_registry(Path(tmp, "reg")) as reg:
        repo = f"{reg.host}/gl-nvidia"
        runs = []
        for _ in range(2):
            start = time.monotonic()
            result = release(LOCK, Path(tmp, "out"), repo)
            runs.append({"wall_s": round(time.monotonic() - start, 2), "compiled": result.compiled,
                         "blobs_uploaded": result.blobs_uploaded, "manifests_pushed": result.manifests_pushed,
                         "ok": result.ok})
        line = {
            "bench": "release_resume",
            "units": len(result.units),
            "first": runs[0],
            "rerun": runs[1],
            "registry_bytes": reg.blob_bytes(),
            "rerun_speedup": round(runs[0]["wall_s"] / max(runs[1]["wall_s"], 0.01), 1),
        }
    print(json.dumps(line))
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
