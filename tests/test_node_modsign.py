"""Signed modules on the node (fake hosts, real files): the build's signature is appended to a module the node
linked only when the link gave exactly the gated bytes, whatever the node's linker; whole modules ship signed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gl_nvidia.node.decide import NodeError
from gl_nvidia.node.link import STAGING_DIR
from tests.fixtures.node import KERNEL, fake_link, fake_node, fake_signature, make_image, reseal

MODULES = f"/usr/lib/gl-nvidia/modules/{KERNEL}/proprietary"
BINARIES = "/usr/lib/gl-nvidia/binaries/proprietary"
OTHER_LINKER = "GNU ld (fake node binutils) 1.0"


def test_the_node_appends_the_builds_signature_to_the_module_it_linked(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)}, signed=True)
    rt, k = fake_node(tmp_path, "h100", image=image)
    k.linker = OTHER_LINKER  # another ld: the gated sha256 is compared all the same, the signature covers it
    rt.init()
    staging = rt.host.path(STAGING_DIR) / KERNEL / "proprietary"
    linked = fake_link(image.at(MODULES) / "nvidia.o", image.at(BINARIES) / "nv-kernel.o")
    assert (staging / "nvidia.ko").read_bytes() == linked + fake_signature("nvidia.ko")
    inserted = [c.split()[1] for c in k.names() if c.startswith("insmod")]
    assert inserted == [f"{staging}/nvidia.ko", f"{image.at(MODULES)}/nvidia-uvm.ko", f"{staging}/nvidia-modeset.ko"]
    assert (image.at(MODULES) / "nvidia-uvm.ko").read_bytes().endswith(fake_signature("nvidia-uvm.ko"))
    assert any('msg="module linked" module=nvidia ' in line and "sha256=\"the build's\" signed=yes" in line
               for line in rt.log.lines), rt.log.lines


def test_a_signed_module_whose_link_differs_from_the_gated_bytes_is_refused(tmp_path: Path) -> None:
    """Another ld: an unsigned module would be loaded on vermagic and srcversion; a signed one is not, since
    the build's signature does not cover what this node linked."""
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)}, signed=True)
    binary = image.at(BINARIES) / "nv-kernel.o"
    binary.write_bytes(binary.read_bytes().upper())  # another build's object, with a manifest that agrees
    image = reseal(image)
    rt, k = fake_node(tmp_path, "h100", image=image)
    k.linker = OTHER_LINKER
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message.startswith("nvidia.ko linked on this node (sha256 ")
    assert exc.value.message.endswith("is not the module the build gated and signed (sha256 "
                                      f"{image.record(KERNEL, 'proprietary', 'nvidia').sha256[:16]}); "  # type: ignore[union-attr]
                                      "its signature would not verify, refusing to load it")
    assert exc.value.hint is not None and "the build's linker" in exc.value.hint
    assert not any(c.startswith("insmod") for c in k.names())
    assert not list(rt.host.path(STAGING_DIR).rglob("*.ko*"))


def test_the_node_appends_the_builds_signature_to_the_module_it_rebuilt_from_its_patch(tmp_path: Path) -> None:
    """IBT kernels: the module rebuilt from the patch is the gated bytes by construction (checked), and
    gets the build's signature as a linked one does."""
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)}, patched=True, signed=True)
    rt, k = fake_node(tmp_path, "h100", image=image)
    rt.init()
    staging = rt.host.path(STAGING_DIR) / KERNEL / "proprietary"
    record = image.record(KERNEL, "proprietary", "nvidia")
    assert record is not None and record.signature is not None
    module = (staging / "nvidia.ko").read_bytes()
    assert module.endswith(fake_signature("nvidia.ko"))
    assert hashlib.sha256(module[:-len(fake_signature("nvidia.ko"))]).hexdigest() == record.sha256
    assert any('msg="module rebuilt from its patch" module=nvidia ' in line and "signed=yes" in line
               for line in rt.log.lines), rt.log.lines
    assert not [c for c in k.names() if c.split()[0] == "ld"]


@pytest.mark.parametrize("file", [f"{MODULES}/nvidia.ko.sig", f"{MODULES}/nvidia-uvm.ko"],
                         ids=["split-signature", "whole-signed-ko"])
def test_an_altered_signature_is_refused_before_anything_is_linked(tmp_path: Path, file: str) -> None:
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)}, signed=True)
    path = image.at(file)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(path.read_bytes().replace(b"pkcs7", b"PKCS7"))
    rt, k = fake_node(tmp_path, "h100", image=image)
    with pytest.raises(NodeError, match=rf"^{file} has sha256 [0-9a-f]{{64}}, but this image's manifest says "
                                        rf"{expected}; refusing to load nvidia(-uvm)?\.ko$"):
        rt.init()
    assert not [c for c in k.names() if c.startswith(("ld ", "insmod"))]
