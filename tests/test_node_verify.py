"""What the node checks before it links or inserts anything: every file a module is made from against the
image's manifest, whatever the linker on the node (fake hosts, real files, real sha256)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gl_nvidia.node import layout
from gl_nvidia.node.decide import NodeError
from gl_nvidia.node.imagefiles import Image
from gl_nvidia.node.link import STAGING_DIR
from gl_nvidia.node.runtime import READY_FILE
from tests.fixtures.node import BUILD_LINKER, KERNEL, fake_node, make_image

MODULES = f"/usr/lib/gl-nvidia/modules/{KERNEL}/proprietary"
BINARIES = "/usr/lib/gl-nvidia/binaries/proprietary"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("linker", ["GNU ld (fake node binutils) 1.0", BUILD_LINKER])
@pytest.mark.parametrize(("module", "file"), [
    ("nvidia-uvm", f"{MODULES}/nvidia-uvm.ko"),  # a whole module
    ("nvidia", f"{MODULES}/nvidia.o"),  # the per-kernel interface object
    ("nvidia-modeset", f"{BINARIES}/nv-modeset-kernel.o"),  # NVIDIA's binary object
    ("nvidia", f"{MODULES}/module.lds"),  # the kernel's link recipe
], ids=["whole-ko", "interface", "binary", "module.lds"])
def test_a_file_that_differs_from_the_manifest_stops_init_before_anything_is_linked_or_loaded(
        tmp_path: Path, module: str, file: str, linker: str) -> None:
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)})
    path = image.at(file)
    expected = _sha(path)
    with path.open("ab") as f:  # one byte more: vermagic and srcversion read the same as the build's
        f.write(b"\0")
    rt, k = fake_node(tmp_path, "h100", image=image)
    k.linker = linker
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message == (f"{file} has sha256 {_sha(path)}, but this image's manifest says {expected}; "
                                 f"refusing to load {module}.ko")
    assert exc.value.hint is not None and "pull it again" in exc.value.hint
    assert not [c for c in k.names() if c.startswith(("ld ", "insmod", "mount ", "nsenter"))]
    assert "nvidia" not in rt.host.read("/proc/modules")
    assert not k.mounts and not rt.host.exists(READY_FILE)
    assert not [p for p in rt.host.path(STAGING_DIR).rglob("*") if p.is_file()]


def test_check_load_verifies_nvidias_parts_before_linking(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)})
    (image.at(BINARIES) / "nv-kernel.o").write_bytes(b"another build's binary object")
    rt, k = fake_node(tmp_path, "no-gpu", image=image)
    with pytest.raises(NodeError, match=rf"^{BINARIES}/nv-kernel\.o has sha256 [0-9a-f]{{64}}, but this image's "
                                        r"manifest says [0-9a-f]{64}; refusing to load nvidia\.ko$"):
        rt.check_load()
    assert not [c for c in k.names() if c.startswith(("ld ", "insmod"))]


@pytest.mark.parametrize("damage", ["altered", "not in the manifest"])
def test_the_peermem_sidecar_verifies_nvidia_peermem(tmp_path: Path, damage: str) -> None:
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)})
    if damage == "altered":
        with image.ko(KERNEL, "proprietary", "nvidia-peermem").open("ab") as f:
            f.write(b"\0")
        refusal = rf"^{MODULES}/nvidia-peermem\.ko has sha256 .*; refusing to load nvidia-peermem\.ko$"
    else:
        image = _unlist(image, "nvidia-peermem.ko")
        refusal = (rf"^this image's manifest does not list nvidia-peermem\.ko for kernel {KERNEL} \(proprietary\); "
                   "refusing to load it$")
    rt, k = fake_node(tmp_path, "hgx-h100", image=image)
    rt.host.write(READY_FILE, "ready")
    rt.host.path("/run/mellanox/drivers").mkdir(parents=True)
    rt.host.path("/run/mellanox/drivers/.driver-ready").write_text("")
    k(("insmod", str(image.ko(KERNEL, "proprietary", "nvidia"))))  # loaded by init earlier
    with pytest.raises(NodeError, match=refusal):
        rt.reload_peermem()
    assert "nvidia_peermem" not in rt.host.read("/proc/modules")


def _unlist(image: Image, name: str) -> Image:
    """The image with `name` dropped from its manifest; the file stays in the image."""
    manifest = image.at(layout.MANIFEST)
    d = json.loads(manifest.read_text())
    ms = d["kernels"][KERNEL]["module_sets"]["proprietary"]
    ms["modules"] = [m for m in ms["modules"] if m["name"] != name]
    manifest.write_text(json.dumps(d))
    return Image.load(image.root)


def test_a_module_file_the_manifest_does_not_name_is_not_loaded(tmp_path: Path) -> None:
    image = _unlist(make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)}), "nvidia-uvm.ko")
    rt, k = fake_node(tmp_path, "h100", image=image)
    with pytest.raises(NodeError, match=rf"^this image lacks nvidia-uvm\.ko for kernel {KERNEL}$"):
        rt.init()
    assert not [c for c in k.names() if c.startswith(("insmod", "mount "))]
    assert not k.mounts
