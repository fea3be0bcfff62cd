"""Reading kbuild's saved link commands, and when a module is left whole (fast; the real split is in
test_build_debian.py)."""

from __future__ import annotations

from pathlib import Path

from gl_nvidia.build.split import binary_object, read_cmd, split_module

# The shapes kbuild writes: 6.1 (cmd_<abs path>) and 6.12 (savedcmd_<name>, with .module-common.o).
KO_CMD_61 = ("cmd_/t/nvidia.ko := ld -r -m elf_x86_64 -z noexecstack --no-warn-rwx-segments --build-id=sha1  "
             "-T arch/x86/module.lds -o /t/nvidia.ko /t/nvidia.o /t/nvidia.mod.o;  true\n")
KO_CMD_612 = ("savedcmd_nvidia.ko := ld -r -m elf_x86_64 -z noexecstack --no-warn-rwx-segments --build-id=sha1 "
              "-T scripts/module.lds -o /t/nvidia.ko /t/nvidia.o /t/nvidia.mod.o /t/.module-common.o\n")
O_CMD_OBJTOOL = ("savedcmd_nvidia.o := ld -m elf_x86_64 -z noexecstack -r -o /t/nvidia.o @/t/nvidia.mod  ; "
                 "./tools/objtool/objtool --hacks=jump_label --ibt --orc --retpoline --rethunk --module /t/nvidia.o\n")


def test_modfinal_command_gives_flags_script_and_inputs(tmp_path: Path) -> None:
    (tmp_path / "a.cmd").write_text(KO_CMD_61)
    link = read_cmd(tmp_path / "a.cmd", Path("/hdrs"))
    assert link.ld == "ld"
    assert link.flags == ("-r", "-m", "elf_x86_64", "-z", "noexecstack", "--no-warn-rwx-segments", "--build-id=sha1")
    assert link.lds == Path("/hdrs/arch/x86/module.lds")
    assert link.inputs == (Path("/t/nvidia.o"), Path("/t/nvidia.mod.o"))
    (tmp_path / "b.cmd").write_text(KO_CMD_612)
    newer = read_cmd(tmp_path / "b.cmd", Path("/hdrs"))
    assert newer.lds == Path("/hdrs/scripts/module.lds")
    assert newer.inputs[-1] == Path("/t/.module-common.o")  # goes into the interface object


def test_the_binary_part_is_the_object_with_a_prebuilt_beside_it(tmp_path: Path) -> None:
    for name in ("nv.o", "nv-kernel.o", "nv-kernel.o_binary"):
        (tmp_path / name).write_bytes(b"")
    assert binary_object([tmp_path / "nv.o", tmp_path / "nv-kernel.o"]) == tmp_path / "nv-kernel.o"
    assert binary_object([tmp_path / "nv.o"]) is None  # nvidia-uvm.ko, nvidia-drm.ko: shipped whole


def test_a_module_objtool_ran_over_after_linking_stays_whole(tmp_path: Path) -> None:
    """With IBT or LTO kbuild runs objtool on the linked <module>.o: its output covers the binary's code
    too and is per kernel, so the module cannot be split faithfully."""
    (tmp_path / "nvidia").mkdir()
    (tmp_path / "nvidia/nv.o").write_bytes(b"")
    (tmp_path / "nvidia/nv-kernel.o").write_bytes(b"")
    (tmp_path / "nvidia/nv-kernel.o_binary").write_bytes(b"")
    (tmp_path / "nvidia.mod").write_text(f"{tmp_path}/nvidia/nv.o\n{tmp_path}/nvidia/nv-kernel.o\n")
    (tmp_path / ".nvidia.o.cmd").write_text(O_CMD_OBJTOOL)
    (tmp_path / ".nvidia.ko.cmd").write_text(KO_CMD_612)
    assert split_module(tmp_path, "nvidia", tmp_path, tmp_path / "out", "GNU ld 2.40") is None
