"""The ABI gate on small real modules built against Debian's real DEBIAN_KERNEL headers (seconds)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from gl_nvidia.errors import UserError
from gl_nvidia.modbuild.abi import expected_vermagic, gate, gate_files, kernel_abi, read_module
from gl_nvidia.modbuild.kenv import read_config
from tests.fixtures.bundle import DEBIAN_KERNEL, TinyModules


def test_kernel_vermagic_from_config_equals_what_kbuild_stamps(tiny_module: TinyModules) -> None:
    abi = kernel_abi(tiny_module.headers.sysout)
    assert abi.release == DEBIAN_KERNEL
    assert read_module(tiny_module.hello).vermagic == abi.vermagic
    assert abi.vermagic == f"{DEBIAN_KERNEL} SMP preempt mod_unload modversions "


def test_modules_built_for_the_kernel_pass(tiny_module: TinyModules) -> None:
    verdict = gate_files([tiny_module.hello, tiny_module.user], tiny_module.headers.sysout)
    assert verdict.ok, verdict.problems
    assert verdict.problems == ()


def test_symbol_no_kernel_exports_is_named(tiny_module: TinyModules) -> None:
    verdict = gate_files([tiny_module.hello, tiny_module.bad], tiny_module.headers.sysout)
    assert not verdict.ok
    assert verdict.problems == (
        f"glnv_bad.ko: symbol glnv_no_such_kernel_symbol is not exported by {DEBIAN_KERNEL}",
    )


def test_sibling_export_counts_only_when_the_sibling_ships(tiny_module: TinyModules) -> None:
    alone = gate_files([tiny_module.user], tiny_module.headers.sysout)
    assert alone.problems == (f"glnv_user.ko: symbol glnv_hello_value is not exported by {DEBIAN_KERNEL}",)


def test_crc_mismatch_is_reported_with_both_values(tiny_module: TinyModules) -> None:
    abi = kernel_abi(tiny_module.headers.sysout)
    module = read_module(tiny_module.hello)
    real = module.versions["_printk"]
    assert real == abi.symvers["_printk"]
    changed = dataclasses.replace(abi, symvers={**abi.symvers, "_printk": real ^ 1})
    verdict = gate([module], changed)
    assert verdict.problems == (f"glnv_hello.ko: symbol _printk CRC {real:#010x} != kernel's {real ^ 1:#010x}",)


def test_vermagic_mismatch_is_reported(tiny_module: TinyModules) -> None:
    abi = kernel_abi(tiny_module.headers.sysout)
    other = dataclasses.replace(abi, release="6.1.0-99-cloud-amd64",
                                vermagic="6.1.0-99-cloud-amd64 SMP preempt mod_unload modversions ")
    problems = gate([read_module(tiny_module.hello)], other).problems
    assert problems == (f"glnv_hello.ko: vermagic '{DEBIAN_KERNEL} SMP preempt mod_unload modversions' "
                        "!= kernel's '6.1.0-99-cloud-amd64 SMP preempt mod_unload modversions'",)


def test_expected_vermagic_follows_the_config_flags() -> None:
    assert expected_vermagic("6.12.1-rt-amd64", {"CONFIG_SMP": "y", "CONFIG_PREEMPT_RT": "y",
                                                 "CONFIG_PREEMPT_BUILD": "y", "CONFIG_MODULE_UNLOAD": "y"}) \
        == "6.12.1-rt-amd64 SMP preempt_rt mod_unload "
    assert expected_vermagic("6.1.0-1-arm64", {"CONFIG_SMP": "y", "CONFIG_MODVERSIONS": "y",
                                               "CONFIG_ARM64": "y"}) == "6.1.0-1-arm64 SMP modversions aarch64 "


def test_stripped_module_keeps_what_the_gate_reads(tiny_module: TinyModules, tmp_path: Path) -> None:
    from gl_nvidia.run import run

    stripped = tmp_path / "glnv_hello.ko"
    run(["strip", "--strip-debug", "-o", stripped, tiny_module.hello])
    assert stripped.stat().st_size < tiny_module.hello.stat().st_size
    before, after = read_module(tiny_module.hello), read_module(stripped)
    assert (after.vermagic, after.undefined, after.exported, after.versions) == \
        (before.vermagic, before.undefined, before.exported, before.versions)


def test_not_a_module_is_a_clear_error(tmp_path: Path) -> None:
    not_elf = tmp_path / "nvidia.ko"
    not_elf.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(UserError, match=r"cannot read kernel module .*nvidia\.ko"):
        read_module(not_elf)


def test_headers_without_symvers_are_a_clear_error(tiny_module: TinyModules, tmp_path: Path) -> None:
    fake = tmp_path / "headers"
    fake.mkdir()
    shutil.copy(tiny_module.headers.sysout / ".config", fake / ".config")
    assert read_config(fake)["CONFIG_MODVERSIONS"] == "y"
    with pytest.raises(UserError, match=r"has no Module\.symvers"):
        kernel_abi(fake)
