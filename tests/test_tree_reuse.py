"""The decision to reuse a whole built tree: which headers count as the same kernel, what must be rebuilt.

Header lines in the exact forms Debian's 6.1.0-56 and -57 headers write them (those two differ in nothing else).
"""

from __future__ import annotations

import os
from pathlib import Path

from gl_nvidia.modbuild.treereuse import Identity, changed_names, deps, identity, stale, uses

OUT = {
    ".config": 'CONFIG_64BIT=y\nCONFIG_BUILD_SALT="{r}"\nCONFIG_MODVERSIONS=y\n',
    ".kernelvariables": "override ARCH = x86\noverride KERNELRELEASE = {r}\n",
    "include/config/auto.conf": "CONFIG_64BIT=y\nCONFIG_BUILD_SALT={r}\n",
    "include/generated/autoconf.h": '#define CONFIG_64BIT 1\n#define CONFIG_BUILD_SALT "{r}"\n',
    "include/generated/utsrelease.h": '#define UTS_RELEASE "{r}"\n',
    "include/generated/utsversion.h": '#define UTS_VERSION "#1 SMP PREEMPT_DYNAMIC Debian {p}"\n',
    "include/generated/package.h": '#define LINUX_PACKAGE_ID " Debian {p}"\n',
    "include/generated/uapi/linux/version.h": "#define LINUX_VERSION_CODE 393408\n",
    "Makefile": "include /usr/src/linux-headers-{r}-common/Makefile\n",  # the view presents its own
}


def _headers(root: Path, release: str, package: str, extra: dict[str, str] | None = None) -> Path:
    for rel, text in {**OUT, **(extra or {})}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text.format(r=release, p=package))
    (root / "scripts").symlink_to("../../lib/linux-kbuild-6.1/scripts")
    return root


def _identity(root: Path) -> Identity:
    return identity({"out": root}, skip=["out/Makefile"])


def test_headers_that_differ_only_where_they_name_the_release_are_the_same_kernel(tmp_path: Path) -> None:
    old = _identity(_headers(tmp_path / "56", "6.1.0-56-cloud-amd64", "6.1.192-2"))
    new = _identity(_headers(tmp_path / "57", "6.1.0-57-cloud-amd64", "6.1.192-3"))
    assert old.digest == new.digest
    assert changed_names(old.release, new.release) == {
        "CONFIG_BUILD_SALT", "KERNELRELEASE", "UTS_RELEASE", "UTS_VERSION", "LINUX_PACKAGE_ID"}
    assert new.release["out/include/generated/utsrelease.h:UTS_RELEASE"] == '"6.1.0-57-cloud-amd64"'
    assert changed_names(old.release, old.release) == set()


def test_any_other_difference_is_another_kernel(tmp_path: Path) -> None:
    base = _identity(_headers(tmp_path / "a", "6.1.0-56-cloud-amd64", "6.1.192-2")).digest
    for name, extra in {
        "version": {"include/generated/uapi/linux/version.h": "#define LINUX_VERSION_CODE 393409\n"},
        "config": {".config": 'CONFIG_64BIT=y\nCONFIG_BUILD_SALT="{r}"\n# CONFIG_MODVERSIONS is not set\n'},
        "new file": {"include/linux/new.h": "\n"},
        # a release name's definition computed, not stated: not a value that only names the release
        "expansion": {".kernelvariables": "override ARCH = x86\noverride KERNELRELEASE = $(shell cat r)\n"},
    }.items():
        other = _identity(_headers(tmp_path / name, "6.1.0-56-cloud-amd64", "6.1.192-2", extra)).digest
        assert other != base, name
    moved = _headers(tmp_path / "link", "6.1.0-56-cloud-amd64", "6.1.192-2")
    (moved / "scripts").unlink()
    (moved / "scripts").symlink_to("../../lib/linux-kbuild-6.12/scripts")
    assert _identity(moved).digest != base


CMD = """savedcmd_{t} := gcc -Wp,-MMD,{d}/.{t}.d -c -o {d}/{t} {d}/{src}

source_{t} := {d}/{src}

deps_{t} := \\
  $(wildcard include/config/{cfg}) \\
{more}
{t}: $(deps_{t})

$(deps_{t}):
"""


def _object(tree: Path, target: str, src: str, cfg: str, more: list[str]) -> None:
    (tree / target).write_text("object")
    (tree / f".{target}.cmd").write_text(CMD.format(t=target, d=tree, src=src, cfg=cfg,
                                                    more="".join(f"  {m} \\\n" for m in more)))


def test_kbuild_recorded_inputs_are_read_from_its_cmd_files(tmp_path: Path) -> None:
    _object(tmp_path, "nv.o", "nv.c", "SMP", ["/h/include/linux/vermagic.h"])
    assert deps((tmp_path / ".nv.o.cmd").read_text()) == [f"{tmp_path}/nv.c", "include/config/SMP",  # the source too
                                                          "/h/include/linux/vermagic.h"]


def test_only_targets_whose_inputs_use_a_changed_release_name_are_rebuilt(tmp_path: Path) -> None:
    h = tmp_path / "h"
    h.mkdir()
    (h / "utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-56-cloud-amd64"\n')  # defines, does not use
    (h / "nv-linux.h").write_text("#include <generated/utsrelease.h>\n#include <linux/version.h>\n")
    (h / "vermagic.h").write_text("#define VERMAGIC_STRING UTS_RELEASE \" SMP preempt mod_unload \"\n")
    tree = tmp_path / "tree"
    tree.mkdir()
    for c in ("nv.c", "os-interface.c", "nvidia.mod.c", "salt.c"):
        (tree / c).write_text("int x;\n")
    (tree / "os-interface.c").write_text("#if defined(UTS_RELEASE)\n s = UTS_RELEASE;\n#endif\n")
    _object(tree, "nv.o", "nv.c", "SMP", [f"{h}/nv-linux.h", f"{h}/utsrelease.h"])
    _object(tree, "os-interface.o", "os-interface.c", "SMP", [f"{h}/nv-linux.h", f"{h}/utsrelease.h"])
    _object(tree, "nvidia.mod.o", "nvidia.mod.c", "SMP", [f"{h}/vermagic.h"])
    _object(tree, "salt.o", "salt.c", "BUILD_SALT", [])
    os.remove(tree / "nv.c")  # an input that is gone: rebuilt too
    _object(tree, "gone.o", "nv.c", "SMP", [])

    def found(names: set[str]) -> list[str]:
        return sorted(p.name for p in stale(tree, names, Path))

    assert found({"UTS_RELEASE", "CONFIG_BUILD_SALT"}) == ["gone.o", "nv.o", "nvidia.mod.o", "os-interface.o",
                                                           "salt.o"]
    (tree / "nv.c").write_text("int x;\n")
    assert found({"UTS_RELEASE"}) == ["nvidia.mod.o", "os-interface.o"]
    assert found({"CONFIG_BUILD_SALT"}) == ["salt.o"]
    assert found(set()) == []


def test_a_definition_is_not_a_use() -> None:
    assert not uses('#define UTS_RELEASE "6.1.0-57-cloud-amd64"\n', {"UTS_RELEASE"})
    assert uses('#define VERMAGIC_STRING UTS_RELEASE " SMP"\n', {"UTS_RELEASE"})
    assert not uses("#include <generated/utsrelease.h>\nUTS_RELEASE_X\n", {"UTS_RELEASE"})
