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
    assert "invalid choice: 'update'" in p.stderr and len(p.stderr.splitlines()) == 1


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


def test_nvidias_init_options_are_accepted() -> None:
    """The operator passes driver.args after `init`; NVIDIA's entrypoint takes -a/--accept-license and
    -m/--max-threads N. Accepted (the run then stops where any init outside an image stops)."""
    for args in (("-a",), ("--accept-license",), ("-m", "8"), ("--max-threads=4",), ("-a", "-m", "16")):
        p = _run("init", *args)
        assert p.returncode == 1, args
        assert p.stderr.startswith("nvidia-driver: error: this image has no readable driver manifest"), args
        assert "NVIDIA's init options accepted, nothing to apply" in p.stdout.splitlines()[0]


def test_anything_else_is_one_line_naming_the_supported_set() -> None:
    supported = ("; commands: init [--dry-run] [-a|--accept-license] [-m|--max-threads N], check-load, "
                 "reload_nvidia_peermem, probe_nvidia_peermem")
    for args, why in ((("init", "--foo"), "unrecognized arguments: --foo"),
                      (("init", "-m", "many"), "argument -m/--max-threads: not a positive number of threads: 'many'"),
                      (("init", "-m"), "argument -m/--max-threads: expected one argument"),
                      (("update", "-k", "6.1"), "argument COMMAND: invalid choice: 'update'"),
                      ((), "the following arguments are required: COMMAND")):
        p = _run(*args)
        assert p.returncode == 2, args
        assert p.stdout == "" and len(p.stderr.splitlines()) == 1, args
        assert p.stderr.startswith(f"nvidia-driver: error: {why}") and p.stderr.rstrip().endswith(supported), args
