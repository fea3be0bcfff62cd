"""NVSwitch systems: fabric manager (with its NVFM_CONFIG_* overrides) and, on NVLink5 systems, the NVLink
subnet manager over ib_umad, both from the image's own files; the NVSwitch monitoring libraries DCGM reads."""

from __future__ import annotations

from ..arches import ARCHES
from . import decide
from .context import HOST_NS, Context
from .daemons import DAEMON_BINARY, DAEMONS, MONITOR_PERIOD, Daemons
from .decide import Node, NodeError
from .detect import nvswitch_count, read_node

FABRICMANAGER = DAEMON_BINARY["nv-fabricmanager"]
FABRICMANAGER_CFG = "/usr/share/nvidia/nvswitch/fabricmanager.cfg"
FABRICMANAGER_START = "/usr/bin/nvidia-fabricmanager-start.sh"  # starts nvlsm, then fabric manager
NVLSM = DAEMON_BINARY["nvlsm"]
NVLSM_CFG = "/usr/share/nvidia/nvlsm/nvlsm.conf"
# the build's name for what each file comes with, to say why the image lacks it
COMPONENT_OF = {FABRICMANAGER: "fabricmanager", FABRICMANAGER_CFG: "fabricmanager",
                FABRICMANAGER_START: "fabricmanager", NVLSM: "nvlsm", NVLSM_CFG: "nvlsm"}
INFINIBAND_MAD = "/sys/class/infiniband_mad"  # ib_umad's umad<N>/issm<N>, each with its dev "major:minor"
INFINIBAND_DEV = "/dev/infiniband"
# NVLink5: NVIDIA's entrypoint waits for the ConnectX driver and ib_umad (another operator may load them).
NVLINK5_MODULES = ("mlx5_core", "ib_umad")
NVLINK5_WAIT = 300.0  # seconds before init gives up on them
# Fabric manager's config with the NVFM_CONFIG_<KEY> overrides applied: in the container, not the image.
FABRICMANAGER_RUN_CFG = "/run/gl-nvidia/fabricmanager.cfg"


class Fabric:
    def __init__(self, ctx: Context, daemons: Daemons) -> None:
        self.ctx = ctx
        self.daemons = daemons

    def start(self, node: Node) -> None:
        """What this node's NVSwitches need running: nvlsm and fabric manager (NVLink5), or fabric manager."""
        if node.nvlink5:
            self._nvlink5()
        elif switches := nvswitch_count(self.ctx.host, node):
            self._require(FABRICMANAGER, FABRICMANAGER_CFG, why=f"this node has {switches} NVSwitch(es)")
            self.daemons.start("nv-fabricmanager", "-c", self._fabricmanager_cfg())
        if node.nvswitches or node.nvlink5:
            self._nscq()

    def _fabricmanager_cfg(self) -> str:
        """The config fabric manager starts with: the image's, or a copy with the NVFM_CONFIG_<KEY>=<value>
        overrides NVIDIA's entrypoint applies (each key's line replaced, or added)."""
        ctx = self.ctx
        overrides = decide.fabricmanager_overrides(ctx.env)
        image_cfg = str(ctx.image.at(FABRICMANAGER_CFG))
        if not overrides:
            return image_cfg
        text = decide.fabricmanager_config(ctx.image.at(FABRICMANAGER_CFG).read_text(), overrides)
        ctx.host.write_atomic(FABRICMANAGER_RUN_CFG, text)
        for key, value in overrides.items():
            ctx.log.info("fabric manager config override", key=key, value=value, source=f"NVFM_CONFIG_{key}")
        return str(ctx.host.path(FABRICMANAGER_RUN_CFG))

    def _nscq(self) -> None:
        """DCGM reads NVSwitch state through libnvidia-nscq (NVLink5: libnvsdm) from the driver root."""
        have = [lib for lib in ("libnvidia-nscq.so", "libnvsdm.so") if self._has_library(lib)]
        if have:
            self.ctx.log.info("nvswitch monitoring libraries", present=",".join(have))
        else:
            self.ctx.log.warn("no libnvidia-nscq or libnvsdm in this image: DCGM cannot read the NVSwitches",
                              why=self.ctx.image.left_out.get("libnvidia_nscq", "not built with them"))

    def _has_library(self, stem: str) -> bool:
        return any(d.is_dir() and any(p.name.startswith(stem) for p in d.iterdir())
                   for d in (self.ctx.image.at(f"/usr/lib/{a.triplet}") for a in ARCHES.values()))

    def _require(self, *paths: str, why: str) -> None:
        """Fabric manager's (and nvlsm's) files in the image, or the one line naming what is missing and why
        the build left it out."""
        image = self.ctx.image
        missing = [p for p in paths if not image.at(p).is_file()]
        if missing:
            components = sorted({COMPONENT_OF[p] for p in missing})
            left = [f"{c}: {image.left_out[c]}" for c in components if c in image.left_out]
            raise NodeError(
                f"{why} but the image has no {', '.join(p.rsplit('/', 1)[-1] for p in missing)}"
                + (f" (the build left it out: {'; '.join(left)})" if left else "")
                + "; CUDA cannot use the GPUs without fabric manager",
                f"build the image with {' and '.join(components)} of this driver release "
                "(the nvidia source ships them from NVIDIA's redist tree)",
            )

    def _nvlink5(self) -> None:
        """Blackwell NVL: NVIDIA's start script runs the NVLink subnet manager (over ib_umad) and then fabric
        manager, both from the image."""
        ctx = self.ctx
        why = "this node is an NVLink5 system (a ConnectX port with SW_MNG)"
        self._require(FABRICMANAGER_START, FABRICMANAGER, FABRICMANAGER_CFG, NVLSM, NVLSM_CFG, why=why)
        self._wait_for_nvlink5_modules(why)
        self._umad_nodes()
        pid = self.daemons.running("nv-fabricmanager")
        if pid is not None:
            ctx.log.info("daemon already running", daemon="nv-fabricmanager", pid=pid)
        else:
            ctx.cmd(str(ctx.image.at(FABRICMANAGER_START)), "--mode", "start",
                    "--fm-config-file", self._fabricmanager_cfg(),
                    "--fm-pid-file", str(ctx.host.path(DAEMONS["nv-fabricmanager"])),
                    "--nvlsm-config-file", str(ctx.image.at(NVLSM_CFG)),
                    "--nvlsm-pid-file", str(ctx.host.path(DAEMONS["nvlsm"])),
                    what="start the NVLink subnet manager and fabric manager")
            for name in ("nvlsm", "nv-fabricmanager"):
                ctx.log.info("daemon started", daemon=name, pid=self.daemons.started(name))
            if decide.fabricmanager_overrides(ctx.env).get("FABRIC_MODE") == "1":
                # NVIDIA's entrypoint: a GPU reset clears fabric partitions left from before FABRIC_MODE=1
                ctx.cmd(str(ctx.image.at("/usr/bin/nvidia-smi")), "-r", what="reset the GPUs for FABRIC_MODE=1")
                ctx.log.info("gpus reset after fabric manager start", reason="NVFM_CONFIG_FABRIC_MODE=1")
        self.daemons.names += ["nvlsm", "nv-fabricmanager"]  # stopped in reverse: fabric manager first
        # IMEX runs per workload, from the driver root, under the DRA driver's compute domains (which also
        # make the channels): the node only says whether this image can serve them.
        if ctx.image.has("nvidia-imex"):
            ctx.log.info("imex available", binary="/usr/bin/nvidia-imex", started_by="DRA driver compute domains")
        else:
            ctx.log.warn("no nvidia-imex in this image: multi-node NVLink compute domains cannot start",
                         why=ctx.image.left_out.get("imex", "not built with it"))

    def _wait_for_nvlink5_modules(self, why: str) -> None:
        """mlx5_core comes from the host or the network operator, maybe after this pod starts: wait for it
        (bounded, a line every try) and load ib_umad from the host once it is there, as NVIDIA's entrypoint
        waits for both."""
        ctx = self.ctx
        waited = 0.0
        while True:
            loaded = read_node(ctx.host).loaded
            if "mlx5_core" in loaded and "ib_umad" not in loaded:
                ctx.cmd(*HOST_NS, "modprobe", "ib_umad", what="load ib_umad (the subnet manager's MAD interface)")
                ctx.log.info("host modules loaded", modules="ib_umad")
                loaded = read_node(ctx.host).loaded
            missing = [m for m in NVLINK5_MODULES if m not in loaded]
            if not missing:
                return
            if waited >= NVLINK5_WAIT:
                raise NodeError(f"{why}, but {' and '.join(missing)} did not load within {NVLINK5_WAIT:.0f} s: the "
                                "NVLink subnet manager reaches the switches through them",
                                "load the Mellanox driver (the host's or the network operator's); the pod retries")
            ctx.log.info("waiting for the kernel modules the NVLink subnet manager needs",
                         missing=",".join(missing), waited_s=int(waited), limit_s=int(NVLINK5_WAIT))
            ctx.sleep(MONITOR_PERIOD)
            waited += MONITOR_PERIOD

    def _umad_nodes(self) -> None:
        """The /dev/infiniband nodes ib_umad's devices need in this container: a device the module made
        after the container started has a node on the host only."""
        host = self.ctx.host
        made, seen = [], 0
        for name in host.listdir(INFINIBAND_MAD):
            major, sep, minor = (host.read_opt(f"{INFINIBAND_MAD}/{name}/dev") or "").strip().partition(":")
            if not sep:
                continue  # abi_version
            seen += 1
            node = f"{INFINIBAND_DEV}/{name}"
            if not host.exists(node):
                host.makedirs(INFINIBAND_DEV)
                self.ctx.cmd("mknod", "-m", "0600", str(host.path(node)), "c", major, minor, what=f"create {node}")
                made.append(name)
        if not seen:
            raise NodeError(f"ib_umad is loaded but {INFINIBAND_MAD} lists no umad device; the NVLink subnet "
                            "manager has no port to manage the switches through",
                            "check the ConnectX ports of the NVLink switch trays (rdma link show)")
        self.ctx.log.info("infiniband device nodes", created=",".join(made) or "none", present=seen)
