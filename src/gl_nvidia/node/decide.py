"""Pure decisions of the node runtime: plain data in, a choice (with its reason) or a NodeError out."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..arches import ARM64, by_machine

NVIDIA = 0x10DE
MELLANOX = 0x15B3
TURING_FIRST_DEVICE = 0x1E00  # open kernel modules need Turing or newer
OPEN_DEFAULT_BRANCH = 560  # from this branch on, NVIDIA defaults to the open modules
MODULE_TYPES = ("open", "proprietary")
# Load order: each module depends on the ones before it.
MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset")
PEERMEM = "nvidia-peermem"
NVIDIA_FS = "nvidia-fs"  # GPUDirect Storage, loaded when GDS_ENABLED=true
CONF_DIR = "/drivers"


class NodeError(Exception):
    """A condition the node cannot proceed past: one line saying what is wrong, and a hint what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class PciDevice:
    address: str  # "0000:3b:00.0"
    vendor: int
    device: int
    pci_class: int  # 24-bit class code, 0x030200

    @property
    def is_gpu(self) -> bool:
        return self.vendor == NVIDIA and self.pci_class >> 8 in (0x0300, 0x0302)

    @property
    def is_nvswitch(self) -> bool:
        return self.vendor == NVIDIA and self.pci_class >> 8 == 0x0680

    @property
    def pci_id(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


@dataclass(frozen=True)
class Node:
    kernel: str  # uname -r
    devices: tuple[PciDevice, ...]
    loaded: dict[str, str | None] = field(default_factory=dict)  # module name -> version (if it has one)
    os_release: dict[str, str] = field(default_factory=dict)
    # NVLink5 (Blackwell NVL): the NVLink switches are managed through ConnectX ports (VPD "SW_MNG")
    # instead of NVSwitch PCI devices; fabric manager needs the NVLink subnet manager there.
    nvlink5: bool = False
    machine: str = ""  # the running kernel's machine: x86_64, aarch64

    @property
    def gpus(self) -> tuple[PciDevice, ...]:
        return tuple(d for d in self.devices if d.is_gpu)

    @property
    def nvswitches(self) -> tuple[PciDevice, ...]:
        return tuple(d for d in self.devices if d.is_nvswitch)

    @property
    def mellanox(self) -> tuple[PciDevice, ...]:
        return tuple(d for d in self.devices if d.vendor == MELLANOX)

    @property
    def coherent_gpus(self) -> tuple[PciDevice, ...]:
        """GPUs coupled to a Grace CPU over NVLink-C2C (GH200, GB200, GB300): their memory is coherent
        with the CPU's. Only arm64 nodes have them."""
        if by_machine(self.machine) != ARM64:
            return ()
        return tuple(g for g in self.gpus if g.device in COHERENT_DEVICE_IDS)


# The C2C-coherent GPUs of Grace superchips, by PCI device id: the table the kernel's nvgrace-gpu VFIO driver
# binds (drivers/vfio/pci/nvgrace-gpu/main.c, Linux 6.18): GH200 120GB, GH200 480GB, GH200, GB200, GB300.
COHERENT_DEVICE_IDS = frozenset({0x2342, 0x2345, 0x2348, 0x2941, 0x31C2})

# Device-id ranges by architecture, for humans; the open/proprietary rule uses TURING_FIRST_DEVICE only.
# Ordered: the first range that contains the id wins (GH100 sits inside the Ampere GA10x span).
_ARCHES = (
    (0x2300, 0x233F, "Hopper"),
    (0x2900, 0x2FFF, "Blackwell"),
    (0x2680, 0x28FF, "Ada Lovelace"),
    (0x2200, 0x25FF, "Ampere"),
    (0x2180, 0x21FF, "Turing"),
    (0x2000, 0x20FF, "Ampere"),
    (0x1E00, 0x1FFF, "Turing"),
    (0x1D80, 0x1DFF, "Volta"),
    (0x15F0, 0x15FF, "Pascal"),
    (0x1B00, 0x1D7F, "Pascal"),
    (0x1340, 0x17FF, "Maxwell"),
)


def architecture(device: int) -> str:
    for lo, hi, name in _ARCHES:
        if lo <= device <= hi:
            return name
    return "newer than Blackwell" if device > 0x2FFF else "older than Maxwell"


def describe_gpu(gpu: PciDevice) -> str:
    return f"{gpu.address} [{gpu.pci_id}] {architecture(gpu.device)}"


# The OS records' (gl_nvidia.osprofile) VERSION_ID rule, in the standard library: an OS whose nodes all
# report one VERSION_ID, by the os-release key the values' NFD rule matches (tests/test_osprofile.py
# holds the two equal).
FIXED_VERSION_IDS = {"gardenlinux": ("GARDENLINUX_VERSION", "0")}


def os_tag(os_release: dict[str, str]) -> str:
    """The GPU Operator's `<ID><VERSION_ID>`; Garden Linux nodes report VERSION_ID=0 (the NFD rule)."""
    os_id = os_release.get("ID", "unknown")
    for fixed_id, (key, version_id) in FIXED_VERSION_IDS.items():
        if os_id == fixed_id or key in os_release:
            return f"{fixed_id}{version_id}"
    return f"{os_id}{os_release.get('VERSION_ID', '')}"


def tag_kernel(kernel: str) -> str:
    """image/tags.py's rule: `+` is not valid in an OCI tag and becomes `_` (names without `+` unchanged)."""
    return kernel.replace("+", "_")


def select_kernel(node: Node, image_kernels: list[str], driver_branch: str, image_arch: str) -> str:
    """The kernel directory this image holds for the running kernel, or the one-line reason there is none.

    An image of another architecture is refused first, whatever kernel names it holds: its modules and
    tools cannot run here (an amd64 image reaches an arm64 node through a wrong tag or a mirror that
    dropped the arch, and runs at all only under binfmt emulation)."""
    needed = f"driver:{driver_branch}-{tag_kernel(node.kernel)}-{os_tag(node.os_release)}"
    known = by_machine(node.machine)
    node_arch = known.debian if known else node.machine  # the Debian name images and manifests use
    if node_arch and image_arch and node_arch != image_arch:
        raise NodeError(
            f"this image is for {image_arch}, but this node's kernel {node.kernel} is {node_arch} ({node.machine}); "
            f"the node needs {needed}",
            f"publish the {node_arch} image under that tag (the kernel's name carries its architecture)",
        )
    if node.kernel in image_kernels:
        return node.kernel
    held = ", ".join(image_kernels) if image_kernels else "none"
    raise NodeError(
        f"no modules for kernel {node.kernel} in this image (it holds {held}); the node needs {needed}",
        "build and publish that image (gl-nvidia build/image/publish for this kernel), "
        "or check the node's kernel-version label",
    )


@dataclass(frozen=True)
class TypeChoice:
    module_type: str
    reason: str


def choose_module_type(
    requested: str, driver_branch: str, gpus: tuple[PciDevice, ...], available: list[str]
) -> TypeChoice:
    """KERNEL_MODULE_TYPE -> the module type to load, given the GPUs and what the image holds for this kernel."""
    req = (requested or "auto").strip().lower()
    if req not in ("auto", *MODULE_TYPES):
        raise NodeError(
            f"KERNEL_MODULE_TYPE={requested!r} is not one of auto, open, proprietary",
            "set driver.kernelModuleType in the ClusterPolicy to auto, open or proprietary",
        )
    pre_turing = [g for g in gpus if g.device < TURING_FIRST_DEVICE]
    if req == "open" and pre_turing:
        raise NodeError(
            "KERNEL_MODULE_TYPE=open, but the open kernel modules need Turing or newer "
            f"(PCI device id >= 0x{TURING_FIRST_DEVICE:04x}) and this node has "
            + ", ".join(describe_gpu(g) for g in pre_turing),
            "use KERNEL_MODULE_TYPE=auto or proprietary on this node",
        )
    held = ", ".join(available) or "none"
    if req != "auto":
        if req not in available:
            raise NodeError(
                f"KERNEL_MODULE_TYPE={req}, but this image holds no {req} modules for this kernel (it holds: {held})",
                "use KERNEL_MODULE_TYPE=auto, or an image built with that module type",
            )
        return TypeChoice(req, f"KERNEL_MODULE_TYPE={req}")

    branch = int(driver_branch) if driver_branch.isdigit() else 0
    if pre_turing:
        preferred, why = "proprietary", "a pre-Turing GPU is present (" + describe_gpu(pre_turing[0]) + ")"
    elif branch >= OPEN_DEFAULT_BRANCH:
        preferred, why = "open", f"branch {driver_branch} >= {OPEN_DEFAULT_BRANCH} and every GPU is Turing or newer"
    else:
        preferred, why = "proprietary", f"branch {driver_branch} < {OPEN_DEFAULT_BRANCH} defaults to proprietary"
    if preferred in available:
        return TypeChoice(preferred, f"auto: {why}")
    if preferred == "proprietary" and "open" in available and not pre_turing:
        return TypeChoice("open", f"auto: {why}, but this image holds only open modules for this kernel")
    raise NodeError(
        f"KERNEL_MODULE_TYPE=auto chose {preferred} ({why}), but this image holds no {preferred} modules "
        f"for this kernel (it holds: {held})",
        "use an image built with proprietary modules for this kernel",
    )


def check_loaded(loaded_version: str | None, ours: str) -> None:
    if loaded_version is not None and loaded_version != ours:
        raise NodeError(
            f"nvidia {loaded_version} is already loaded on this node; this image carries {ours}",
            "drain the GPU pods and unload the old driver (the k8s-driver-manager init container does this), "
            "or deploy the image for driver " + loaded_version,
        )


def fast_path(loaded_version: str | None, ours: str, digest: str, state: str | None) -> bool:
    """Same driver already loaded with the same configuration: keep the modules, running GPU jobs survive."""
    return bool(digest) and loaded_version == ours and state is not None and state.strip() == digest


# A value holds no control character: the kernel's parameter parser would cut it, and insmod's argv cannot
# carry a NUL.
_PARAM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(=[^\x00-\x1f\x7f]*)?$")
# shlex.split(line, comments=True) in one regular-expression pass (shlex grows its token a character at a
# time, quadratic on a long line): unquoted runs, backslash escapes, '...', "..." with \" and \\ escapes;
# an unquoted # starts a comment. Each word is a run of these pieces.
_PIECE = r"[^ \t\r\n'\"\\#]+|(?:\\.)+|'[^']*'|\"(?:[^\"\\]|\\.)*\""
_WORD = re.compile(rf"[ \t\r\n]*(?:((?:{_PIECE})+)|#.*|(.)|$)", re.S)
_UNESCAPE = re.compile(r"\\(.)", re.S)
_UNESCAPE_DQ = re.compile(r'\\(["\\])')


def _unquote(word: str) -> str:
    out = []
    for m in re.finditer(_PIECE, word, re.S):
        piece = m.group()
        if piece[0] == "'":
            out.append(piece[1:-1])
        elif piece[0] == '"':
            out.append(_UNESCAPE_DQ.sub(r"\1", piece[1:-1]))
        else:
            out.append(_UNESCAPE.sub(r"\1", piece))
    return "".join(out)


def split_words(line: str) -> list[str]:
    """`shlex.split(line, comments=True)`, linear in the line's length; ValueError where shlex raises one."""
    words: list[str] = []
    pos = 0
    while m := _WORD.match(line, pos):  # always matches: its last alternative is the end of the line
        word, other = m.groups()
        if word is None:
            if other is not None:
                raise ValueError("no closing quotation, or a backslash at the end")
            return words  # a comment, or the end of the line
        words.append(_unquote(word))
        pos = m.end()
    return words


@dataclass(frozen=True)
class ModuleParams:
    params: dict[str, tuple[str, ...]]  # module name -> parameters, in file order
    problems: tuple[str, ...]  # "<file>:<line>: <what is wrong>"


def parse_module_conf(name: str, text: str, path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """One `<module>.conf`: parameters, one or more per line; comments (#) and blank lines skipped.

    A problem names the file, the line and the parameter's name, never the value (a line may be long)."""
    params: list[str] = []
    problems: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = split_words(line)
        except ValueError as exc:
            problems.append(f"{path}:{n}: {exc}")
            continue
        bad = [w for w in words if not _PARAM.match(w)]
        if bad:
            key = bad[0].partition("=")[0]
            what = (f"{shown(key)}'s value holds a control character" if _PARAM.match(key)
                    else f"{shown(bad[0])} is not a {name} parameter (expected name=value)")
            problems.append(f"{path}:{n}: {what}")
            continue
        params += words
    return tuple(params), tuple(problems)


def shown(word: str) -> str:
    """A word from a user's file for an error line: printable, and short."""
    text = repr(word[:40])
    return text + ("..." if len(word) > 40 else "")


def module_params(confs: dict[str, tuple[str, str]]) -> ModuleParams:
    """`confs`: module name -> (path, text) for each /drivers/<module>.conf present."""
    params: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []
    for name, (path, text) in sorted(confs.items()):
        p, bad = parse_module_conf(name, text, path)
        params[name] = p
        problems += bad
    return ModuleParams(params, tuple(problems))


def firmware_path_action(current: str, ours: str, nvidia_params: tuple[str, ...]) -> str:
    """What to do with /sys/module/firmware_class/parameters/path: "set", "keep" (already ours), "skip", "retain"."""
    if "NVreg_EnableGpuFirmware=0" in nvidia_params:
        return "skip"
    cur = current.strip()
    if not cur:
        return "set"
    return "keep" if cur == ours else "retain"


def modules_to_load(node: Node, rdma_enabled: bool, host_mofed: bool) -> tuple[str, ...]:
    """init loads nvidia-peermem only against the host's MOFED; with MOFED in the network operator's
    container, the peermem sidecar loads it once MOFED is ready (loading the in-tree ib_core earlier
    would stand in MOFED's way)."""
    if rdma_enabled and host_mofed and node.mellanox:
        return (*MODULES, PEERMEM)
    return MODULES


# nvidia-peermem registers GPU memory with MOFED's peer-memory API in ib_core; built against a kernel's inbox
# RDMA stack, which lacks that API, NVIDIA compiles it to a stub whose init returns -EINVAL and which uses
# nothing of ib_core. Inbox RDMA reaches GPU memory through DMA-BUF instead (open modules, no nvidia-peermem).
PEERMEM_STUB = ("nvidia-peermem in this image is built against the kernel's inbox RDMA stack, which has no "
                "peer-memory API (MOFED's): its init refuses to load")
DMA_BUF_ROUTE = ("use GPUDirect RDMA through DMA-BUF: open kernel modules (driver.kernelModuleType auto or open) "
                 "and driver.rdma.enabled=false; NCCL and UCX use DMA-BUF where the kernel and driver offer it")


def peermem_stub(depends: tuple[str, ...]) -> bool:
    return "ib_core" not in depends


def gds_enabled(value: str) -> bool:
    """GDS_ENABLED (the GPU Operator's name on the driver container): true or false, nothing else."""
    if value.strip().lower() not in ("true", "false"):
        raise NodeError(f"GDS_ENABLED={value!r} is not true or false",
                        "set GDS_ENABLED to true (load nvidia-fs) or false in driver.env")
    return value.strip().lower() == "true"


# HMM in nvidia-uvm exists only in the open modules (from branch 535); the seed installer turns it off
# (`uvm_disable_hmm=1`): with HMM on, multi-GPU CUDA on recent GPUs hangs or fails to initialise.
HMM_FIRST_BRANCH = 535
UVM_DISABLE_HMM = "uvm_disable_hmm=1"


def uvm_params(module_type: str, driver_branch: str, params: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """nvidia-uvm's parameters with the HMM default added where it applies, and why (for the log).

    A `uvm_disable_hmm` in /drivers/nvidia-uvm.conf, whatever its value, wins over the default."""
    if any(p.split("=", 1)[0] == "uvm_disable_hmm" for p in params):
        return params, "uvm_disable_hmm from /drivers/nvidia-uvm.conf"
    branch = int(driver_branch) if driver_branch.isdigit() else 0
    if module_type != "open" or branch < HMM_FIRST_BRANCH:
        return params, f"no HMM in the {module_type} modules of branch {driver_branch}"
    return (*params, UVM_DISABLE_HMM), f"default for the open modules of branch {driver_branch} (HMM off)"


# NVIDIA's entrypoint (R580 on) loads nvidia with NVreg_CoherentGPUMemoryMode=driver: the driver keeps a
# coherent GPU's memory instead of onlining it as a NUMA node, which the kubelet would count as the node's
# memory. Branches before 580 do not have the parameter.
COHERENT_FIRST_BRANCH = 580
COHERENT_PARAM = "NVreg_CoherentGPUMemoryMode"


def coherent_params(driver_branch: str, node: Node, params: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """nvidia's parameters with the coherent-memory default added where the branch has it, and why (for the
    log; "warn: ..." where a Grace node keeps its GPU memory as NUMA nodes).

    An NVreg_CoherentGPUMemoryMode in /drivers/nvidia.conf, whatever its value, wins over the default."""
    grace = node.coherent_gpus
    where = f"{len(grace)} Grace-coupled GPU(s)" if grace else "no Grace-coupled GPU"
    if any(p.split("=", 1)[0] == COHERENT_PARAM for p in params):
        return params, f"{COHERENT_PARAM} from /drivers/nvidia.conf ({where})"
    branch = int(driver_branch) if driver_branch.isdigit() else 0
    if branch < COHERENT_FIRST_BRANCH:
        if grace:
            return params, (f"warn: branch {driver_branch} has no {COHERENT_PARAM} (from {COHERENT_FIRST_BRANCH}): "
                            "the Grace-coupled GPUs' memory becomes NUMA nodes the kubelet counts as the node's")
        return params, f"branch {driver_branch} < {COHERENT_FIRST_BRANCH} has no {COHERENT_PARAM} ({where})"
    return (f"{COHERENT_PARAM}=driver", *params), f"{COHERENT_PARAM}=driver, NVIDIA's default from {COHERENT_FIRST_BRANCH} ({where})"


# NVFM_CONFIG_<KEY>=<value> in the container's environment sets fabricmanager.cfg's KEY (NVIDIA's knob);
# the config's keys are upper case, and a value is one line.
NVFM_PREFIX = "NVFM_CONFIG_"
_FM_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


def fabricmanager_overrides(env: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in sorted(env.items()):
        if not name.startswith(NVFM_PREFIX):
            continue
        key = name.removeprefix(NVFM_PREFIX)
        if not _FM_KEY.match(key):
            raise NodeError(f"{shown(name)} does not name a fabric manager setting (expected {NVFM_PREFIX}<KEY>, "
                            "KEY as in fabricmanager.cfg: upper case, digits, _)",
                            "fix the driver container's env in the ClusterPolicy (driver.env)")
        if any(c in value for c in "\r\n\0"):
            raise NodeError(f"{name} holds a line break; a fabric manager setting is one line",
                            "fix the driver container's env in the ClusterPolicy (driver.env)")
        out[key] = value
    return out


def fabricmanager_config(text: str, overrides: dict[str, str]) -> str:
    """fabricmanager.cfg with each KEY's line set to KEY=value, or the line added when the file has none."""
    lines = text.splitlines()
    for key, value in overrides.items():
        at = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
        for i in at:
            lines[i] = f"{key}={value}"
        if not at:
            lines.append(f"{key}={value}")
    return "".join(line + "\n" for line in lines)


def nvlink_device_args(nvswitches: int) -> list[list[str]]:
    """nvidia-modprobe runs that create the NVSwitch and NVLink device nodes fabric manager opens
    (/dev/nvidia-nvswitchctl, /dev/nvidia-nvswitch<N>, /dev/nvidia-nvlink), as NVIDIA's driver container does."""
    if not nvswitches:
        return []
    return [["-s", *[a for i in range(nvswitches) for a in ("-c", str(i))]], ["-l"]]


def sysfs_name(module: str) -> str:
    return module.replace("-", "_")


def in_use(refcnt: dict[str, int]) -> bool:
    """Refcounts by module (loaded ones only): nvidia is held by its own dependants, nothing else may hold."""
    deps = sum(1 for m in refcnt if m != "nvidia")
    return refcnt.get("nvidia", 0) > deps or any(v > 0 for m, v in refcnt.items() if m != "nvidia")
