"""`nvidia-driver init` and friends against fake host trees (tests/data/node): every path and its message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gl_nvidia.node import layout
from gl_nvidia.node.decide import NodeError
from gl_nvidia.node.driverroot import DRIVER_ROOT
from gl_nvidia.node.host import Result
from gl_nvidia.node.imagefiles import PULL_AGAIN, Image, sha256_file
from gl_nvidia.node.link import STAGING_DIR
from gl_nvidia.node.runtime import READY_FILE, STATE_FILE, Runtime
from tests.fixtures.node import (
    BUILD_LINKER,
    KERNEL,
    FakeHost,
    FakeKernel,
    fake_node,
    make_image,
    make_ko,
    reseal,
)

DIGEST = "2f9c1b7d"


def _index(calls: list[str], prefix: str) -> int:
    return next(i for i, c in enumerate(calls) if c.startswith(prefix))


def test_h100_full_start_and_sigterm(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100", DRIVER_CONFIG_DIGEST=DIGEST)
    host, driver_root = rt.host, str(rt.host.path(DRIVER_ROOT))
    seen: dict[str, object] = {}

    def wait(timeout: float | None) -> bool:  # the state while "waiting for SIGTERM"
        seen["mounted"] = driver_root in k.mounts
        seen["state"] = host.read_opt(STATE_FILE)
        seen["fw"] = host.read("/sys/module/firmware_class/parameters/path")
        seen["loaded"] = host.read("/proc/modules")
        host.write(READY_FILE, "ready")  # what the operator's startup probe writes
        return True

    rt.wait = wait
    rt.init()
    calls = k.names()
    assert seen == {
        "mounted": True,
        "state": DIGEST + "\n",
        "fw": "/run/nvidia/driver/lib/firmware",
        "loaded": seen["loaded"],
    }
    assert [line.split()[0] for line in str(seen["loaded"]).splitlines()][:3] == ["nvidia_modeset", "nvidia_uvm", "nvidia"]
    # the driver root (and its GSP firmware) is visible before the kernel initialises the GPUs
    assert _index(calls, "mount --rbind") < _index(calls, "insmod")
    assert calls[_index(calls, "mount --rbind")] == f"mount --rbind {rt.image.root} {driver_root}"
    inserted = [Path(c.split()[1]) for c in calls if c.startswith("insmod")]
    assert [p.name for p in inserted] == ["nvidia.ko", "nvidia-uvm.ko", "nvidia-modeset.ko"]
    assert {p.parent.name for p in inserted} == {"proprietary"}  # branch 535: auto -> proprietary
    assert "nsenter -t 1 -m -- /run/nvidia/driver/usr/bin/nvidia-modprobe -u -m -c 0 -c 1" in calls
    assert f"{rt.image.root}/usr/bin/nvidia-persistenced --persistence-mode" in calls
    # teardown: daemon stopped, modules unloaded, mount gone, ready and state files removed
    assert "rmmod nvidia-modeset nvidia-uvm nvidia" in calls
    assert not k.pids and not k.mounts
    assert not host.exists(READY_FILE) and not host.exists(STATE_FILE)
    assert "nvidia" not in host.read("/proc/modules")
    assert any("msg=\"driver ready, waiting for SIGTERM\"" in line and "ts=" in line for line in rt.log.lines)


def test_branch_570_on_h100_loads_open(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100", image=make_image(tmp_path / "img", version="570.195.03"))
    rt.init()
    assert {Path(c.split()[1]).parent.name for c in k.names() if c.startswith("insmod")} == {"open"}


def test_v100_explicit_open_is_refused_before_touching_anything(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "v100", KERNEL_MODULE_TYPE="open")
    with pytest.raises(NodeError, match=r"open kernel modules need Turing or newer .* 0000:3b:00.0 \[10de:1db4\] Volta"):
        rt.init()
    assert not [c for c in k.names() if c.split()[0] in ("insmod", "mount", "nsenter")]


def test_mixed_node_570_auto_stays_proprietary(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "mixed", image=make_image(tmp_path / "img", version="570.195.03"))
    rt.init()
    assert {Path(c.split()[1]).parent.name for c in k.names() if c.startswith("insmod")} == {"proprietary"}
    assert any("pre-Turing GPU is present" in line for line in rt.log.lines)


def test_no_gpu_stops_before_the_kernel(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "no-gpu")
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message.startswith("no NVIDIA GPU on this node (no PCI device with vendor 0x10de")
    assert exc.value.message.endswith(f"nothing loaded into kernel {KERNEL}")
    assert k.calls == []


def test_foreign_driver_is_refused_naming_both_versions(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "foreign-driver", DRIVER_CONFIG_DIGEST=DIGEST)
    with pytest.raises(NodeError, match=r"^nvidia 550.54.15 is already loaded on this node; this image carries 535.309.01$"):
        rt.init()
    assert k.calls == []
    assert "nvidia 73728" in rt.host.read("/proc/modules")  # left alone


def test_kernel_without_modules_is_refused_naming_the_tag(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", kernels={"6.1.0-47-cloud-amd64": ("proprietary",)})
    rt, k = fake_node(tmp_path, "h100", image=image)
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message == (
        f"no modules for kernel {KERNEL} in this image (it holds 6.1.0-47-cloud-amd64); "
        f"the node needs driver:535-{KERNEL}-gardenlinux0"
    )
    assert k.calls == []


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    from gl_nvidia.node.imagefiles import Image

    with pytest.raises(NodeError, match=r"this image has no readable driver manifest at /usr/share/gl-nvidia/manifest.json"):
        Image.load(tmp_path)


def _loaded_by_us(tmp_path: Path) -> FakeKernel:
    """A node where an earlier container loaded our driver and wrote the state file."""
    rt, k = fake_node(tmp_path, "h100", DRIVER_CONFIG_DIGEST=DIGEST)
    rt.wait = lambda timeout: True
    rt.teardown = lambda failed=False: None  # type: ignore[method-assign]  # the old container died
    rt.init()
    assert isinstance(rt.host, FakeHost)
    rt.host.exit()
    k.calls.clear()
    k.mounts.clear()
    return k


def _attach(rt: Runtime, k: FakeKernel) -> None:
    """Run `rt` on the node (fake host tree and kernel) that `k` is."""
    assert isinstance(rt.host, FakeHost)
    rt.host.root, rt.host.runner, rt.host.kernel = k.root, k, k


def test_fast_path_keeps_modules_and_sigterm_leaves_nothing_behind(tmp_path: Path) -> None:
    k = _loaded_by_us(tmp_path / "a")
    rt, _ = fake_node(tmp_path / "b", "h100", DRIVER_CONFIG_DIGEST=DIGEST)
    _attach(rt, k)
    # a GPU job holds /dev/nvidia0 on the host
    (k.root / "sys/module/nvidia/refcnt").write_text("3\n")
    job = k.root / "proc/4242"
    (job / "fd").mkdir(parents=True)
    (job / "comm").write_text("python3\n")
    (job / "fd/7").symlink_to("/dev/nvidia0")

    def wait(timeout: float | None) -> bool:
        rt.host.write(READY_FILE, "ready")
        return True

    rt.wait = wait
    rt.init()
    calls = k.names()
    assert not [c for c in calls if c.startswith(("insmod", "rmmod"))]
    assert any("fast path" in line for line in rt.log.lines)
    assert any("driver in use, modules stay loaded" in line and "pid 4242 (python3)" in line for line in rt.log.lines)
    assert not k.mounts
    assert not rt.host.exists(READY_FILE)
    assert rt.host.read(STATE_FILE) == DIGEST + "\n"  # modules stay loaded: the next start takes the fast path


def test_changed_digest_reloads_when_idle(tmp_path: Path) -> None:
    k = _loaded_by_us(tmp_path / "a")
    rt, _ = fake_node(tmp_path / "b", "h100", DRIVER_CONFIG_DIGEST="new")
    _attach(rt, k)
    rt.init()
    calls = k.names()
    assert _index(calls, "rmmod nvidia-modeset nvidia-uvm nvidia") < _index(calls, "insmod")


def test_a_damaged_image_on_the_reload_path_keeps_the_driver_the_node_runs(tmp_path: Path) -> None:
    """Reloading first unloads the old modules: a new image whose files fail their manifest check must
    be refused before that, or the node is left with no driver at all."""
    k = _loaded_by_us(tmp_path / "a")
    rt, _ = fake_node(tmp_path / "b", "h100", DRIVER_CONFIG_DIGEST="new")
    _attach(rt, k)
    with rt.image.ko(KERNEL, "proprietary", "nvidia-uvm").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(NodeError, match=r"nvidia-uvm\.ko has sha256 [0-9a-f]{64}, but this image's manifest says"):
        rt.init()
    assert not [c for c in k.names() if c.startswith(("insmod", "rmmod", "mount "))]
    assert "nvidia_uvm" in (k.root / "proc/modules").read_text()


def test_changed_digest_in_use_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    k = _loaded_by_us(tmp_path / "a")
    (k.root / "sys/module/nvidia_uvm/refcnt").write_text("1\n")
    rt, _ = fake_node(tmp_path / "b", "h100", DRIVER_CONFIG_DIGEST="new")
    _attach(rt, k)
    with pytest.raises(NodeError, match=r"^nvidia 535.309.01 is loaded with another configuration and in use; cannot reload it$"):
        rt.init()
    assert not [c for c in k.names() if c.startswith(("insmod", "rmmod", "mount "))]


def test_insmod_failure_reports_the_kernel_and_undoes_everything(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100", DRIVER_CONFIG_DIGEST=DIGEST)
    k.fail["insmod:nvidia_uvm"] = Result(1, "", "insmod: ERROR: could not insert module nvidia-uvm.ko: Invalid module format")
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message.startswith("the kernel refused nvidia-uvm.ko: insmod: ERROR: could not insert module nvidia-uvm.ko: Invalid module format; kernel log: ")
    assert "nvidia_uvm: forced failure" in exc.value.message
    assert "rmmod nvidia" in k.names()  # the nvidia.ko this run inserted is taken out again
    assert not k.mounts
    assert not rt.host.exists(STATE_FILE) and not rt.host.exists(READY_FILE)


def test_a_ready_file_that_cannot_be_removed_does_not_hide_the_insmod_error(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100", DRIVER_CONFIG_DIGEST=DIGEST)
    rt.host.path(READY_FILE).mkdir(parents=True)  # unlink fails (EISDIR) as it would on a read-only mount
    k.fail["insmod:nvidia_uvm"] = Result(1, "", "insmod: ERROR: could not insert module nvidia-uvm.ko: Invalid module format")
    with pytest.raises(NodeError, match=r"^the kernel refused nvidia-uvm\.ko: insmod: ERROR: could not insert"):
        rt.init()
    assert "rmmod nvidia" in k.names() and not k.mounts  # the other steps still ran
    assert any("teardown: could not remove the ready file" in line and "Is a directory" in line for line in rt.log.lines)


def test_teardown_after_sigterm_does_not_raise_when_the_ready_file_cannot_be_removed(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100")
    rt.host.path(READY_FILE).mkdir(parents=True)
    rt.init()  # SIGTERM (the fake wait) and teardown: returns, so the container exits 0
    assert "nvidia" not in rt.host.read("/proc/modules") and not k.mounts
    assert any("teardown: could not remove the ready file" in line for line in rt.log.lines)
    assert any("teardown done" in line for line in rt.log.lines)


def test_a_failed_link_leaves_no_temp_file_and_loads_nothing(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100")
    k.fail["ld"] = Result(1, "", "ld: final link failed: No space left on device")
    with pytest.raises(NodeError, match=rf"^could not link nvidia\.ko for kernel {KERNEL} from its parts: "
                                        r"ld: final link failed: No space left on device$"):
        rt.init()
    assert any(c.startswith("ld ") for c in k.names())
    assert not [p for p in rt.host.path(STAGING_DIR).rglob("*") if p.is_file()]
    assert not [c for c in k.names() if c.startswith("insmod")]


def test_malformed_module_conf_stops_before_loading(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100")
    (rt.host.path("/drivers")).mkdir()
    rt.host.path("/drivers/nvidia.conf").write_text("# ok\nNVreg_EnableGpuFirmware=0\nNVreg_X = 1\n")
    with pytest.raises(NodeError, match=r"^malformed module parameters: /drivers/nvidia.conf:3: '=' is not a nvidia parameter"):
        rt.init()
    assert not [c for c in k.names() if c.startswith(("insmod", "mount "))]


def test_module_params_reach_insmod_and_firmware_path_is_skipped(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100")
    rt.host.path("/drivers").mkdir()
    rt.host.path("/drivers/nvidia.conf").write_text("NVreg_EnableGpuFirmware=0\n")
    rt.host.path("/drivers/nvidia-uvm.conf").write_text("uvm_perf_prefetch_enable=0\n")
    rt.init()
    calls = k.names()
    assert any(c.startswith("insmod") and c.endswith("nvidia.ko NVreg_EnableGpuFirmware=0") for c in calls)
    assert any(c.endswith("nvidia-uvm.ko uvm_perf_prefetch_enable=0") for c in calls)
    assert rt.host.read("/sys/module/firmware_class/parameters/path") == "\n"


def test_firmware_path_of_someone_else_is_retained(tmp_path: Path) -> None:
    rt, _ = fake_node(tmp_path, "h100")
    rt.host.write("/sys/module/firmware_class/parameters/path", "/opt/firmware\n")
    rt.init()
    assert rt.host.read("/sys/module/firmware_class/parameters/path") == "/opt/firmware\n"
    assert any("retaining it" in line for line in rt.log.lines)


def test_hgx_with_rdma_loads_peermem_host_deps_and_fabric_manager(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", binaries=("nvidia-smi", "nvidia-modprobe", "nvidia-persistenced", "nv-fabricmanager"))
    rt, k = fake_node(tmp_path, "hgx-h100", image=image, GPU_DIRECT_RDMA_ENABLED="true", USE_HOST_MOFED="true")
    rt.init()
    calls = k.names()
    inserted = [Path(c.split()[1]).name for c in calls if c.startswith("insmod")]
    assert inserted == ["nvidia.ko", "nvidia-uvm.ko", "nvidia-modeset.ko", "nvidia-peermem.ko"]
    fm = rt.image.root / "usr"
    assert f"{fm}/bin/nv-fabricmanager -c {fm}/share/nvidia/nvswitch/fabricmanager.cfg" in calls
    assert "rmmod nvidia-peermem nvidia-modeset nvidia-uvm nvidia" in calls
    assert not k.pids  # both daemons stopped


def test_hgx_host_module_dependency_comes_from_the_host(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", binaries=("nv-fabricmanager",))
    rt, k = fake_node(tmp_path, "hgx-h100", image=image, GPU_DIRECT_RDMA_ENABLED="true", USE_HOST_MOFED="true")
    (rt.host.path("/proc/modules")).write_text("")  # MOFED not loaded yet: ib_core must come from the host
    rt.init()
    assert _index(k.names(), "nsenter -t 1 -m -- modprobe -a ib_core") < _index(k.names(), "insmod")


def test_rdma_with_containerized_mofed_leaves_peermem_and_ib_core_to_the_sidecar(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", binaries=("nv-fabricmanager",))
    rt, k = fake_node(tmp_path, "hgx-h100", image=image, GPU_DIRECT_RDMA_ENABLED="true")
    (rt.host.path("/proc/modules")).write_text("")  # MOFED's container has not loaded its modules yet
    rt.init()
    inserted = [Path(c.split()[1]).name for c in k.names() if c.startswith("insmod")]
    assert inserted == ["nvidia.ko", "nvidia-uvm.ko", "nvidia-modeset.ko"]
    assert not any("ib_core" in c for c in k.names())


def test_nvswitch_without_fabric_manager_is_refused_and_undone(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "hgx-h100")
    with pytest.raises(NodeError, match=r"^this node has 1 NVSwitch\(es\) but the image has no nv-fabricmanager, "
                                        r"fabricmanager.cfg; CUDA cannot use the GPUs without fabric manager$"):
        rt.init()
    assert not k.mounts
    assert "rmmod nvidia-modeset nvidia-uvm nvidia" in k.names()


def test_hgx_init_reaches_driver_ready_with_the_images_own_fabric_manager(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", binaries=("nvidia-smi", "nvidia-modprobe", "nvidia-persistenced", "nv-fabricmanager"))
    rt, k = fake_node(tmp_path, "hgx-h100", image=image)
    seen: dict[str, object] = {}

    def wait(timeout: float | None) -> bool:  # "driver ready, waiting for SIGTERM": fabric manager runs
        fm_pid = int(rt.host.read("/var/run/nvidia-fabricmanager/nv-fabricmanager.pid"))
        seen["fm running"] = fm_pid in k.pids
        seen["ready logged"] = any("driver ready" in line for line in rt.log.lines)
        return True

    rt.wait = wait
    rt.init()
    assert seen == {"fm running": True, "ready logged": True}
    calls = k.names()
    tool = "nsenter -t 1 -m -- /run/nvidia/driver/usr/bin/nvidia-modprobe"
    # NVIDIA's device nodes for NVSwitch (ctl + one per switch) and NVLink, before fabric manager opens them
    assert _index(calls, f"{tool} -s -c 0") < _index(calls, f"{tool} -l") < _index(calls, f"{image.root}/usr/bin/nv-fabricmanager")
    assert any("device nodes created" in line and "nvswitches=1" in line for line in rt.log.lines)
    assert not k.pids  # fabric manager and persistenced stopped on SIGTERM


def test_fabric_manager_without_its_config_does_not_start(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", binaries=("nvidia-modprobe", "nv-fabricmanager"))
    (image.root / "usr/share/nvidia/nvswitch/fabricmanager.cfg").write_text("# emptied\n")
    rt, k = fake_node(tmp_path, "hgx-h100", image=image)
    with pytest.raises(NodeError, match=r"could not start nv-fabricmanager: .* cannot read fabric manager config"):
        rt.init()
    assert not k.mounts and not k.pids


def test_a_fabric_manager_the_build_left_out_is_named_on_the_node(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img")
    manifest = image.at(layout.MANIFEST)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()),
                                    "left_out": {"fabricmanager": "no fabric manager for 535.309.01 in Debian"}}))
    rt, _ = fake_node(tmp_path, "hgx-h100", image=Image.load(image.root))
    with pytest.raises(NodeError, match=r"no nv-fabricmanager, fabricmanager.cfg \(the build left it out: "
                                        r"fabricmanager: no fabric manager for 535\.309\.01 in Debian\)"):
        rt.init()


NVL_BINARIES = ("nvidia-smi", "nvidia-modprobe", "nvidia-persistenced", "nv-fabricmanager", "nvidia-fabricmanager-start.sh",
                "nvidia-imex", "nvlsm")


def test_blackwell_nvl_starts_nvlsm_and_fabric_manager_over_ib_umad(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", version="570.195.03", binaries=NVL_BINARIES)
    rt, k = fake_node(tmp_path, "nvl-b200", image=image)
    running: list[bool] = []
    rt.wait = lambda timeout: running.extend(
        int(rt.host.read(f"/var/run/nvidia-fabricmanager/{d}.pid")) in k.pids for d in ("nvlsm", "nv-fabricmanager")
    ) or True
    rt.init()
    assert running == [True, True]
    calls = k.names()
    # ib_umad from the host, then the container's /dev/infiniband nodes from its devices' major:minor
    assert _index(calls, "nsenter -t 1 -m -- modprobe ib_umad") < _index(calls, "mknod")
    dev = rt.host.path("/dev/infiniband")
    assert {c for c in calls if c.startswith("mknod")} == {
        f"mknod -m 0600 {dev}/issm0 c 231 64", f"mknod -m 0600 {dev}/umad0 c 231 0", f"mknod -m 0600 {dev}/umad1 c 231 1"}
    usr, pids = image.root / "usr", rt.host.path("/var/run/nvidia-fabricmanager")
    assert (f"{usr}/bin/nvidia-fabricmanager-start.sh --mode start "
            f"--fm-config-file {usr}/share/nvidia/nvswitch/fabricmanager.cfg --fm-pid-file {pids}/nv-fabricmanager.pid "
            f"--nvlsm-config-file {usr}/share/nvidia/nvlsm/nvlsm.conf --nvlsm-pid-file {pids}/nvlsm.pid") in calls
    assert not any("nv-fabricmanager -c" in c for c in calls)  # NVLink5: only through the start script
    assert any("imex available" in line and "started_by=\"DRA driver compute domains\"" in line for line in rt.log.lines)
    assert not any("nvidia-imex" in c for c in calls)  # IMEX runs per workload, under the DRA driver
    assert not k.pids


def test_blackwell_nvl_without_imex_starts_and_says_compute_domains_cannot(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", version="570.195.03", binaries=tuple(b for b in NVL_BINARIES if b != "nvidia-imex"))
    manifest = image.at(layout.MANIFEST)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "left_out": {
        "imex": "redistrib_570.195.03.json lists no imex for linux-sbsa"}}))
    rt, k = fake_node(tmp_path, "nvl-b200", image=Image.load(image.root))
    rt.wait = lambda timeout: True
    rt.init()  # fabric manager does not need IMEX: the node serves single-node jobs
    assert any("nvidia-fabricmanager-start.sh --mode start" in c for c in k.names())
    assert any("no nvidia-imex in this image" in line and "lists no imex for linux-sbsa" in line for line in rt.log.lines)


def test_nvswitch_monitoring_libraries_missing_say_why_the_build_left_them_out(tmp_path: Path) -> None:
    """The build names them left out under NVIDIA's component names; DCGM's warning carries that reason."""
    image = make_image(tmp_path / "img", version="570.195.03", binaries=NVL_BINARIES)
    manifest = image.at(layout.MANIFEST)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "left_out": {
        "libnvidia_nscq": "Debian packages no libnvidia_nscq (NVIDIA's redist tree has it: --source nvidia)"}}))
    rt, _ = fake_node(tmp_path, "nvl-b200", image=Image.load(image.root))
    rt.wait = lambda timeout: True
    rt.init()
    assert any("DCGM cannot read the NVSwitches" in line and "Debian packages no libnvidia_nscq" in line
               for line in rt.log.lines)


def test_blackwell_nvl_needs_mlx5_and_the_subnet_managers_files(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", version="570.195.03", binaries=NVL_BINARIES[:-1])
    manifest = image.at(layout.MANIFEST)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "left_out": {
        "nvlsm": "Debian packages no nvlsm (NVIDIA's redist tree has it: --source nvidia)"}}))
    rt, k = fake_node(tmp_path, "nvl-b200", image=Image.load(image.root))
    with pytest.raises(NodeError, match=r"^this node is an NVLink5 system \(a ConnectX port with SW_MNG\) but the "
                                        r"image has no nvlsm, nvlsm.conf \(the build left it out: nvlsm: Debian "
                                        r"packages no nvlsm .*\); CUDA cannot use the GPUs without fabric manager$"):
        rt.init()
    rt, k = fake_node(tmp_path / "2", "nvl-b200", image=make_image(tmp_path / "img2", version="570.195.03",
                                                                   binaries=NVL_BINARIES))
    rt.host.path("/proc/modules").write_text("ib_core 73728 0 - Live 0x0\n")
    with pytest.raises(NodeError, match=r"NVLink5 system .*, but mlx5_core and ib_umad did not load within 300 s"):
        rt.init()
    assert not any(c.startswith("mknod") for c in k.names())


@pytest.mark.parametrize(("version", "module_type", "conf", "uvm"), [
    ("570.195.03", "auto", None, "uvm_disable_hmm=1"),  # open: HMM exists, off by default as in the seed
    ("570.195.03", "auto", "uvm_perf_prefetch_enable=0\n", "uvm_perf_prefetch_enable=0 uvm_disable_hmm=1"),
    ("570.195.03", "auto", "uvm_disable_hmm=0\n", "uvm_disable_hmm=0"),  # /drivers/nvidia-uvm.conf wins
    ("535.309.01", "auto", None, ""),  # proprietary modules have no HMM
    ("570.195.03", "proprietary", None, ""),
])
def test_uvm_disable_hmm_default(tmp_path: Path, version: str, module_type: str, conf: str | None, uvm: str) -> None:
    rt, k = fake_node(tmp_path, "h100", image=make_image(tmp_path / "img", version=version),
                      KERNEL_MODULE_TYPE=module_type)
    if conf is not None:
        rt.host.makedirs("/drivers")
        rt.host.path("/drivers/nvidia-uvm.conf").write_text(conf)
    rt.init()
    insmod = next(c for c in k.names() if c.startswith("insmod") and "nvidia-uvm.ko" in c)
    assert " ".join(insmod.split()[2:]) == uvm


def test_dry_run_prints_detection_and_touches_nothing(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "mixed")
    plan = rt.dry_run()
    assert plan is not None and plan.module_type.module_type == "proprietary"
    text = "\n".join(rt.log.lines)
    assert f"kernel={KERNEL}" in text
    assert "address=0000:1b:00.0 pci_id=10de:2330 architecture=Hopper" in text
    assert "address=0000:3b:00.0 pci_id=10de:1db4 architecture=Volta" in text
    assert f"kernel={KERNEL} types=open,proprietary driver=535.309.01" in text
    assert "type=proprietary reason=\"auto: a pre-Turing GPU is present" in text
    assert [c for c in k.names() if c.split()[0] != "mountpoint"] == []


def test_dry_run_on_a_gpu_less_node_says_why_init_would_stop(tmp_path: Path) -> None:
    rt, _k = fake_node(tmp_path, "no-gpu")
    assert rt.dry_run() is None
    assert any("init would stop" in line and "no NVIDIA GPU" in line for line in rt.log.lines)


@pytest.mark.parametrize(
    ("stderr", "verdict", "ok"),
    [
        ("insmod: ERROR: could not insert module nvidia.ko: No such device", "ABI OK, no GPU on this machine", True),
        ("insmod: ERROR: could not insert module nvidia.ko: Invalid module format", "rejected by the kernel", False),
    ],
)
def test_check_load_classifies_the_kernels_answer(tmp_path: Path, stderr: str, verdict: str, ok: bool) -> None:
    rt, k = fake_node(tmp_path, "no-gpu", image=make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)}))
    k.fail["insmod"] = Result(1, "", stderr)
    assert rt.check_load() is ok
    assert any(verdict in line and "type=proprietary" in line and "nvidia: forced failure" in line for line in rt.log.lines)


def test_check_load_success_unloads_again(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100", image=make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)}))
    assert rt.check_load()
    assert k.names()[-1] == "rmmod nvidia"
    assert any("loaded (and unloaded again)" in line for line in rt.log.lines)


def test_probe_and_reload_peermem(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "hgx-h100")
    assert rt.probe_peermem() is False  # mlx5_core loaded, nvidia_peermem not
    rt.host.write(READY_FILE, "ready")
    rt.host.path("/run/mellanox/drivers").mkdir(parents=True)
    rt.host.path("/run/mellanox/drivers/.driver-ready").write_text("")
    k(("insmod", str(rt.image.ko(KERNEL, "proprietary", "nvidia"))))  # loaded by init earlier
    rt.reload_peermem()
    assert Path(k.names()[-1].split()[1]).parts[-2:] == ("proprietary", "nvidia-peermem.ko")
    assert rt.probe_peermem() is True


def test_reload_peermem_waits_for_mofed_and_leaves_on_sigterm(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "hgx-h100")
    waits: list[float | None] = []

    def wait(timeout: float | None) -> bool:
        waits.append(timeout)
        return len(waits) == 3  # SIGTERM during the third wait

    rt.wait = wait
    rt.reload_peermem()
    assert waits == [10, 10, 10]
    assert k.calls == []  # nothing loaded while MOFED and the driver are not ready
    assert sum("waiting for the Mellanox OFED and NVIDIA drivers" in line for line in rt.log.lines) == 3


def test_probe_peermem_without_mofed_passes(tmp_path: Path) -> None:
    rt, _ = fake_node(tmp_path, "h100")
    assert rt.probe_peermem() is True


def test_unwritable_firmware_path_is_a_warning_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rt, _ = fake_node(tmp_path, "h100")

    def write(p: str, text: str) -> None:
        raise PermissionError(13, "Permission denied", p)

    monkeypatch.setattr(rt.host, "write", write)  # a read-only /sys, as without the hostPath mount
    rt.init()
    assert any("could not set the firmware search path" in line and "Permission denied" in line for line in rt.log.lines)


def test_a_second_init_on_the_same_node_is_refused(tmp_path: Path) -> None:
    first, k = fake_node(tmp_path, "h100")
    second, _ = fake_node(tmp_path / "2", "h100")
    _attach(second, k)
    seen: list[str] = []

    def wait(timeout: float | None) -> bool:
        with pytest.raises(NodeError) as exc:
            second.init()
        seen.append(exc.value.message)
        return True

    first.wait = wait
    first.init()
    assert seen == [
        "another nvidia-driver init is running on this node (it holds the lock on /run/nvidia/nvidia-driver.pid, "
        f"pid {os.getpid()})"
    ]
    assert len([c for c in k.names() if c.startswith("insmod")]) == 3  # the second one inserted nothing


def test_gpudirect_rdma_puts_the_gpus_iommu_groups_in_identity_mode(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", binaries=("nv-fabricmanager",))
    rt, _ = fake_node(tmp_path, "hgx-h100", image=image, GPU_DIRECT_RDMA_ENABLED="true")
    for n, gpu in ((12, "0000:1b:00.0"), (40, "0000:43:00.0")):
        group = rt.host.path(f"/sys/kernel/iommu_groups/{n}")
        group.mkdir(parents=True)
        (group / "type").write_text("DMA-FQ\n" if n == 12 else "identity\n")
        rt.host.path(f"/sys/bus/pci/devices/{gpu}/iommu_group").symlink_to(f"../../../kernel/iommu_groups/{n}")
    rt.init()
    assert rt.host.read("/sys/kernel/iommu_groups/12/type") == "identity"
    assert any("iommu group set to identity" in line and "gpu=0000:1b:00.0 was=DMA-FQ" in line for line in rt.log.lines)
    assert not any("gpu=0000:43:00.0" in line for line in rt.log.lines if "iommu" in line)


def test_open_modules_of_another_version_than_userspace_are_refused(tmp_path: Path) -> None:
    """Debian ships open 535.261.03 sources beside 535.309.01 userspace: NVML would refuse the pair."""
    image = make_image(tmp_path / "image", source_versions={"open": "535.261.03"})
    rt, k = fake_node(tmp_path, "h100", image, KERNEL_MODULE_TYPE="open")
    with pytest.raises(NodeError, match=r"KERNEL_MODULE_TYPE=open, but this image's open modules are version "
                                        r"535\.261\.03 and its userspace is 535\.309\.01"):
        rt.init()
    assert not any(c.startswith("insmod") for c in k.names())


def test_auto_skips_a_mismatched_set_and_loads_the_matching_one(tmp_path: Path) -> None:
    image = make_image(tmp_path / "image", source_versions={"open": "535.261.03"})
    rt, _ = fake_node(tmp_path, "h100", image)
    assert rt.plan().module_type.module_type == "proprietary"


def test_only_mismatched_sets_is_a_clear_error_before_touching_the_kernel(tmp_path: Path) -> None:
    image = make_image(tmp_path / "image", kernels={KERNEL: ("open",)}, source_versions={"open": "535.261.03"})
    rt, k = fake_node(tmp_path, "h100", image)
    with pytest.raises(NodeError, match=r"modules for kernel .* \(open 535\.261\.03\) do not match its userspace"):
        rt.init()
    assert not any(c.startswith("insmod") for c in k.names())


def test_split_modules_are_linked_into_staging_and_inserted_from_there(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100")
    k.linker = BUILD_LINKER  # same linker as the build: the result must also be byte-identical
    rt.init()
    calls = k.names()
    staging = rt.host.path(STAGING_DIR) / KERNEL / "proprietary"
    link = next(c for c in calls if c.startswith("ld ") and "nvidia.o" in c)
    image_dir = rt.image.at(f"/usr/lib/gl-nvidia/modules/{KERNEL}/proprietary")
    assert link == (f"ld -r -m elf_x86_64 --build-id=sha1 -T {image_dir}/module.lds -o {staging}/.nvidia.ko.tmp "
                    f"{image_dir}/nvidia.o {rt.image.at('/usr/lib/gl-nvidia/binaries/proprietary')}/nv-kernel.o")
    inserted = [c.split()[1] for c in calls if c.startswith("insmod")]
    assert inserted == [f"{staging}/nvidia.ko", f"{image_dir}/nvidia-uvm.ko", f"{staging}/nvidia-modeset.ko"]
    assert _index(calls, "ld ") < _index(calls, "insmod")
    assert not str(staging).startswith(str(rt.host.path(DRIVER_ROOT)))


def test_a_link_that_differs_from_the_builds_is_refused_before_insmod(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)})
    # another build's binary object next to this build's interface, and a manifest that agrees with the
    # parts (not with the module the build linked): same linker, other bytes
    (image.at("/usr/lib/gl-nvidia/binaries/proprietary") / "nv-kernel.o").write_bytes(b"another build")
    image = reseal(image)
    rt, k = fake_node(tmp_path, "h100", image=image)
    k.linker = BUILD_LINKER
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message.startswith("nvidia.ko linked on this node (sha256 ")
    assert "differs from the module the build linked and gated (sha256 " in exc.value.message
    assert f"with the same linker ({BUILD_LINKER}); refusing to load it" in exc.value.message
    assert not any(c.startswith("insmod") for c in k.names())
    assert not list(rt.host.path(STAGING_DIR).rglob("*.ko*"))


def _ibt_node(tmp_path: Path, tree: str = "h100") -> tuple[Runtime, FakeKernel]:
    """A node whose image holds IBT modules: each the build's patch from NVIDIA's binary object."""
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)}, patched=True)
    return fake_node(tmp_path, tree, image=image)


def test_ibt_modules_are_rebuilt_from_their_patch_without_ld_or_objtool(tmp_path: Path) -> None:
    rt, k = _ibt_node(tmp_path)
    rt.init()
    calls = k.names()
    assert not [c for c in calls if c.split()[0] in ("ld", "objtool", "ldd")]
    image_dir = rt.image.at(f"/usr/lib/gl-nvidia/modules/{KERNEL}/proprietary")
    staging = rt.host.path(STAGING_DIR) / KERNEL / "proprietary"
    # byte for byte the module the build gated, then inserted from staging
    record = rt.image.record(KERNEL, "proprietary", "nvidia")
    assert record is not None and sha256_file(staging / "nvidia.ko") == record.sha256
    assert any("module rebuilt from its patch" in line and "sha256=\"the build's\"" in line for line in rt.log.lines)
    inserted = [c.split()[1] for c in calls if c.startswith("insmod")]
    assert inserted == [f"{staging}/nvidia.ko", f"{image_dir}/nvidia-uvm.ko", f"{staging}/nvidia-modeset.ko"]
    assert sorted(p.name for p in staging.iterdir()) == ["nvidia-modeset.ko", "nvidia.ko"]


def test_a_patch_result_other_than_the_builds_is_refused_before_insmod(tmp_path: Path) -> None:
    rt, k = _ibt_node(tmp_path)
    # another build's binary object, and a manifest that agrees with it (not with the module the build gated)
    binary = rt.image.at("/usr/lib/gl-nvidia/binaries/proprietary") / "nv-kernel.o"
    binary.write_bytes(binary.read_bytes().upper())  # as long as the build's: the patch fits, other bytes out
    rt.image = reseal(rt.image)
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message.startswith("nvidia.ko rebuilt on this node (sha256 ")
    assert exc.value.message.endswith("differs from the module the build linked and gated "
                                      f"(sha256 {rt.image.record(KERNEL, 'proprietary', 'nvidia').sha256[:16]}); "  # type: ignore[union-attr]
                                      "refusing to load it")
    assert not any(c.startswith("insmod") for c in k.names())
    assert not list(rt.host.path(STAGING_DIR).rglob("*.ko*"))


def test_an_altered_patch_in_the_image_is_refused_before_it_is_applied(tmp_path: Path) -> None:
    rt, k = _ibt_node(tmp_path)
    (rt.image.at(f"/usr/lib/gl-nvidia/modules/{KERNEL}/proprietary") / "nvidia.patch").write_bytes(b"GLNVPAT1 other")
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message.startswith(f"/usr/lib/gl-nvidia/modules/{KERNEL}/proprietary/nvidia.patch has sha256 ")
    assert exc.value.message.endswith("; refusing to load nvidia.ko")
    assert not any(c.startswith("insmod") for c in k.names())
    assert not list(rt.host.path(STAGING_DIR).rglob("*.ko*"))


def test_a_damaged_patch_is_one_error_and_leaves_nothing_staged(tmp_path: Path) -> None:
    rt, k = _ibt_node(tmp_path)
    (rt.image.at(f"/usr/lib/gl-nvidia/modules/{KERNEL}/proprietary") / "nvidia.patch").write_bytes(b"not a patch")
    rt.image = reseal(rt.image)  # a patch the build itself got wrong: its manifest agrees with it
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message == f"could not rebuild nvidia.ko for kernel {KERNEL} from its patch: not a module patch"
    assert exc.value.hint == PULL_AGAIN
    assert not any(c.startswith("insmod") for c in k.names())
    assert not [p for p in rt.host.path(STAGING_DIR).rglob("*") if p.is_file()]


def test_an_interface_for_another_kernel_is_refused_naming_both(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", kernels={KERNEL: ("proprietary",)})
    iface = image.at(f"/usr/lib/gl-nvidia/modules/{KERNEL}/proprietary") / "nvidia.o"
    make_ko(iface, version="535.309.01", srcversion="proprietary-nvidia",
            vermagic="6.1.0-47-cloud-amd64 SMP mod_unload modversions ")
    image = reseal(image)  # the manifest agrees with the interface: built for another kernel, not damaged
    rt, k = fake_node(tmp_path, "no-gpu", image=image)  # other linker: vermagic and srcversion still checked
    with pytest.raises(NodeError) as exc:
        rt.check_load()
    assert exc.value.message == (
        "nvidia.ko linked from this image's parts has vermagic 6.1.0-47-cloud-amd64 and srcversion "
        f"proprietary-nvidia, but the running kernel is {KERNEL} and the manifest's srcversion is "
        "proprietary-nvidia; refusing to load it")
    assert not any(c.startswith("insmod") for c in k.names())


@pytest.mark.parametrize("content", [b"", b"not an ELF file", b"\x7fELF\x02\x01\x01" + b"\0" * 20])
def test_a_damaged_module_is_one_clear_error_and_leaves_nothing_loaded_or_mounted(tmp_path: Path, content: bytes) -> None:
    image = make_image(tmp_path / "image", kernels={KERNEL: ("proprietary",)})
    image.ko(KERNEL, "proprietary", "nvidia-uvm").write_bytes(content)
    image = reseal(image)  # a module the build itself got wrong: its manifest agrees with it
    rt, k = fake_node(tmp_path, "h100", image)
    with pytest.raises(NodeError, match=r"nvidia-uvm\.ko is not a readable kernel module .*"):
        rt.init()
    assert not k.mounts
    assert "nvidia" not in rt.host.read("/proc/modules")
