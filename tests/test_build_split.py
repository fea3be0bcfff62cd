"""Reading kbuild's saved link and objtool commands, and which object is the binary (fast; the real split is in
test_build_debian.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from gl_nvidia import bundle as b
from gl_nvidia.modbuild.split import KbuildObjtool, binary_object, read_cmd, read_objtool

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


def test_the_objtool_run_after_the_module_link_is_read_with_debians_real_binary(tmp_path: Path) -> None:
    """With IBT kbuild runs objtool on the linked <module>.o: the recipe takes its arguments as they are,
    and the binary that runs (Debian's wrapper executes objtool.real-$SRCARCH)."""
    tools = tmp_path / "tools/objtool"
    tools.mkdir(parents=True)
    for name in ("objtool", "objtool.real-x86", "objtool.real-powerpc"):
        (tools / name).write_bytes(b"")
    (tmp_path / "arch/x86").mkdir(parents=True)
    (tmp_path / ".nvidia.o.cmd").write_text(O_CMD_OBJTOOL)
    run = read_objtool(tmp_path / ".nvidia.o.cmd", tmp_path)
    assert run == KbuildObjtool(tools / "objtool.real-x86",
                                ("--hacks=jump_label", "--ibt", "--orc", "--retpoline", "--rethunk", "--module"))
    assert read_cmd(tmp_path / ".nvidia.o.cmd", tmp_path).flags == ("-m", "elf_x86_64", "-z", "noexecstack", "-r")
    # a kernel without IBT runs objtool per object at compile time, none after this link
    (tmp_path / "b.cmd").write_text(O_CMD_OBJTOOL.partition(" ; ")[0] + "\n")
    assert read_objtool(tmp_path / "b.cmd", tmp_path) is None


def test_a_patch_rebuilds_copied_added_literal_and_column_encoded_relocation_bytes() -> None:
    """bundle.apply_patch (what the node runs) for each operation module_patch writes, and refusals."""
    source = bytes(range(256)) * 4
    entries = b"".join(struct.pack("<QQq", 4 * i, (7 << 32) | 2, 1000 * i - 5) for i in range(50))
    columns = b.rela_columns(entries)
    assert columns is not None and len(columns) == len(entries)
    moved = (int.from_bytes(source[16:64], "little") + (3 << 64)).to_bytes(48, "little")
    diff = (3 << 64).to_bytes(10, "little", signed=True)
    ops: list[list[int | str]] = [["lit", 5], ["copy", 100, 20], ["add", 16, 48, len(diff)], ["rela", len(entries)]]
    patch = b.write_patch(ops, b"head:" + diff + columns)
    assert b.apply_patch(patch, source) == b"head:" + source[100:120] + moved + entries
    with pytest.raises(ValueError, match="does not fit its source"):
        b.apply_patch(patch, source[:50])  # a copy beyond the source's end
    with pytest.raises(ValueError, match="not a module patch"):
        b.apply_patch(b"GLNVPAT1" + patch[8:], source)  # another format
    assert b.rela_columns(entries[:-1]) is None  # no whole entries
    assert b.rela_columns(struct.pack("<QQq", 0, 0, -(1 << 63)) + struct.pack("<QQq", 0, 0, (1 << 63) - 1)) is None
