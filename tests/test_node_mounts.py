"""The driver root bind mount and its teardown, for real, in a private mount namespace (`unshare -m`).

The kernel side stays fake (FakeKernel); mount, umount and mountpoint run for real, and SIGTERM is a
real signal delivered to the process and taken by the runtime's own sigwait.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, signal, sys
from pathlib import Path
from gl_nvidia.node.host import subprocess_runner
from gl_nvidia.node.context import wait_for_signal
from gl_nvidia.node.driverroot import DRIVER_ROOT
from gl_nvidia.node.runtime import READY_FILE, STATE_FILE
from tests.fixtures.node import fake_node

tmp = Path(sys.argv[1])
report = {}
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


def mounted(path):
    return any(line.split()[4] == str(path) for line in open("/proc/self/mountinfo"))


def real_mounts(rt, k):
    rt.host.runner = lambda argv: subprocess_runner(argv) if argv[0] in {"mount", "umount", "mountpoint"} else k(argv)


def run(rt, k, name):
    real_mounts(rt, k)
    target = rt.host.path(DRIVER_ROOT)

    def wait(timeout):
        report[name + ":while-running"] = {
            "mounted": mounted(target),
            "nvidia-smi visible": (target / "usr/bin/nvidia-smi").is_file(),
            "state": rt.host.read_opt(STATE_FILE),
        }
        rt.host.write(READY_FILE, "ready")
        os.kill(os.getpid(), signal.SIGTERM)
        return wait_for_signal(timeout)

    rt.wait = wait
    rt.init()
    report[name + ":after-sigterm"] = {
        "mounted": mounted(target),
        "ready file": rt.host.exists(READY_FILE),
        "state": rt.host.read_opt(STATE_FILE),
        "modules": rt.host.read("/proc/modules").split("\n")[0].split(" ")[0],
    }
    return k


rt, k = fake_node(tmp / "full", "h100", DRIVER_CONFIG_DIGEST="d1")
run(rt, k, "full")

# fast path: our driver is loaded, in use by a GPU job, and the state matches: no reload
rt, k2 = fake_node(tmp / "fast", "h100", DRIVER_CONFIG_DIGEST="d1")
real_mounts(rt, k2)
rt.wait, teardown, rt.teardown = (lambda timeout: True), rt.teardown, (lambda failed=False: None)
rt.init()  # an earlier container, killed without teardown: modules, state and a stale mount stay
rt.host.exit()
rt.teardown = teardown
(k2.root / "sys/module/nvidia/refcnt").write_text("5\n")
report["fast:stale mount before"] = mounted(rt.host.path(DRIVER_ROOT))
k2.calls.clear()
run(rt, k2, "fast")
report["fast:inserted"] = [c for c in k2.names() if c.startswith(("insmod", "rmmod"))]
print(json.dumps(report))
"""


def test_bind_mount_and_sigterm_teardown_in_a_mount_namespace(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}:{repo / 'src'}"}
    p = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=repo, timeout=60, check=False,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["full:while-running"] == {"mounted": True, "nvidia-smi visible": True, "state": "d1\n"}
    assert report["full:after-sigterm"] == {"mounted": False, "ready file": False, "state": None, "modules": "virtio_net"}
    assert report["fast:while-running"] == {"mounted": True, "nvidia-smi visible": True, "state": "d1\n"}
    # in use: modules and the state stay for the next start's fast path; the mount and ready file go
    assert report["fast:after-sigterm"] == {"mounted": False, "ready file": False, "state": "d1\n", "modules": "nvidia_modeset"}
    assert report["fast:stale mount before"] is True  # replaced, not stacked: none is left after teardown
    assert report["fast:inserted"] == []


RBIND_CHILD = r"""
import json, os, signal, subprocess, sys
from pathlib import Path
from gl_nvidia.node.host import subprocess_runner
from gl_nvidia.node.context import wait_for_signal
from gl_nvidia.node.driverroot import DRIVER_ROOT
from tests.fixtures.node import fake_node, make_image

tmp = Path(sys.argv[1])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
image = make_image(tmp / "image")
for d in ("dev", "sys"):  # the container's /dev and /sys: mounts of their own under its root
    (image.root / d).mkdir()
    subprocess.run(["mount", "-t", "tmpfs", d, str(image.root / d)], check=True)
(image.root / "sys/fs/cgroup").mkdir(parents=True)
subprocess.run(["mount", "-t", "tmpfs", "cgroup", str(image.root / "sys/fs/cgroup")], check=True)
rt, k = fake_node(tmp, "h100", image=image)
rt.host.runner = lambda argv: subprocess_runner(argv) if argv[0] in {"mount", "umount", "mountpoint"} else k(argv)
target = rt.host.path(DRIVER_ROOT)
report = {}


def under(path):
    return sorted(line.split()[4] for line in open("/proc/self/mountinfo") if line.split()[4].startswith(str(path)))


def wait(timeout):
    report["running"] = {"mounts": [m.removeprefix(str(target)) for m in under(target)],
                         "dev": sorted(os.listdir(target / "dev")), "cgroup": os.listdir(target / "sys/fs/cgroup")}
    os.kill(os.getpid(), signal.SIGTERM)
    return wait_for_signal(timeout)


rt.wait = wait
rt.init()
report["after"] = under(target)
print(json.dumps(report))
"""


def test_the_driver_root_is_a_recursive_bind_without_what_is_mounted_under_sys(tmp_path: Path) -> None:
    """NVIDIA's mount: the container's root with its /dev (where the validator and the toolkit look for
    the device nodes once the driver root has a /dev) and its /sys made private, the mounts under /sys
    (cgroups) unbindable and so left out; all of it gone on SIGTERM."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}:{repo / 'src'}"}
    p = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", RBIND_CHILD, str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=repo, timeout=60, check=False,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["running"] == {
        "mounts": ["", "/dev", "/sys"],
        "dev": ["nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools", "nvidia0", "nvidia1", "nvidiactl"],
        "cgroup": [],
    }
    assert report["after"] == []
