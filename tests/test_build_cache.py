"""The build cache is verified on every use: a damaged entry is discarded, rebuilt, and never shipped.

Each test builds real entries (a compiled module, a downloaded and unpacked installer) in a private
cache, damages one the way a full disk, a killed copy or a stray edit does, and builds again.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
from pathlib import Path
from typing import Any

import pytest

from gl_nvidia import bundle as b
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.fs import SEAL, cache_fill, cache_hit, sha256_file
from gl_nvidia.modbuild import DirEnv, KernelHeaders, build_unit
from gl_nvidia.modbuild.compile import compile_set
from gl_nvidia.modbuild.nvidia import NvidiaRunSource, run_file_name
from gl_nvidia.modbuild.sources import ModuleSource
from tests.fixtures.bundle import DEBIAN_KERNEL, TINY_SOURCES
from tests.fixtures.nvidia_site import FAKE_VERSION, _Server, _template, own_cache, server

__all__ = ["own_cache", "server"]  # fixtures, from tests/fixtures/nvidia_site.py

FAKE_UNIT = BuildUnit(kernel=DEBIAN_KERNEL, driver_version=FAKE_VERSION, driver_branch="999", arch="amd64",
                      flavour="cloud", os_id="debian", os_versions=("12",))
LIB = f"usr/lib/x86_64-linux-gnu/libnvidia-ml.so.{FAKE_VERSION}"


def _damaged(caplog: pytest.LogCaptureFixture, what: str) -> bool:
    return any("fails verification" in r.getMessage() and what in r.getMessage() and "building it again to replace it"
               in r.getMessage()
               for r in caplog.records)


def test_a_truncated_cached_module_is_compiled_again(tmp_path: Path, own_cache: Path,
                                                     debian_headers: KernelHeaders,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    tree = tmp_path / "hello"
    tree.mkdir()
    shutil.copy(TINY_SOURCES / "glnv_hello.c", tree)
    (tree / "Kbuild").write_text("obj-m := glnv_hello.o\n")
    (tree / "Makefile").write_text("modules:\n\t$(MAKE) -C $(SYSOUT) M=$(CURDIR) modules\n")  # NVIDIA's interface
    src = ModuleSource("open", "1.0", tree, "hello-" + sha256_file(tree / "glnv_hello.c"))
    env = DirEnv(debian_headers.sysout)
    hdrs = env.headers(DEBIAN_KERNEL, "amd64")
    first = compile_set(src, hdrs, env, env.toolchain(hdrs), jobs=2)
    assert first.status == "ok" and not first.cached
    (good,) = first.modules
    ko = first.entry / "ko" / "glnv_hello.ko"
    ko.write_bytes(ko.read_bytes()[: good.size // 2])

    with caplog.at_level(logging.WARNING):
        again = compile_set(src, hdrs, env, env.toolchain(hdrs), jobs=2)
    assert not again.cached and _damaged(caplog, "ko/glnv_hello.ko is not what was sealed")
    (rebuilt,) = again.modules
    # A fresh compile (kbuild output differs by its temp build path, not in size): the file is what it records.
    assert sha256_file(ko) == rebuilt.sha256 and ko.stat().st_size == rebuilt.size == good.size
    assert compile_set(src, hdrs, env, env.toolchain(hdrs), jobs=2).cached  # the new entry is a hit


def test_a_damaged_unpacked_library_is_unpacked_again_and_the_bundle_rewritten(
        server: _Server, own_cache: Path, debian_headers: KernelHeaders, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    source, env = NvidiaRunSource(_template(server), redist=server.redist, retry_delay=0.01), DirEnv(debian_headers.sysout)
    out = tmp_path / "bundle"
    first = build_unit(FAKE_UNIT, out, source=source, env=env, module_types=())
    assert first.manifest is not None
    good = {f.path: f.sha256 for f in first.manifest.userspace}
    (layout,) = (own_cache / "build" / "driver").glob("run-*")
    (layout / "userspace" / LIB).write_bytes(b"\0" * 4096)
    # What an older gl-nvidia shipped from that entry: the 4 KB file, with a manifest that matches it.
    (b.userspace_dir(out) / LIB).write_bytes(b"\0" * 4096)
    manifest = json.loads((out / b.MANIFEST).read_text())
    for f in manifest["userspace"]:
        if f["path"] == LIB:
            f["sha256"], f["size"] = sha256_file(b.userspace_dir(out) / LIB), 4096
    (out / b.MANIFEST).write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING):
        again = build_unit(FAKE_UNIT, out, source=source, env=env, module_types=())
    assert _damaged(caplog, f"userspace/{LIB} is not what was sealed")
    assert again.manifest is not None and {f.path: f.sha256 for f in again.manifest.userspace} == good
    for f in b.BundleManifest.load(out).userspace:
        if f.link is None:
            assert sha256_file(b.userspace_dir(out) / f.path) == good[f.path], f.path
    assert server.requests == 1  # the installer itself was fine: unpacked again, not downloaded again


def test_a_truncated_download_is_fetched_again(server: _Server, own_cache: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    source = NvidiaRunSource(_template(server), redist=server.redist, retry_delay=0.01)
    run_file = source.fetch(FAKE_VERSION, "amd64")
    assert run_file.name == run_file_name(FAKE_VERSION, "amd64")
    whole = run_file.read_bytes()
    run_file.write_bytes(whole[:100])
    with caplog.at_level(logging.WARNING):
        inputs = source.prepare(FAKE_VERSION, "amd64")
    assert _damaged(caplog, f"{run_file.name} is not what was sealed")
    assert server.requests == 2 and run_file.read_bytes() == whole
    assert (inputs.userspace / LIB).is_file()


@pytest.mark.parametrize("damage", ["added", "removed", "relinked", "unsealed", "chmod"])
def test_any_change_to_an_entry_discards_it(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    entry = tmp_path / "entry"
    with cache_fill(entry) as tmp:
        (tmp / "lib").mkdir()
        (tmp / "lib/a.so").write_bytes(b"a")
        (tmp / "lib/a.so.1").symlink_to("a.so")
    assert cache_hit(entry)
    if damage == "added":
        (entry / "lib/evil.so").write_bytes(b"x")
    elif damage == "removed":
        (entry / "lib/a.so").unlink()
    elif damage == "relinked":
        (entry / "lib/a.so.1").unlink()
        (entry / "lib/a.so.1").symlink_to("/etc/passwd")
    elif damage == "unsealed":
        (entry / SEAL).unlink()
    else:
        (entry / "lib/a.so").chmod(0o4755)
    with caplog.at_level(logging.WARNING):
        assert not cache_hit(entry)
    assert _damaged(caplog, str(entry))
    assert not cache_hit(entry)  # a miss until it is built again
    with cache_fill(entry) as tmp:
        (tmp / "rebuilt").write_bytes(b"r")
    assert cache_hit(entry) and sorted(p.name for p in entry.iterdir()) == [SEAL, "rebuilt"]


def _fill_at_the_same_moment(entry: str, content: str, barrier: Any) -> None:
    with cache_fill(Path(entry)) as tmp:
        (tmp / "content").write_text(content)
        barrier.wait()  # every process renames its entry in at once


def test_processes_filling_one_entry_at_once_all_succeed_and_leave_one_sealed_entry(tmp_path: Path) -> None:
    # CI jobs, test workers and parallel units share one machine's cache: the same download or headers
    # entry is often made by two of them at once.
    ctx = multiprocessing.get_context("fork")
    for round in range(10):
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=_fill_at_the_same_moment, args=(str(tmp_path / f"entry{round}"), f"run {i}",
                                                                       barrier))
                 for i in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 6
        assert cache_hit(tmp_path / f"entry{round}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"entry{r}" for r in range(10)]  # no temp or old copy


def test_an_entry_another_process_filled_meanwhile_is_kept_and_one_there_before_is_replaced(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    with cache_fill(entry) as tmp:
        (tmp / "ours").write_text("late")
        with cache_fill(entry) as other:  # another run finishes first
            (other / "theirs").write_text("first")
        reading = (entry / "theirs").stat().st_ino
    assert (entry / "theirs").stat().st_ino == reading and not (entry / "ours").exists()  # its readers go on
    # A rebuild of an entry its caller found wanting (e.g. one without the debug copies --keep-debug needs)
    # replaces it.
    with cache_fill(entry) as tmp:
        (tmp / "with-debug").write_text("new")
    assert cache_hit(entry) and sorted(p.name for p in entry.iterdir()) == [SEAL, "with-debug"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
