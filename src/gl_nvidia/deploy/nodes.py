"""What a live node tells us through its labels (set by NFD and the GPU Operator)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gl_nvidia.deploy.resolve import NodeOS
from gl_nvidia.deploy.values import KERNEL_LABEL, OS_ID_LABEL, OS_VERSION_LABEL
from gl_nvidia.errors import UserError
from gl_nvidia.osprofile import DEBIAN, PROFILES

# The operator labels GPU nodes `nvidia.com/gpu.present=true`; before it has, NFD's PCI label
# for NVIDIA's vendor id (10de) says the same.
GPU_LABELS = ("nvidia.com/gpu.present", "feature.node.kubernetes.io/pci-10de.present")


@dataclass(frozen=True)
class NodeFacts:
    name: str
    arch: str
    gpu: bool
    kernel: str | None  # NFD's kernel-version.full label
    os_id: str | None
    version_id: str | None
    kubelet_kernel: str  # status.nodeInfo.kernelVersion: known even without NFD

    @property
    def has_nfd_labels(self) -> bool:
        return bool(self.kernel and self.os_id and self.version_id is not None)

    def node_os(self) -> NodeOS:
        assert self.kernel and self.os_id and self.version_id is not None
        return NodeOS(self.os_id, self.version_id, self.kernel)

    @property
    def flavour(self) -> str:
        # Any node's, whatever OS it runs (a cluster is not ours to refuse): every profile names flavours alike.
        return PROFILES.get(self.os_id or "", DEBIAN).kernel_flavour(self.kernel or self.kubelet_kernel)


def _object(value: Any) -> dict[str, Any]:
    """A field of a Node that should be an object; anything else (an API server we cannot trust) reads as empty."""
    return value if isinstance(value, dict) else {}


def node_facts(node: dict[str, Any]) -> NodeFacts:
    meta = _object(node.get("metadata"))
    labels = {str(k): str(v) for k, v in _object(meta.get("labels")).items()}
    info = _object(_object(node.get("status")).get("nodeInfo"))
    return NodeFacts(
        name=str(meta.get("name", "")),
        arch=labels.get("kubernetes.io/arch") or str(info.get("architecture", "")),
        gpu=any(labels.get(k) == "true" for k in GPU_LABELS),
        kernel=labels.get(KERNEL_LABEL),
        os_id=labels.get(OS_ID_LABEL),
        version_id=labels.get(OS_VERSION_LABEL),
        kubelet_kernel=str(info.get("kernelVersion", "")),
    )


def gpu_nodes(nodes: list[dict[str, Any]], server: str, only: str | None = None) -> list[NodeFacts]:
    """The GPU nodes of the cluster at `server` (or the node named `only`); none is one error line."""
    facts = [node_facts(n) for n in nodes]
    if only is not None:
        found = [f for f in facts if f.name == only]
        if not found:
            raise UserError(f"no node named {only!r} in the cluster at {server}", "see `kubectl get nodes`")
        return found
    gpus = [f for f in facts if f.gpu]
    if not gpus:
        raise UserError(f"no GPU nodes in the cluster at {server}",
                        "GPU nodes carry nvidia.com/gpu.present=true or NFD's pci-10de.present=true")
    return gpus
