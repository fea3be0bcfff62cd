"""Replication benchmark: `mirror --component` (the OCM component with every image, checked at the source and
in the copy) against `mirror` of the same repository, between two real docker-registry processes on 127.0.0.1.

Sixteen images of 8 MiB each (a shared 4 MiB layer and an own 4 MiB layer, like a driver image's per-kernel
layer on a shared base), half of them signed, each with an SBOM; the component lists them as `release
--version` does. Each way copies into an empty registry, then again into the filled one (nothing to send).

    .venv/bin/python bench/mirror_component.py

Prints one JSON line last.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the registry fixture lives with the tests

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from tests.fixtures.registry import running_registry  # noqa: E402

from gl_nvidia.catalog.model import BuildUnit  # noqa: E402
from gl_nvidia.image import layers, sbom  # noqa: E402
from gl_nvidia.image.tags import image_tags  # noqa: E402
from gl_nvidia.oci import CONFIG, Layout, Manifest, canonical_json  # noqa: E402
from gl_nvidia.registry.client import RegistryClient  # noqa: E402
from gl_nvidia.registry.sign import sign_digest  # noqa: E402
from gl_nvidia.registry.transfer import mirror, push  # noqa: E402
from gl_nvidia.release.ocm import (  # noqa: E402
    COMPONENT,
    component_descriptor,
    mirror_component,
    published_images,
    push_descriptor,
)

IMAGES = 16


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-bench-") as tmp, \
            running_registry(Path(tmp, "src")) as src, running_registry(Path(tmp, "a")) as a, \
            running_registry(Path(tmp, "b")) as b:
        layout = Layout.create(Path(tmp, "layout"))
        shared = layers.write_layer(layout, [layers.Entry(PurePosixPath("/base"), data=os.urandom(4 << 20))])
        units = []
        for i in range(IMAGES):
            arch = ("amd64", "arm64")[i % 2]
            u = BuildUnit(f"6.12.{i}-cloud-{arch}", "580.105.08", "580", arch, "cloud", "gardenlinux", ("1877.3",),
                          ("proprietary",))
            own = layers.write_layer(layout, [layers.Entry(PurePosixPath("/k"), data=os.urandom(4 << 20))])
            cfg = layout.write_blob(canonical_json({"architecture": arch, "os": "linux", "rootfs": {
                "type": "layers", "diff_ids": [shared.diff_id, own.diff_id]}}), CONFIG)
            manifest = Manifest.build(cfg, [shared.descriptor, own.descriptor], {})
            tags = tuple(image_tags(u.driver_version, u.driver_branch, u.kernel, u.os_id, u.os_versions))
            layout.add_image(manifest, list(tags))
            sbom.attach(layout, manifest, {"spdxVersion": "SPDX-2.3", "name": u.kernel})
            units.append((u, tags, manifest.digest))
        push(Path(tmp, "layout"), f"{src.host}/gl/driver")
        key = ec.generate_private_key(ec.SECP256R1())
        with RegistryClient(src.host) as c:
            for _, _, digest in units[::2]:
                sign_digest(c, "gl/driver", digest, key)
            images = published_images(c, "gl/driver", units)
            push_descriptor(c, f"{src.host}/gl", component_descriptor("1.4.0", f"{src.host}/gl",
                                                                      f"{src.host}/gl/driver", images, "apt:x"))
        runs: dict[str, list[float]] = {"component": [], "repository": []}
        for _ in range(2):
            start = time.monotonic()
            mirror_component(f"{src.host}/gl", f"{a.host}/gl", f"{COMPONENT}:1.4.0", public_key=key.public_key())
            runs["component"].append(round(time.monotonic() - start, 2))
            start = time.monotonic()
            mirror(f"{src.host}/gl/driver", f"{b.host}/gl/driver")
            runs["repository"].append(round(time.monotonic() - start, 2))
        line = {"bench": "mirror_component", "images": IMAGES, "mirror_component_s": runs["component"],
                "mirror_s": runs["repository"], "bytes_component": a.blob_bytes(), "bytes_repository": b.blob_bytes()}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
