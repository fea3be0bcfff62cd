"""The driver in the kernel: module parameters, the firmware search path, the GPUs' IOMMU groups, insmod and
rmmod (with who holds the modules when they stay), and the /dev/nvidia* device nodes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import decide
from .context import HOST_NS, Context, reason
from .decide import MODULES, PEERMEM, Node, NodeError, sysfs_name
from .detect import nvswitch_count
from .driverroot import DRIVER_ROOT
from .modinfo import depends

FIRMWARE_PARAM = "/sys/module/firmware_class/parameters/path"
FIRMWARE_SEARCH_PATH = DRIVER_ROOT + "/lib/firmware"
# NVIDIA's entrypoint loads these before the driver (i2c for the GPUs' I2C buses, the IPMI device interface
# for the BMC's view of the GPUs); a kernel without them still runs CUDA, so a failure is a warning.
SUPPORT_MODULES = ("i2c_core", "ipmi_msghandler", "ipmi_devintf")
UNLOAD_ORDER = (decide.NVIDIA_FS, PEERMEM, "nvidia-modeset", "nvidia-uvm", "nvidia", "nvidia-drm")


class Modules:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.loaded: list[str] = []  # inserted by this run

    def params(self) -> decide.ModuleParams:
        """The parameters in /drivers/<module>.conf, or the one line naming what is malformed."""
        confs = {}
        for m in (*MODULES, PEERMEM):
            path = f"{decide.CONF_DIR}/{m}.conf"
            text = self.ctx.host.read_opt(path)
            if text is not None:
                confs[m] = (path, text)
        params = decide.module_params(confs)
        if params.problems:
            raise NodeError(
                "malformed module parameters: " + "; ".join(params.problems),
                "fix the ConfigMap behind /drivers (one or more name=value per line, # comments)",
            )
        for m, p in params.params.items():
            self.ctx.log.info("module parameters", module=m, params=" ".join(p))
        return params

    def with_defaults(self, params: decide.ModuleParams, module_type: str, node: Node) -> decide.ModuleParams:
        """`params` with nvidia-uvm's and the coherent-memory defaults decide.py picks for this node."""
        ctx = self.ctx
        uvm, why = decide.uvm_params(module_type, ctx.image.driver_branch, params.params.get("nvidia-uvm", ()))
        ctx.log.info("nvidia-uvm parameters", params=" ".join(uvm) or "none", reason=why)
        params = replace(params, params={**params.params, "nvidia-uvm": uvm})
        nvidia, why = decide.coherent_params(ctx.image.driver_branch, node, params.params.get("nvidia", ()))
        if why.startswith("warn: "):
            ctx.log.warn(why.removeprefix("warn: "), gpus=",".join(g.address for g in node.coherent_gpus))
        else:
            ctx.log.info("coherent GPU memory", reason=why)
        return replace(params, params={**params.params, "nvidia": nvidia})

    def firmware_path(self, nvidia_params: tuple[str, ...]) -> None:
        host, log = self.ctx.host, self.ctx.log
        current = host.read_opt(FIRMWARE_PARAM)
        if current is None:
            log.warn("no firmware search path parameter; the kernel must find GSP firmware elsewhere",
                     path=FIRMWARE_PARAM)
            return
        action = decide.firmware_path_action(current, FIRMWARE_SEARCH_PATH, nvidia_params)
        if action == "set":
            try:
                host.write(FIRMWARE_PARAM, FIRMWARE_SEARCH_PATH)
            except OSError as exc:
                log.warn("could not set the firmware search path", path=FIRMWARE_PARAM, error=exc.strerror or str(exc))
                return
        elif action == "retain":
            log.warn("firmware search path already set by someone else, retaining it",
                     current=current.strip(), ours=FIRMWARE_SEARCH_PATH)
            return
        log.info("firmware search path", action=action, path=FIRMWARE_SEARCH_PATH)

    def iommu_identity(self, node: Node) -> None:
        """The GPUs' IOMMU groups in identity mode before the driver binds them, as the seed installer sets
        them on metal nodes: in a translated (DMA) group the GPU faults during probe (IO_PAGE_FAULT) and gets
        no device nodes, and GPUDirect RDMA's peer DMA between NIC and GPU needs it too. The kernel takes the
        change only while no driver is bound; a group that refuses it stays as it is, with a warning."""
        host, log = self.ctx.host, self.ctx.log
        for gpu in node.gpus:
            group = host.readlink(f"/sys/bus/pci/devices/{gpu.address}/iommu_group")
            if not group:
                continue
            type_file = f"/sys/kernel/iommu_groups/{group.rsplit('/', 1)[-1]}/type"
            current = (host.read_opt(type_file) or "").strip()
            if current in ("DMA", "DMA-FQ"):
                try:
                    host.write(type_file, "identity")
                    log.info("iommu group set to identity", gpu=gpu.address, was=current)
                except OSError as exc:
                    log.warn("could not set iommu group to identity", gpu=gpu.address, error=str(exc))

    def support_modules(self, node: Node) -> None:
        wanted = [m for m in SUPPORT_MODULES if m not in node.loaded]
        if not wanted:
            return
        res = self.ctx.host.run(*HOST_NS, "modprobe", "-a", *wanted)
        if res.rc == 0:
            self.ctx.log.info("host modules loaded", modules=",".join(wanted))
        else:
            self.ctx.log.warn("could not load the i2c/ipmi modules NVIDIA's entrypoint loads; the driver runs "
                              "without them (no BMC view of the GPUs)", modules=",".join(wanted),
                              error=reason(res.stderr))

    def load(self, node: Node, module_type: str, modules: tuple[str, ...], params: decide.ModuleParams,
             kos: list[Path]) -> None:
        """insmod each of `modules` (`kos`, in order) the kernel does not hold yet, after the host modules
        they depend on."""
        ctx = self.ctx
        ours = {sysfs_name(m) for m in modules}
        host_deps = sorted({d for k in kos for d in depends(k)} - ours - set(node.loaded))
        if host_deps:
            ctx.cmd(*HOST_NS, "modprobe", "-a", *host_deps, what="load host modules " + ",".join(host_deps))
            ctx.log.info("host modules loaded", modules=",".join(host_deps))
        for m, ko in zip(modules, kos, strict=True):
            if sysfs_name(m) in node.loaded:
                continue
            if m == PEERMEM and decide.peermem_stub(depends(ko)):
                ctx.log.warn(decide.PEERMEM_STUB + ", not loading it", module=m, route=decide.DMA_BUF_ROUTE)
                continue
            p = params.params.get(m, ())
            res = ctx.host.run("insmod", str(ko), *p)
            if res.rc != 0:
                raise NodeError(f"the kernel refused {ko.name}: {reason(res.stderr)}; kernel log: {ctx.kernel_log()}",
                                "run `nvidia-driver check-load` for a diagnosis")
            self.loaded.append(m)
            ctx.log.info("module loaded", module=m, type=module_type, params=" ".join(p))

    def device_nodes(self, node: Node) -> None:
        """/dev/nvidia* on the host (for what runs there) and in this container, whose /dev is the driver
        root's: the validator and the toolkit take the driver root as the dev root once it has a /dev."""
        ctx = self.ctx
        if not ctx.image.has("nvidia-modprobe"):
            ctx.log.warn("nvidia-modprobe not in this image; device nodes are left to the kernel")
            return
        args = ["-u", "-m"] + [a for i in range(len(node.gpus)) for a in ("-c", str(i))]
        switches = nvswitch_count(ctx.host, node)
        for where, tool in (("the host", [*HOST_NS, DRIVER_ROOT + "/usr/bin/nvidia-modprobe"]),
                            ("the driver root", [str(ctx.image.at("/usr/bin/nvidia-modprobe"))])):
            ctx.cmd(*tool, *args, what=f"create /dev/nvidia* on {where}")
            for extra in decide.nvlink_device_args(switches):
                ctx.cmd(*tool, *extra, what=f"create the NVSwitch and NVLink device nodes on {where}")
        ctx.log.info("device nodes created", gpus=len(node.gpus), nvswitches=switches, on="host,driver root")

    def unload(self) -> bool:
        """rmmod the NVIDIA modules unless something holds them; then say who does. True when none is left."""
        host, log = self.ctx.host, self.ctx.log
        refcnt = {}
        for m in UNLOAD_ORDER:
            text = host.read_opt(f"/sys/module/{sysfs_name(m)}/refcnt")
            if text is not None and text.strip().isdigit():
                refcnt[m] = int(text.strip())
        if not refcnt:
            return True
        # nvidia-fs that binds nvidia_p2p_* with symbol_get (2.13.5) holds nvidia only while it is open
        fs_idle = refcnt.get(decide.NVIDIA_FS) == 0 and "nvidia_fs" not in host.listdir("/sys/module/nvidia/holders")
        if decide.in_use({m: n for m, n in refcnt.items() if not (fs_idle and m == decide.NVIDIA_FS)}) \
                or "nvidia-drm" in refcnt:
            log.warn("driver in use, modules stay loaded", holders=self._holders() or "unknown",
                     refcnt=",".join(f"{m}={n}" for m, n in refcnt.items()))
            return False
        res = host.run("rmmod", *[m for m in UNLOAD_ORDER if m in refcnt])
        if res.rc != 0:
            log.warn("rmmod failed, modules stay loaded", error=reason(res.stderr), holders=self._holders() or "unknown")
            return False
        self.loaded.clear()
        log.info("modules unloaded", modules=",".join(m for m in UNLOAD_ORDER if m in refcnt))
        return True

    def _holders(self) -> str:
        """Modules stacked on nvidia and processes with /dev/nvidia* open (hostPID shows the host's)."""
        host = self.ctx.host
        who = [f"module {h}" for h in host.listdir("/sys/module/nvidia/holders")]
        for pid in host.listdir("/proc"):
            if not pid.isdigit():
                continue
            fds = host.listdir(f"/proc/{pid}/fd")
            if any((host.readlink(f"/proc/{pid}/fd/{fd}") or "").startswith("/dev/nvidia") for fd in fds):
                comm = (host.read_opt(f"/proc/{pid}/comm") or "?").strip()
                who.append(f"pid {pid} ({comm})")
        return ", ".join(who)
