"""Compiles are reused across kernels, and what is reused is byte-identical to a cold compile.

Real headers of two real 6.1 kernels (Debian's DEBIAN_KERNEL and the ABI next to it in the archive), a small
out-of-tree module compiled in seconds (kbuild's own compiler probes are most of what one kernel's build
can take from another's), each test in a private cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

from gl_nvidia.catalog.kernels import kernel_sort_key
from gl_nvidia.fs import sha256_file
from gl_nvidia.modbuild import AptEnv, DirEnv, KernelHeaders
from gl_nvidia.modbuild.abi import read_module
from gl_nvidia.modbuild.compile import CompiledSet, compile_set
from gl_nvidia.modbuild.reuse import View, identity, unavailable
from gl_nvidia.modbuild.sources import ModuleSource
from tests.fixtures.bundle import DEBIAN_KERNEL, TINY_SOURCES
from tests.fixtures.nvidia_site import own_cache

__all__ = ["own_cache"]  # a fixture, from tests/fixtures/nvidia_site.py


@cache
def next_kernel() -> str:
    """The 6.1 cloud ABI beside DEBIAN_KERNEL in Debian's archive (the one after it, else the one before)."""
    names = {p.name.removeprefix("linux-headers-")
             for p in AptEnv().repo("amd64").search(r"linux-headers-6\.1\.0-\d+-cloud-amd64")}
    kernels = sorted(names | {DEBIAN_KERNEL}, key=kernel_sort_key)
    at = kernels.index(DEBIAN_KERNEL)
    return kernels[at + 1] if at + 1 < len(kernels) else kernels[at - 1]


@pytest.fixture(scope="session")
def next_headers() -> KernelHeaders:
    return AptEnv().headers(next_kernel(), "amd64")


def _source(tmp_path: Path, name: str = "hello", extra: dict[str, str] | None = None,
            kbuild: str = "obj-m := glnv_hello.o\n") -> ModuleSource:
    tree = tmp_path / name
    tree.mkdir()
    shutil.copy(TINY_SOURCES / "glnv_hello.c", tree)
    for file, text in (extra or {}).items():
        (tree / file).write_text(text)
    (tree / "Kbuild").write_text(kbuild)
    (tree / "Makefile").write_text("modules:\n\t$(MAKE) -C $(SYSOUT) M=$(CURDIR) modules\n")  # NVIDIA's interface
    digest = hashlib.sha256("".join(sha256_file(f) for f in sorted(tree.iterdir())).encode()).hexdigest()
    return ModuleSource("open", "1.0", tree, f"{name}-{digest}")


def _build(src: ModuleSource, headers: KernelHeaders) -> tuple[CompiledSet, dict[str, object]]:
    env = DirEnv(headers.sysout)
    hdrs = env.headers(headers.kernel, "amd64")
    cs = compile_set(src, hdrs, env, env.toolchain(hdrs), jobs=2)
    assert cs.status == "ok", cs.error
    return cs, json.loads((cs.entry / "reuse.json").read_text())


def _shas(cs: CompiledSet) -> dict[str, str]:
    return {m.name: m.sha256 for m in cs.modules}


def test_the_second_kernel_reuses_the_first_ones_compiles_and_its_modules_are_byte_identical_to_cold(
        tmp_path: Path, own_cache: Path, debian_headers: KernelHeaders, next_headers: KernelHeaders) -> None:
    assert unavailable(debian_headers, "dir") is None, "this machine reuses compiles (ccache, unshare -rm)"
    src = _source(tmp_path)
    first, first_record = _build(src, debian_headers)
    assert first_record["mode"] == "warm" and first_record["reused"] == 0  # an empty compiler cache
    second, record = _build(src, next_headers)
    assert record["identical"] is True
    if identity(debian_headers).digest == identity(next_headers).digest:
        # The same kernel rebuilt under another release (6.1.0-56 and -57): the first one's tree, with what
        # uses the release rebuilt (modpost's object: vermagic, build salt), the object compiled once.
        tree = record["tree"]
        assert record["reuse"] == "tree" and isinstance(tree, dict) and tree["from"] == DEBIAN_KERNEL
        assert tree["rebuilt"] == ["glnv_hello.mod.o"] and "UTS_RELEASE" in tree["changed"]
    else:
        assert record["reuse"] == "objects" and int(str(record["reused"])) > 0
    modules = record["modules"]
    assert isinstance(modules, dict) and set(modules) == {"glnv_hello.ko"}
    assert all(warm == cold for warm, cold in modules.values())  # the gate compared kbuild's modules, unstripped
    # The reused module is the second kernel's own: its vermagic, nothing naming the per-kernel paths
    # (the headers' directories, the build's temp work tree), debug info included.
    assert read_module(second.entry / "ko" / "glnv_hello.ko").vermagic.startswith(next_kernel() + " ")
    data = (second.entry / "debug" / "glnv_hello.ko").read_bytes()
    for path in (next_headers.sysout.name, next_headers.syssrc.name, "/build/work/", DEBIAN_KERNEL):
        assert path.encode() not in data
    assert _shas(first) != _shas(second)


def test_another_source_sharing_a_file_compiles_it_itself_and_pays_no_gate(
        tmp_path: Path, own_cache: Path, debian_headers: KernelHeaders) -> None:
    # Open and proprietary trees of one driver (and two versions of a driver) share some files: a hit from
    # the other source would make the first build of this one repeat itself cold for the gate.
    _build(_source(tmp_path, "first"), debian_headers)
    other, record = _build(_source(tmp_path, "other", {"other.c": "/* another driver source */\n"}), debian_headers)
    assert record["reuse"] == "objects" and record["reused"] == 0 and int(str(record["compiles"])) > 0
    assert "cold_seconds" not in record and record["verdict"] is None  # no cold build, no verdict to keep
    assert other.status == "ok"


@pytest.mark.parametrize("damage", ["compiler cache", "verdict", "built tree"])
def test_a_damaged_reuse_cache_entry_is_detected_and_rebuilt(
        tmp_path: Path, own_cache: Path, debian_headers: KernelHeaders, next_headers: KernelHeaders,
        damage: str, caplog: pytest.LogCaptureFixture) -> None:
    src = _source(tmp_path)
    _build(src, debian_headers)
    good, _ = _build(src, next_headers)
    shutil.rmtree(good.entry)
    if damage == "compiler cache":
        shutil.rmtree(own_cache / "build" / "trees")  # the kernels' compiles alone
        results = [f for f in (own_cache / "build" / "ccache").rglob("*") if f.is_file() and f.name.endswith("R")]
        assert results
        for f in results:
            f.write_bytes(f.read_bytes()[:40] + b"\0" * 64)
    elif damage == "built tree":
        # The tree kept for the second kernel's identity (its own build's, if the first one's is another)
        kept = list((own_cache / "build" / "trees").glob("*/tree/glnv_hello.o"))
        assert kept
        for obj in kept:
            obj.write_bytes(obj.read_bytes().replace(b"glnv", b"GLNV"))
    else:
        (verdict,) = (own_cache / "build" / "reuse").glob("*/verdict.json")
        verdict.write_text(json.dumps({"ok": True, "why": "edited"}))
    with caplog.at_level(logging.WARNING):
        again, record = _build(src, next_headers)
    assert _shas(again) == _shas(good)
    if damage == "compiler cache":
        assert record["reused"] == 0  # every damaged object compiled again, none taken
    elif damage == "built tree":
        assert any("fails verification" in r.getMessage() and "glnv_hello.o" in r.getMessage() for r in caplog.records)
        assert record["reuse"] == "objects"  # built without it, and kept again in its place
        damaged = [b"GLNV" in t.read_bytes() for t in (own_cache / "build" / "trees").glob("*/tree/glnv_hello.o")]
        assert sum(damaged) == len(kept) - 1  # the tree the build would have used, replaced
    else:
        assert any("fails verification" in r.getMessage() and "verdict.json" in r.getMessage() for r in caplog.records)
        assert record["identical"] is True  # compared with a cold build again


def test_two_kernels_built_at_once_do_not_corrupt_each_other(
        tmp_path: Path, own_cache: Path, debian_headers: KernelHeaders, next_headers: KernelHeaders) -> None:
    src = _source(tmp_path)
    alone = [_shas(_build(src, h)[0]) for h in (debian_headers, next_headers)]
    for made in ("modules", "ccache", "reuse", "trees"):  # the same cache, empty again: both fill it at once
        shutil.rmtree(own_cache / "build" / made)
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda h: _build(src, h)[0], (debian_headers, next_headers)))
    assert [_shas(cs) for cs in together] == alone
    for cs, kernel in zip(together, (DEBIAN_KERNEL, next_kernel()), strict=True):
        assert read_module(cs.entry / "ko" / "glnv_hello.ko").vermagic.startswith(kernel + " ")
    assert not any(View(own_cache / "build" / "view").root.iterdir())  # each build's view was its own


SALT = """// SPDX-License-Identifier: GPL-2.0
#include <linux/stringify.h>
const char *glnv_salt(void);
const char *glnv_salt(void)
{
	return __stringify(GLNV_SALT);
}
"""


def test_a_module_that_differs_warm_and_cold_turns_reuse_off_and_the_log_says_why(
        tmp_path: Path, own_cache: Path, debian_headers: KernelHeaders, next_headers: KernelHeaders,
        caplog: pytest.LogCaptureFixture) -> None:
    # A build that is not reproducible: one of its objects bakes in a random number each time it is compiled
    # (the other one is reused, so the gate compares).
    src = _source(tmp_path, "salted", {"salt.c": SALT}, "obj-m := glnv_salt.o\nglnv_salt-y := glnv_hello.o salt.o\n"
                  "CFLAGS_salt.o := -DGLNV_SALT=$(strip $(shell od -An -N8 -tx8 /dev/urandom))\n")
    _build(src, debian_headers)
    with caplog.at_level(logging.WARNING):
        second, record = _build(src, next_headers)
    assert record["mode"] == "off" and record["identical"] is False
    assert "glnv_salt.ko built warm" in str(record["why"])
    modules = record["modules"]
    assert isinstance(modules, dict)
    (_, cold), = modules.values()
    assert sha256_file(second.entry / "debug" / "glnv_salt.ko") == cold  # the cold build is what was kept
    assert any("turned off" in r.getMessage() and "glnv_salt.ko built warm" in r.getMessage() for r in caplog.records)
    shutil.rmtree(second.entry)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, again = _build(src, next_headers)
    assert again["mode"] == "off" and "compiles" in again and "reused" not in again
    assert any("is off for this driver source" in r.getMessage() for r in caplog.records)
