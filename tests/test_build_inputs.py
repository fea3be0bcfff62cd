"""Driver sources and kernel environments, and bad input: each a clear error and nothing half-written.

NVIDIA's download site is replaced by a local HTTP server serving a small self-made `.run`-shaped
installer (it answers `--extract-only --target DIR` like NVIDIA's makeself archives).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gl_nvidia.build import AptEnv, DebianSource, DirEnv, DirSource, KernelHeaders, build_unit
from gl_nvidia.build.compile import first_error
from gl_nvidia.build.kenv import (
    KmodbuildEnv,
    compiler_mismatch,
    config_arch,
    cross_prefix,
    host_arch,
    host_toolchain,
    kmodbuild_image,
    make_argv,
)
from gl_nvidia.build.nvidia import (
    FABRICMANAGER_URL,
    NvidiaRunSource,
    RedistFile,
    fabricmanager_entry,
    redist_manifest_url,
)
from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from tests.fixtures.bundle import DEBIAN_DRIVER, DEBIAN_UNIT

FAKE_VERSION = "999.12.34"
FAKE_RUN = f"""#!/bin/sh
# A .run-shaped test installer: only --extract-only --target DIR, like NVIDIA's makeself archives.
set -e
[ "$1" = --extract-only ] && [ "$2" = --target ] || {{ echo "usage: $0 --extract-only --target DIR" >&2; exit 2; }}
d="$3"
mkdir -p "$d/kernel" "$d/kernel-open" "$d/firmware" "$d/supported-gpus"
printf 'NVIDIA Accelerated Graphics Driver for Linux-x86_64\\n{FAKE_VERSION}\\n' > "$d/.manifest"
echo 'obj-m += nvidia.o' > "$d/kernel/Kbuild"
echo 'obj-m += nvidia.o' > "$d/kernel-open/Kbuild"
printf '#!/bin/sh\\necho smi\\n' > "$d/nvidia-smi"; chmod 755 "$d/nvidia-smi"
echo lib > "$d/libcuda.so.{FAKE_VERSION}"
echo lib > "$d/libnvidia-ml.so.{FAKE_VERSION}"
echo fw > "$d/firmware/gsp_ga10x.bin"
echo license > "$d/LICENSE"
echo '{{"chips": []}}' > "$d/supported-gpus/supported-gpus.json"
"""


def fabricmanager_archive(dest: Path, version: str = FAKE_VERSION, arch: str = "x86_64") -> Path:
    """An archive in the layout of NVIDIA's fabricmanager-linux-<arch>-<version>-archive.tar.xz."""
    top = f"fabricmanager-linux-{arch}-{version}-archive"
    files = {
        "bin/nv-fabricmanager": ("#!/bin/sh\necho fabric manager\n", 0o755),
        "bin/nvswitch-audit": ("#!/bin/sh\n", 0o755),
        "bin/nvidia-fabricmanager-start.sh": ("#!/bin/sh\n", 0o755),
        "lib/libnvfm.so.1": ("lib", 0o644),
        "include/nv_fm_agent.h": ("/* api */", 0o644),
        "etc/fabricmanager.cfg": ("LOG_LEVEL=4\nDAEMONIZE=1\nFABRIC_MODE=0\n", 0o644),
        "etc/fabricmanager_multinode.cfg": ("FABRIC_MODE=0\n", 0o644),
        "share/nvidia/nvswitch/dgxh100_hgxh100_topology": ("topology", 0o644),
        "systemd/nvidia-fabricmanager.service": ("[Service]\n", 0o644),
        "LICENSE": ("license", 0o644),
    }
    archive = dest / f"{top}.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for name, (text, mode) in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(text), mode
            tar.addfile(info, io.BytesIO(text.encode()))
    return archive


def redistrib(version: str, archive: bytes) -> dict[str, object]:
    """NVIDIA's redistrib_<version>.json in the shape of its driver redist tree, listing `archive` as the
    fabric manager of both server arches."""
    def platform(component: str, arch: str) -> dict[str, str]:
        return {"relative_path": f"{component}/linux-{arch}/{component}-linux-{arch}-{version}-archive.tar.xz",
                "sha256": hashlib.sha256(archive).hexdigest(), "md5": hashlib.md5(archive).hexdigest(),
                "size": str(len(archive))}
    return {
        "release_date": "2025-10-09", "release_label": version, "release_product": "nvidia-driver",
        "nvidia_driver": {"name": "NVIDIA Linux Driver", "license": "NVIDIA Driver", "license_path":
                          "nvidia_driver/LICENSE.txt", "version": version, "linux-x86_64": platform("nvidia_driver", "x86_64")},
        "fabricmanager": {"name": "NVIDIA Fabric Manager", "license": "NVIDIA Driver", "license_path":
                          "fabricmanager/LICENSE.txt", "version": version,
                          "linux-x86_64": platform("fabricmanager", "x86_64"), "linux-sbsa": platform("fabricmanager", "sbsa")},
    }


class _Server:
    """Serves one installer, `fm` (a fabric manager archive) at *-archive.tar.xz paths and the redist tree's
    redistrib_<version>.json listing `listed` (default: `fm`); the first `fail` requests for the installer
    answer 503, a path of "missing" answers 404."""

    def __init__(self, body: bytes, fm: bytes | None = None) -> None:
        self.body, self.fm, self.fail, self.requests, self.fm_requests = body, fm, 0, 0, 0
        self.listed: bytes | None = None
        self.manifest_requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.rpartition("/")[2]
                if name.startswith("redistrib_") and name.endswith(".json"):
                    server.manifest_requests += 1
                    if server.fm is None or "missing" in self.path:
                        self.send_error(404)
                        return
                    version = name.removeprefix("redistrib_").removesuffix(".json")
                    body = json.dumps(redistrib(version, server.listed or server.fm)).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path.endswith("-archive.tar.xz"):
                    server.fm_requests += 1
                    if server.fm is None or "missing" in self.path:
                        self.send_error(404)
                        return
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.fm)))
                    self.end_headers()
                    self.wfile.write(server.fm)
                    return
                server.requests += 1
                if "missing" in self.path:
                    self.send_error(404)
                elif server.fail > 0:
                    server.fail -= 1
                    self.send_error(503)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.body)))
                    self.end_headers()
                    self.wfile.write(server.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    s = _Server(FAKE_RUN.encode(), fabricmanager_archive(tmp_path_factory.mktemp("fm")).read_bytes())
    yield s
    s.httpd.shutdown()


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(cache))
    return cache


def _template(server: _Server) -> str:
    return server.url + "/tesla/{version}/NVIDIA-Linux-{machine}-{version}.run"


def _fm_template(server: _Server, where: str = "redist") -> str:
    return server.url + f"/{where}/fabricmanager/linux-{{arch}}/fabricmanager-linux-{{arch}}-{{version}}-archive.tar.xz"


FM = f"fabricmanager-linux-x86_64-{FAKE_VERSION}-archive.tar.xz"


def test_nvidia_run_is_downloaded_with_retries_checked_and_laid_out(server: _Server, own_cache: Path) -> None:
    server.fail = 2
    digest = hashlib.sha256(FAKE_RUN.encode()).hexdigest()
    source = NvidiaRunSource(_template(server), sha256=digest, fabricmanager=_fm_template(server), retry_delay=0.01)
    inputs = source.prepare(FAKE_VERSION, "amd64")
    assert server.requests == 3
    assert (inputs.driver_version, inputs.branch, inputs.source) == (FAKE_VERSION, "999", "nvidia")
    assert inputs.digests == {f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run": digest, FM: hashlib.sha256(server.fm or b"").hexdigest()}
    assert inputs.left_out == {}
    lib = inputs.userspace / "usr/lib/x86_64-linux-gnu"
    assert os.access(inputs.userspace / "usr/bin/nvidia-smi", os.X_OK)
    assert os.readlink(lib / "libcuda.so.1") == f"libcuda.so.{FAKE_VERSION}"
    assert (inputs.userspace / "usr/share/nvidia/supported-gpus.json").is_file()
    assert (inputs.userspace / "usr/share/doc/nvidia/LICENSE").is_file()
    assert (inputs.firmware / "nvidia" / FAKE_VERSION / "gsp_ga10x.bin").is_file()
    assert sorted(inputs.module_sources) == ["open", "proprietary"]
    assert (inputs.module_sources["open"].tree / "Kbuild").is_file()
    # Cached by version: a second prepare does not download again.
    source.prepare(FAKE_VERSION, "amd64")
    assert (server.requests, server.fm_requests, server.manifest_requests) == (3, 1, 1)


def test_nvidia_source_ships_fabric_manager_of_exactly_the_driver_version(server: _Server, own_cache: Path) -> None:
    source = NvidiaRunSource(_template(server), fabricmanager=_fm_template(server), retry_delay=0.01)
    assert source.checksums(FAKE_VERSION, "amd64")[FM] == _fm_template(server).format(arch="x86_64", version=FAKE_VERSION)
    usr = source.prepare(FAKE_VERSION, "amd64").userspace / "usr"
    for tool in ("nv-fabricmanager", "nvswitch-audit", "nvidia-fabricmanager-start.sh"):
        assert os.access(usr / "bin" / tool, os.X_OK), tool
    nvswitch = usr / "share/nvidia/nvswitch"
    assert sorted(p.name for p in nvswitch.iterdir()) == [
        "dgxh100_hgxh100_topology", "fabricmanager.cfg", "fabricmanager_multinode.cfg"]
    assert "FABRIC_MODE=0" in (nvswitch / "fabricmanager.cfg").read_text()  # NVIDIA's own config, as shipped
    assert (usr / "lib/x86_64-linux-gnu/libnvfm.so.1").is_file()
    assert (usr / "share/doc/nvidia-fabricmanager/LICENSE").is_file()
    assert not (usr / "include").exists()  # the API headers are for building against it, not for the node


def test_no_fabric_manager_from_nvidia_is_a_left_out_reason_not_a_gap(server: _Server, own_cache: Path) -> None:
    source = NvidiaRunSource(_template(server), fabricmanager=_fm_template(server, "missing"), retry_delay=0.01)
    inputs = source.prepare(FAKE_VERSION, "amd64")
    assert inputs.left_out == {"fabricmanager": f"NVIDIA publishes no fabric manager for {FAKE_VERSION} (amd64): "
                                                f"{server.url}/missing/redistrib_{FAKE_VERSION}.json answered 404"}
    assert not (inputs.userspace / "usr/bin/nv-fabricmanager").exists()
    assert (server.manifest_requests, server.fm_requests) == (1, 0)  # a 404 is an answer, not a reason to retry


def test_a_fabric_manager_archive_other_than_nvidias_manifest_lists_is_refused(server: _Server,
                                                                               own_cache: Path) -> None:
    """The archive on the server was swapped: its sha256 is not the one redistrib_<version>.json lists."""
    server.listed, server.fm = server.fm, fabricmanager_archive(own_cache.parent).read_bytes() + b"\0"
    source = NvidiaRunSource(_template(server), fabricmanager=_fm_template(server), retry_delay=0.01)
    listed = hashlib.sha256(server.listed or b"").hexdigest()
    with pytest.raises(UserError) as exc:
        source.prepare(FAKE_VERSION, "amd64")
    assert re.fullmatch(rf"checksum mismatch for {server.url}/redist/fabricmanager/linux-x86_64/{FM}: "
                        rf"expected sha256 {listed}, got [0-9a-f]{{64}}", exc.value.message), exc.value.message
    assert exc.value.hint == f"the archive is not the one {server.url}/redist/redistrib_{FAKE_VERSION}.json lists; " \
                             "nothing was kept"
    assert server.fm_requests == 1  # a mismatch is final, not retried
    assert [p.name for p in (own_cache / "build" / "fabricmanager").iterdir()] == []
    assert not (own_cache / "build" / "fabricmanager-trees").exists()
    server.fm = server.listed  # NVIDIA's own archive again: verified, used, cached
    assert (source.prepare(FAKE_VERSION, "amd64").userspace / "usr/bin/nv-fabricmanager").is_file()
    assert (own_cache / "build" / "fabricmanager" / f"{FAKE_VERSION}-amd64" / FM).is_file()


def test_the_redist_manifest_must_list_exactly_the_archive_of_the_driver() -> None:
    good = redistrib(FAKE_VERSION, b"archive")
    assert fabricmanager_entry(good, FAKE_VERSION, "arm64", "m.json") == RedistFile(
        hashlib.sha256(b"archive").hexdigest(), 7)
    assert fabricmanager_entry({k: v for k, v in good.items() if k != "fabricmanager"}, FAKE_VERSION, "amd64",
                               "m.json") is None
    with pytest.raises(UserError, match=r"^m\.json lists fabricmanager 999\.12\.34 at fabricmanager/linux-x86_64/"
                                        r"fabricmanager-linux-x86_64-999\.12\.34-archive\.tar\.xz, not 999\.12\.35 at"):
        fabricmanager_entry(good, "999.12.35", "amd64", "m.json")
    fm = good["fabricmanager"]
    assert isinstance(fm, dict)
    for broken, why in (({**fm["linux-x86_64"], "sha256": "abc"}, "no valid sha256: 'abc'"),
                        ({k: v for k, v in fm["linux-x86_64"].items() if k != "size"}, "lacks a valid 'size'")):
        with pytest.raises(UserError, match=why):
            fabricmanager_entry({**good, "fabricmanager": {**fm, "linux-x86_64": broken}}, FAKE_VERSION, "amd64", "m")
    with pytest.raises(UserError, match="not in NVIDIA's redist tree layout"):
        redist_manifest_url("https://mirror.example/fm.tar.xz", FAKE_VERSION, "amd64")
    assert redist_manifest_url(FABRICMANAGER_URL.format(arch="sbsa", version=FAKE_VERSION), FAKE_VERSION, "arm64") == \
        f"https://developer.download.nvidia.com/compute/nvidia-driver/redist/redistrib_{FAKE_VERSION}.json"


def test_a_fabric_manager_of_another_version_is_refused(tmp_path: Path, own_cache: Path) -> None:
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run"
    run_file.write_text(FAKE_RUN)
    other = fabricmanager_archive(tmp_path, version="999.12.33")
    with pytest.raises(UserError, match=r"holds fabricmanager-linux-x86_64-999\.12\.33-archive, not "
                                        r"fabricmanager-linux-x86_64-999\.12\.34-archive: fabric manager must be of "
                                        r"exactly driver 999\.12\.34"):
        NvidiaRunSource(str(run_file), fabricmanager=str(other)).prepare(FAKE_VERSION, "amd64")


def test_nvidia_checksum_mismatch_leaves_nothing_behind(server: _Server, own_cache: Path) -> None:
    source = NvidiaRunSource(_template(server), sha256="0" * 64, retry_delay=0.01)
    with pytest.raises(UserError, match=r"checksum mismatch for .*NVIDIA-Linux-x86_64-999\.12\.34\.run"):
        source.prepare(FAKE_VERSION, "amd64")
    assert list((own_cache / "build" / "runs").iterdir()) == []


def test_nvidia_unknown_driver_version(server: _Server, own_cache: Path) -> None:
    source = NvidiaRunSource(server.url + "/missing/{version}.run", retry_delay=0.01)
    with pytest.raises(UserError, match=r"unknown driver version 1\.2\.3: .* does not exist \(HTTP 404\)"):
        source.prepare("1.2.3", "amd64")
    assert server.requests == 1  # a 404 is an answer, not a reason to retry


def test_nvidia_download_gives_up_after_retries(server: _Server, own_cache: Path) -> None:
    server.fail = 10
    with pytest.raises(UserError, match=r"download failed after 4 attempts: .*HTTP 503"):
        NvidiaRunSource(_template(server), retry_delay=0.01).prepare(FAKE_VERSION, "amd64")
    assert server.requests == 4
    assert list((own_cache / "build" / "runs").iterdir()) == []


def test_local_run_file_and_dir_source(tmp_path: Path, own_cache: Path) -> None:
    run_file = tmp_path / f"NVIDIA-Linux-x86_64-{FAKE_VERSION}.run"
    run_file.write_text(FAKE_RUN)
    inputs = NvidiaRunSource(str(run_file)).prepare(FAKE_VERSION, "amd64")
    assert inputs.source == "nvidia" and (inputs.userspace / "usr/bin/nvidia-smi").is_file()
    assert inputs.left_out == {"fabricmanager": f"no fabric manager for {FAKE_VERSION}: {tmp_path / FM} does not exist"}
    fabricmanager_archive(tmp_path)  # beside the installer: taken by default
    inputs = NvidiaRunSource(str(run_file)).prepare(FAKE_VERSION, "amd64")
    assert inputs.left_out == {} and (inputs.userspace / "usr/bin/nv-fabricmanager").is_file()
    with pytest.raises(UserError, match=r"holds driver 999\.12\.34, not 1\.0\.0"):
        NvidiaRunSource(str(run_file)).prepare("1.0.0", "amd64")
    with pytest.raises(UserError, match="no such driver installer"):
        NvidiaRunSource(str(tmp_path / "nope.run")).prepare(FAKE_VERSION, "amd64")
    tree = tmp_path / "unpacked"
    subprocess.run(["sh", str(run_file), "--extract-only", "--target", str(tree)], check=True)
    d = DirSource(tree).prepare(FAKE_VERSION, "amd64")
    assert d.source == "dir" and (d.module_sources["proprietary"].tree / "Kbuild").is_file()
    assert "has no fabric manager" in d.left_out["fabricmanager"]
    with pytest.raises(UserError, match="is not an unpacked NVIDIA driver"):
        DirSource(tmp_path).prepare(FAKE_VERSION, "amd64")


def test_damaged_installer_is_a_clear_error(tmp_path: Path, own_cache: Path) -> None:
    bad = tmp_path / "NVIDIA-Linux-x86_64-1.0.0.run"
    bad.write_text("#!/bin/sh\necho 'Verifying archive integrity... Error in MD5 checksums' >&2\nexit 1\n")
    with pytest.raises(UserError, match=r"cannot unpack .*: .*Error in MD5 checksums"):
        NvidiaRunSource(str(bad)).prepare("1.0.0", "amd64")
    assert not any((own_cache / "build" / "run-trees").iterdir())


def test_kmodbuild_runs_make_in_garden_linux_container() -> None:
    env = KmodbuildEnv("1877.3", engine="podman")
    hdrs = KernelHeaders("6.12.72-cloud-amd64", Path("/s"), Path("/o"), "d", "gcc-14 (Debian 14.2.0-19) 14.2.0", "amd64")
    tree = Path("/cache/work/tree")
    assert kmodbuild_image("arm64", "2150.9.0") == "ghcr.io/gardenlinux/gardenlinux/kmodbuild:arm64-2150.9.0"
    assert env.make_argv(hdrs, tree, 8) == [
        "podman", "run", "--rm", "--network=none", "-v", "/cache/work/tree:/cache/work/tree:rw",
        "-w", "/cache/work/tree", "ghcr.io/gardenlinux/gardenlinux/kmodbuild:amd64-1877.3",
        "make", "-j8", "-C", "/cache/work/tree", "KERNEL_UNAME=6.12.72-cloud-amd64", "modules",
    ]
    assert make_argv(hdrs, tree, 2) == ["make", "-j2", "-C", "/cache/work/tree", "SYSSRC=/s", "SYSOUT=/o", "modules"]
    assert hdrs.cc == "gcc-14"


def test_an_arm64_kernel_is_cross_compiled_on_amd64_and_not_on_arm64() -> None:
    hdrs = KernelHeaders("6.1.0-56-cloud-arm64", Path("/s"), Path("/o"), "d", "gcc-12 (Debian 12.2.0-14) 12.2.0", "arm64")
    assert cross_prefix("arm64", "amd64") == "aarch64-linux-gnu-" and cross_prefix("arm64", "arm64") == ""
    assert cross_prefix("amd64", "arm64") == "x86_64-linux-gnu-"
    assert host_arch() == "amd64"  # this machine; the rest of the test depends on it
    assert (hdrs.cc, hdrs.kernel_cc, hdrs.tool("ld")) == ("aarch64-linux-gnu-gcc-12", "gcc-12", "aarch64-linux-gnu-ld")
    assert make_argv(hdrs, Path("/t"), 2)[-4:] == [
        "ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-", "CC=aarch64-linux-gnu-gcc-12", "modules"]
    with pytest.raises(UserError, match="is for neither amd64 nor arm64"):
        config_arch({"CONFIG_PPC64": "y"}, Path("/o"))


def test_first_error_is_the_compiler_error_line() -> None:
    log = ("  CC [M]  nvidia/nv.o\nwarning: something harmless\n"
           "nvidia/nv-pci.c:212:13: error: too few arguments to function 'pci_resize_resource'\n"
           "make[2]: *** [scripts/Makefile.build:250: nvidia/nv-pci.o] Error 1\n")
    assert first_error(log) == "nvidia/nv-pci.c:212:13: error: too few arguments to function 'pci_resize_resource'"
    assert first_error("make: *** No rule to make target 'modules'.  Stop.\n").startswith("make: ***")


def test_debian_has_no_fabric_manager_of_the_driver_version_and_says_so() -> None:
    """Debian 12 packages no nvidia-fabricmanager: the bundle records why the image ships without it."""
    inputs = DebianSource().prepare(DEBIAN_DRIVER, "amd64")
    assert inputs.left_out == {"fabricmanager": f"no fabric manager for {DEBIAN_DRIVER} in Debian "
                                                "(the archive's nvidia-fabricmanager: no such package)"}
    assert "nvidia-fabricmanager" not in DebianSource().checksums(DEBIAN_DRIVER, "amd64")


def test_unknown_driver_version_in_debian(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=r"driver 999\.1\.1 is not in the Debian archive \(nvidia-smi has: 535\."):
        DebianSource().prepare("999.1.1", "amd64")
    out = tmp_path / "bundles"
    rc = main(["build", "--kernel", "6.1.0-56-cloud-amd64", "--driver", "999.1.1", "--out", str(out)])
    assert rc != 0
    assert "driver 999.1.1 is not in the Debian archive" in capsys.readouterr().out
    assert not (out / "999.1.1-amd64").exists()


@pytest.mark.parametrize(("args", "ignored"), [
    (["--kernel-headers", "."], "--kernel-headers is read only with --env dir"),
    (["--env", "apt", "--kernel-headers", "."], "--kernel-headers is read only with --env dir"),
    (["--source-path", "/x.run"], "--source-path and --sha256 are read only"),
    (["--sha256", "0" * 64], "--source-path and --sha256 are read only"),
    (["--source", "dir", "--source-path", ".", "--sha256", "0" * 64], "--sha256 and --fabricmanager are read only"),
    (["--fabricmanager", "/fm.tar.xz"], "--sha256 and --fabricmanager are read only with --source nvidia"),
])
def test_options_the_build_would_ignore_are_refused(args: list[str], ignored: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["build", "--kernel", "6.1.0-56-cloud-amd64", "--driver", DEBIAN_DRIVER, "--out", str(out), *args]) == 2
    assert ignored in capsys.readouterr().err
    assert not out.exists()


def test_missing_headers_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=r"no kernel headers package linux-headers-6\.1\.0-99-cloud-amd64"):
        AptEnv().headers("6.1.0-99-cloud-amd64", "amd64")
    out = tmp_path / "bundles"
    rc = main(["build", "--kernel", "6.1.0-99-cloud-amd64", "--driver", DEBIAN_DRIVER, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc != 0 and "1 of 1 build unit(s) failed" in captured.err
    assert "no kernel headers package linux-headers-6.1.0-99-cloud-amd64" in captured.out
    assert not out.exists() or not any(out.iterdir())


def test_disk_full_leaves_no_half_written_bundle(debian_bundle: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / f"{DEBIAN_DRIVER}-amd64"
        with pytest.raises(UserError, match="no space left on device while writing"):
            build_unit(DEBIAN_UNIT, out, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_bundle_holds_one_driver(debian_bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((debian_bundle / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "driver_version": "1.2.3"}))
    with pytest.raises(UserError, match=r"is the bundle of driver 1\.2\.3 amd64, not 535\.309\.01 amd64"):
        build_unit(DEBIAN_UNIT, other, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
    assert sorted(p.name for p in other.iterdir()) == ["manifest.json"]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not a driver bundle"):
        build_unit(DEBIAN_UNIT, stranger, source=DebianSource(), env=AptEnv(), module_types=("proprietary",))
    assert sorted(p.name for p in stranger.iterdir()) == ["notes.txt"]


def test_compiler_check_names_both_compilers(debian_headers: KernelHeaders) -> None:
    # This machine has the kernel's own compiler: no warning.
    assert compiler_mismatch(host_toolchain(debian_headers.cc), debian_headers.kernel_compiler) is None
    note = compiler_mismatch("gcc (Debian 14.2.0-19) 14.2.0", debian_headers.kernel_compiler)
    assert note is not None and "gcc (Debian 14.2.0-19) 14.2.0" in note and "gcc-12 (Debian 12.2.0" in note
    with pytest.raises(UserError, match="the kernel was built with gcc-99, which is not installed"):
        host_toolchain("gcc-99")


def test_dir_env_reads_headers_on_disk(debian_headers: KernelHeaders) -> None:
    env = DirEnv(debian_headers.sysout)
    hdrs = env.headers("6.1.0-56-cloud-amd64", "amd64")
    # The arch dir's Makefile names the common dir: SYSSRC is found from it.
    assert (hdrs.sysout, hdrs.syssrc) == (debian_headers.sysout, debian_headers.syssrc)
    assert hdrs.kernel_compiler == debian_headers.kernel_compiler
    with pytest.raises(UserError, match=r"are for 6\.1\.0-56-cloud-amd64, not 6\.1\.0-47-cloud-amd64"):
        env.headers("6.1.0-47-cloud-amd64", "amd64")
