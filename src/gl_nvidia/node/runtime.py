"""The `nvidia-driver` verbs: init (load, expose, wait, tear down), check-load, the peermem helpers.

The lifecycle lives here: the plan, the install order, the state file, teardown. Each concern it drives is a
part of its own, built on the one Context: link.py (the .ko files), modules.py (parameters, firmware, insmod,
device nodes), driverroot.py (the mount), daemons.py and fabric.py. Decisions come from decide.py; every
host effect goes through Host; every step logs one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from . import decide
from .context import HOST_NS, Context, reason
from .daemons import MONITOR_PERIOD, Daemons, daemon_log
from .decide import PEERMEM, Node, NodeError, TypeChoice
from .detect import read_node
from .driverroot import DriverRoot
from .fabric import Fabric
from .link import Linker
from .modinfo import depends, modinfo
from .modules import Modules

STATE_FILE = "/run/nvidia/nvidia-driver.state"
PID_FILE = "/run/nvidia/nvidia-driver.pid"  # locked while an init runs: one driver container per node
# The operator's startup probe (its driver DaemonSet's startup-probe.sh) fails while this file exists and
# does not say "Ready"; on success it writes READY_FILE, which the validator and the peermem sidecar wait for.
READY_FILE = "/run/nvidia/validations/.driver-ctr-ready"
DAEMONS_STATUS = "/run/nvidia/validations/.driver-daemons-status"
MELLANOX_READY = "/run/mellanox/drivers/.driver-ready"


@dataclass(frozen=True)
class Plan:
    """What `init` decided for this node (also what `--dry-run` prints)."""

    node: Node
    kernel: str
    module_type: TypeChoice
    modules: tuple[str, ...]


@dataclass
class Runtime(Context):
    """The verbs over the parts; what each part started (modules, mount, daemons) it also undoes."""

    linker: Linker = field(init=False)
    modules: Modules = field(init=False)
    root: DriverRoot = field(init=False)
    daemons: Daemons = field(init=False)
    fabric: Fabric = field(init=False)

    def __post_init__(self) -> None:
        self.linker = Linker(self)
        self.modules = Modules(self)
        self.root = DriverRoot(self)
        self.daemons = Daemons(self)
        self.fabric = Fabric(self, self.daemons)

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
                self.root.expose()
                self._start_daemons(plan)
            else:
                if loaded is not None:
                    self.log.info("driver loaded with another configuration, reloading", version=loaded,
                                  digest=digest or "unset", state=(state or "absent").strip())
                    # A damaged image must not cost the node the driver it runs.
                    self.linker.verify(plan.kernel, plan.module_type.module_type, plan.modules)
                    if not self.modules.unload():
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
                      daemons=",".join(self.daemons.names) or "none")
        while not self.wait(MONITOR_PERIOD):
            down = self.daemons.down()
            if down:  # the pod must not stay ready without them: stop, and let the kubelet start it again
                why = f"{down[0]} exited"
                self.log.error(f"{why}, shutting down so the pod restarts", daemon=down[0])
                self.teardown(why=why)
                raise NodeError(f"{why} while the driver was ready; {DAEMONS_STATUS} says NotReady",
                                f"see the daemon's log ({daemon_log(down[0])}); the kubelet restarts the pod")
        self.log.info("signal received, shutting down")
        self.teardown()

    def _install(self, plan: Plan) -> None:
        self.log.info("module type", type=plan.module_type.module_type, reason=plan.module_type.reason)
        t = plan.module_type.module_type
        params = self.modules.with_defaults(self.modules.params(), t, plan.node)
        kos = self.linker.prepare(plan.kernel, t, plan.modules, plan.node.kernel)  # verified (and linked) before the host is touched
        self.modules.firmware_path(params.params.get("nvidia", ()))
        self.root.expose()  # before insmod: GSP firmware is read through the driver root at GPU init
        self.modules.iommu_identity(plan.node)
        self.modules.support_modules(plan.node)
        self.modules.load(plan.node, t, plan.modules, params, kos)
        self.modules.device_nodes(plan.node)
        self._start_daemons(plan)

    def _start_daemons(self, plan: Plan) -> None:
        if self.image.has("nvidia-persistenced"):
            self.daemons.start("nvidia-persistenced", "--persistence-mode")
        else:
            self.log.warn("nvidia-persistenced not in this image; persistence mode stays off")
        self.fabric.start(plan.node)

    # ---------------------------------------------------------------- teardown

    def teardown(self, failed: bool = False, why: str = "") -> None:
        """Stop daemons, unload modules unless in use, undo the mount, remove the ready file and say NotReady.

        Never raises: after a failed init the error that stopped it is the one to report, and every step
        is tried whatever the one before it met. A step that fails is a warning line.
        """
        status = "NotReady" + (f": {why}" if why else "") + "\n"
        self._teardown_step("mark the daemons not ready", lambda: self.host.write_atomic(DAEMONS_STATUS, status))
        self._teardown_step("stop the daemons", self.daemons.stop)
        if not failed or self.modules.loaded:
            self._teardown_step("unload the modules", self._unload_and_drop_state)
        if self.root.mounted or not failed:
            self._teardown_step("unmount the driver root", self.root.umount_if_mounted)
        self._teardown_step("remove the ready file", lambda: self.host.remove(READY_FILE))
        self.log.info("teardown done", failed=failed)

    def _teardown_step(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:  # the promise is "never raises": say what failed, go on
            error = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
            self.log.warn(f"teardown: could not {what}", error=error or type(exc).__name__)

    def _unload_and_drop_state(self) -> None:
        if self.modules.unload():
            self.host.remove(STATE_FILE)

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
            ko, = self.linker.modules(kernel, t, ("nvidia",), node.kernel)
            deps = [d for d in depends(ko) if d not in node.loaded]
            if deps:
                self.host.run(*HOST_NS, "modprobe", "-a", *deps)
            before = self.kernel_log_lines()
            res = self.host.run("insmod", str(ko))
            fields = {"kernel": kernel, "type": t, "version": modinfo(ko).get("version", "?")}
            if res.rc == 0:
                self.host.run("rmmod", "nvidia")
                self.log.info("check-load: loaded (and unloaded again)", **fields)
            elif "No such device" in res.stderr:
                self.log.info("check-load: ABI OK, no GPU on this machine", **fields,
                              kernel_log=self.kernel_log(before))
            else:
                ok = False
                self.log.error("check-load: rejected by the kernel", **fields, error=reason(res.stderr),
                               kernel_log=self.kernel_log(before))
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
            ko, = self.linker.modules(kernel, module_type, (PEERMEM,), node.kernel)
            if decide.peermem_stub(depends(ko)):
                raise NodeError(decide.PEERMEM_STUB, decide.DMA_BUF_ROUTE)
            p = self.modules.params().params.get(PEERMEM, ())
            deps = [d for d in depends(ko) if d not in node.loaded]
            if deps:
                self.cmd(*HOST_NS, "modprobe", "-a", *deps, what="load host modules " + ",".join(deps))
            self.cmd("insmod", str(ko), *p, what="load nvidia-peermem")
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


def _loaded_version(node: Node) -> str | None:
    if "nvidia" not in node.loaded:
        return None
    return node.loaded["nvidia"] or "unknown"
