"""The `nvidia-driver` entrypoint as the operator runs it: help, verbs, one-line errors, log line shape."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gl_nvidia.node", *args], capture_output=True, text=True,
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=30, check=False,
    )


def test_help_lists_every_verb() -> None:
    p = _run("--help")
    assert p.returncode == 0
    for verb in ("init", "check-load", "reload_nvidia_peermem", "probe_nvidia_peermem", "--dry-run", "KERNEL_MODULE_TYPE"):
        assert verb in p.stdout


def test_unknown_verb_is_a_usage_error() -> None:
    p = _run("update")
    assert p.returncode == 2
    assert "invalid choice: 'update'" in p.stderr


def test_outside_a_driver_image_init_says_so_in_one_line() -> None:
    # this machine has no /usr/share/gl-nvidia/manifest.json: the same error an unbuilt image would give
    if Path("/usr/share/gl-nvidia/manifest.json").exists():
        raise AssertionError("test machine must not have a driver image manifest installed")
    p = _run("init")
    assert p.returncode == 1
    assert p.stderr.splitlines()[0].startswith(
        "nvidia-driver: error: this image has no readable driver manifest at /usr/share/gl-nvidia/manifest.json"
    )
    assert p.stderr.splitlines()[1] == "nvidia-driver: hint: the image was not built by `gl-nvidia image`; rebuild it"
    assert re.match(r'^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=error msg="this image has no', p.stdout)
