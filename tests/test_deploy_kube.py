"""verify and the live-cluster reads, against a local HTTP server answering the Kubernetes API paths used.

The server speaks the API's real JSON shapes (NodeList, ClusterPolicyList, Pod, Status) and plays the
kubelet: a pod on a GPU node runs the vectorAdd sample and prints what it really prints.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gl_nvidia.cli import main
from gl_nvidia.deploy.kube import Kube, KubeAccessError
from gl_nvidia.deploy.nodes import gpu_nodes
from gl_nvidia.deploy.verify import PASSED, verify_nodes

VECTORADD_OK = """[Vector addition of 50000 elements]
Copy input data from the host memory to the CUDA device
CUDA kernel launch with 196 blocks of 256 threads
Copy output data from the CUDA device to the host memory
Test PASSED
Done
"""
VECTORADD_NO_DRIVER = """[Vector addition of 50000 elements]
Failed to allocate device vector A (error code CUDA driver version is insufficient for CUDA runtime version)!
"""
GOOD_TOKEN = "good-token"
FORBIDDEN_TOKEN = "forbidden-token"


def node_json(name: str, *, gpu: bool, kernel: str = "6.12.72-cloud-amd64", version_id: str = "0",
              nfd: bool = True, os_id: str = "gardenlinux") -> dict[str, Any]:
    labels = {
        "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "g4dn.xlarge" if gpu else "m5.large",
        "worker.gardener.cloud/pool": "gpu" if gpu else "cpu",
    }
    if nfd:
        labels |= {
            "feature.node.kubernetes.io/kernel-version.full": kernel,
            "feature.node.kubernetes.io/kernel-version.major": kernel.split(".")[0],
            "feature.node.kubernetes.io/system-os_release.ID": os_id,
            "feature.node.kubernetes.io/system-os_release.VERSION_ID": version_id,
        }
        if gpu:
            labels["feature.node.kubernetes.io/pci-10de.present"] = "true"
    if gpu and nfd:
        labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "Tesla-T4", "nvidia.com/gpu.count": "1"}
    capacity = {"cpu": "4", "memory": "16106136Ki", "pods": "110"} | ({"nvidia.com/gpu": "1"} if gpu else {})
    return {
        "metadata": {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name)), "resourceVersion": "4242",
                     "creationTimestamp": "2026-11-20T08:00:00Z", "labels": labels,
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"podCIDR": "100.64.1.0/24", "providerID": f"aws:///eu-west-1a/i-{name}"},
        "status": {
            "capacity": capacity, "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": "2026-11-22T16:00:00Z", "lastTransitionTime": "2026-11-20T08:01:00Z"}],
            "nodeInfo": {"architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "containerd://1.7.24",
                         "kernelVersion": kernel, "kubeProxyVersion": "", "kubeletVersion": "v1.31.4",
                         "machineID": "m", "operatingSystem": "linux", "osImage": "Garden Linux 1877.3",
                         "systemUUID": "s"},
        },
    }


CLUSTER_POLICY = {
    "apiVersion": "nvidia.com/v1", "kind": "ClusterPolicy",
    "metadata": {"name": "cluster-policy", "uid": "cp-1", "resourceVersion": "77", "generation": 1,
                 "creationTimestamp": "2026-11-20T08:05:00Z"},
    "spec": {
        "cdi": {"enabled": True},
        "driver": {"enabled": True, "usePrecompiled": True, "repository": "127.0.0.1:1/gl-nvidia",
                   "image": "driver", "version": "590", "imagePullPolicy": "Always"},
        "toolkit": {"enabled": True, "installDir": "/opt/nvidia"},
    },
    "status": {"state": "ready", "namespace": "gpu-operator"},
}


@dataclass
class FakeCluster:
    nodes: list[dict[str, Any]]
    policies: list[dict[str, Any]] = field(default_factory=lambda: [CLUSTER_POLICY])
    # node name -> what its pods do: "pass", "fail" (no working driver) or "stuck" (image never pulls)
    behaviour: dict[str, str] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    polls: dict[tuple[str, str], int] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def advance(self, key: tuple[str, str]) -> dict[str, Any]:
        """The kubelet's view: Pending, then Running, then the container's exit."""
        pod = self.pods[key]
        self.polls[key] = n = self.polls.get(key, 0) + 1
        node = pod["spec"]["nodeName"]
        what = self.behaviour.get(node, "pass")
        status = pod["status"]
        if what == "stuck":
            status["phase"] = "Pending"
            status["containerStatuses"] = [{
                "name": "cuda-container", "ready": False, "restartCount": 0, "image": pod["spec"]["containers"][0]["image"],
                "imageID": "", "started": False,
                "state": {"waiting": {"reason": "ImagePullBackOff",
                                      "message": "Back-off pulling image \"nvcr.io/nvidia/k8s/cuda-sample:vectoradd-cuda12.5.0\""}}}]
        elif n == 1:
            status["phase"] = "Running"
        else:
            code = 0 if what == "pass" else 1
            status["phase"] = "Succeeded" if code == 0 else "Failed"
            status["containerStatuses"] = [{
                "name": "cuda-container", "ready": False, "restartCount": 0,
                "image": pod["spec"]["containers"][0]["image"], "imageID": "sha256:1", "started": False,
                "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                         "startedAt": "2026-11-22T16:00:01Z", "finishedAt": "2026-11-22T16:00:02Z"}}}]
        return pod

    def log_of(self, key: tuple[str, str]) -> str:
        node = self.pods[key]["spec"]["nodeName"]
        return VECTORADD_OK if self.behaviour.get(node, "pass") == "pass" else VECTORADD_NO_DRIVER


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def make_handler(cluster: FakeCluster) -> type[BaseHTTPRequestHandler]:
    pod_path = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?(/log)?$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self, resource: str) -> bool:
            auth = self.headers.get("Authorization", "")
            if auth == f"Bearer {GOOD_TOKEN}":
                return True
            if auth == f"Bearer {FORBIDDEN_TOKEN}":
                self._send(403, _status(403, "Forbidden", f'{resource} is forbidden: User "system:serviceaccount:'
                                        f'default:viewer" cannot list resource "{resource}" in API group "" '
                                        "at the cluster scope"))
            else:
                self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            return False

        def _route(self, method: str) -> None:
            path = self.path.split("?")[0]
            with cluster.lock:
                if path == "/api/v1/nodes" and method == "GET":
                    if self._authorized("nodes"):
                        self._send(200, {"kind": "NodeList", "apiVersion": "v1",
                                         "metadata": {"resourceVersion": "4242"},
                                         "items": [n | {"kind": "Node", "apiVersion": "v1"} for n in cluster.nodes]})
                    return
                if path == "/apis/nvidia.com/v1/clusterpolicies" and method == "GET":
                    if self._authorized("clusterpolicies"):
                        self._send(200, {"apiVersion": "nvidia.com/v1", "kind": "ClusterPolicyList",
                                         "metadata": {"continue": "", "resourceVersion": "78"},
                                         "items": cluster.policies})
                    return
                m = pod_path.match(path)
                if not m:
                    self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))
                    return
                if not self._authorized("pods"):
                    return
                ns, name, log = m.groups()
                if method == "POST" and name is None:
                    length = int(self.headers.get("Content-Length", "0"))
                    pod = json.loads(self.rfile.read(length))
                    key = (ns, pod["metadata"]["name"])
                    pod["metadata"] |= {"namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1",
                                        "creationTimestamp": "2026-11-22T16:00:00Z"}
                    pod["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
                    cluster.pods[key] = pod
                    cluster.created.append(key[1])
                    self._send(201, pod)
                    return
                key = (ns, name or "")
                if key not in cluster.pods:
                    self._send(404, _status(404, "NotFound", f'pods "{name}" not found'))
                elif method == "GET" and log:
                    self._send(200, cluster.log_of(key), "text/plain")
                elif method == "GET":
                    self._send(200, cluster.advance(key))
                elif method == "DELETE":
                    pod = cluster.pods.pop(key)
                    cluster.deleted.append(key[1])
                    self._send(200, pod)
                else:
                    self._send(405, _status(405, "MethodNotAllowed", "method not allowed"))

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler


@contextlib.contextmanager
def serve(fake: FakeCluster) -> Iterator[str]:
    """Answer the API for `fake` on a free loopback port; yields the server URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cluster() -> Iterator[tuple[FakeCluster, str]]:
    fake = FakeCluster(nodes=[node_json("gpu-a", gpu=True), node_json("gpu-b", gpu=True),
                              node_json("cpu-1", gpu=False)])
    with serve(fake) as url:
        yield fake, url


def write_kubeconfig(path: Path, server: str, token: str = GOOD_TOKEN) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "shoot",
        "clusters": [{"name": "shoot", "cluster": {"server": server}}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "shoot", "context": {"cluster": "shoot", "user": "admin"}}],
    }))
    return path


def test_reads_gpu_nodes_and_clusterpolicy(cluster: tuple[FakeCluster, str], tmp_path: Path) -> None:
    _, server = cluster
    kube = Kube(write_kubeconfig(tmp_path / "kubeconfig", server))
    nodes = gpu_nodes(kube.nodes(), kube.server)
    assert [n.name for n in nodes] == ["gpu-a", "gpu-b"]
    assert nodes[0].node_os().os_tag == "gardenlinux0"
    assert (nodes[0].kernel, nodes[0].flavour, nodes[0].arch) == ("6.12.72-cloud-amd64", "cloud", "amd64")
    (policy,) = kube.cluster_policies()
    assert policy["spec"]["driver"]["version"] == "590"


def test_verify_passes_fails_and_cleans_up(cluster: tuple[FakeCluster, str], tmp_path: Path) -> None:
    fake, server = cluster
    fake.behaviour["gpu-b"] = "fail"
    kube = Kube(write_kubeconfig(tmp_path / "kubeconfig", server))
    results = verify_nodes(kube, ["gpu-a", "gpu-b"], "default", timeout_s=20, poll_s=0.05)
    assert [(r.node, r.status) for r in results] == [("gpu-a", "PASSED"), ("gpu-b", "FAILED")]
    assert results[0].detail == PASSED
    assert "CUDA driver version is insufficient" in results[1].detail
    assert sorted(fake.deleted) == sorted(fake.created) and len(fake.created) == 2
    assert not fake.pods
    # The pods are the seed's: one GPU, the NoSchedule toleration, never restarted.
    assert all(p.startswith("gl-nvidia-verify-") for p in fake.created)


def test_verify_times_out_with_the_kubelet_reason(cluster: tuple[FakeCluster, str], tmp_path: Path) -> None:
    fake, server = cluster
    fake.behaviour["gpu-a"] = "stuck"
    kube = Kube(write_kubeconfig(tmp_path / "kubeconfig", server))
    (result,) = verify_nodes(kube, ["gpu-a"], "default", timeout_s=0.3, poll_s=0.05)
    assert result.status == "TIMEOUT"
    assert "ImagePullBackOff" in result.detail
    assert not fake.pods


def test_verify_cli_table_and_exit_code(cluster: tuple[FakeCluster, str], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    fake, server = cluster
    kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", server))
    assert main(["verify", "--kubeconfig", kubeconfig, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["node"], r["status"]) for r in out] == [("gpu-a", "PASSED"), ("gpu-b", "PASSED")]
    fake.behaviour["gpu-a"] = "fail"
    assert main(["verify", "--kubeconfig", kubeconfig, "--node", "gpu-a"]) == 1
    captured = capsys.readouterr()
    assert "vectorAdd did not pass on gpu-a" in captured.err
    assert main(["verify", "--kubeconfig", kubeconfig, "--node", "nope"]) == 2
    assert "no node named 'nope'" in capsys.readouterr().err
    assert not fake.pods


@pytest.mark.parametrize(("token", "code", "words"), [
    ("wrong", 4, "HTTP 401 Unauthorized"),
    (FORBIDDEN_TOKEN, 4, "HTTP 403 Forbidden"),
])
def test_kubeconfig_without_access(cluster: tuple[FakeCluster, str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], token: str, code: int, words: str) -> None:
    _, server = cluster
    kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", server, token))
    assert main(["verify", "--kubeconfig", kubeconfig]) == code
    err = capsys.readouterr().err
    assert words in err and "refused to list nodes" in err
    assert err.count("\n") <= 2  # one error line and one hint, no traceback


def test_unreachable_cluster_and_broken_kubeconfig(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    with pytest.raises(KubeAccessError, match=r"cannot reach the Kubernetes API at http://127\.0\.0\.1:9"):
        Kube(kubeconfig).nodes()
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\n")
    assert main(["verify", "--kubeconfig", str(broken)]) == 2
    assert "cannot use kubeconfig" in capsys.readouterr().err
    broken.write_text("apiVersion: [\n  v1")  # not YAML at all
    assert main(["verify", "--kubeconfig", str(broken)]) == 2
    assert "cannot use kubeconfig" in capsys.readouterr().err
    assert main(["preflight", "--gl-version", "1877.3", "--kubeconfig", str(broken)]) == 2
    assert "cannot use kubeconfig" in capsys.readouterr().err


@pytest.mark.parametrize(("sig", "parent_sigint"), [
    (signal.SIGINT, signal.SIG_DFL),
    # A non-interactive shell starts `cmd &` with SIGINT ignored, and children inherit that: the suite
    # run in the background once hung here, verify polling on until --timeout while the pods stayed.
    (signal.SIGINT, signal.SIG_IGN),
    (signal.SIGTERM, signal.SIG_DFL),  # CI cancelling the job, `timeout`: its default kills without `finally`
], ids=["sigint", "sigint-ignored-by-the-parent", "sigterm"])
def test_ctrl_c_deletes_the_pods(cluster: tuple[FakeCluster, str], tmp_path: Path, sig: signal.Signals,
                                 parent_sigint: signal.Handlers) -> None:
    fake, server = cluster
    fake.behaviour |= {"gpu-a": "stuck", "gpu-b": "stuck"}
    kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", server))
    cli = Path(sys.executable).with_name("gl-nvidia")
    previous = signal.signal(signal.SIGINT, parent_sigint)  # what the child inherits across exec
    try:
        proc = subprocess.Popen([str(cli), "verify", "--kubeconfig", kubeconfig, "--timeout", "120"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 60
        while len(fake.created) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(fake.created) == 2, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert sorted(fake.deleted) == sorted(fake.created)
    assert not fake.pods
