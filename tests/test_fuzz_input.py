"""Malformed files fed to every command that reads them: no traceback, a documented exit code, nothing written.

Lock files, os-release files, kubeconfigs, OCI layouts, NVIDIA's redist manifests, bundle manifests and
base image configs are mutated from a valid seed with a fixed
random seed (bounded, reproducible): bytes flipped, lines dropped or repeated, the text cut short,
values swapped for hostile ones. Each command runs in-process (as the other CLI tests do) against a
real registry and a closed port for Kubernetes; nothing compiles: a lock that still parses is only
given to the commands that read it without building.

Exit codes (README): 0 fine, 1 a check that ran and said no, 2 bad input, 3 a failed tool, 4 no
access to Kubernetes; 70 is a bug and fails this test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from gl_nvidia.catalog.lock import read_lock
from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.oci import CONFIG, LAYER_GZIP, Layout, Manifest
from tests.fixtures.registry import Registry, free_port

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "tests" / "data" / "catalog"
OS_RELEASE = ROOT / "tests" / "data" / "deploy" / "os-release-gardenlinux-1877.3"
KERNEL = "6.12.44-cloud-amd64"
SEED = 20261130
DOCUMENTED = {0, 1, 2, 3, 4}

HOSTILE: list[bytes] = [
    b"../../etc", b"$(id)", b"2026-13-45", b"9" * 5000, b"[" * 200, b"{" * 70, b"]", b"}", b"~", b"null",
    b"[]", b"{}", b"-1", b"1e999", b".nan", b"'", b'"', b"\xff\xfe", b"\x00", b"&a [*a]", b"*nowhere",
    b"!!binary zz", b"!!python/object/apply:os.system [id]", b"!!int x", b"!!timestamp 2026-02-30",
    b"true", b"\t", b"- x", b"? x", b"a: b: c", b"0x", b"\\u12", b"\"\\ud800\"", b"\xe2\x80", b"%TAG ! x",
    b"---", b"...", b"|", b">-", b"<<: *nowhere", b"[1, 2", b"{\"a\": 1, \"a\": 2}", b"1" * 60,
    b"5", b"[5]", b"[{}]", b"{\"a\": []}", b"\"\"", b"[null]", b"-0", b"\"\\u0000\"",
]
_TOKEN = re.compile(rb'"[^"\n]*"|[A-Za-z0-9_.:/+-]+')  # a quoted string (JSON) or a bare word


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One malformation of `data`; never `data` itself."""
    lines = data.splitlines(keepends=True) or [b""]
    kind = rng.randrange(7)
    if kind == 0:  # flip bytes
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        out = bytes(buf)
    elif kind == 1:  # cut short
        out = data[: rng.randrange(len(data))] if data else b"x"
    elif kind == 2:  # drop a line
        del lines[rng.randrange(len(lines))]
        out = b"".join(lines)
    elif kind == 3:  # repeat a line
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
        out = b"".join(lines)
    elif kind == 4:  # insert a hostile line
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(HOSTILE) + b"\n")
        out = b"".join(lines)
    else:  # replace a value (a token) with a hostile one
        tokens = list(_TOKEN.finditer(data))
        if not tokens:
            return data + rng.choice(HOSTILE)
        m = rng.choice(tokens)
        out = data[: m.start()] + rng.choice(HOSTILE) + data[m.end():]
    return out if out != data else out + rng.choice(HOSTILE)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root, with a digest of each file's content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, (argv, err)
    assert rc in DOCUMENTED, (argv, rc, err)
    errors = [line for line in err.splitlines() if line.startswith(("gl-nvidia: error:", "Error:"))]
    assert len(errors) == (1 if rc else 0), (argv, err)  # one line says what is wrong
    return rc, err


def samples(seed_data: bytes, n: int, salt: int) -> list[bytes]:
    rng = random.Random(SEED + salt)
    return [mutate(rng, seed_data) for _ in range(n)]


def offline_lock() -> bytes:
    """The repository's lock with its sources pointed at the offline snapshot (a lock that mutated out of
    its `resolved` section is resolved from these files, never from the network)."""
    text = (ROOT / "versions.yaml").read_text()
    text = re.sub(r"  glrd:\n(    - .*\n)+", f"  glrd:\n    - {CATALOG / 'glrd-releases-major.json'}\n"
                                           f"    - {CATALOG / 'glrd-releases-minor.json'}\n", text)
    text = re.sub(r"  nvidia: .*", f"  nvidia: {CATALOG / 'nvidia-releases.json'}", text)
    text = text.replace("${GL_APT_REPOSITORY}", str(CATALOG / "gl-apt"))
    return text.encode()


def test_fuzzed_lock_files(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # anything a command writes by default lands here, where the check sees it
    lock = work / "versions.yaml"
    repo = f"{registry.host}/fuzz"
    reading: list[list[str]] = [  # commands that only read the lock (and the registry)
        ["matrix", "--lock", str(lock), "--format", "json"],
        ["versions", "--lock", str(lock)],
        ["values", "--lock", str(lock)],
        ["resolve", "--lock", str(lock), "--os-release", str(OS_RELEASE), "--kernel", KERNEL, "--registry", repo],
        ["preflight", "--lock", str(lock), "--gl-version", "1877.3", "--registry", repo],
    ]
    writing: list[list[str]] = [  # and those that would build or rewrite it: given only locks that do not parse
        ["values", "--lock", str(lock), "--out", str(work / "values.yaml")],
        ["update", "--lock", str(lock)],
        ["build", "--all", "--profile", str(lock), "--out", str(work / "bundles")],
        ["release", "--profile", str(lock), "--out", str(work / "out")],
    ]
    rejected = 0
    seed = offline_lock()
    corpus = [  # the cases issue 11 names, always tried, then random ones
        seed.replace(b"policy:", b"policy: \xff\xfe"),
        seed + b"deep: " + b"[" * 5000 + b"]" * 5000 + b"\n",
        seed.replace(b"today: 2026-11-20", b"today: 2026-13-45"),
        seed.replace(b"branches: 3", b"branches: " + b"9" * 5000),
        seed.replace(b"version: 575.57.08", b"version: ../../etc"),
        seed.replace(b"kernel: 6.12.44-amd64}", b"kernel: ../../etc}"),
    ]
    for data in corpus + samples(seed, 16, 1):
        lock.write_bytes(data)
        try:
            read_lock(lock)
            valid = True
        except UserError:
            valid = False
        before = snapshot(work)
        for argv in reading + ([] if valid else writing):
            rc, err = run(argv, capsys)
            if not valid:
                assert rc == 2, (argv, data, err)
        assert snapshot(work) == before, data
        rejected += not valid
    assert rejected >= 12  # the mutations mostly break the lock: the build commands were reached


def test_fuzzed_os_release(registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    lock = work / "versions.yaml"
    lock.write_bytes(offline_lock())
    os_release = work / "os-release"
    seed = OS_RELEASE.read_bytes()
    corpus = [seed + b"\xff\n", seed.replace(b"ID=gardenlinux", b"ID=$(id)"), b"ID=\n", b"", b"ID=" + b"[" * 5000]
    for data in corpus + samples(seed, 20, 2):
        os_release.write_bytes(data)
        before = snapshot(work)
        rc, err = run(["resolve", "--os-release", str(os_release), "--kernel", KERNEL, "--lock", str(lock),
                       "--registry", f"{registry.host}/fuzz"], capsys)
        assert rc in (1, 2), (data, err)  # no such image, or bad input
        assert snapshot(work) == before


def _kubeconfig(server: str) -> bytes:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "shoot",
        "clusters": [{"name": "shoot", "cluster": {"server": server}}],
        "users": [{"name": "admin", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "shoot", "context": {"cluster": "shoot", "user": "admin", "namespace": "x"}}],
    }, indent=1).encode()


def test_fuzzed_kubeconfigs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "versions.yaml"
    lock.write_bytes(offline_lock())
    kubeconfig = tmp_path / "kubeconfig"
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens: a kubeconfig that parses gets exit 4
    commands = [["preflight", "--kubeconfig", str(kubeconfig), "--lock", str(lock)],
                ["verify", "--kubeconfig", str(kubeconfig), "--timeout", "1"]]
    seed = _kubeconfig(server)
    corpus = [seed.replace(f'"{server}"'.encode(), b"5"), seed.replace(b'"contexts": [', b'"contexts": [5, '),
              seed + b"\xff", b"[" * 5000, b"[]", b"apiVersion: v1\nclusters: 5\n"]
    for data in corpus + samples(seed, 20, 3):
        kubeconfig.write_bytes(data)
        before = snapshot(tmp_path)
        for argv in commands:
            rc, err = run(argv, capsys)
            assert rc in (2, 4), (argv, data, err)
        assert snapshot(tmp_path) == before


def _layout(root: Path) -> None:
    """A small, valid OCI layout holding one image tagged `t1`."""
    layout = Layout.create(root)
    config = layout.write_blob(json.dumps({"architecture": "amd64", "os": "linux",
                                           "rootfs": {"type": "layers", "diff_ids": []}}).encode(), CONFIG)
    layer = layout.write_blob(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00",
                              LAYER_GZIP)
    layout.add_image(Manifest.build(config, [layer], {}), ["t1"])


def test_fuzzed_oci_layouts(registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed = tmp_path / "seed"
    _layout(seed)
    files = sorted(p.relative_to(seed) for p in seed.rglob("*") if p.is_file())
    index = Path("index.json")
    manifest = Path("blobs/sha256") / Layout(seed).tags()["t1"].removeprefix("sha256:")
    corpus: list[tuple[Path, bytes | None]] = [
        (index, b"[]"), (index, b'{"manifests": 5}'), (index, b'{"manifests": [5]}'), (index, b"\xff"),
        (index, b'{"manifests": [{"mediaType": "x", "digest": "sha256:../../etc", "size": 1, '
                b'"annotations": {"org.opencontainers.image.ref.name": "t1"}}]}'),
        (manifest, b"[]"), (manifest, b'{"config": 5, "layers": []}'), (manifest, b'{"config": {}, "layers": 5}'),
        (Path("oci-layout"), None), (manifest, None),
    ]
    rng = random.Random(SEED + 4)
    layout = tmp_path / "layout"
    for i in range(len(corpus) + 20):
        for f in files:
            (layout / f).parent.mkdir(parents=True, exist_ok=True)
            (layout / f).write_bytes((seed / f).read_bytes())
        name, data = corpus[i] if i < len(corpus) else (rng.choice(files), b"")
        target = layout / name
        if i >= len(corpus):
            data = None if rng.random() < 0.15 else mutate(rng, target.read_bytes())
        if data is None:
            target.unlink()
        else:
            target.write_bytes(data)
        before = snapshot(layout)
        rc, err = run(["push", str(layout), f"{registry.host}/fuzz{i}/driver"], capsys)
        assert rc in (0, 2, 3), (target, err)  # pushed (a change the registry cannot see), bad input, failed tool
        assert snapshot(layout) == before


@pytest.mark.parametrize(("what", "make"), [
    ("lock", offline_lock),
    ("os-release", OS_RELEASE.read_bytes),
])
def test_mutations_are_deterministic(what: str, make: Callable[[], bytes]) -> None:
    assert samples(make(), 5, 9) == samples(make(), 5, 9)
    assert all(s != make() for s in samples(make(), 50, 9))


def test_fuzzed_redist_manifests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NVIDIA's redistrib_<version>.json as a mirror could serve it: bad input (2), or, when it still lists
    the release, the build goes on to the unit (1: this kernel has no headers); never a bug."""
    from tests.fixtures import redist
    from tests.test_build_inputs import FAKE_RUN, FAKE_VERSION

    work = tmp_path / "work"
    run_file = work / "NVIDIA.run"
    run_file.parent.mkdir()
    run_file.write_text(FAKE_RUN)
    tree = work / "redist"
    redist.write_tree(tree, FAKE_VERSION)
    manifest = tree / f"redistrib_{FAKE_VERSION}.json"
    seed = manifest.read_bytes()
    corpus = [b"9" * 5000, b"[" * 5000 + b"]" * 5000, seed.replace(b'"size": "', b'"size": "' + b"9" * 5000),
              seed.replace(b'"release_label": "999.12.34"', b'"release_label": ' + b"[" * 100000),
              seed.replace(b'"fabricmanager/', b'"fabricmanager/../../'), b"[]", b"\xff"]
    argv = ["build", "--kernel", "6.1.0-99-cloud-amd64", "--driver", FAKE_VERSION, "--source", "nvidia",
            "--source-path", str(run_file), "--redist", str(tree), "--out", str(work / "out")]
    for data in corpus + samples(seed, 16, 5):
        manifest.write_bytes(data)
        before = snapshot(work)
        rc, err = run(argv, capsys)
        assert rc in (1, 2), (data, err)
        assert snapshot(work) == before


EMPTY_TAR = b"\0" * 1024  # two zero blocks: a tar of nothing


def _tiny_base(root: Path, config: bytes) -> None:
    """A layout whose image has `config` and one small layer (no python3: a valid config still ends in 2)."""
    layout = Layout.create(root)
    layer = layout.write_blob(gzip.compress(EMPTY_TAR, mtime=0), LAYER_GZIP)
    layout.add_image(Manifest.build(layout.write_blob(config, CONFIG), [layer], {}), ["v1"])


def test_fuzzed_bundle_manifests_and_base_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle's manifest.json and a --base image's config, malformed: `image` says so in one line (2) and
    leaves no layout behind."""
    from tests.test_image_support import KERNELS, make_bundle

    work = tmp_path / "work"
    bundle = make_bundle(work / "bundle", kernels=KERNELS[:1])
    good_config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(EMPTY_TAR).hexdigest()}"]}}).encode()
    base = work / "base"
    _tiny_base(base, good_config)
    argv = ["image", str(bundle), "--all", "--base", f"{base}:v1", "--out", str(work / "out")]
    seed = (bundle / "manifest.json").read_bytes()
    corpus = [b"9" * 5000, b"[" * 100000, b"[]", seed.replace(b'"nvidia.ko"', b'"../../../../etc/cron.d/x"'),
              seed.replace(b'"usr/bin/nvidia-smi"', b'"../../etc/passwd"'), seed.replace(b'"size": ', b'"size": ' +
                                                                                            b"9" * 5000 + b"0 + ")]
    for data in corpus + samples(seed, 16, 6):
        (bundle / "manifest.json").write_bytes(data)
        before = snapshot(work)
        rc, err = run(argv, capsys)
        assert rc == 2, (data, err)
        assert snapshot(work) == before
    (bundle / "manifest.json").write_bytes(seed)
    for data in [b"[]", b"5", b"9" * 5000, b"[" * 100000, b'{"rootfs": []}', *samples(good_config, 16, 7)]:
        shutil.rmtree(base)
        _tiny_base(base, data)
        before = snapshot(work)
        rc, err = run(argv, capsys)
        assert rc == 2, (data, err)
        assert snapshot(work) == before
