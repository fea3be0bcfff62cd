"""Compatibility fixes to NVIDIA's module sources (modbuild/compat.py): applied to a copy before compiling,
with a digest of their own, recorded in the build log and the bundle, refused by name when their text
does not fit a source of their range.

The small tree is shaped like NVIDIA's where the shipped pci_resize_resource fix changes it and compiles
against Debian's real headers with a miniature of NVIDIA's conftest machinery; the slow test applies the
fix to Debian's real open module source of its driver version and runs NVIDIA's own conftest.sh, with
the fix's compile test, against the real headers of trixie's newest 6.12 kernel.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gl_nvidia import bundle as b
from gl_nvidia.catalog.kernels import kernel_sort_key
from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.modbuild import AptEnv, DirEnv, KernelHeaders
from gl_nvidia.modbuild.compat import FIXES, apply, load
from gl_nvidia.modbuild.compile import cache_key, compile_set
from gl_nvidia.modbuild.sources import ModuleSource
from tests.fixtures.bundle import DEBIAN_KERNEL
from tests.fixtures.compat import (
    PCI_FIX,
    debian_open_source,
    declares_exclude_bars,
    fixable_driver,
    fixable_tree,
    trixie,
)
from tests.fixtures.kernels import debian_abis
from tests.fixtures.nvidia_site import own_cache

__all__ = ["own_cache"]  # a fixture, from tests/fixtures/nvidia_site.py

VERSION = PCI_FIX.last  # a driver version the fix applies to
CONFTEST = "gl_nvidia_pci_resize_resource_exclude_bars"  # the compile test the fix adds
DEFINE = "NV_GL_NVIDIA_PCI_RESIZE_RESOURCE_EXCLUDE_BARS"


def _source(tmp_path: Path, version: str = VERSION, module_type: str = "open") -> ModuleSource:
    return ModuleSource(module_type, version, fixable_tree(tmp_path / "tree"), "a" * 64)


def _headers() -> KernelHeaders:
    return KernelHeaders("k", Path("/s"), Path("/o"), "h" * 64, "gcc-12", "amd64")


def test_a_fix_is_applied_to_a_copy_whose_digest_is_its_own(tmp_path: Path, own_cache: Path) -> None:
    src = _source(tmp_path)
    before = {p: p.read_bytes() for p in src.tree.rglob("*") if p.is_file()}
    fixed = apply(src)
    assert fixed.fixes == (b.SourceFix(PCI_FIX.id, PCI_FIX.why, ("conftest.sh", "nvidia/nvidia.Kbuild", "nvidia/nv-pci.c")),)
    assert {p: p.read_bytes() for p in src.tree.rglob("*") if p.is_file()} == before  # the source as it was
    assert fixed.tree != src.tree and fixed.tree.is_relative_to(own_cache)
    for change in PCI_FIX.changes:
        text = (fixed.tree / change.file).read_text()
        assert change.replace in text and text.count(change.find.strip()) == text.count(change.replace.strip())
    assert (fixed.tree / "Kbuild").read_bytes() == (src.tree / "Kbuild").read_bytes()
    # cache keys of compiles take the source's digest: the patched tree is never mistaken for the source
    assert fixed.digest != src.digest
    assert cache_key(fixed, _headers(), "gcc-12", "apt") != cache_key(src, _headers(), "gcc-12", "apt")
    again = apply(src)
    assert (again.tree, again.digest) == (fixed.tree, fixed.digest)  # from the cache
    other = apply(ModuleSource("open", VERSION, src.tree, "b" * 64))
    assert other.digest not in (fixed.digest, "b" * 64)


def test_a_changed_fix_gives_another_digest(tmp_path: Path, own_cache: Path) -> None:
    text = (Path(__file__).parent.parent / "src/gl_nvidia/modbuild/compat.toml").read_text()
    changed = load(text.replace("requested_size, 0);", "requested_size, 0 /* none kept */);"), "changed")
    src = _source(tmp_path)
    assert apply(src, changed).digest != apply(src, FIXES).digest


@pytest.mark.parametrize(("version", "module_type"), [
    ("550.144.03", "open"), ("550.163.02", "open"), ("535.261.03", "open"), (VERSION, "proprietary")])
def test_sources_outside_a_fixs_range_are_compiled_as_shipped(tmp_path: Path, own_cache: Path, version: str,
                                                              module_type: str) -> None:
    src = _source(tmp_path, version, module_type)
    assert apply(src) is src
    assert not (own_cache / "build" / "patched").exists()


def _missing(tree: Path) -> None:
    path = tree / "nvidia/nv-pci.c"
    path.write_text(path.read_text().replace("requested_size);", "requested_size, 0);"))


def _twice(tree: Path) -> None:
    path = tree / "nvidia/nvidia.Kbuild"
    path.write_text(path.read_text() * 2)


def _no_file(tree: Path) -> None:
    (tree / "conftest.sh").unlink()


@pytest.mark.parametrize(("damage", "what"), [
    (_missing, "nvidia/nv-pci.c has the text it changes 0 times, not once"),
    (_twice, "nvidia/nvidia.Kbuild has the text it changes 2 times, not once"),
    (_no_file, "it has no file conftest.sh"),
])
def test_a_fix_that_does_not_fit_a_source_of_its_range_fails_naming_it(
        tmp_path: Path, own_cache: Path, damage: Callable[[Path], None], what: str) -> None:
    src = _source(tmp_path)
    damage(src.tree)
    with pytest.raises(UserError) as exc:
        apply(src)
    assert exc.value.message == f"compatibility fix {PCI_FIX.id} does not fit the open module source {VERSION}: {what}"
    assert not any((own_cache / "build" / "patched").glob("*"))  # nothing half-made


@pytest.mark.parametrize("doc", [
    "[[fix]]\nid = 'x'\n",  # no why, no changes
    "[[fix]]\nid='x'\nwhy='y'\nfirst='2'\nlast='1'\nmodule_types=['open']\n[[fix.change]]\nfile='a'\nfind='b'\nreplace='c'\n",
    "[[fix]]\nid='x'\nwhy='y'\nfirst='1'\nlast='2'\nmodule_types=['open']\n[[fix.change]]\nfile='../a'\nfind='b'\nreplace='c'\n",
    "[[fix]]\nid='x'\nwhy='y'\nfirst='1'\nlast='2'\nmodule_types=['vgpu']\n[[fix.change]]\nfile='a'\nfind='b'\nreplace='c'\n",
    "[[fix]]\nid='x'\nwhy='y'\nfirst='1'\nlast='2'\nmodule_types=['open']\n[[fix.change]]\nfile='a'\nfind=''\nreplace='c'\n",
])
def test_malformed_fix_data_is_refused(doc: str) -> None:
    with pytest.raises(ValueError, match=r"^test\.toml: "):
        load(doc, "test.toml")


def test_the_build_compiles_the_fixed_tree_and_records_the_fix(tmp_path: Path, own_cache: Path,
                                                                debian_headers: KernelHeaders,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Integration with real headers: the small tree's module fails as shipped where the kernel's
    pci_resize_resource() takes four arguments; `gl-nvidia build` compiles it with the fix and says so
    under its table, in its JSON, in the build log's first line and in the bundle."""
    env = DirEnv(debian_headers.sysout)
    hdrs = env.headers(DEBIAN_KERNEL, "amd64")
    shipped = compile_set(_source(tmp_path), hdrs, env, env.toolchain(hdrs), jobs=2)
    assert (shipped.status == "failed") == declares_exclude_bars(hdrs)
    if shipped.status == "failed":
        assert shipped.error is not None and "pci_resize_resource" in shipped.error
    driver, out = fixable_driver(tmp_path / "driver", VERSION), tmp_path / "bundles"
    argv = ["build", "--kernel", DEBIAN_KERNEL, "--driver", VERSION, "--type", "open", "--source", "dir",
            "--source-path", str(driver), "--env", "dir", "--kernel-headers", str(debian_headers.sysout),
            "--out", str(out), "--make-jobs", "2"]
    assert main(argv) == 0
    assert f"{VERSION} open: compatibility fix {PCI_FIX.id}: {PCI_FIX.why}" in " ".join(capsys.readouterr().out.split())
    assert main([*argv, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["modules"]["open"]["fixes"] == [{"id": PCI_FIX.id, "why": PCI_FIX.why}]
    assert row["modules"]["open"]["status"] == "ok" and row["modules"]["open"]["cached"]
    ms = b.BundleManifest.load(out / f"{VERSION}-amd64").kernels[DEBIAN_KERNEL].module_sets["open"]
    assert ms.fixes == (PCI_FIX.record,) and [m.name for m in ms.modules] == ["glnv_pci.ko"]
    first_line = (out / f"{VERSION}-amd64" / str(ms.log)).read_text().splitlines()[0]
    assert first_line == (f"gl-nvidia: compatibility fix {PCI_FIX.id} applied (conftest.sh, nvidia/nvidia.Kbuild, "
                          f"nvidia/nv-pci.c): {PCI_FIX.why}")


@pytest.mark.slow  # two kernels' headers and a small compile each
def test_the_fixed_tree_builds_for_kernels_with_and_without_the_fourth_argument(tmp_path: Path, own_cache: Path) -> None:
    """One patched tree, the oldest and the newest 6.1 ABI this machine's archive serves (today one without
    exclude_bars and one with it): its compile test picks the call each kernel declares."""
    src = apply(_source(tmp_path))
    for kernel in (debian_abis("6.1")[0], debian_abis("6.1")[-1]):
        env = AptEnv()
        hdrs = env.headers(kernel, "amd64")
        built = compile_set(src, hdrs, env, env.toolchain(hdrs), jobs=2)
        assert built.status == "ok", (kernel, built.error)


# --- Debian's real source ----------------------------------------------------------------------------

def _newest_trixie_612() -> str:
    names = [p.name for p in AptEnv(trixie()).repo("amd64").search(r"linux-headers-6\.12\.\d+\+deb13-cloud-amd64")]
    assert names, "trixie serves 6.12 cloud amd64 headers"
    return max((n.removeprefix("linux-headers-") for n in names), key=kernel_sort_key)


def _conftest(tree: Path, hdrs: KernelHeaders, work: Path) -> str:
    """NVIDIA's conftest.sh of `tree`, run as its Kbuild runs it (its own CFLAGS, the preamble's header
    presence results), for the fix's compile test alone: what it writes into conftest/types.h."""
    work.mkdir()
    (work / "conftest.sh").write_bytes((tree / "conftest.sh").read_bytes())  # it works where it lies
    cmd = ["sh", str(work / "conftest.sh"), "gcc", "x86_64", str(hdrs.syssrc), str(hdrs.sysout)]
    cflags = subprocess.run([*cmd, "build_cflags"], check=True, capture_output=True, text=True).stdout.strip()
    (work / "conftest").mkdir()
    present = "".join(subprocess.run([*cmd, "test_kernel_header", cflags, h], check=True, capture_output=True,
                                     text=True).stdout for h in ("generated/autoconf.h", "linux/kconfig.h"))
    (work / "conftest/headers.h").write_text(present)
    return subprocess.run([*cmd, "compile_tests", cflags, CONFTEST], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.slow  # downloads Debian's open module source (36 MB) and two kernels' headers
def test_debians_open_source_gets_the_fix_and_its_conftest_picks_the_kernels_call(tmp_path: Path) -> None:
    """Integration: the fix applies to trixie's real nvidia-open-kernel-source of its driver version, and
    NVIDIA's conftest.sh with the fix's compile test finds the four-argument pci_resize_resource() in
    trixie's newest 6.12 headers (and, for a 6.1 kernel of this machine's archive, whichever it declares)."""
    src = debian_open_source(PCI_FIX, tmp_path / "debian")
    fixed = apply(src)
    assert [f.id for f in fixed.fixes] == [PCI_FIX.id] and fixed.digest != src.digest
    nv_pci = (fixed.tree / "nvidia/nv-pci.c").read_text()
    assert nv_pci.count("pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size, 0);") == 1
    assert f"NV_CONFTEST_TYPE_COMPILE_TESTS += {CONFTEST}\n" in (fixed.tree / "nvidia/nvidia.Kbuild").read_text()
    trixie_hdrs = AptEnv(trixie()).headers(_newest_trixie_612(), "amd64")
    assert declares_exclude_bars(trixie_hdrs)
    assert _conftest(fixed.tree, trixie_hdrs, tmp_path / "trixie") == f"#define {DEFINE}"
    oldest = AptEnv().headers(debian_abis("6.1")[0], "amd64")
    verdict = "define" if declares_exclude_bars(oldest) else "undef"
    assert _conftest(fixed.tree, oldest, tmp_path / "bookworm") == f"#{verdict} {DEFINE}"
