"""The node runtime against a hostile or damaged host and image: stale pid files, planted symlinks, NUL bytes,
manifests of the wrong shape, and module configs built to be slow. Each ends in one line, or is left alone."""

from __future__ import annotations

import json
import random
import shlex
import time
from pathlib import Path

import pytest

from gl_nvidia.node import decide, layout
from gl_nvidia.node.decide import NodeError
from gl_nvidia.node.imagefiles import Image
from gl_nvidia.node.runtime import PID_FILE, STATE_FILE
from tests.fixtures.fuzz import samples
from tests.fixtures.node import fake_node, make_image

PERSISTENCED_PID = "/var/run/nvidia-persistenced/nvidia-persistenced.pid"
HOST_NS = "mnt:[4026531840]"  # the host's mount namespace, not the runtime's


@pytest.mark.parametrize(("exe", "mount_ns"), [
    ("/usr/sbin/sshd", HOST_NS),  # the pid was reused by an unrelated host process (hostPID shows them all)
    (None, HOST_NS),  # a host install of the same binary, at the same path: another mount namespace
])
def test_a_stale_persistenced_pid_file_never_signals_another_process(tmp_path: Path, exe: str | None,
                                                                     mount_ns: str) -> None:
    rt, k = fake_node(tmp_path, "h100")
    rt.host.write_atomic(PERSISTENCED_PID, "4242\n")
    k.start(4242, exe or str(rt.image.at("/usr/bin/nvidia-persistenced")), mount_ns)
    rt.init()
    assert 4242 in k.pids  # still running: neither taken for our daemon nor stopped at teardown
    assert any("nvidia-persistenced --persistence-mode" in c for c in k.names())  # ours was started instead
    assert any("not this image's daemon, leaving it alone" in line and "pid=4242" in line for line in rt.log.lines)


def test_the_pid_lock_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    rt.host.path(PID_FILE).symlink_to(victim)
    with pytest.raises(OSError, match="a symlink, not the lock file: refusing to write through it") as exc:
        rt.init()
    assert exc.value.filename == PID_FILE
    assert victim.read_text() == "precious\n"
    assert k.calls == []


def test_the_state_file_is_never_written_through_a_planted_temporary_name(tmp_path: Path) -> None:
    rt, _ = fake_node(tmp_path, "h100", DRIVER_CONFIG_DIGEST="d1")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    rt.host.path("/run/nvidia/.nvidia-driver.state.tmp").symlink_to(victim)
    seen: list[str | None] = []
    rt.wait = lambda timeout: seen.append(rt.host.read_opt(STATE_FILE)) or True
    rt.init()
    assert seen == ["d1\n"] and victim.read_text() == "precious\n"


def test_a_nul_in_a_module_conf_is_one_line_before_the_kernel(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100")
    rt.host.makedirs("/drivers")
    rt.host.path("/drivers/nvidia.conf").write_bytes(b"NVreg_OpenRmEnableUnsupportedGpus=1\nNVreg_X=a\x00b\n")
    with pytest.raises(NodeError) as exc:
        rt.init()
    assert exc.value.message == ("malformed module parameters: /drivers/nvidia.conf:2: 'NVreg_X''s value holds a "
                                 "control character")
    assert not any(c.startswith(("insmod", "mount")) for c in k.names())


def test_a_nul_in_proc_modules_is_one_line(tmp_path: Path) -> None:
    rt, k = fake_node(tmp_path, "h100")
    rt.host.path("/proc/modules").write_bytes(b"virtio_net 73728 0 - Live 0x0\nnvi\x00dia 1 0 - Live 0x0\n")
    with pytest.raises(NodeError, match=r"^/proc/modules line 2 names no kernel module \('nvi\\x00dia'\); refusing"):
        rt.init()
    assert not any(c.startswith("insmod") for c in k.calls)


@pytest.mark.parametrize(("manifest", "why"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("[]", "not a JSON object"),
    ('{"driver_version": 5, "driver_branch": "535", "arch": "amd64"}', "driver_version is not a string"),
    ('{"driver_version": "1", "driver_branch": "5", "arch": "amd64", "kernels": []}', "has no attribute 'items'"),
    ('{"driver_version": "1", "driver_branch": "5", "arch": "amd64", "kernels": {"k": {"module_sets": '
     '{"open": {"source_version": "1", "modules": [7]}}}}}', "has no attribute 'get'"),
    ('{"driver_version": "1", "driver_branch": "5", "arch": "amd64", "left_out": ["imex"]}', "has no attribute"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line(tmp_path: Path, manifest: str, why: str) -> None:
    path = tmp_path / str(layout.MANIFEST).lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_text(manifest)
    with pytest.raises(NodeError) as exc:
        Image.load(tmp_path)
    assert exc.value.message.startswith(f"this image has no readable driver manifest at {layout.MANIFEST} (")
    assert why in exc.value.message and len(exc.value.message) < 300


@pytest.mark.parametrize("line", [
    "NVreg_X=" + "x" * (1 << 20),  # shlex: 15 s
    "NVreg_X='" + "x y" * (1 << 18) + "'",
    "NVreg_X=" + "\\x" * (1 << 19),
    'NVreg_X="' + '\\"' * (1 << 19) + '"',
    "NVreg_X=1 " * (1 << 17),
])
def test_a_one_mib_conf_line_parses_in_linear_time(line: str) -> None:
    start = time.monotonic()
    params, problems = decide.parse_module_conf("nvidia", line + "\n", "/drivers/nvidia.conf")
    assert time.monotonic() - start < 3.0  # 0.5 s at most on an idle machine; shlex took 15 s on the first
    assert problems == () and params and all(p.startswith("NVreg_X=") for p in params)


def test_conf_words_split_as_shlex_splits_them() -> None:
    """The linear splitter is shlex.split(comments=True) on every line, errors included."""
    rng = random.Random(24)
    alphabet = ["a", "=", "'", '"', "\\", "#", " ", "\t", "\x0b", "é"]
    for _ in range(50_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        try:
            expected: object = shlex.split(line, comments=True)
        except ValueError:
            expected = ValueError
        try:
            actual: object = decide.split_words(line)
        except ValueError:
            actual = ValueError
        assert actual == expected, line


def test_a_long_bad_word_is_not_echoed_whole(tmp_path: Path) -> None:
    _, problems = decide.parse_module_conf("nvidia", "bad-name" + "x" * 100_000 + "=1\n", "/drivers/nvidia.conf")
    assert len(problems) == 1 and len(problems[0]) < 150 and problems[0].endswith("... is not a nvidia parameter "
                                                                                 "(expected name=value)")


def test_a_manifest_arch_that_is_not_a_string_is_named(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img")
    d = json.loads(image.at(layout.MANIFEST).read_text())
    image.at(layout.MANIFEST).write_text(json.dumps({**d, "arch": ["amd64"]}))
    with pytest.raises(NodeError, match=r"\(arch is not a string\)"):
        Image.load(image.root)


@pytest.mark.parametrize(("what", "salt"), [("nvidia.conf", 41), ("proc-modules", 42), ("manifest", 43)])
def test_fuzzed_node_inputs_load_or_end_in_one_line(tmp_path: Path, what: str, salt: int) -> None:
    """The CLI fuzz test's mutations (tests/test_fuzz_input.py) on what the node reads from the host and the
    image: each sample loads, or stops with a NodeError (main's one line, exit 1); nothing else escapes."""
    image = make_image(tmp_path / "img")
    seeds = {
        "nvidia.conf": b"NVreg_EnableGpuFirmware=1 NVreg_RegistryDwords=\"A=1;B=2\"\n# comment\nNVreg_X='a b'\n",
        "proc-modules": b"virtio_net 73728 0 - Live 0x0\nib_core 450560 1 mlx5_ib, Live 0x0\n",
        "manifest": image.at(layout.MANIFEST).read_bytes(),
    }
    outcomes: dict[str, int] = {"ran": 0, "one line": 0}
    for n, data in enumerate(samples(seeds[what], 25, salt)):
        if what == "manifest":
            image.at(layout.MANIFEST).write_bytes(data)
            try:
                Image.load(image.root)
                outcomes["ran"] += 1
            except NodeError:
                outcomes["one line"] += 1
            continue
        rt, _ = fake_node(tmp_path / str(n), "h100", image=image)
        if what == "nvidia.conf":
            rt.host.makedirs("/drivers")
            rt.host.path("/drivers/nvidia.conf").write_bytes(data)
        else:
            rt.host.path("/proc/modules").write_bytes(data)
        try:
            rt.init()
            outcomes["ran"] += 1
        except NodeError as exc:
            assert "\n" not in exc.message and len(exc.message) < 600, exc.message
            outcomes["one line"] += 1
    assert sum(outcomes.values()) == 25 and outcomes["one line"] > 0, outcomes
