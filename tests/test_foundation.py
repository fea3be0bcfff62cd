"""The shared seams every stage relies on: atomic writes, the command runner, the tag rule, the CLI's error line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.errors import CommandError, UserError
from gl_nvidia.fs import atomic_dir, atomic_write_text, staged_file
from gl_nvidia.image.tags import image_tags, operator_tag, tag_kernel
from gl_nvidia.net import Transient, retrying
from gl_nvidia.node.decide import tag_kernel as node_tag_kernel
from gl_nvidia.reference import validate_tag
from gl_nvidia.run import run


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "versions.yaml"
    target.write_text("old\n")
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["versions.yaml"]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "manifest.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("compile failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json"]


def test_atomic_dir_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_atomic_writes_where_no_temp_file_can_be_made_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        atomic_write_text(tmp_path / "file" / "values.yaml", "a: 1\n")  # parent is a file
    with pytest.raises(UserError, match="cannot write"), atomic_dir(tmp_path / "file" / "bundle"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]




def test_run_failure_names_command_and_first_error() -> None:
    with pytest.raises(CommandError) as exc:
        run(["sh", "-c", "echo 'nv-pci.c:12: error: too few arguments'; exit 2"])
    assert "exit 2" in str(exc.value)
    assert "too few arguments" in str(exc.value)


def test_run_missing_program_is_user_error() -> None:
    with pytest.raises(UserError, match="required program not found: no-such-tool"):
        run(["no-such-tool"])


def test_operator_tags_for_garden_linux() -> None:
    tags = image_tags("590.48.01", "590", "6.12.72-cloud-amd64", "gardenlinux", ("1877.3", "1877.4"))
    assert tags == [
        "590-6.12.72-cloud-amd64-gardenlinux0",
        "590.48.01-6.12.72-cloud-amd64-gardenlinux0",
        "590-6.12.72-cloud-amd64-gardenlinux1877.3",
        "590-6.12.72-cloud-amd64-gardenlinux1877.4",
    ]
    assert operator_tag("590", "6.12.72-cloud-amd64", "gardenlinux", "0") in tags


def test_operator_tags_for_debian_use_real_version_id() -> None:
    assert image_tags("535.309.01", "535", "6.1.0-47-cloud-amd64", "debian", ("12",)) == [
        "535-6.1.0-47-cloud-amd64-debian12",
        "535.309.01-6.1.0-47-cloud-amd64-debian12",
    ]


def test_a_kernel_with_a_plus_gets_a_valid_tag_by_one_documented_rule() -> None:
    # Debian's 6.12 releases carry `+`, which no OCI tag may contain: it becomes `_`, nothing else changes.
    tags = image_tags("535.309.01", "535", "6.12.117+deb12-cloud-amd64", "debian", ("12",))
    assert tags == ["535-6.12.117_deb12-cloud-amd64-debian12", "535.309.01-6.12.117_deb12-cloud-amd64-debian12"]
    assert [validate_tag(t) for t in tags] == tags
    # Names without `+` (Garden Linux's) keep the operator's rule; the node's copy of the rule agrees.
    for kernel in ("6.12.117+deb12-cloud-amd64", "6.12.72-cloud-amd64"):
        assert node_tag_kernel(kernel) == tag_kernel(kernel)
    assert tag_kernel("6.12.72-cloud-amd64") == "6.12.72-cloud-amd64"


@pytest.mark.parametrize("bad", ["", "-x", ".x", "a/b", "a:b", "x" * 129])
def test_invalid_tags_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid tag"):
        validate_tag(bad)


def test_cli_unknown_command_exits_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) != 0
    assert "No such command" in capsys.readouterr().err


def test_tables_fold_long_values_instead_of_truncating(capsys: pytest.CaptureFixture[str]) -> None:
    from gl_nvidia import ui

    tag = "535.309.01-6.1.0-56-cloud-amd64-gardenlinux0"
    ui.print_table("release", ["unit", "tags", "digest", "status"],
                   [["6.1.0-56-cloud-amd64 535.309.01 amd64", f"535-6.1.0-56-cloud-amd64-gardenlinux0 {tag}",
                     "sha256:495ed0f0b6ad", "build cached, image built"]])
    out = "".join(capsys.readouterr().out.split())
    assert "…" not in out
    assert "".join(tag.split()) in "".join(c for c in out if c not in "│┃")


def test_output_is_printed_as_it_is_never_as_markup_or_emoji(capsys: pytest.CaptureFixture[str]) -> None:
    """A certificate serial holding ":AB:" once printed as "🆎" (rich's emoji codes), a compiler line's
    "[-Werror]" would vanish as a style tag: tables and lines show data verbatim."""
    from gl_nvidia import ui

    key = "67:17:00:E4:7D:AB:90:BE:DE:2C:OK:CL:ID:UP"
    error = "nv.c:12:3: error: [-Werror=implicit-function-declaration] [red]x[/red] :smile:"
    ui.print_table("signatures", ["module", "key"], [["nvidia.ko", key], ["nv.o", error]])
    ui.stdout.print(error, soft_wrap=True)
    out = capsys.readouterr().out
    assert key in out and "🆎" not in out
    assert out.count(error) == 2 and "[-Werror=implicit-function-declaration]" in out  # the cell, the line


def test_one_retry_loop_for_downloads_and_the_registry() -> None:
    """Transient failures are tried again with a growing wait and a hook before each new try; the last
    one is raised as it is; anything else is final at once."""
    calls: list[str] = []

    def flaky() -> str:
        calls.append("try")
        if calls.count("try") < 3:
            raise Transient("HTTP 503")
        return "done"

    assert retrying(flaky, retries=2, delay_s=0.001, what="t", before_retry=lambda: calls.append("resume")) == "done"
    assert calls == ["try", "resume", "try", "resume", "try"]
    calls.clear()
    with pytest.raises(Transient, match="HTTP 503"):
        retrying(flaky, retries=1, delay_s=0.001, what="t")
    assert calls == ["try", "try"]

    def refused() -> None:
        calls.append("refused")
        raise UserError("digest mismatch")

    calls.clear()
    with pytest.raises(UserError):
        retrying(refused, retries=5, delay_s=0.001, what="t")
    assert calls == ["refused"]


def test_a_staged_file_reaches_its_destination_only_when_committed(tmp_path: Path) -> None:
    dest = tmp_path / "d" / "blob"
    with pytest.raises(UserError), staged_file(dest) as out:
        out.write(b"half")
        raise UserError("refused")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with staged_file(dest) as out:
        out.write(b"whole")
        assert (out.size, out.sha256) == (5, "5d5766cf2d78701614200418ee1450690d9af12c84d52545e4802f001ad53099")
        out.commit()
    assert dest.read_bytes() == b"whole" and list(dest.parent.iterdir()) == [dest]
