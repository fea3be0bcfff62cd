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
    GOOD_TOKEN,
    FakeCluster,
    node_json,
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


def test_a_token_file_ending_in_a_newline_works(cluster: tuple[FakeCluster, str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, server = cluster
    token_file = tmp_path / "token"
    token_file.write_text(f"{GOOD_TOKEN}\n")  # what `echo "$T" > token` writes; kubectl trims it
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server, token_file=token_file)
    kube = Kube(kubeconfig)
    # Twice: the client puts the kubeconfig's credential back before every request.
    assert [n.name for n in gpu_nodes(kube.nodes(), kube.server)] == ["gpu-a", "gpu-b"]
    assert kube.cluster_policies()
    assert main(["verify", "--kubeconfig", str(kubeconfig), "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["PASSED", "PASSED"]
    # An inline token (a YAML block scalar ends in a newline) is trimmed alike.
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server, f"{GOOD_TOKEN}\n")
    assert main(["verify", "--kubeconfig", str(kubeconfig), "--json"]) == 0


SECRET = "s3cr3t-line"


@pytest.mark.parametrize(("token", "file_text"), [
    (f"{GOOD_TOKEN}\r\nX-Injected: {SECRET}", None),  # a second header smuggled in
    (f"tök{SECRET}", None),
    (f"{SECRET}\x1b[2J", None),
    ("", f"root:x:0:0:{SECRET}:/root:/bin/bash\ndaemon:x:1:1:{SECRET}:/usr/sbin:/usr/sbin/nologin\n"),  # tokenFile: /etc/passwd
    ("", f"{GOOD_TOKEN}\n{SECRET}\n"),
    ("", "\n \n"),
], ids=["crlf-header", "non-ascii", "ansi", "token-file-is-another-file", "two-lines", "blank"])
def test_a_token_no_header_can_carry_is_refused_without_showing_it(
        cluster: tuple[FakeCluster, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        token: str, file_text: str | None) -> None:
    fake, server = cluster
    token_file = None
    if file_text is not None:
        token_file = tmp_path / "token"
        token_file.write_text(file_text)
    kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", server, token, token_file))
    assert main(["verify", "--kubeconfig", kubeconfig]) == 2
    err = capsys.readouterr().err
    assert "token (or tokenFile) is" in err
    assert SECRET not in err and "root:" not in err and "Bearer" not in err, err
    assert err.count("\n") == 2  # one error line and its hint
    assert not fake.created


@pytest.mark.parametrize("status", [500, 503])
def test_a_failing_api_server_is_no_access_not_a_bug(cluster: tuple[FakeCluster, str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], status: int) -> None:
    fake, server = cluster
    fake.fail_with = status
    kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", server))
    for argv in (["verify", "--kubeconfig", kubeconfig], ["preflight", "--kubeconfig", kubeconfig, "--lock", "debian"]):
        assert main(argv) == 4  # README: 4, no access to Kubernetes
        err = capsys.readouterr().err
        assert f"the Kubernetes API at {server} answered HTTP {status}" in err and "to list nodes" in err, err
        assert "etcdserver" not in err  # the reason phrase, not the body
        assert err.count("gl-nvidia: error:") == 1


@pytest.mark.parametrize(("body", "words"), [
    (b"<html>login</html>", "is not JSON"),
    (b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "is not JSON"),
    (b'{"items": [' + b"9" * 5000 + b"]}", "is not JSON"),
    (b"[]", "is not a JSON object"),
    (b'{"items": 5}', "has items that are not a list of objects"),
    (b'{"items": [5]}', "has items that are not a list of objects"),
], ids=["html", "deep", "5000-digits", "list", "items-5", "item-5"])
def test_an_answer_that_is_not_a_node_list_is_one_line(cluster: tuple[FakeCluster, str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], body: bytes,
                                                       words: str) -> None:
    fake, server = cluster
    fake.nodes_body = body
    assert main(["verify", "--kubeconfig", str(write_kubeconfig(tmp_path / "kubeconfig", server))]) == 4
    err = capsys.readouterr().err
    assert f"the Kubernetes API at {server} answered to list nodes with a body that {words}" in err, err
    assert err.count("\n") == 2


def test_nodes_of_other_shapes_read_as_unlabelled(cluster: tuple[FakeCluster, str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fake, server = cluster
    fake.nodes = [{"metadata": 5}, {"metadata": {"labels": [1]}, "status": "x"}]
    assert main(["verify", "--kubeconfig", str(write_kubeconfig(tmp_path / "kubeconfig", server))]) == 2
    assert "no GPU nodes in the cluster" in capsys.readouterr().err


HOSTILE_NODE = "gpu-\x1b[31mred\x1b[0m\nINFO forged\u202eline"


def test_node_names_reach_tables_and_logs_escaped(cluster: tuple[FakeCluster, str], tmp_path: Path) -> None:
    fake, server = cluster
    fake.nodes = [node_json(HOSTILE_NODE, gpu=True)]
    kubeconfig = str(write_kubeconfig(tmp_path / "kubeconfig", server))
    cli = Path(sys.executable).with_name("gl-nvidia")  # a process of its own: its logging as users see it
    proc = subprocess.run([str(cli), "verify", "--kubeconfig", kubeconfig], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    escaped = "gpu-\\x1b[31mred\\x1b[0m\\nINFO forged\\u202eline"
    for stream in (proc.stdout, proc.stderr):
        assert "\x1b" not in stream and "\u202e" not in stream
        assert "\nINFO forged" not in stream
    assert f"{escaped}: PASSED" in proc.stderr  # the log line
    assert escaped in proc.stdout  # the table cell, one line


def test_a_huge_cell_is_cut_with_a_marker_and_renders_fast(capsys: pytest.CaptureFixture[str]) -> None:
    from gl_nvidia import ui

    start = time.monotonic()
    ui.print_table("CUDA vectorAdd per node", ["node", "result", "detail"],
                   [["gpu-a", "FAILED", "word " * 200_000], ["gpu-b", "PASSED", "Test PASSED"]])
    assert time.monotonic() - start < 2  # 22 s before cells were bounded
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if "gpu-a" in line]  # not on a terminal: one line a row
    assert row.rstrip(" │").endswith(f"word ... ({1_000_000 - ui.MAX_CELL} more characters)")
    assert len(out) < 10 * ui.MAX_CELL
