"""Pure decisions of the node runtime: module type, kernel match, versions, fast path, /drivers/*.conf."""

from __future__ import annotations

import pytest

from gl_nvidia.node import decide
from gl_nvidia.node.decide import Node, NodeError, PciDevice

H100 = PciDevice("0000:1b:00.0", 0x10DE, 0x2330, 0x030200)
V100 = PciDevice("0000:3b:00.0", 0x10DE, 0x1DB4, 0x030200)
T4 = PciDevice("0000:00:04.0", 0x10DE, 0x1EB8, 0x030200)
BOTH = ["open", "proprietary"]


@pytest.mark.parametrize(
    ("device", "arch"),
    [(0x2330, "Hopper"), (0x1DB4, "Volta"), (0x1EB8, "Turing"), (0x20B0, "Ampere"), (0x2204, "Ampere"),
     (0x2684, "Ada Lovelace"), (0x2901, "Blackwell"), (0x15F7, "Pascal"), (0x13BB, "Maxwell")],
)
def test_architecture_names(device: int, arch: str) -> None:
    assert decide.architecture(device) == arch


def test_auto_picks_open_from_560_on_turing_and_newer() -> None:
    c = decide.choose_module_type("auto", "570", (H100, T4), BOTH)
    assert c.module_type == "open"
    assert "570 >= 560" in c.reason


def test_auto_picks_proprietary_below_560() -> None:
    c = decide.choose_module_type("", "535", (H100,), BOTH)
    assert (c.module_type, c.reason) == ("proprietary", "auto: branch 535 < 560 defaults to proprietary")


def test_auto_picks_proprietary_with_any_pre_turing_gpu() -> None:
    c = decide.choose_module_type("auto", "570", (H100, V100), BOTH)
    assert c.module_type == "proprietary"
    assert "pre-Turing GPU is present (0000:3b:00.0 [10de:1db4] Volta)" in c.reason


def test_auto_falls_back_to_open_when_the_image_has_only_open() -> None:
    c = decide.choose_module_type("auto", "535", (H100,), ["open"])
    assert c.module_type == "open"
    assert "holds only open" in c.reason


def test_auto_cannot_fall_back_to_open_on_pre_turing() -> None:
    with pytest.raises(NodeError, match=r"chose proprietary .* holds no proprietary modules for this kernel \(it holds: open\)"):
        decide.choose_module_type("auto", "535", (V100,), ["open"])


def test_explicit_open_on_pre_turing_is_refused_with_the_reason() -> None:
    with pytest.raises(NodeError) as exc:
        decide.choose_module_type("open", "570", (H100, V100), BOTH)
    assert exc.value.message == (
        "KERNEL_MODULE_TYPE=open, but the open kernel modules need Turing or newer (PCI device id >= 0x1e00) "
        "and this node has 0000:3b:00.0 [10de:1db4] Volta"
    )


def test_explicit_type_missing_from_image() -> None:
    with pytest.raises(NodeError, match=r"KERNEL_MODULE_TYPE=open, but this image holds no open modules .*it holds: proprietary"):
        decide.choose_module_type("open", "535", (H100,), ["proprietary"])


def test_explicit_proprietary_is_honoured() -> None:
    assert decide.choose_module_type("Proprietary", "570", (H100,), BOTH).module_type == "proprietary"


def test_unknown_module_type() -> None:
    with pytest.raises(NodeError, match=r"KERNEL_MODULE_TYPE='closed' is not one of auto, open, proprietary"):
        decide.choose_module_type("closed", "570", (H100,), BOTH)


def test_no_kernel_match_names_kernel_held_kernels_and_tag() -> None:
    node = Node("6.1.0-47-cloud-amd64", (H100,), os_release={"ID": "gardenlinux", "VERSION_ID": "1877.3"})
    with pytest.raises(NodeError) as exc:
        decide.select_kernel(node, ["6.1.0-56-cloud-amd64", "6.12.72-cloud-amd64"], "535", "amd64")
    assert exc.value.message == (
        "no modules for kernel 6.1.0-47-cloud-amd64 in this image (it holds 6.1.0-56-cloud-amd64, "
        "6.12.72-cloud-amd64); the node needs driver:535-6.1.0-47-cloud-amd64-gardenlinux0"
    )


def test_no_kernel_match_names_the_tag_a_plus_kernel_is_published_under() -> None:
    node = Node("6.12.117+deb12-cloud-amd64", (), os_release={"ID": "debian", "VERSION_ID": "12"})
    with pytest.raises(NodeError, match=r"the node needs driver:535-6\.12\.117_deb12-cloud-amd64-debian12$"):
        decide.select_kernel(node, ["6.12.115+deb12-cloud-amd64"], "535", "amd64")


def test_no_kernel_match_on_debian_uses_its_version_id() -> None:
    node = Node("6.1.0-47-cloud-amd64", (), os_release={"ID": "debian", "VERSION_ID": "12"})
    with pytest.raises(NodeError, match=r"it holds none\); the node needs driver:535-6.1.0-47-cloud-amd64-debian12"):
        decide.select_kernel(node, [], "535", "amd64")


def test_an_image_of_another_arch_is_refused_before_its_kernels_are_looked_at() -> None:
    """An amd64 image on an arm64 node: one line naming both arches and the image the node needs."""
    node = Node("6.1.0-56-cloud-arm64", (H100,), os_release={"ID": "debian", "VERSION_ID": "12"}, machine="aarch64")
    with pytest.raises(NodeError) as exc:
        decide.select_kernel(node, ["6.1.0-56-cloud-arm64"], "535", "amd64")
    assert exc.value.message == (
        "this image is for amd64, but this node's kernel 6.1.0-56-cloud-arm64 is arm64 (aarch64); "
        "the node needs driver:535-6.1.0-56-cloud-arm64-debian12"
    )
    assert decide.select_kernel(node, ["6.1.0-56-cloud-arm64"], "535", "arm64") == "6.1.0-56-cloud-arm64"


def test_foreign_version_is_refused_naming_both() -> None:
    decide.check_loaded(None, "535.309.01")
    decide.check_loaded("535.309.01", "535.309.01")
    with pytest.raises(NodeError, match=r"^nvidia 550.54.15 is already loaded on this node; this image carries 535.309.01$"):
        decide.check_loaded("550.54.15", "535.309.01")


@pytest.mark.parametrize(
    ("loaded", "digest", "state", "fast"),
    [
        ("535.309.01", "abc", "abc\n", True),
        ("535.309.01", "abc", "old\n", False),
        ("535.309.01", "abc", None, False),
        ("535.309.01", "", "", False),  # no digest from the operator: always a full start
        (None, "abc", "abc", False),  # state left behind, modules gone (reboot): reload
        ("550.54.15", "abc", "abc", False),
    ],
)
def test_fast_path(loaded: str | None, digest: str, state: str | None, fast: bool) -> None:
    assert decide.fast_path(loaded, "535.309.01", digest, state) is fast


def test_module_conf_skips_comments_and_blank_lines() -> None:
    text = "# GSP on\n\nNVreg_EnableGpuFirmware=1  NVreg_OpenRmEnableUnsupportedGpus=1\nNVreg_RegistryDwords=\"A=1;B=2\" # why\n"
    params, problems = decide.parse_module_conf("nvidia", text, "/drivers/nvidia.conf")
    assert params == ("NVreg_EnableGpuFirmware=1", "NVreg_OpenRmEnableUnsupportedGpus=1", "NVreg_RegistryDwords=A=1;B=2")
    assert problems == ()


def test_module_conf_reports_malformed_lines_with_file_and_line() -> None:
    text = "uvm_perf_prefetch_enable=0\n=1\nfoo bar-baz=1\nquoted=\"open\n"
    params, problems = decide.parse_module_conf("nvidia-uvm", text, "/drivers/nvidia-uvm.conf")
    assert params == ("uvm_perf_prefetch_enable=0",)
    assert problems == (
        "/drivers/nvidia-uvm.conf:2: '=1' is not a nvidia-uvm parameter (expected name=value)",
        "/drivers/nvidia-uvm.conf:3: 'bar-baz=1' is not a nvidia-uvm parameter (expected name=value)",
        "/drivers/nvidia-uvm.conf:4: no closing quotation, or a backslash at the end",
    )


@pytest.mark.parametrize(
    ("current", "params", "action"),
    [("\n", (), "set"), ("/run/nvidia/driver/lib/firmware", (), "keep"), ("/opt/fw\n", (), "retain"),
     ("", ("NVreg_EnableGpuFirmware=0",), "skip")],
)
def test_firmware_path_action(current: str, params: tuple[str, ...], action: str) -> None:
    assert decide.firmware_path_action(current, "/run/nvidia/driver/lib/firmware", params) == action


def test_peermem_only_with_rdma_host_mofed_and_a_mellanox_nic() -> None:
    cx7 = PciDevice("0000:0c:00.0", 0x15B3, 0x1021, 0x020000)
    assert decide.modules_to_load(Node("k", (H100, cx7)), True, True)[-1] == "nvidia-peermem"
    assert "nvidia-peermem" not in decide.modules_to_load(Node("k", (H100, cx7)), False, True)
    assert "nvidia-peermem" not in decide.modules_to_load(Node("k", (H100,)), True, True)
    # MOFED in a container: the sidecar (reload_nvidia_peermem) loads it when MOFED is ready
    assert "nvidia-peermem" not in decide.modules_to_load(Node("k", (H100, cx7)), True, False)


@pytest.mark.parametrize(
    ("refcnt", "busy"),
    [({"nvidia": 2, "nvidia-uvm": 0, "nvidia-modeset": 0}, False),
     ({"nvidia": 3, "nvidia-uvm": 0, "nvidia-modeset": 0}, True),  # a process holds /dev/nvidia*
     ({"nvidia": 2, "nvidia-uvm": 1, "nvidia-modeset": 0}, True),  # a CUDA process holds uvm
     ({"nvidia": 0}, False)],
)
def test_in_use(refcnt: dict[str, int], busy: bool) -> None:
    assert decide.in_use(refcnt) is busy
