"""`nvidia-driver init` as the GPU Operator, its validator and the container toolkit judge it (issue 24): the
startup probe's contract, the driver root and dev root they discover, Grace and NVSwitch/NVLink5 details.

NVIDIA's rules are test data (tests/data/node/operator-contract.json, restated from their Apache-2.0
sources); the checks below apply them to what the runtime leaves on the fake host.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from gl_nvidia.arches import ARCHES
from gl_nvidia.node import layout
from gl_nvidia.node.decide import NodeError
from gl_nvidia.node.host import Result
from gl_nvidia.node.imagefiles import Image
from gl_nvidia.node.runtime import DAEMONS_STATUS, READY_FILE, Runtime
from tests.fixtures.node import KERNEL, FakeKernel, fake_node, make_image, make_ko, reseal

CONTRACT = json.loads((Path(__file__).parent / "data/node/operator-contract.json").read_text())
FM_BINARIES = ("nvidia-smi", "nvidia-modprobe", "nvidia-persistenced", "nv-fabricmanager")
NVL_BINARIES = (*FM_BINARIES, "nvidia-fabricmanager-start.sh", "nvlsm")
FM_PID = "/var/run/nvidia-fabricmanager/nv-fabricmanager.pid"


def startup_probe(rt: Runtime, nvidia_smi_ok: bool = True) -> tuple[bool, str]:
    """The operator's driver startup probe, by its contract: nvidia loaded, the daemons' status (when the
    file exists) Ready, nvidia-smi passing; on success it writes the ready file."""
    probe = CONTRACT["startup_probe"]
    if not rt.host.exists(probe["module_loaded"]):
        return False, "NVIDIA kernel module not loaded"
    status = rt.host.read_opt(probe["status_file"])
    if status is not None and status.strip() != probe["ready_status"]:
        return False, f"NVIDIA driver daemons are not ready; Current status: {status.strip()}"
    if not nvidia_smi_ok:
        return False, "nvidia-smi failed"
    rt.host.write(probe["ready_file"], "GPU_DIRECT_RDMA_ENABLED: false\n")
    return True, ""


def test_the_probe_contract_matches_the_runtimes_paths() -> None:
    assert CONTRACT["startup_probe"]["status_file"] == DAEMONS_STATUS
    assert CONTRACT["startup_probe"]["ready_file"] == READY_FILE


def test_the_probe_fails_until_fabric_manager_runs_and_again_when_it_exits(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "hgx-h100", image=make_image(tmp_path / "img", binaries=FM_BINARIES))
    probes: list[tuple[bool, str]] = []

    def runner(argv: Sequence[str]) -> Result:
        if argv[0].endswith("/nv-fabricmanager"):  # modules loaded, persistenced up, fabric manager not yet
            probes.append(startup_probe(rt))
        return k(argv)

    rt.host.runner = runner
    waits: list[float | None] = []

    def wait(timeout: float | None) -> bool:
        waits.append(timeout)
        if len(waits) == 1:
            probes.append(startup_probe(rt))  # everything up
            k.pids.discard(int(rt.host.read(FM_PID)))  # fabric manager dies
            rt.host.write("/sys/module/nvidia/refcnt", "9\n")  # GPU jobs hold the driver: modules stay
        return False  # the monitor's period passed, no signal

    rt.wait = wait
    with pytest.raises(NodeError, match=r"^nv-fabricmanager exited while the driver was ready; "):
        rt.init()
    probes.append(startup_probe(rt))
    assert probes == [
        (False, "NVIDIA driver daemons are not ready; Current status: NotReady"),
        (True, ""),
        (False, "NVIDIA driver daemons are not ready; Current status: NotReady: nv-fabricmanager exited"),
    ]
    assert waits == [10.0]  # checked once a period
    assert not rt.host.exists(READY_FILE)  # the validator and the peermem sidecar stop seeing a ready driver
    assert not k.pids  # persistenced stopped with it: the restarted pod starts both


def test_a_daemon_that_does_not_stay_up_keeps_the_probe_failing(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", binaries=FM_BINARIES)
    daemon = image.at("/usr/bin/nv-fabricmanager")
    daemon.write_text("#!/bin/sh\nexit 0\n")  # exits at once, before writing its pid file
    rt, _ = fake_node(tmp_path, "hgx-h100", image=image)
    slept: list[float] = []
    rt.sleep = slept.append
    with pytest.raises(NodeError, match=r"^nv-fabricmanager started but is not running \(no live nv-fabricmanager of "
                                        r"this image in /var/run/nvidia-fabricmanager/nv-fabricmanager.pid\)$"):
        rt.init()
    assert rt.host.read(DAEMONS_STATUS) == "NotReady\n"
    assert sum(slept) == pytest.approx(5.0)  # it had 5 s to write its pid file


def test_nvlink5_ready_only_with_nvlsm_and_fabric_manager(tmp_path: Path) -> None:
    rt, _ = fake_node(tmp_path, "nvl-b200", image=make_image(tmp_path / "img", version="570.195.03",
                                                              binaries=NVL_BINARIES))
    seen: list[object] = []
    rt.wait = lambda timeout: seen.extend([startup_probe(rt), rt.host.read(DAEMONS_STATUS)]) or True
    rt.init()
    assert seen == [(True, ""), "Ready\n"]
    assert any("driver ready" in line and "daemons=nvidia-persistenced,nvlsm,nv-fabricmanager" in line
               for line in rt.log.lines)


# ------------------------------------------------------------------ driver root and dev root


def _find(root: Path, name: str, dirs: list[str]) -> Path | None:
    for d in dirs:
        candidate = root / d.lstrip("/") / name
        if candidate.exists():
            return candidate.resolve()
    return None


def test_the_validator_and_toolkit_find_the_driver_and_its_device_nodes_in_the_driver_root(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img")
    lib = image.at("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.535.309.01")
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    (lib.parent / "libnvidia-ml.so.1").symlink_to(lib.name)
    image.at("/dev").mkdir()  # the container's /dev (a mount the runtime always makes)
    rt, k = fake_node(tmp_path, "hgx-h100", image=image)  # 2 GPUs, 1 NVSwitch
    (image.root / "usr/bin/nv-fabricmanager").write_text((image.root / "usr/bin/nvidia-persistenced").read_text())
    (image.root / "usr/share/nvidia/nvswitch").mkdir(parents=True)
    (image.root / "usr/share/nvidia/nvswitch/fabricmanager.cfg").write_text("FABRIC_MODE=0\n")
    (image.root / "usr/bin/nv-fabricmanager").chmod(0o755)
    seen: dict[str, object] = {}

    def wait(timeout: float | None) -> bool:
        # The host sees the container's root at /run/nvidia/driver (mount --rbind /): the image root here.
        driver_root = rt.image.root
        rules = CONTRACT["validator_driver_root"]
        seen["libnvidia-ml"] = _find(driver_root, "libnvidia-ml.so.1", rules["libnvidia-ml.so.1"]) == lib
        seen["nvidia-smi"] = _find(driver_root, "nvidia-smi", rules["nvidia-smi"]) is not None
        seen["toolkit lib"] = _find(driver_root, "libnvidia-ml.so.1", CONTRACT["toolkit_library_search"]) == lib
        dev_root = driver_root if (driver_root / "dev").is_dir() else Path("/")
        seen["dev root"] = dev_root == driver_root
        wanted = [*CONTRACT["toolkit_control_devices"],
                  *(CONTRACT["toolkit_gpu_device"].format(minor=n) for n in range(2))]
        seen["missing nodes"] = [d for d in wanted if not (dev_root / d.lstrip("/")).exists()]
        seen["nvswitch nodes"] = sorted(p.name for p in (dev_root / "dev").glob("nvidia-nv*"))
        return True

    rt.wait = wait
    rt.init()
    assert seen == {"libnvidia-ml": True, "nvidia-smi": True, "toolkit lib": True, "dev root": True,
                    "missing nodes": [], "nvswitch nodes": ["nvidia-nvlink", "nvidia-nvswitch0", "nvidia-nvswitchctl"]}
    calls = k.names()
    # the host's /dev gets them too, for what runs there
    assert "nsenter -t 1 -m -- /run/nvidia/driver/usr/bin/nvidia-modprobe -u -m -c 0 -c 1" in calls
    assert f"mount --rbind {image.root} {rt.host.path('/run/nvidia/driver')}" in calls


# ------------------------------------------------------------------ Grace


def _grace_node(tmp_path: Path, device: int, machine: str = "aarch64", version: str = "580.95.05",
                conf: str | None = None) -> tuple[Runtime, FakeKernel]:
    image = make_image(tmp_path / "img", version=version)
    manifest = image.at(layout.MANIFEST)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "arch": {a.machine: a.debian for a in ARCHES.values()}[machine]}))
    rt, k = fake_node(tmp_path, "h100", image=Image.load(image.root))
    rt.host.write("/proc/sys/kernel/arch", machine + "\n")
    for gpu in ("0000:1b:00.0", "0000:43:00.0"):
        rt.host.write(f"/sys/bus/pci/devices/{gpu}/device", f"0x{device:04x}\n")
    if conf is not None:
        rt.host.makedirs("/drivers")
        rt.host.write("/drivers/nvidia.conf", conf)
    return rt, k


def _nvidia_params(k: FakeKernel) -> list[str]:
    insmod = next(c for c in k.calls if c[0] == "insmod" and Path(c[1]).name == "nvidia.ko")
    return list(insmod[2:])


@pytest.mark.parametrize(("device", "machine", "grace"), [
    (0x2342, "aarch64", 2),  # GH200 120GB
    (0x2348, "aarch64", 2),  # GH200 144GB HBM3e
    (0x2941, "aarch64", 2),  # GB200
    (0x31C2, "aarch64", 2),  # GB300
    (0x2331, "aarch64", 0),  # H100 PCIe in an arm64 server: not coherent
    (0x2330, "x86_64", 0),  # H100 SXM on x86
])
def test_coherent_memory_default_on_580_and_grace_detection(tmp_path: Path, device: int, machine: str,
                                                            grace: int) -> None:
    rt, k = _grace_node(tmp_path, device, machine)
    assert rt.dry_run() is not None
    assert any(f'msg="dry-run: grace-coupled gpus" count={grace}' in line for line in rt.log.lines)
    rt.init()
    assert _nvidia_params(k) == ["NVreg_CoherentGPUMemoryMode=driver"]  # NVIDIA sets it on every R580+ node
    where = f"{grace} Grace-coupled GPU(s)" if grace else "no Grace-coupled GPU"
    assert any("coherent GPU memory" in line and where in line for line in rt.log.lines)


def test_coherent_memory_mode_from_nvidia_conf_wins(tmp_path: Path) -> None:
    rt, k = _grace_node(tmp_path, 0x2342, conf="NVreg_CoherentGPUMemoryMode=numa\n")
    rt.init()
    assert _nvidia_params(k) == ["NVreg_CoherentGPUMemoryMode=numa"]


def test_grace_on_a_branch_without_the_parameter_warns(tmp_path: Path) -> None:
    rt, k = _grace_node(tmp_path, 0x2342, version="570.195.03")
    rt.init()
    assert _nvidia_params(k) == []
    assert any("level=warn" in line and "has no NVreg_CoherentGPUMemoryMode" in line
               and "gpus=0000:1b:00.0,0000:43:00.0" in line for line in rt.log.lines)


# ------------------------------------------------------------------ fabric manager, NVLink5


def test_nvfm_config_overrides_reach_fabric_manager_not_the_image(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", binaries=FM_BINARIES)
    original = image.at("/usr/share/nvidia/nvswitch/fabricmanager.cfg").read_text()
    rt, k = fake_node(tmp_path, "hgx-h100", image=image, NVFM_CONFIG_FABRIC_MODE="1",
                      NVFM_CONFIG_LOG_LEVEL="2", NVFM_CONFIG_FM_STAY_RESIDENT_ON_FAILURES="1")
    seen: list[str] = []
    rt.wait = lambda timeout: seen.append(rt.host.read("/run/gl-nvidia/fabricmanager.cfg")) or True
    rt.init()
    assert seen == ["LOG_LEVEL=2\nLOG_FILE_NAME=/var/log/fabricmanager.log\nDAEMONIZE=1\nFABRIC_MODE=1\n"
                    "FM_STAY_RESIDENT_ON_FAILURES=1\n"]
    assert f"{image.root}/usr/bin/nv-fabricmanager -c {rt.host.path('/run/gl-nvidia/fabricmanager.cfg')}" in k.names()
    assert image.at("/usr/share/nvidia/nvswitch/fabricmanager.cfg").read_text() == original
    assert not any(c.endswith("nvidia-smi -r") for c in k.names())  # NVIDIA resets only on NVLink5


def test_nvlink5_fabric_mode_1_resets_the_gpus_after_fabric_manager(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", version="570.195.03", binaries=NVL_BINARIES)
    rt, k = fake_node(tmp_path, "nvl-b200", image=image, NVFM_CONFIG_FABRIC_MODE="1")
    rt.init()
    calls = k.names()
    start = next(i for i, c in enumerate(calls) if "nvidia-fabricmanager-start.sh" in c)
    assert f"--fm-config-file {rt.host.path('/run/gl-nvidia/fabricmanager.cfg')}" in calls[start]
    assert calls[start + 1] == f"{image.root}/usr/bin/nvidia-smi -r"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("NVFM_CONFIG_", "1", r"^'NVFM_CONFIG_' does not name a fabric manager setting"),
    ("NVFM_CONFIG_fabric_mode", "1", r"^'NVFM_CONFIG_fabric_mode' does not name a fabric manager setting"),
    ("NVFM_CONFIG_LOG_LEVEL", "4\nFABRIC_MODE=2", r"^NVFM_CONFIG_LOG_LEVEL holds a line break"),
])
def test_a_bad_nvfm_setting_is_one_line_before_anything_starts(tmp_path: Path, name: str, value: str,
                                                              message: str) -> None:
    rt, k = fake_node(tmp_path, "hgx-h100", image=make_image(tmp_path / "img", binaries=FM_BINARIES), **{name: value})
    with pytest.raises(NodeError, match=message):
        rt.init()
    assert not any(c.startswith(("insmod", "mount")) for c in k.names())


def test_nvlink5_waits_for_mlx5_core_then_loads_ib_umad(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "nvl-b200", image=make_image(tmp_path / "img", version="570.195.03",
                                                              binaries=NVL_BINARIES))
    modules = rt.host.path("/proc/modules")
    modules.write_text("ib_core 73728 0 - Live 0x0\n")  # the network operator has not loaded mlx5_core yet
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            modules.write_text("mlx5_core 2000000 0 - Live 0x0\n" + modules.read_text())

    rt.sleep = sleep
    rt.init()
    assert sleeps == [10.0, 10.0, 10.0]
    waiting = [line for line in rt.log.lines if "waiting for the kernel modules the NVLink subnet manager" in line]
    assert len(waiting) == 3 and "missing=mlx5_core,ib_umad waited_s=20 limit_s=300" in waiting[-1]
    assert "nsenter -t 1 -m -- modprobe ib_umad" in k.names()
    assert any("nvidia-fabricmanager-start.sh" in c for c in k.names())


def test_nvlink5_gives_up_after_the_bound_and_undoes_everything(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "nvl-b200", image=make_image(tmp_path / "img", version="570.195.03",
                                                              binaries=NVL_BINARIES))
    rt.host.path("/proc/modules").write_text("")
    slept: list[float] = []
    rt.sleep = slept.append
    with pytest.raises(NodeError, match=r"mlx5_core and ib_umad did not load within 300 s"):
        rt.init()
    assert sum(slept) == 300
    assert not k.mounts and not k.pids


# ------------------------------------------------------------------ what NVIDIA loads besides the driver


def test_i2c_and_ipmi_load_before_the_driver_and_their_absence_is_a_warning(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100")
    rt.init()
    calls = k.names()
    support = "nsenter -t 1 -m -- modprobe -a i2c_core ipmi_msghandler ipmi_devintf"
    assert calls.index(support) < next(i for i, c in enumerate(calls) if c.startswith("insmod"))
    rt, k = fake_node(tmp_path / "2", "h100")
    k.fail["modprobe"] = Result(1, "", "modprobe: FATAL: Module ipmi_devintf not found in directory /lib/modules/"
                                       + KERNEL)
    rt.init()
    assert any(c.startswith("insmod") for c in k.names())
    assert any("level=warn" in line and "i2c/ipmi" in line and "ipmi_devintf not found" in line for line in rt.log.lines)


def test_the_gpus_iommu_groups_go_to_identity_before_the_driver_as_the_seed_installer_sets_them(tmp_path: Path) -> None:
    rt, _ = fake_node(tmp_path, "h100")  # no GPUDirect RDMA
    group = rt.host.path("/sys/kernel/iommu_groups/12")
    group.mkdir(parents=True)
    (group / "type").write_text("DMA\n")
    rt.host.path("/sys/bus/pci/devices/0000:1b:00.0/iommu_group").symlink_to("../../../kernel/iommu_groups/12")
    seen: list[str] = []
    runner = rt.host.runner
    rt.host.runner = lambda argv: (seen.append(rt.host.read("/sys/kernel/iommu_groups/12/type"))
                                   if argv[0] == "insmod" and not seen else None) or runner(argv)
    rt.init()
    assert seen == ["identity"]


# ------------------------------------------------------------------ GPUDirect RDMA


def _inbox_peermem_image(tmp_path: Path) -> Image:
    """nvidia-peermem as a Debian kernel builds it: against the inbox RDMA stack, a stub without ib_core."""
    image = make_image(tmp_path / "img", version="570.195.03", kernels={KERNEL: ("open",)})
    ko = image.ko(KERNEL, "open", "nvidia-peermem")
    make_ko(ko, version="570.195.03", depends="nvidia", srcversion="open-nvidia-peermem",
            vermagic=f"{KERNEL} SMP mod_unload modversions ")
    return reseal(image)


def test_an_inbox_nvidia_peermem_is_not_loaded_and_init_names_dma_buf(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "hgx-h100", image=_inbox_peermem_image(tmp_path), GPU_DIRECT_RDMA_ENABLED="true",
                      USE_HOST_MOFED="true")
    (rt.image.root / "usr/bin/nv-fabricmanager").write_text((rt.image.root / "usr/bin/nvidia-persistenced").read_text())
    rt.image.at("/usr/share/nvidia/nvswitch").mkdir(parents=True)
    rt.image.at("/usr/share/nvidia/nvswitch/fabricmanager.cfg").write_text("FABRIC_MODE=0\n")
    rt.image.at("/usr/bin/nv-fabricmanager").chmod(0o755)
    rt.init()
    assert [Path(c[1]).name for c in k.calls if c[0] == "insmod"] == ["nvidia.ko", "nvidia-uvm.ko", "nvidia-modeset.ko"]
    assert any("level=warn" in line and "no peer-memory API" in line and "DMA-BUF" in line for line in rt.log.lines)


def test_the_peermem_sidecar_refuses_an_inbox_nvidia_peermem_in_one_line(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "hgx-h100", image=_inbox_peermem_image(tmp_path), USE_HOST_MOFED="true")
    rt.host.write(READY_FILE, "ready")  # the driver container is ready: init loaded our open nvidia
    rt.host.write("/proc/modules", "nvidia 1 0 - Live 0x0\nmlx5_core 1 0 - Live 0x0\n")
    rt.host.makedirs("/sys/module/nvidia")
    rt.host.write("/sys/module/nvidia/srcversion", "open-nvidia\n")
    with pytest.raises(NodeError, match=r"^nvidia-peermem in this image is built against the kernel's inbox RDMA "
                                        r"stack, which has no peer-memory API") as exc:
        rt.reload_peermem()
    assert exc.value.hint is not None and "driver.rdma.enabled=false" in exc.value.hint
    assert not any(c[0] == "insmod" for c in k.calls)
