"""GPUDirect Storage on the node: GDS_ENABLED=true loads the image's prebuilt nvidia-fs after nvidia, or stops
before touching the host, naming why the build left it out; a bad GDS_ENABLED is one line, nothing started."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gl_nvidia.node import layout
from gl_nvidia.node.decide import NodeError
from gl_nvidia.node.imagefiles import Image
from tests.fixtures.node import KERNEL, fake_node, make_image, make_ko

WHY = ("nvidia-fs 2.13.5: proprietary: ABI gate: nvidia-fs.ko: binds nvidia_p2p_get_pages with symbol_get, which "
       "Linux 6.1.192 refuses for exports that are not EXPORT_SYMBOL_GPL")


def _image(root: Path, nvidia_fs: bool, left_out: dict[str, str] | None = None) -> Image:
    """The fake image, with nvidia-fs.ko in its proprietary set as the build adds it (a whole module)."""
    image = make_image(root, kernels={KERNEL: ("proprietary",)})
    path = image.at(layout.MANIFEST)
    d = json.loads(path.read_text())
    if nvidia_fs:
        ko = make_ko(image.at(layout.modules_dir(KERNEL, "proprietary")) / "nvidia-fs.ko", version="2.13.5",
                     depends="", vermagic=f"{KERNEL} SMP mod_unload modversions ")
        d["kernels"][KERNEL]["module_sets"]["proprietary"]["modules"].append(
            {"name": ko.name, "sha256": hashlib.sha256(ko.read_bytes()).hexdigest(), "size": 0, "size_unstripped": 0,
             "vermagic": f"{KERNEL} SMP mod_unload modversions ", "srcversion": "nvfs"})
    path.write_text(json.dumps({**d, "left_out": left_out or {}}))
    return Image.load(root)


def test_gds_enabled_loads_nvidia_fs_after_the_driver_and_unloads_it_first(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100", _image(tmp_path / "image", nvidia_fs=True), GDS_ENABLED="true")
    rt.init()
    inserted = [Path(c.split()[1]).name for c in k.names() if c.startswith("insmod")]
    assert inserted == ["nvidia.ko", "nvidia-uvm.ko", "nvidia-modeset.ko", "nvidia-fs.ko"]
    # the image's own copy, checked against its manifest like every module
    assert any(c.startswith(f"insmod {rt.image.root}/") and c.endswith("/proprietary/nvidia-fs.ko") for c in k.names())
    assert 'msg="module loaded" module=nvidia-fs type=proprietary' in rt.log.stream.getvalue()  # type: ignore[attr-defined]
    (rmmod,) = [c for c in k.names() if c.startswith("rmmod")]
    assert rmmod == "rmmod nvidia-fs nvidia-modeset nvidia-uvm nvidia"
    assert "nvidia" not in rt.host.path("/proc/modules").read_text()


def test_without_gds_nvidia_fs_stays_out(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100", _image(tmp_path / "image", nvidia_fs=True))
    rt.init()
    assert not [c for c in k.names() if c.startswith("insmod") and "nvidia-fs" in c]


def test_gds_on_an_image_without_nvidia_fs_names_the_builds_reason_and_touches_nothing(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100", _image(tmp_path / "image", nvidia_fs=False, left_out={f"nvidia-fs {KERNEL}": WHY, "nvidia-fs 6.1.0-47-cloud-amd64": "another kernel's"}),
                      GDS_ENABLED="true")
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message == f"this image lacks nvidia-fs.ko for kernel {KERNEL} (the build left out nvidia-fs: {WHY})"
    assert not [c for c in k.names() if c.startswith(("insmod", "mount", "nsenter"))]


@pytest.mark.parametrize("value", ["yes", "1", "", "true "])
def test_bad_gds_enabled_is_one_line_before_anything_starts(tmp_path: Path, value: str) -> None:
    rt, k = fake_node(tmp_path, "h100", _image(tmp_path / "image", nvidia_fs=True), GDS_ENABLED=value)
    if value == "true ":  # the operator's env is trimmed, like KERNEL_MODULE_TYPE
        rt.init()
        assert any("nvidia-fs.ko" in c for c in k.names())
        return
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message == f"GDS_ENABLED={value!r} is not true or false"
    assert "\n" not in exc.value.message and exc.value.hint
    assert k.names() == []  # nothing inserted, mounted or started


def test_a_process_holding_nvidia_keeps_the_driver_although_nvidia_fs_holds_nothing(tmp_path: Path) -> None:
    """nvidia-fs 2.13.5 is no dependant of nvidia while closed: it must not stand in for a real holder."""
    rt, k = fake_node(tmp_path, "h100", _image(tmp_path / "image", nvidia_fs=True), GDS_ENABLED="true")

    def wait(timeout: float | None) -> bool:  # a process opens /dev/nvidiactl while the driver runs
        nv = rt.host.path("/sys/module/nvidia/refcnt")
        nv.write_text(f"{int(nv.read_text()) + 1}\n")
        return True

    rt.wait = wait
    rt.init()
    assert not [c for c in k.names() if c.startswith("rmmod")]
    assert 'msg="driver in use, modules stay loaded"' in rt.log.stream.getvalue()  # type: ignore[attr-defined]
