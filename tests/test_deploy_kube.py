"""verify and the live-cluster reads, against a local HTTP server answering the Kubernetes API paths used.

The server speaks the API's real JSON shapes (NodeList, ClusterPolicyList, Pod, Status) and plays the
kubelet: a pod on a GPU node runs the vectorAdd sample and prints what it really prints.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.deploy.kube import Kube, KubeAccessError
from gl_nvidia.deploy.nodes import gpu_nodes
from gl_nvidia.deploy.verify import PASSED, verify_nodes
from tests.fixtures.kube import (
    FORBIDDEN_TOKEN,
    FakeCluster,
    write_kubeconfig,
)


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
