"""IBT kernels for real: Debian's 6.12 cloud headers, where kbuild runs objtool over each linked module.

The split still holds there: the build links through the kernel's own objtool (recipe kept in the bundle)
and ships per kernel a patch that makes the gated module of NVIDIA's binary object, which stays
kernel-independent; the node needs no ld and no objtool. Cold this compiles the
proprietary 535.309.01 modules for one 6.12 kernel (tests/fixtures/ibt.py); warm, nothing compiles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from gl_nvidia import bundle as b
from gl_nvidia.cli import main
from gl_nvidia.fs import sha256_file
from gl_nvidia.modbuild import AptEnv, DebianSource, build_unit
from gl_nvidia.modbuild.abi import OBJTOOL_SECTIONS, gate_files, read_module
from gl_nvidia.modbuild.kenv import KernelHeaders
from gl_nvidia.modbuild.split import libelf_of, link, linker_version
from gl_nvidia.run import run
from tests.fixtures.ibt import ibt_kernels, ibt_unit

pytestmark = pytest.mark.slow  # real compiles for the IBT kernels


def _modules(bundle: Path) -> dict[str, b.ModuleFile]:
    ms = b.BundleManifest.load(bundle).kernels[ibt_kernels().built].module_sets["proprietary"]
    assert ms.status == "ok" and ms.abi_gate is not None and ms.abi_gate.ok, ms.abi_gate
    return {m.name: m for m in ms.modules}


def _paths(bundle: Path, parts: b.ModuleParts) -> b.PartPaths:
    kernel = ibt_kernels().built
    return parts.paths(str(b.interfaces_dir(bundle, kernel, "proprietary")), str(b.binaries_dir(bundle, "proprietary")))


def test_ibt_modules_ship_split_with_the_kernels_objtool_recipe(ibt_bundle: Path, ibt_headers: KernelHeaders) -> None:
    mods = _modules(ibt_bundle)
    assert {n for n, m in mods.items() if m.parts} == {"nvidia.ko", "nvidia-modeset.ko"}
    nvidia = mods["nvidia.ko"].parts
    assert nvidia is not None and nvidia.objtool is not None
    step = nvidia.objtool
    # objtool's arguments exactly as kbuild ran it over the linked module: IBT, and the module link mode
    assert {"--ibt", "--orc", "--rethunk", "--link", "--module"} <= set(step.args)
    assert step.ld_flags[-1] == "-r" and nvidia.linker == linker_version()
    # the kernel's own objtool: the real binary of its kbuild package, and the libelf it ran with
    real = ibt_headers.sysout / "tools/objtool/objtool.real-x86"
    assert step.tool_sha256 == sha256_file(real)
    assert step.libelf == libelf_of(real) and step.libelf.startswith("libelf-")
    iface = b.interfaces_dir(ibt_bundle, ibt_kernels().built, "proprietary")
    assert {p.name for p in iface.iterdir()} == {"nvidia.o", "nvidia.final.o", "nvidia-modeset.o",
                                                "nvidia-modeset.final.o", "module.lds", "objtool",
                                                "nvidia.patch", "nvidia-modeset.patch"}
    # what the image ships per kernel of them: the patches, a few MB; NVIDIA's object is most of the module
    patches = [mods[n].patch for n in ("nvidia.ko", "nvidia-modeset.ko")]
    assert all(p is not None and p.binary == m.binary and p.patch_sha256 == sha256_file(iface / p.patch)
               for p, m in zip(patches, (nvidia, mods["nvidia-modeset.ko"].parts), strict=True) if m)
    assert sum(p.patch_size for p in patches if p) < 5_000_000 and nvidia.binary_size > 10 * nvidia.interface_size


def test_the_module_linked_from_parts_through_objtool_is_the_gated_one_and_deterministic(
        ibt_bundle: Path, ibt_headers: KernelHeaders, tmp_path: Path) -> None:
    """What the build does (link, objtool, final link), twice: the same bytes as the module the gate passed;
    against kbuild's own module the loader sees the same vermagic, srcversion, symbols and CRCs, and
    objtool annotated the same sites (each of its sections the same size). What the node does (the patch
    applied to the binary, standard library only) gives those bytes too, and a second build the same patch."""
    debug = tmp_path / "debug"
    assert build_unit(ibt_unit(ibt_kernels().built), debug, source=DebianSource(), env=AptEnv(),
                      module_types=("proprietary",), keep_debug=True).ok
    linked = []
    for name, m in _modules(ibt_bundle).items():
        shipped = b.modules_dir(ibt_bundle, ibt_kernels().built, "proprietary") / name
        if m.parts is None:
            linked.append(shipped)
            continue
        (tmp_path / "first").mkdir(exist_ok=True)
        first = link(m.parts, _paths(ibt_bundle, m.parts), tmp_path / "first" / name)
        again = link(m.parts, _paths(ibt_bundle, m.parts), tmp_path / name)
        assert sha256_file(first) == sha256_file(again) == m.sha256 == sha256_file(shipped)
        assert m.patch is not None
        patch = (b.interfaces_dir(ibt_bundle, ibt_kernels().built, "proprietary") / m.patch.patch).read_bytes()
        binary = (b.binaries_dir(ibt_bundle, "proprietary") / m.patch.binary).read_bytes()
        assert hashlib.sha256(b.apply_patch(patch, binary)).hexdigest() == m.sha256
        assert sha256_file(b.interfaces_dir(debug, ibt_kernels().built, "proprietary") / m.patch.patch) == m.patch.patch_sha256
        ours, kbuild = read_module(again), read_module(b.debug_dir(debug, ibt_kernels().built, "proprietary") / name)
        assert (ours.vermagic, ours.srcversion, ours.undefined, ours.exported, ours.versions) == (
            kbuild.vermagic, kbuild.srcversion, kbuild.undefined, kbuild.exported, kbuild.versions)
        annotated = {s: kbuild.sections[s] for s in OBJTOOL_SECTIONS if s in kbuild.sections}
        assert {".ibt_endbr_seal", ".return_sites", ".orc_unwind"} <= set(annotated)
        assert {s: ours.sections.get(s) for s in annotated} == annotated
        linked.append(again)
    assert gate_files(linked, ibt_headers.sysout).ok


def test_objtool_output_is_deterministic_on_the_same_input(ibt_bundle: Path, tmp_path: Path) -> None:
    """The evidence the node-side sha256 check rests on: objtool over the same <module>.o twice."""
    m = _modules(ibt_bundle)["nvidia.ko"].parts
    assert m is not None and m.objtool is not None
    at = _paths(ibt_bundle, m)
    steps = m.link_steps("ld", at, str(tmp_path / "nvidia.ko"))
    run(steps[0])
    obj = tmp_path / "nvidia.ko.o"
    before = sha256_file(obj)
    digests = []
    for i in range(2):
        copy = tmp_path / f"run{i}.o"
        copy.write_bytes(obj.read_bytes())
        run([steps[1][0], *m.objtool.args, str(copy)])
        digests.append(sha256_file(copy))
    assert digests[0] == digests[1] != before  # objtool did write, the same bytes both times


def test_check_modules_reports_objtool_evidence_and_refuses_a_module_objtool_never_saw(
        ibt_bundle: Path, ibt_headers: KernelHeaders, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-modules", str(ibt_bundle), "--kernel-headers", str(ibt_headers.sysout), "--json"]) == 0
    (verdict,) = json.loads(capsys.readouterr().out)
    assert verdict["ok"] and verdict["problems"] == []
    evidence = {line.split(":")[0]: line for line in verdict["evidence"]}
    sections, retpoline, note = evidence["nvidia.ko"].partition("objtool sections: ")[2].split("; ")
    assert {".ibt_endbr_seal", ".return_sites", ".retpoline_sites", ".orc_unwind"} <= {
        part.split()[0] for part in sections.split(", ")}
    # NVIDIA's binary object was not built with IBT (no property note survives the link); objtool covers it
    assert (retpoline, note) == ("modinfo retpoline=Y", "IBT property note: no")
    assert evidence["nvidia-uvm.ko"].endswith("; IBT property note: yes")  # compiled entirely against the kernel
    # the same parts linked without the objtool step: what the kernel must not be given
    m = _modules(ibt_bundle)["nvidia.ko"].parts
    assert m is not None and m.objtool is not None
    at = _paths(ibt_bundle, m)
    raw = tmp_path / "nvidia.ko"
    run(["ld", *m.objtool.ld_flags, "-o", str(tmp_path / "nvidia.o"), at.interface, at.binary])
    link(replace(m, objtool=None), replace(at, interface=str(tmp_path / "nvidia.o"), binary=at.final), raw)
    verdict2 = gate_files([raw], ibt_headers.sysout)
    assert not verdict2.ok
    assert any(p.startswith("nvidia.ko: no .orc_unwind section, which objtool writes on ") and
               p.endswith("the kernel's objtool did not process it") for p in verdict2.problems), verdict2.problems
