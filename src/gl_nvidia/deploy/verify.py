"""Prove GPUs work: run the CUDA vectorAdd sample (seed document) on each GPU node and read its verdict."""

from __future__ import annotations

import logging
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from gl_nvidia.deploy.kube import Kube

log = logging.getLogger(__name__)

VECTORADD_IMAGE = "nvcr.io/nvidia/k8s/cuda-sample:vectoradd-cuda12.5.0"
PASSED = "Test PASSED"
RUN_LABEL = "gl-nvidia.gardenlinux.io/verify-run"
NODE_ANNOTATION = "gl-nvidia.gardenlinux.io/node"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class VerifyResult:
    node: str
    pod: str
    status: str  # "PASSED" | "FAILED" | "TIMEOUT"
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "pod": self.pod, "status": self.status, "detail": self.detail}


def vectoradd_pod(name: str, node: str, run_id: str, image: str = VECTORADD_IMAGE) -> dict[str, Any]:
    """The seed's GPU pod, pinned to one node.

    `nodeName` skips the scheduler: a node whose device plugin advertises no GPU rejects the pod at
    once (OutOfnvidia.com/gpu) instead of leaving it Pending until the timeout.
    """
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "gl-nvidia-verify", RUN_LABEL: run_id},
            "annotations": {NODE_ANNOTATION: node},
        },
        "spec": {
            "restartPolicy": "Never",
            "nodeName": node,
            "containers": [
                {"name": "cuda-container", "image": image, "resources": {"limits": {"nvidia.com/gpu": "1"}}}
            ],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


def waiting_reason(pod: dict[str, Any]) -> str:
    """Why a pod has not finished, in the words the API uses (ImagePullBackOff, Unschedulable, ...)."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting:
            return f"{waiting.get('reason', 'Waiting')}: {waiting.get('message', '')}".rstrip(": ")
    if status.get("reason"):
        return f"{status['reason']}: {status.get('message', '')}".rstrip(": ")
    for cond in status.get("conditions") or []:
        if cond.get("status") == "False" and cond.get("message"):
            return f"{cond.get('reason', cond.get('type'))}: {cond['message']}"
    return f"phase {status.get('phase', 'Unknown')}"


def verdict(node: str, name: str, pod: dict[str, Any], logs: str) -> VerifyResult:
    if PASSED in logs and (pod.get("status") or {}).get("phase") == "Succeeded":
        return VerifyResult(node, name, "PASSED", PASSED)
    last = [line for line in logs.splitlines() if line.strip()]
    detail = last[-1].strip() if last else waiting_reason(pod)
    return VerifyResult(node, name, "FAILED", detail)


def verify_nodes(
    kube: Kube,
    nodes: list[str],
    namespace: str,
    timeout_s: float,
    poll_s: float = 2.0,
    image: str = VECTORADD_IMAGE,
    on_result: Callable[[VerifyResult], None] | None = None,
) -> list[VerifyResult]:
    """Run one vectorAdd pod per node at once, wait for all, and delete every pod we created.

    The pods are deleted in `finally`, so Ctrl-C or an API error mid-way leaves nothing behind. While
    pods may exist, SIGINT and SIGTERM raise KeyboardInterrupt whatever this process inherited: a shell
    starts `cmd &` with SIGINT ignored (verify then polled on until its timeout), and SIGTERM's default
    action ends the process without running `finally`. Call it from the main thread.
    """
    run_id = secrets.token_hex(3)
    created: dict[str, str] = {}  # pod name -> node
    results: dict[str, VerifyResult] = {}
    with _on_stop_signals(_interrupt):
        try:
            for i, node in enumerate(nodes):
                name = f"gl-nvidia-verify-{run_id}-{i}"
                # Recorded before the call: Ctrl-C after the API created the pod but before we heard back
                # must still delete it (deleting a pod that was never created is a harmless 404).
                created[name] = node
                kube.create_pod(namespace, vectoradd_pod(name, node, run_id, image))
                log.info("started %s on %s", name, node)
            _wait(kube, namespace, created, results, timeout_s, poll_s, on_result)
        finally:
            with _on_stop_signals(signal.SIG_IGN):  # a second Ctrl-C must not stop the cleanup half-way
                for name in created:
                    try:
                        kube.delete_pod(namespace, name)
                    except Exception as exc:  # cleanup must try every pod, whatever one failure was
                        log.warning("could not delete pod %s/%s: %s", namespace, name, exc)
    return [results[name] for name in created if name in results]


def _wait(kube: Kube, namespace: str, created: dict[str, str], results: dict[str, VerifyResult], timeout_s: float,
          poll_s: float, on_result: Callable[[VerifyResult], None] | None) -> None:
    deadline = time.monotonic() + timeout_s
    pending = dict(created)
    last_seen: dict[str, dict[str, Any]] = {}
    while pending:
        for name, node in list(pending.items()):
            pod = kube.pod(namespace, name)
            last_seen[name] = pod
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                result = verdict(node, name, pod, kube.pod_log(namespace, name))
                results[name] = result
                del pending[name]
                if on_result:
                    on_result(result)
        if not pending:
            return
        if time.monotonic() >= deadline:
            for name, node in pending.items():
                result = VerifyResult(
                    node, name, "TIMEOUT",
                    f"not finished after {timeout_s:g}s: {waiting_reason(last_seen[name])}",
                )
                results[name] = result
                if on_result:
                    on_result(result)
            return
        time.sleep(poll_s)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _on_stop_signals(handler: Callable[[int, FrameType | None], None] | signal.Handlers) -> Iterator[None]:
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
