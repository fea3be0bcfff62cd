"""A kernel's own toolchain root (modbuild.toolroot): which kernels need one, what it holds, how make enters it.

Fast: the decision against this machine's real compilers and Debian's real indexes, the argv built, a
failing mmdebstrap as one line. Slow: the default profile's Debian 13 unit (550, open and proprietary) compiled
for real for the newest 6.12 cloud kernel trixie's index serves (tests/fixtures/trixie.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from gl_nvidia import bundle as b
from gl_nvidia.apt import DEBIAN_KEYRING
from gl_nvidia.errors import UserError
from gl_nvidia.fs import cache_dir
from gl_nvidia.modbuild import AptEnv
from gl_nvidia.modbuild.kenv import KernelHeaders, host_compiler
from gl_nvidia.modbuild.toolroot import (
    BASE_PACKAGES,
    RootSpec,
    compiler_packages,
    enter_argv,
    kbuild_depends,
    major,
    make_root,
    mmdebstrap_argv,
    needs_root,
    root_spec,
)
from tests.fixtures.trixie import TrixieUnit, newest_trixie_kernel, trixie_env


def test_a_kernel_of_a_compiler_this_machine_lacks_or_has_in_another_version_needs_its_root(
        debian_headers: KernelHeaders) -> None:
    trixie = trixie_env().headers(newest_trixie_kernel(), "amd64")  # real headers, the newest trixie serves
    assert major(trixie.kernel_compiler) == "14" and host_compiler(trixie.cc) is None  # bookworm has no gcc-14
    assert needs_root(trixie.kernel_compiler, host_compiler(trixie.cc))
    gcc = host_compiler("gcc")
    assert gcc is not None and needs_root(trixie.kernel_compiler.replace(trixie.cc, "gcc"), gcc)  # here: gcc 12
    # a bookworm kernel, native or cross: this machine's compiler, as before
    assert not needs_root(debian_headers.kernel_compiler, host_compiler(debian_headers.cc))
    cross = host_compiler("aarch64-linux-gnu-gcc-12")
    assert cross is not None and not needs_root(debian_headers.kernel_compiler, cross)
    assert not needs_root("", None)  # a kernel naming no compiler builds here, as it always did
    # trixie's arm64 kernel (built natively there) on this amd64 machine: a root with the cross gcc-14
    arm64 = trixie_env().headers(newest_trixie_kernel("arm64"), "arm64")
    assert arm64.cc == "aarch64-linux-gnu-gcc-14" and needs_root(arm64.kernel_compiler, host_compiler(arm64.cc))
    assert compiler_packages(arm64.cc) == ("gcc-14-aarch64-linux-gnu", "binutils-aarch64-linux-gnu")


def test_the_root_holds_the_kernels_compiler_make_libc_ccache_and_what_its_kbuild_depends_on() -> None:
    assert compiler_packages("gcc-14") == ("gcc-14",)
    assert compiler_packages("aarch64-linux-gnu-gcc-14") == ("gcc-14-aarch64-linux-gnu", "binutils-aarch64-linux-gnu")
    assert compiler_packages("gcc") == ("gcc",)
    with pytest.raises(UserError, match="built with clang-19, which gl-nvidia cannot install"):
        compiler_packages("clang-19")
    # the real linux-kbuild package of trixie's newest 6.12 cloud kernel
    repo = trixie_env().repo("amd64")
    kbuild = next(d.strip().split()[0] for d in repo.find(f"linux-headers-{newest_trixie_kernel()}").depends.split(",")
                  if d.strip().startswith("linux-kbuild-"))
    deps = kbuild_depends(repo.find(kbuild).depends)
    assert {"libelf1t64", "pahole"} <= set(deps) and "libc6" not in deps
    # every package a trixie root asks for exists in trixie's verified index, amd64 and cross
    for name in (*compiler_packages("gcc-14"), *compiler_packages("aarch64-linux-gnu-gcc-14"), *BASE_PACKAGES, *deps):
        assert repo.find(name).version


def test_the_root_is_keyed_by_its_packages_digests_and_made_from_the_verified_suites(tmp_path: Path) -> None:
    spec = root_spec(trixie_env().repo("amd64"), ("gcc-14", *BASE_PACKAGES))
    assert spec.suite == "trixie" and spec.arch == "amd64"
    assert [m.split()[1] for m in spec.mirrors] == [f"[signed-by={DEBIAN_KEYRING}]"] * 3
    assert [m.split()[3] for m in spec.mirrors] == ["trixie", "trixie-updates", "trixie-security"]
    assert all(m.endswith(" main") for m in spec.mirrors)
    assert [d.split()[0] for d in spec.digests] == ["gcc-14", *BASE_PACKAGES]
    assert all(re.fullmatch(r"[0-9a-f]{64}", d.split()[2]) for d in spec.digests)
    other = RootSpec(spec.suite, spec.mirrors, spec.arch, spec.packages, (*spec.digests[:-1], "ccache 9 " + "0" * 64))
    assert other.key() != spec.key() and RootSpec(*vars(spec).values()).key() == spec.key()

    argv = mmdebstrap_argv(spec, tmp_path / "root.tar")
    assert argv[:2] == ["mmdebstrap", "--variant=essential"]
    assert "--include=gcc-14,make,binutils,libc6-dev,ccache" in argv and "--skip=output/dev" in argv
    assert argv[argv.index("trixie"):] == ["trixie", str(tmp_path / "root.tar"), *spec.mirrors]


def test_make_enters_the_root_unprivileged_offline_with_the_cache_at_its_own_path() -> None:
    argv = enter_argv(Path("/c/build/toolroot/r"), Path("/c"), ["make", "-C", "/c/build/work/t", "modules"])
    assert argv[:4] == ["unshare", "--map-root-user", "--mount", "--net"]
    script = argv[6]
    assert argv[7:] == ["sh", "/c/build/toolroot/r", "/c", "make", "-C", "/c/build/work/t", "modules"]
    assert 'mount --rbind "$cache" "$root$cache"' in script and script.rstrip().endswith('exec chroot "$root" "$@"')


def test_a_bookworm_kernel_builds_with_this_machines_compiler_as_before(debian_headers: KernelHeaders) -> None:
    env = AptEnv()
    assert env.toolroot(debian_headers) is None and env.runner(debian_headers) == []
    assert env.make_argv(debian_headers, Path("/t"), 2)[0] == "make"
    assert env.toolchain(debian_headers) == host_compiler(debian_headers.cc)


def test_a_root_mmdebstrap_cannot_make_is_one_line_and_leaves_no_entry(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GL_NVIDIA_CACHE", str(tmp_path / "cache"))
    spec = RootSpec("trixie", (f"deb [signed-by={DEBIAN_KEYRING}] file://{tmp_path}/none trixie main",), "amd64",
                    ("gcc-14",), ())
    with pytest.raises(UserError) as exc:
        make_root(spec)
    assert str(exc.value).startswith("cannot make the trixie toolchain root (gcc-14): mmdebstrap failed: ")
    assert "\n" not in str(exc.value)
    assert not any(cache_dir("build", "toolroot").iterdir())


@pytest.mark.slow
def test_trixies_550_modules_compile_in_the_kernels_gcc_14_root_and_pass_the_gate(trixie_unit: TrixieUnit) -> None:
    """The profile's Debian 13 unit, as `gl-nvidia build --all` builds it: both module types compile in
    trixie's root, gcc-14 recorded; the open source with its compatibility fix."""
    kernel, result = trixie_unit.kernel, trixie_unit.result
    assert re.fullmatch(r"6\.12\.\d+\+deb13-cloud-amd64", kernel) and kernel == newest_trixie_kernel()
    assert result.unit.driver_version.startswith("550."), result.unit
    assert result.ok and {t: o.status for t, o in result.outcomes.items()} == {"open": "ok", "proprietary": "ok"}
    assert [f.id for f in result.outcomes["open"].fixes] == ["pci-resize-resource-exclude-bars"]
    assert result.outcomes["proprietary"].fixes == ()
    kb = b.BundleManifest.load(trixie_unit.bundle).kernels[kernel]
    # the compiler that ran is the kernel's own, gcc-14, which this machine has no package of
    assert kb.toolchain == kb.kernel_compiler and major(kb.toolchain) == "14", kb
    for mtype in ("open", "proprietary"):
        ms = kb.module_sets[mtype]
        assert ms.status == "ok" and ms.abi_gate is not None and ms.abi_gate.ok, ms
        assert {m.name for m in ms.modules} >= {"nvidia.ko", "nvidia-modeset.ko", "nvidia-uvm.ko"}
        assert {m.vermagic.split()[0] for m in ms.modules} == {kernel}
        # the root's pahole wrote the BTF of each module shipped whole, as trixie's own dkms build would
        whole = [m.name for m in ms.modules if m.parts is None]
        assert whole, mtype
        for name in whole:
            with (b.modules_dir(trixie_unit.bundle, kernel, mtype) / name).open("rb") as fh:
                assert ".BTF" in {s.name for s in ELFFile(fh).iter_sections()}, (mtype, name)
