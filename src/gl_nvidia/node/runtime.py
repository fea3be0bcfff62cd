"""The `nvidia-driver` verbs: init (load, expose, wait, tear down), check-load, the peermem helpers.

Decisions come from decide.py; every host effect goes through Host; every step logs one line.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..bundle import apply_patch
from . import decide
from .decide import MODULES, PEERMEM, Node, NodeError, TypeChoice, sysfs_name
from .detect import read_node
from .host import Host
from .image import PULL_AGAIN, Image, PatchedModule, SplitModule, sha256_file
from .log import Log
from .modinfo import depends, modinfo

RUN_DIR = "/run/nvidia"
DRIVER_ROOT = "/run/nvidia/driver"
STATE_FILE = "/run/nvidia/nvidia-driver.state"
PID_FILE = "/run/nvidia/nvidia-driver.pid"  # locked while an init runs: one driver container per node
# The operator's startup probe (its driver DaemonSet's startup-probe.sh) fails while this file exists and
# does not say "Ready"; on success it writes READY_FILE, which the validator and the peermem sidecar wait for.
READY_FILE = "/run/nvidia/validations/.driver-ctr-ready"
DAEMONS_STATUS = "/run/nvidia/validations/.driver-daemons-status"
MONITOR_PERIOD = 10.0  # seconds between checks that the daemons still run (the probe's period)
DAEMON_START_TRIES = 50  # a started daemon's pid file names it within 5 s (0.1 s apart)
FIRMWARE_PARAM = "/sys/module/firmware_class/parameters/path"
FIRMWARE_SEARCH_PATH = DRIVER_ROOT + "/lib/firmware"
MELLANOX_READY = "/run/mellanox/drivers/.driver-ready"
NVSWITCH_PROC = "/proc/driver/nvidia-nvswitch/devices"
# Fabric manager and, on NVLink5 systems, the NVLink subnet manager: run from the image's own files.
FABRICMANAGER = "/usr/bin/nv-fabricmanager"
FABRICMANAGER_CFG = "/usr/share/nvidia/nvswitch/fabricmanager.cfg"
FABRICMANAGER_START = "/usr/bin/nvidia-fabricmanager-start.sh"  # starts nvlsm, then fabric manager
NVLSM = "/opt/nvidia/nvlsm/sbin/nvlsm"
NVLSM_CFG = "/usr/share/nvidia/nvlsm/nvlsm.conf"
# the build's name for what each file comes with, to say why the image lacks it
COMPONENT_OF = {FABRICMANAGER: "fabricmanager", FABRICMANAGER_CFG: "fabricmanager",
                FABRICMANAGER_START: "fabricmanager", NVLSM: "nvlsm", NVLSM_CFG: "nvlsm"}
INFINIBAND_MAD = "/sys/class/infiniband_mad"  # ib_umad's umad<N>/issm<N>, each with its dev "major:minor"
INFINIBAND_DEV = "/dev/infiniband"
# Daemons write their own pid files; teardown stops what these name, once the process they name is the
# image's binary in this container (a stale file may name any process: hostPID shows the host's).
DAEMONS = {
    "nvidia-persistenced": "/var/run/nvidia-persistenced/nvidia-persistenced.pid",
    "nv-fabricmanager": "/var/run/nvidia-fabricmanager/nv-fabricmanager.pid",
    "nvlsm": "/var/run/nvidia-fabricmanager/nvlsm.pid",
}
DAEMON_BINARY = {"nvidia-persistenced": "/usr/bin/nvidia-persistenced", "nv-fabricmanager": FABRICMANAGER,
                 "nvlsm": NVLSM}
# NVIDIA's entrypoint loads these before the driver (i2c for the GPUs' I2C buses, the IPMI device interface
# for the BMC's view of the GPUs); a kernel without them still runs CUDA, so a failure is a warning.
SUPPORT_MODULES = ("i2c_core", "ipmi_msghandler", "ipmi_devintf")
# NVLink5: NVIDIA's entrypoint waits for the ConnectX driver and ib_umad (another operator may load them).
NVLINK5_MODULES = ("mlx5_core", "ib_umad")
NVLINK5_WAIT = 300.0  # seconds before init gives up on them
# Fabric manager's config with the NVFM_CONFIG_<KEY> overrides applied: in the container, not the image.
FABRICMANAGER_RUN_CFG = "/run/gl-nvidia/fabricmanager.cfg"
# Modules linked from their parts (interface + NVIDIA's binary object) before insmod: inside the
# container, never under the driver root the host sees.
STAGING_DIR = "/run/gl-nvidia/modules"
HOST_NS = ("nsenter", "-t", "1", "-m", "--")  # hostPID: PID 1 is the host's init, its mount ns the host's


def wait_for_signal(timeout: float | None = None) -> bool:
    """Block until SIGTERM/SIGINT (True) or `timeout` seconds (False). main() keeps both blocked, so a
    signal that arrives during setup waits here instead of killing the process half-way."""
    signals = {signal.SIGTERM, signal.SIGINT}
    if timeout is None:
        signal.sigwait(signals)
        return True
    return signal.sigtimedwait(signals, timeout) is not None


@dataclass(frozen=True)
class Plan:
    """What `init` decided for this node (also what `--dry-run` prints)."""

    node: Node
    kernel: str
    module_type: TypeChoice
    modules: tuple[str, ...]


@dataclass
class Runtime:
    host: Host
    image: Image
    env: dict[str, str]
    log: Log = field(default_factory=Log)
    wait: Callable[[float | None], bool] = wait_for_signal
    sleep: Callable[[float], None] = time.sleep
    # what this run started, undone on teardown or failure
    _mounted: bool = False
    _loaded: list[str] = field(default_factory=list)
    _daemons: list[str] = field(default_factory=list)
    _linker: str | None = None

    # ---------------------------------------------------------------- decisions

    def plan(self) -> Plan:
        node = read_node(self.host)
        self.log.info("node", kernel=node.kernel, gpus=len(node.gpus), os=decide.os_tag(node.os_release))
        kernel = decide.select_kernel(node, self._kernels(), self.image.driver_branch, self.image.arch)
        if not node.gpus:
            raise NodeError(
                f"no NVIDIA GPU on this node (no PCI device with vendor 0x10de and a display class in "
                f"/sys/bus/pci/devices); nothing loaded into kernel {node.kernel}",
                "run the driver only on GPU nodes (node label nvidia.com/gpu.deploy.driver=true)",
            )
        decide.fabricmanager_overrides(self.env)  # a bad NVFM_CONFIG_* stops init before it touches anything
        requested = self.env.get("KERNEL_MODULE_TYPE", "auto")
        other = self.image.mismatch(kernel, requested.strip().lower())
        if other is not None:
            raise NodeError(
                f"KERNEL_MODULE_TYPE={requested}, but this image's {requested} modules are version {other} and "
                f"its userspace is {self.image.driver_version}; NVML refuses mismatched versions",
                "use KERNEL_MODULE_TYPE=auto, or an image whose module and userspace versions match",
            )
        usable = self.image.module_types(kernel)
        if not usable:
            sets = ", ".join(f"{t} {self.image.mismatch(kernel, t)}" for t in self.image.present_types(kernel))
            raise NodeError(
                f"this image's modules for kernel {kernel} ({sets}) do not match its userspace "
                f"{self.image.driver_version}; NVML refuses mismatched versions",
                "rebuild the image from one driver version",
            )
        choice = decide.choose_module_type(requested, self.image.driver_branch, node.gpus, usable)
        modules = decide.modules_to_load(node, self.env.get("GPU_DIRECT_RDMA_ENABLED", "false") == "true",
                                         self.env.get("USE_HOST_MOFED", "false") == "true")
        if decide.gds_enabled(self.env.get("GDS_ENABLED", "false")):
            modules = (*modules, decide.NVIDIA_FS)
        return Plan(node, kernel, choice, modules)

    def _kernels(self) -> list[str]:
        return [k for k in self.image.kernels() if self.image.present_types(k)]

    def dry_run(self) -> Plan | None:
        """Detection only: print what init would do, touch nothing."""
        node = read_node(self.host)
        out = self.log.info
        out("dry-run: kernel", kernel=node.kernel, os=decide.os_tag(node.os_release))
        for gpu in node.gpus:
            out("dry-run: gpu", address=gpu.address, pci_id=gpu.pci_id, architecture=decide.architecture(gpu.device))
        for sw in node.nvswitches:
            out("dry-run: nvswitch", address=sw.address, pci_id=sw.pci_id)
        out("dry-run: mellanox nics", count=len(node.mellanox))
        out("dry-run: grace-coupled gpus", count=len(node.coherent_gpus))
        if node.nvlink5:
            out("dry-run: nvlink5 system: nvlsm and fabric manager through ib_umad")
        for k in self.image.kernels():
            out("dry-run: image holds", kernel=k, types=",".join(self.image.module_types(k)) or "none",
                driver=self.image.driver_version)
        out("dry-run: loaded nvidia", version=_loaded_version(node) or "none")
        try:
            plan = self.plan()
        except NodeError as exc:
            self.log.error("dry-run: init would stop", reason=exc.message)
            return None
        out("dry-run: module type", type=plan.module_type.module_type, reason=plan.module_type.reason)
        out("dry-run: would load", modules=",".join(plan.modules), kernel=plan.kernel)
        return plan

    # ---------------------------------------------------------------- init

    def init(self) -> None:
        self.log.info("nvidia-driver init", driver=self.image.driver_version, node=self.env.get("NODE_NAME", ""))
        if not self.host.lock(PID_FILE):
            raise NodeError(
                f"another nvidia-driver init is running on this node (it holds the lock on {PID_FILE}, "
                f"pid {(self.host.read_opt(PID_FILE) or '?').strip()})",
                "wait for the other driver pod to stop; only one may load the driver at a time",
            )
        self.host.write_atomic(DAEMONS_STATUS, "NotReady\n")
        plan = self.plan()
        ours = self.image.driver_version
        loaded = _loaded_version(plan.node)
        decide.check_loaded(loaded, ours)
        digest = self.env.get("DRIVER_CONFIG_DIGEST", "")
        state = self.host.read_opt(STATE_FILE)
        try:
            if decide.fast_path(loaded, ours, digest, state):
                self.log.info("fast path: driver already loaded with this configuration, not reloading",
                              version=ours, digest=digest)
                self._expose()
                self._start_daemons(plan)
            else:
                if loaded is not None:
                    self.log.info("driver loaded with another configuration, reloading", version=loaded,
                                  digest=digest or "unset", state=(state or "absent").strip())
                    # A damaged image must not cost the node the driver it runs.
                    self._verify(plan.kernel, plan.module_type.module_type, plan.modules)
                    if not self._unload():
                        raise NodeError(
                            f"nvidia {loaded} is loaded with another configuration and in use; "
                            "cannot reload it", "drain the GPU pods on this node and restart the driver pod",
                        )
                    plan = self.plan()
                self.host.remove(STATE_FILE)
                self._install(plan)
                if digest:
                    self.host.write_atomic(STATE_FILE, digest + "\n")
        except BaseException:
            self.teardown(failed=True)
            raise
        self.host.write_atomic(DAEMONS_STATUS, "Ready\n")
        self.log.info("driver ready, waiting for SIGTERM", version=ours, type=plan.module_type.module_type,
                      daemons=",".join(self._daemons) or "none")
        while not self.wait(MONITOR_PERIOD):
            down = [d for d in self._daemons if self._running(d) is None]
            if down:  # the pod must not stay ready without them: stop, and let the kubelet start it again
                why = f"{down[0]} exited"
                self.log.error(f"{why}, shutting down so the pod restarts", daemon=down[0])
                self.teardown(why=why)
                raise NodeError(f"{why} while the driver was ready; {DAEMONS_STATUS} says NotReady",
                                f"see the daemon's log ({_daemon_log(down[0])}); the kubelet restarts the pod")
        self.log.info("signal received, shutting down")
        self.teardown()

    def _install(self, plan: Plan) -> None:
        self.log.info("module type", type=plan.module_type.module_type, reason=plan.module_type.reason)
        params = self._coherent_default(self._uvm_default(self._params(), plan), plan)
        kos = self._prepare(plan)  # verified (and linked) before the host is touched
        self._firmware_path(params.params.get("nvidia", ()))
        self._expose()  # before insmod: GSP firmware is read through the driver root at GPU init
        self._iommu_identity(plan.node)
        self._support_modules(plan.node)
        self._load(plan, params, kos)
        self._device_nodes(plan.node)
        self._start_daemons(plan)

    def _params(self) -> decide.ModuleParams:
        confs = {}
        for m in (*MODULES, PEERMEM):
            path = f"{decide.CONF_DIR}/{m}.conf"
            text = self.host.read_opt(path)
            if text is not None:
                confs[m] = (path, text)
        params = decide.module_params(confs)
        if params.problems:
            raise NodeError(
                "malformed module parameters: " + "; ".join(params.problems),
                "fix the ConfigMap behind /drivers (one or more name=value per line, # comments)",
            )
        for m, p in params.params.items():
            self.log.info("module parameters", module=m, params=" ".join(p))
        return params

    def _uvm_default(self, params: decide.ModuleParams, plan: Plan) -> decide.ModuleParams:
        uvm, why = decide.uvm_params(plan.module_type.module_type, self.image.driver_branch,
                                     params.params.get("nvidia-uvm", ()))
        self.log.info("nvidia-uvm parameters", params=" ".join(uvm) or "none", reason=why)
        return replace(params, params={**params.params, "nvidia-uvm": uvm})

    def _coherent_default(self, params: decide.ModuleParams, plan: Plan) -> decide.ModuleParams:
        nvidia, why = decide.coherent_params(self.image.driver_branch, plan.node, params.params.get("nvidia", ()))
        if why.startswith("warn: "):
            self.log.warn(why.removeprefix("warn: "), gpus=",".join(g.address for g in plan.node.coherent_gpus))
        else:
            self.log.info("coherent GPU memory", reason=why)
        return replace(params, params={**params.params, "nvidia": nvidia})

    def _firmware_path(self, nvidia_params: tuple[str, ...]) -> None:
        current = self.host.read_opt(FIRMWARE_PARAM)
        if current is None:
            self.log.warn("no firmware search path parameter; the kernel must find GSP firmware elsewhere",
                          path=FIRMWARE_PARAM)
            return
        action = decide.firmware_path_action(current, FIRMWARE_SEARCH_PATH, nvidia_params)
        if action == "set":
            try:
                self.host.write(FIRMWARE_PARAM, FIRMWARE_SEARCH_PATH)
            except OSError as exc:
                self.log.warn("could not set the firmware search path", path=FIRMWARE_PARAM, error=exc.strerror or str(exc))
                return
        elif action == "retain":
            self.log.warn("firmware search path already set by someone else, retaining it",
                          current=current.strip(), ours=FIRMWARE_SEARCH_PATH)
            return
        self.log.info("firmware search path", action=action, path=FIRMWARE_SEARCH_PATH)

    def _expose(self) -> None:
        """The container's root at /run/nvidia/driver on the host, as NVIDIA's entrypoint mounts it: a
        recursive bind (no copy of the userspace), so the driver root's /dev is this container's, where the
        validator and the toolkit look for the device nodes once the driver root has a /dev. /sys first has
        its submounts made unbindable (the cgroup mounts are left out) and itself private (no mount event
        under it reaches the host through the shared /run/nvidia)."""
        self._ensure_ld_cache()
        if self.host.is_mountpoint(DRIVER_ROOT):
            self.log.info("driver root still mounted from an earlier run, replacing it", path=DRIVER_ROOT)
            self._umount()
        sys_dir = str(self.image.at("/sys"))
        if self.host.run("mountpoint", "-q", sys_dir).rc == 0:
            self._cmd("mount", "--make-runbindable", sys_dir, what="keep the mounts under /sys out of the driver root")
            self._cmd("mount", "--make-private", sys_dir, what="make /sys private")
        self.host.makedirs(DRIVER_ROOT)
        self._cmd("mount", "--rbind", str(self.image.root), str(self.host.path(DRIVER_ROOT)), what="bind-mount the driver root")
        self._mounted = True
        self.log.info("driver root visible", path=DRIVER_ROOT, source=str(self.image.root))

    def _ensure_ld_cache(self) -> None:
        """The container toolkit finds the libraries through the driver root's etc/ld.so.cache."""
        cache = self.image.at("/etc/ld.so.cache")
        if cache.is_file() and b"libnvidia-ml.so.1" in cache.read_bytes():
            return
        self.log.info("etc/ld.so.cache does not list libnvidia-ml.so.1, running ldconfig")
        self._cmd("ldconfig", what="rebuild the driver root's loader cache")

    def _iommu_identity(self, node: Node) -> None:
        """The GPUs' IOMMU groups in identity mode before the driver binds them, as the seed installer sets
        them on metal nodes: in a translated (DMA) group the GPU faults during probe (IO_PAGE_FAULT) and gets
        no device nodes, and GPUDirect RDMA's peer DMA between NIC and GPU needs it too. The kernel takes the
        change only while no driver is bound; a group that refuses it stays as it is, with a warning."""
        for gpu in node.gpus:
            group = self.host.readlink(f"/sys/bus/pci/devices/{gpu.address}/iommu_group")
            if not group:
                continue
            type_file = f"/sys/kernel/iommu_groups/{group.rsplit('/', 1)[-1]}/type"
            current = (self.host.read_opt(type_file) or "").strip()
            if current in ("DMA", "DMA-FQ"):
                try:
                    self.host.write(type_file, "identity")
                    self.log.info("iommu group set to identity", gpu=gpu.address, was=current)
                except OSError as exc:
                    self.log.warn("could not set iommu group to identity", gpu=gpu.address, error=str(exc))

    def _prepare(self, plan: Plan) -> list[Path]:
        t = plan.module_type.module_type
        missing = [f"{m}.ko" for m in plan.modules if not self.image.has_module(plan.kernel, t, m)]
        if missing:
            left = [f"{m}: {self.image.left_out[k]}" for m in (decide.NVIDIA_FS,) if f"{m}.ko" in missing
                    and (k := f"{m} {plan.kernel}") in self.image.left_out]  # GDS: why the build shipped none
            raise NodeError(f"this image lacks {', '.join(missing)} for kernel {plan.kernel}"
                            + (f" (the build left out {'; '.join(left)})" if left else ""),
                            "rebuild the image from a complete bundle")
        return self._modules(plan.kernel, t, plan.modules, plan.node.kernel)

    def _support_modules(self, node: Node) -> None:
        wanted = [m for m in SUPPORT_MODULES if m not in node.loaded]
        if not wanted:
            return
        res = self.host.run(*HOST_NS, "modprobe", "-a", *wanted)
        if res.rc == 0:
            self.log.info("host modules loaded", modules=",".join(wanted))
        else:
            self.log.warn("could not load the i2c/ipmi modules NVIDIA's entrypoint loads; the driver runs without "
                          "them (no BMC view of the GPUs)", modules=",".join(wanted), error=_reason(res.stderr))

    def _load(self, plan: Plan, params: decide.ModuleParams, kos: list[Path]) -> None:
        ours = {sysfs_name(m) for m in plan.modules}
        host_deps = sorted({d for k in kos for d in depends(k)} - ours - set(plan.node.loaded))
        if host_deps:
            self._cmd(*HOST_NS, "modprobe", "-a", *host_deps, what="load host modules " + ",".join(host_deps))
            self.log.info("host modules loaded", modules=",".join(host_deps))
        for m, ko in zip(plan.modules, kos, strict=True):
            if sysfs_name(m) in plan.node.loaded:
                continue
            if m == PEERMEM and decide.peermem_stub(depends(ko)):
                self.log.warn(decide.PEERMEM_STUB + ", not loading it", module=m, route=decide.DMA_BUF_ROUTE)
                continue
            p = params.params.get(m, ())
            res = self.host.run("insmod", str(ko), *p)
            if res.rc != 0:
                raise NodeError(f"the kernel refused {ko.name}: {_reason(res.stderr)}; kernel log: {self._kernel_log()}",
                                "run `nvidia-driver check-load` for a diagnosis")
            self._loaded.append(m)
            self.log.info("module loaded", module=m, type=plan.module_type.module_type, params=" ".join(p))

    def _device_nodes(self, node: Node) -> None:
        """/dev/nvidia* on the host (for what runs there) and in this container, whose /dev is the driver
        root's: the validator and the toolkit take the driver root as the dev root once it has a /dev."""
        if not self.image.has("nvidia-modprobe"):
            self.log.warn("nvidia-modprobe not in this image; device nodes are left to the kernel")
            return
        args = ["-u", "-m"] + [a for i in range(len(node.gpus)) for a in ("-c", str(i))]
        switches = self._nvswitches(node)
        for where, tool in (("the host", [*HOST_NS, DRIVER_ROOT + "/usr/bin/nvidia-modprobe"]),
                            ("the driver root", [str(self.image.at("/usr/bin/nvidia-modprobe"))])):
            self._cmd(*tool, *args, what=f"create /dev/nvidia* on {where}")
            for extra in decide.nvlink_device_args(switches):
                self._cmd(*tool, *extra, what=f"create the NVSwitch and NVLink device nodes on {where}")
        self.log.info("device nodes created", gpus=len(node.gpus), nvswitches=switches, on="host,driver root")

    def _nvswitches(self, node: Node) -> int:
        return max(len(node.nvswitches), len(self.host.listdir(NVSWITCH_PROC)))

    def _start_daemons(self, plan: Plan) -> None:
        if self.image.has("nvidia-persistenced"):
            self._daemon("nvidia-persistenced", "--persistence-mode")
        else:
            self.log.warn("nvidia-persistenced not in this image; persistence mode stays off")
        if plan.node.nvlink5:
            self._nvlink5(plan.node)
        elif self._nvswitches(plan.node):
            self._require(FABRICMANAGER, FABRICMANAGER_CFG,
                          why=f"this node has {self._nvswitches(plan.node)} NVSwitch(es)")
            self._daemon("nv-fabricmanager", "-c", self._fabricmanager_cfg())
        if plan.node.nvswitches or plan.node.nvlink5:
            self._nscq()

    def _fabricmanager_cfg(self) -> str:
        """The config fabric manager starts with: the image's, or a copy with the NVFM_CONFIG_<KEY>=<value>
        overrides NVIDIA's entrypoint applies (each key's line replaced, or added)."""
        overrides = decide.fabricmanager_overrides(self.env)
        image_cfg = str(self.image.at(FABRICMANAGER_CFG))
        if not overrides:
            return image_cfg
        text = decide.fabricmanager_config(self.image.at(FABRICMANAGER_CFG).read_text(), overrides)
        self.host.write_atomic(FABRICMANAGER_RUN_CFG, text)
        for key, value in overrides.items():
            self.log.info("fabric manager config override", key=key, value=value, source=f"NVFM_CONFIG_{key}")
        return str(self.host.path(FABRICMANAGER_RUN_CFG))

    def _nscq(self) -> None:
        """DCGM reads NVSwitch state through libnvidia-nscq (NVLink5: libnvsdm) from the driver root."""
        have = [lib for lib in ("libnvidia-nscq.so", "libnvsdm.so") if self._has_library(lib)]
        if have:
            self.log.info("nvswitch monitoring libraries", present=",".join(have))
        else:
            self.log.warn("no libnvidia-nscq or libnvsdm in this image: DCGM cannot read the NVSwitches",
                          why=self.image.left_out.get("libnvidia_nscq", "not built with them"))

    def _has_library(self, stem: str) -> bool:
        return any(d.is_dir() and any(p.name.startswith(stem) for p in d.iterdir())
                   for d in (self.image.at(f"/usr/lib/{t}") for t in ("x86_64-linux-gnu", "aarch64-linux-gnu")))

    def _require(self, *paths: str, why: str) -> None:
        """Fabric manager's (and nvlsm's) files in the image, or the one line naming what is missing and why
        the build left it out."""
        missing = [p for p in paths if not self.image.at(p).is_file()]
        if missing:
            components = sorted({COMPONENT_OF[p] for p in missing})
            left = [f"{c}: {self.image.left_out[c]}" for c in components if c in self.image.left_out]
            raise NodeError(
                f"{why} but the image has no {', '.join(p.rsplit('/', 1)[-1] for p in missing)}"
                + (f" (the build left it out: {'; '.join(left)})" if left else "")
                + "; CUDA cannot use the GPUs without fabric manager",
                f"build the image with {' and '.join(components)} of this driver release "
                "(the nvidia source ships them from NVIDIA's redist tree)",
            )

    def _nvlink5(self, node: Node) -> None:
        """Blackwell NVL: NVIDIA's start script runs the NVLink subnet manager (over ib_umad) and then fabric
        manager, both from the image."""
        why = "this node is an NVLink5 system (a ConnectX port with SW_MNG)"
        self._require(FABRICMANAGER_START, FABRICMANAGER, FABRICMANAGER_CFG, NVLSM, NVLSM_CFG, why=why)
        self._wait_for_nvlink5_modules(why)
        self._umad_nodes()
        pid = self._running("nv-fabricmanager")
        if pid is not None:
            self.log.info("daemon already running", daemon="nv-fabricmanager", pid=pid)
        else:
            self._cmd(str(self.image.at(FABRICMANAGER_START)), "--mode", "start",
                      "--fm-config-file", self._fabricmanager_cfg(),
                      "--fm-pid-file", str(self.host.path(DAEMONS["nv-fabricmanager"])),
                      "--nvlsm-config-file", str(self.image.at(NVLSM_CFG)),
                      "--nvlsm-pid-file", str(self.host.path(DAEMONS["nvlsm"])),
                      what="start the NVLink subnet manager and fabric manager")
            for name in ("nvlsm", "nv-fabricmanager"):
                self.log.info("daemon started", daemon=name, pid=self._started(name))
            if decide.fabricmanager_overrides(self.env).get("FABRIC_MODE") == "1":
                # NVIDIA's entrypoint: a GPU reset clears fabric partitions left from before FABRIC_MODE=1
                self._cmd(str(self.image.at("/usr/bin/nvidia-smi")), "-r", what="reset the GPUs for FABRIC_MODE=1")
                self.log.info("gpus reset after fabric manager start", reason="NVFM_CONFIG_FABRIC_MODE=1")
        self._daemons += ["nvlsm", "nv-fabricmanager"]  # stopped in reverse: fabric manager first
        # IMEX runs per workload, from the driver root, under the DRA driver's compute domains (which also
        # make the channels): the node only says whether this image can serve them.
        if self.image.has("nvidia-imex"):
            self.log.info("imex available", binary="/usr/bin/nvidia-imex", started_by="DRA driver compute domains")
        else:
            self.log.warn("no nvidia-imex in this image: multi-node NVLink compute domains cannot start",
                          why=self.image.left_out.get("imex", "not built with it"))

    def _wait_for_nvlink5_modules(self, why: str) -> None:
        """mlx5_core comes from the host or the network operator, maybe after this pod starts: wait for it
        (bounded, a line every try) and load ib_umad from the host once it is there, as NVIDIA's entrypoint
        waits for both."""
        waited = 0.0
        while True:
            loaded = read_node(self.host).loaded
            if "mlx5_core" in loaded and "ib_umad" not in loaded:
                self._cmd(*HOST_NS, "modprobe", "ib_umad", what="load ib_umad (the subnet manager's MAD interface)")
                self.log.info("host modules loaded", modules="ib_umad")
                loaded = read_node(self.host).loaded
            missing = [m for m in NVLINK5_MODULES if m not in loaded]
            if not missing:
                return
            if waited >= NVLINK5_WAIT:
                raise NodeError(f"{why}, but {' and '.join(missing)} did not load within {NVLINK5_WAIT:.0f} s: the "
                                "NVLink subnet manager reaches the switches through them",
                                "load the Mellanox driver (the host's or the network operator's); the pod retries")
            self.log.info("waiting for the kernel modules the NVLink subnet manager needs",
                          missing=",".join(missing), waited_s=int(waited), limit_s=int(NVLINK5_WAIT))
            self.sleep(MONITOR_PERIOD)
            waited += MONITOR_PERIOD

    def _umad_nodes(self) -> None:
        """The /dev/infiniband nodes ib_umad's devices need in this container: a device the module made
        after the container started has a node on the host only."""
        made, seen = [], 0
        for name in self.host.listdir(INFINIBAND_MAD):
            major, sep, minor = (self.host.read_opt(f"{INFINIBAND_MAD}/{name}/dev") or "").strip().partition(":")
            if not sep:
                continue  # abi_version
            seen += 1
            node = f"{INFINIBAND_DEV}/{name}"
            if not self.host.exists(node):
                self.host.makedirs(INFINIBAND_DEV)
                self._cmd("mknod", "-m", "0600", str(self.host.path(node)), "c", major, minor, what=f"create {node}")
                made.append(name)
        if not seen:
            raise NodeError(f"ib_umad is loaded but {INFINIBAND_MAD} lists no umad device; the NVLink subnet "
                            "manager has no port to manage the switches through",
                            "check the ConnectX ports of the NVLink switch trays (rdma link show)")
        self.log.info("infiniband device nodes", created=",".join(made) or "none", present=seen)

    def _daemon(self, name: str, *args: str) -> None:
        pid = self._running(name)
        if pid is not None:
            self.log.info("daemon already running", daemon=name, pid=pid)
        else:
            self._cmd(str(self.image.at(f"/usr/bin/{name}")), *args, what=f"start {name}")
            self.log.info("daemon started", daemon=name, pid=self._started(name))
        self._daemons.append(name)

    def _started(self, name: str) -> int:
        """The pid of a daemon just started, or the one line saying it is not running: readiness waits on it.
        A daemon writes its pid file after it forks, maybe after the command that started it returned."""
        for _ in range(DAEMON_START_TRIES):
            if self._running(name, quiet=True) is not None:
                break
            self.sleep(0.1)
        pid = self._running(name)
        if pid is None:
            raise NodeError(f"{name} started but is not running (no live {name} of this image in {DAEMONS[name]})",
                            f"see its log ({_daemon_log(name)})")
        return pid

    def _pid(self, daemon: str) -> int | None:
        text = self.host.read_opt(DAEMONS[daemon])
        return int(text.strip()) if text and text.strip().isdigit() else None

    def _running(self, name: str, quiet: bool = False) -> int | None:
        """The pid in `name`'s pid file when it is a live process of this image's binary in this container's
        mount namespace (where init starts its daemons); None otherwise, a stale file named in the log
        unless `quiet`."""
        pid = self._pid(name)
        if pid is None or not self.host.alive(pid):
            return None
        exe = (self.host.readlink(f"/proc/{pid}/exe") or "").removesuffix(" (deleted)")
        ns = self.host.readlink(f"/proc/{pid}/ns/mnt")
        if exe == str(self.image.at(DAEMON_BINARY[name])) and ns is not None and ns == self.host.readlink("/proc/self/ns/mnt"):
            return pid
        if not quiet:
            self.log.warn("pid file names a process that is not this image's daemon, leaving it alone",
                          daemon=name, pid=pid, pid_file=DAEMONS[name], exe=exe or "unreadable")
        return None

    # ---------------------------------------------------------------- teardown

    def teardown(self, failed: bool = False, why: str = "") -> None:
        """Stop daemons, unload modules unless in use, undo the mount, remove the ready file and say NotReady.

        Never raises: after a failed init the error that stopped it is the one to report, and every step
        is tried whatever the one before it met. A step that fails is a warning line.
        """
        status = "NotReady" + (f": {why}" if why else "") + "\n"
        self._teardown_step("mark the daemons not ready", lambda: self.host.write_atomic(DAEMONS_STATUS, status))
        self._teardown_step("stop the daemons", self._stop_daemons)
        if not failed or self._loaded:
            self._teardown_step("unload the modules", self._unload_and_drop_state)
        if self._mounted or not failed:
            self._teardown_step("unmount the driver root", self._umount_if_mounted)
        self._teardown_step("remove the ready file", lambda: self.host.remove(READY_FILE))
        self.log.info("teardown done", failed=failed)

    def _teardown_step(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:  # the promise is "never raises": say what failed, go on
            error = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
            self.log.warn(f"teardown: could not {what}", error=error or type(exc).__name__)

    def _stop_daemons(self) -> None:
        for name in reversed(self._daemons):
            pid = self._running(name)
            if pid is None:
                continue
            self.host.kill(pid)
            for _ in range(50):
                if not self.host.alive(pid):
                    break
                self.sleep(0.1)
            self.log.info("daemon stopped", daemon=name, pid=pid, stopped=not self.host.alive(pid))
        self._daemons.clear()

    def _unload_and_drop_state(self) -> None:
        if self._unload():
            self.host.remove(STATE_FILE)

    def _umount_if_mounted(self) -> None:
        if self._mounted or self.host.is_mountpoint(DRIVER_ROOT):
            self._umount()

    def _umount(self) -> None:
        res = self.host.run("umount", "--lazy", "--recursive", str(self.host.path(DRIVER_ROOT)))
        if res.rc != 0:
            self.log.warn("could not unmount the driver root", path=DRIVER_ROOT, error=_reason(res.stderr))
        else:
            self.log.info("driver root unmounted", path=DRIVER_ROOT)
        self._mounted = False

    def _unload(self) -> bool:
        """rmmod the NVIDIA modules unless something holds them; then say who does. True when none is left."""
        order = [decide.NVIDIA_FS, PEERMEM, "nvidia-modeset", "nvidia-uvm", "nvidia", "nvidia-drm"]
        refcnt = {}
        for m in order:
            text = self.host.read_opt(f"/sys/module/{sysfs_name(m)}/refcnt")
            if text is not None and text.strip().isdigit():
                refcnt[m] = int(text.strip())
        if not refcnt:
            return True
        # nvidia-fs that binds nvidia_p2p_* with symbol_get (2.13.5) holds nvidia only while it is open
        fs_idle = refcnt.get(decide.NVIDIA_FS) == 0 and "nvidia_fs" not in self.host.listdir("/sys/module/nvidia/holders")
        if decide.in_use({m: n for m, n in refcnt.items() if not (fs_idle and m == decide.NVIDIA_FS)}) \
                or "nvidia-drm" in refcnt:
            self.log.warn("driver in use, modules stay loaded", holders=self._holders() or "unknown",
                          refcnt=",".join(f"{m}={n}" for m, n in refcnt.items()))
            return False
        res = self.host.run("rmmod", *[m for m in order if m in refcnt])
        if res.rc != 0:
            self.log.warn("rmmod failed, modules stay loaded", error=_reason(res.stderr), holders=self._holders() or "unknown")
            return False
        self._loaded.clear()
        self.log.info("modules unloaded", modules=",".join(m for m in order if m in refcnt))
        return True

    def _holders(self) -> str:
        """Modules stacked on nvidia and processes with /dev/nvidia* open (hostPID shows the host's)."""
        who = [f"module {h}" for h in self.host.listdir("/sys/module/nvidia/holders")]
        for pid in self.host.listdir("/proc"):
            if not pid.isdigit():
                continue
            fds = self.host.listdir(f"/proc/{pid}/fd")
            if any((self.host.readlink(f"/proc/{pid}/fd/{fd}") or "").startswith("/dev/nvidia") for fd in fds):
                comm = (self.host.read_opt(f"/proc/{pid}/comm") or "?").strip()
                who.append(f"pid {pid} ({comm})")
        return ", ".join(who)

    # ---------------------------------------------------------------- other verbs

    def check_load(self) -> bool:
        """insmod nvidia.ko into the running kernel and classify, then unload it again (host modules it
        needed, loaded with modprobe, stay loaded)."""
        node = read_node(self.host)
        kernel = decide.select_kernel(node, self._kernels(), self.image.driver_branch, self.image.arch)
        if "nvidia" in node.loaded:
            raise NodeError("nvidia is already loaded; check-load needs a kernel without it",
                            "run it on a node (or VM) where the driver is not loaded")
        ok = True
        # The kernel's verdict on the ABI does not depend on the userspace version: try every set.
        for t in self.image.present_types(kernel):
            ko, = self._modules(kernel, t, ("nvidia",), node.kernel)
            deps = [d for d in depends(ko) if d not in node.loaded]
            if deps:
                self.host.run(*HOST_NS, "modprobe", "-a", *deps)
            before = self._kernel_log_lines()
            res = self.host.run("insmod", str(ko))
            fields = {"kernel": kernel, "type": t, "version": modinfo(ko).get("version", "?")}
            if res.rc == 0:
                self.host.run("rmmod", "nvidia")
                self.log.info("check-load: loaded (and unloaded again)", **fields)
            elif "No such device" in res.stderr:
                self.log.info("check-load: ABI OK, no GPU on this machine", **fields,
                              kernel_log=self._kernel_log(before))
            else:
                ok = False
                self.log.error("check-load: rejected by the kernel", **fields, error=_reason(res.stderr),
                               kernel_log=self._kernel_log(before))
        return ok

    def probe_peermem(self) -> bool:
        if "mlx5_core" not in read_node(self.host).loaded:
            self.log.info("MOFED drivers are not ready, skipping the nvidia-peermem probe")
            return True
        if self.host.exists("/sys/module/nvidia_peermem/refcnt"):
            return True
        self.log.error("nvidia-peermem module is not loaded")
        return False

    def reload_peermem(self) -> None:
        """Sidecar: (re)load nvidia-peermem once MOFED and the driver are ready, then wait."""
        host_mofed = self.env.get("USE_HOST_MOFED", "false") == "true"
        while not (
            self.host.exists(READY_FILE)
            and ("mlx5_core" in read_node(self.host).loaded if host_mofed else self.host.exists(MELLANOX_READY))
        ):
            self.log.info("waiting for the Mellanox OFED and NVIDIA drivers")
            if self.wait(10):
                return
        node = read_node(self.host)
        if "nvidia_peermem" not in node.loaded:
            kernel = decide.select_kernel(node, self.image.kernels(), self.image.driver_branch, self.image.arch)
            module_type = self._loaded_type(kernel)
            ko, = self._modules(kernel, module_type, (PEERMEM,), node.kernel)
            if decide.peermem_stub(depends(ko)):
                raise NodeError(decide.PEERMEM_STUB, decide.DMA_BUF_ROUTE)
            p = self._params().params.get(PEERMEM, ())
            deps = [d for d in depends(ko) if d not in node.loaded]
            if deps:
                self._cmd(*HOST_NS, "modprobe", "-a", *deps, what="load host modules " + ",".join(deps))
            self._cmd("insmod", str(ko), *p, what="load nvidia-peermem")
        self.log.info("nvidia-peermem loaded, waiting for SIGTERM")
        self.wait(None)

    def _loaded_type(self, kernel: str) -> str:
        """Which of the image's module sets the loaded nvidia came from (by srcversion)."""
        loaded = (self.host.read_opt("/sys/module/nvidia/srcversion") or "").strip()
        for t in self.image.module_types(kernel):
            record = self.image.record(kernel, t, "nvidia")
            if record is not None and record.srcversion == loaded:
                return t
        raise NodeError("the loaded nvidia module is not one of this image's", "restart the driver pod first")

    # ---------------------------------------------------------------- linking split modules

    def _verify(self, kernel: str, module_type: str, modules: tuple[str, ...]) -> None:
        for m in modules:
            self.image.verify(kernel, module_type, m)

    def _modules(self, kernel: str, module_type: str, modules: tuple[str, ...], running: str) -> list[Path]:
        """The .ko files to insert, in order: every file they are made from is checked against the manifest
        first (whatever the linker), then split modules are linked into STAGING_DIR and checked again."""
        self._verify(kernel, module_type, modules)
        return [self._link(kernel, module_type, m, running) for m in modules]

    def _link(self, kernel: str, module_type: str, module: str, running: str) -> Path:
        patched = self.image.patched_module(kernel, module_type, module)
        split = self.image.split_module(kernel, module_type, module)
        if patched is None and split is None:
            return self.image.ko(kernel, module_type, module)
        stage = f"{STAGING_DIR}/{kernel}/{module_type}"
        self.host.makedirs(stage)
        out = self.host.path(f"{stage}/{module}.ko")
        tmp = out.with_name(f".{out.name}.tmp")
        problem = None
        try:
            if patched is not None:
                actual = self._rebuild(patched, tmp, module, kernel)
                problem = _link_problem(tmp, module, patched.sha256, patched.srcversion, running, actual=actual)
            elif split is not None:
                for argv in split.parts.link_steps("ld", split.paths, str(tmp)):
                    res = self.host.run(*argv)
                    if res.rc != 0:
                        raise NodeError(f"could not link {module}.ko for kernel {kernel} from its parts: "
                                        f"{_reason(res.stderr or res.stdout)}", "the image needs a working ld (binutils)")
                same = self._ld_version() == split.parts.linker
                problem = _link_problem(tmp, module, split.sha256 if same else "", split.srcversion, running,
                                        split.parts.linker)
            if problem:
                raise NodeError(problem, "rebuild the image from one bundle; do not mix parts of different builds")
            if patched is not None and patched.signature is not None:  # the gated bytes: checked above
                with tmp.open("ab") as f:
                    f.write(patched.signature.read_bytes())
            elif split is not None and split.signature is not None:
                self._sign(tmp, module, split)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)  # a failed or killed ld can leave a partial output behind
        if patched is not None:
            self.log.info("module rebuilt from its patch", module=module, type=module_type, path=str(out),
                          sha256="the build's", signed="yes" if patched.signature else "no")
        elif split is not None:
            self.log.info("module linked", module=module, type=module_type, path=str(out),
                          sha256="the build's" if split.signature or self._ld_version() == split.parts.linker
                          else "not compared (other ld)", signed="yes" if split.signature else "no")
        return out

    def _rebuild(self, patched: PatchedModule, out: Path, module: str, kernel: str) -> str:
        """Write the module made of NVIDIA's binary object and the build's patch to `out`, and return its
        sha256: no linker, no objtool (they ran at build time); `_link_problem` holds it to the gated one."""
        try:
            with patched.binary.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as binary:
                data = apply_patch(patched.patch.read_bytes(), binary)
        except (OSError, ValueError) as exc:
            raise NodeError(f"could not rebuild {module}.ko for kernel {kernel} from its patch: {exc}",
                            PULL_AGAIN) from exc
        out.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def _sign(self, ko: Path, module: str, split: SplitModule) -> None:
        """Append the build's signature, which covers exactly the gated bytes: only to those bytes, whatever
        the linker (a kernel that enforces signatures would refuse any other module under it)."""
        assert split.signature is not None
        actual = sha256_file(ko)
        if actual != split.sha256:
            raise NodeError(f"{module}.ko linked on this node (sha256 {actual[:16]}) is not the module the build "
                            f"gated and signed (sha256 {split.sha256[:16]}); its signature would not verify, "
                            "refusing to load it",
                            f"link with the build's linker ({split.parts.linker}): the image's own, unchanged")
        with ko.open("ab") as f:
            f.write(split.signature.read_bytes())

    def _ld_version(self) -> str:
        if self._linker is None:
            res = self.host.run("ld", "--version")
            self._linker = res.stdout.splitlines()[0].strip() if res.rc == 0 and res.stdout.strip() else "unknown"
        return self._linker

    # ---------------------------------------------------------------- helpers

    def _cmd(self, *argv: str, what: str) -> None:
        res = self.host.run(*argv)
        if res.rc != 0:
            raise NodeError(f"could not {what}: `{' '.join(argv)}` failed: {_reason(res.stderr or res.stdout)}")

    def _kernel_log_lines(self) -> list[str]:
        return self.host.run("dmesg").stdout.splitlines()

    def _kernel_log(self, before: list[str] | None = None) -> str:
        lines = self._kernel_log_lines()
        new = lines[len(before):] if before is not None and lines[: len(before)] == before else lines[-5:]
        return " | ".join(line.strip() for line in new[-5:]) or "nothing new"


def _daemon_log(name: str) -> str:
    return {"nvidia-persistenced": "syslog of the node", "nv-fabricmanager": "/var/log/fabricmanager.log",
            "nvlsm": "/var/log/nvlsm.log"}[name]


def _loaded_version(node: Node) -> str | None:
    if "nvidia" not in node.loaded:
        return None
    return node.loaded["nvidia"] or "unknown"


def _link_problem(ko: Path, module: str, sha256: str, srcversion: str, running: str, linker: str = "",
                  actual: str = "") -> str | None:
    """Why a module made on this node must not be loaded (None: it is the module the build gated).

    `sha256`: the bytes it must have ("": not compared, another linker may lay it out otherwise);
    `linker`: the build's linker when it was linked with it, "" when it was rebuilt from the build's patch;
    `actual`: its sha256 when the caller has it ("": read from `ko`).
    """
    how, source = ("linked", "parts") if linker else ("rebuilt", "patch")
    info = modinfo(ko)
    vermagic = info.get("vermagic", "").split(" ")[0]
    actual_srcversion = info.get("srcversion", "")
    if vermagic != running or actual_srcversion != srcversion:
        return (f"{module}.ko {how} from this image's {source} has vermagic {vermagic or '?'} and srcversion "
                f"{actual_srcversion or '?'}, but the running kernel is {running} and the manifest's srcversion is "
                f"{srcversion}; refusing to load it")
    if sha256:
        actual = actual or sha256_file(ko)
        if actual != sha256:
            return (f"{module}.ko {how} on this node (sha256 {actual[:16]}) differs from the module the "
                    f"build linked and gated (sha256 {sha256[:16]})"
                    f"{f' with the same linker ({linker})' if linker else ''}; refusing to load it")
    return None


def _reason(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
