"""Bad input stops where it enters: one error line and exit 2, before any work, nothing written.

And what nobody expected (a bug) exits 70 with one line, not 1 (a check that ran and said no) with a
traceback; `-v` shows the traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gl_nvidia.cli import main
from gl_nvidia.deploy import values as values_mod
from gl_nvidia.names import check_driver_version, check_kernel
from gl_nvidia.reference import check_repository
from tests.fixtures.cli import one_error, tree

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "versions.yaml"
DEBIAN_LOCK = ROOT / "tests" / "data" / "deploy" / "release-debian-lock.yaml"
KERNEL = "6.1.0-56-cloud-amd64"


@pytest.mark.parametrize(("name", "mutate", "words"), [
    ("not UTF-8", lambda b: b.replace(b"policy:", b"policy: \xff\xfe"), "is not UTF-8 text"),
    ("deeply nested", lambda b: b + b"deep: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
    ("invalid date", lambda b: b.replace(b"today: 2026-11-20", b"today: 2026-13-45"), "month must be in 1..12"),
    ("5000-digit integer", lambda b: b.replace(b"branches: 3", b"branches: " + b"9" * 5000),
     "Exceeds the limit (4300 digits)"),
    ("driver version ../../etc", lambda b: b.replace(b"version: 575.57.08", b"version: ../../etc"),
     "resolved.drivers.1.version: Value error, '../../etc' is not a driver version"),
    ("open module version $(id)", lambda b: b.replace(b"version: 575.57.08,", b"version: 575.57.08, open_version: $(id),"),
     "resolved.drivers.1.open_version: Value error, '$(id)' is not a driver version"),
    ("kernel ../../etc", lambda b: b.replace(b"kernel: 6.12.44-amd64}", b"kernel: 6.12.44/../../etc}"),
     "is not a kernel release"),
    ("kernel $(id)", lambda b: b.replace(b"kernel: 6.12.44-amd64}", b"kernel: '6.12.44$(id)'}"),
     "is not a kernel release"),
    ("pinned driver version", lambda b: b.replace(b"pins: []", b"pins: ['570.1.2/..']"), "is not a driver version"),
], ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("command", [["matrix", "--lock"], ["values", "--lock"], ["versions", "--lock"],
                                     ["update", "--nvidia", "/nonexistent", "--lock"]])
def test_a_bad_lock_file_is_one_error_line(name: str, mutate: object, words: str, command: list[str],
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert callable(mutate)
    lock = tmp_path / "versions.yaml"
    data = mutate(LOCK.read_bytes())
    assert data != LOCK.read_bytes()
    lock.write_bytes(data)
    before = tree(tmp_path)
    assert main([*command, str(lock)]) == 2
    one_error(capsys.readouterr().err, words)
    assert tree(tmp_path) == before and lock.read_bytes() == data


def test_a_bad_history_file_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "versions.yaml"
    lock.write_bytes(LOCK.read_bytes())
    history = tmp_path / "versions-history.yaml"
    for data, words in [(b"entries: [\xff]\n", "is not UTF-8"), (b"entries: " + b"[" * 20000, "nested too deeply"),
                        (b"entries:\n  - {os_version: '1', driver_version: 1.2.3, first_seen: 2026-02-30}\n",
                         "day is out of range")]:
        history.write_bytes(data)
        assert main(["versions", "--lock", str(lock)]) == 2
        one_error(capsys.readouterr().err, words)


@pytest.mark.parametrize(("args", "words"), [
    (["--kernel", "../../etc"], "Invalid value for '--kernel': '../../etc' is not a kernel release"),
    (["--kernel", "$(id)"], "Invalid value for '--kernel': '$(id)' is not a kernel release"),
    (["--kernel", f"{KERNEL}\n"], "is not a kernel release"),
    (["--kernel", KERNEL, "--driver", "../../etc"], "Invalid value for '--driver': '../../etc' is not a driver"),
    (["--kernel", KERNEL, "--driver", "535.309.01; id"], "is not a driver version"),
    (["--kernel", KERNEL, "--driver", "535.309.01", "--source", "nvidia", "--sha256", "zz"],
     "Invalid value for '--sha256': 'zz' is not a sha256"),
])
def test_build_refuses_bad_names_before_any_work(args: list[str], words: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["build", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not out.exists()


def test_kernel_names_are_checked_wherever_they_enter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os_release = ROOT / "tests" / "data" / "deploy" / "os-release-debian-12"
    assert main(["resolve", "--os-release", str(os_release), "--kernel", "../../etc", "--lock", str(DEBIAN_LOCK)]) == 2
    assert "is not a kernel release" in capsys.readouterr().err
    assert main(["image", str(tmp_path / "bundle"), "--kernel", "$(id)", "--out", str(tmp_path / "out")]) == 2
    assert "is not a kernel release" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_name_checks() -> None:
    for good in ("6.1.0-56-cloud-amd64", "6.12.72-cloud-arm64", "6.8.0+rpt-rpi-v8", "5.15.0_1"):
        assert check_kernel(good) == good
    for bad in ("", "../../etc", "6.1/../x", "6.1..0", "$(id)", "6.1 0", "-6.1", "v6.1", "6.1\n", "6" * 65):
        with pytest.raises(ValueError, match="is not a kernel release"):
            check_kernel(bad)
    for good in ("535.309.01", "580.105", "1.2.3"):
        assert check_driver_version(good) == good
    for bad in ("", "535", "535.", "../../etc", "535.309.01.1", "535.309.01\n", "535.309.01-1", "1" * 7 + ".1"):
        with pytest.raises(ValueError, match="is not a driver version"):
            check_driver_version(bad)


def test_release_refuses_an_unwritable_out_before_building(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # A unit whose build would fail fast: today's code got that far (exit 1) before noticing --out.
    lock = tmp_path / "lock.yaml"
    lock.write_text(DEBIAN_LOCK.read_text().replace("535.309.01", "535.999.01"))
    (tmp_path / "file").write_text("x")
    before = tree(tmp_path)
    assert main(["release", "--profile", str(lock), "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    one_error(err, f"cannot write {tmp_path / 'file' / 'out'}: Not a directory")
    assert "build unit" not in err  # nothing was built
    assert tree(tmp_path) == before


def test_build_refuses_an_unwritable_out_before_building(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    assert main(["build", "--kernel", KERNEL, "--driver", "535.999.01", "--out", str(out)]) == 2
    one_error(capsys.readouterr().err, f"cannot write {out}: Not a directory")
    assert tree(tmp_path) == ["file"]


@pytest.mark.parametrize("repository", ["foo", "gpu/drivers", "Registry/gpu"])
def test_a_repository_without_a_registry_host_is_refused(repository: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The operator would pull docker.io/<repository>/driver: not what anyone publishing there meant."""
    out = tmp_path / "values.yaml"
    assert main(["values", "--repository", repository, "--lock", str(LOCK), "--out", str(out)]) == 2
    one_error(capsys.readouterr().err, "names no registry host")
    assert not out.exists()
    assert main(["release", "--profile", str(DEBIAN_LOCK), "--registry", repository,
                 "--out", str(tmp_path / "out")]) == 2
    one_error(capsys.readouterr().err, "names no registry host")
    assert tree(tmp_path) == []
    for good in ("localhost/gpu", "localhost:5000/gpu", "registry.example/gpu", "[::1]:5000/gpu"):
        assert check_repository(good, "driver") == good


def test_an_unexpected_exception_exits_70_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    def bug(_settings: values_mod.ValuesSettings) -> dict[str, object]:
        raise KeyError("driver\nsecond line")

    monkeypatch.setattr(values_mod, "helm_values", bug)
    assert main(["values", "--lock", str(LOCK)]) == 70
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == [
        "gl-nvidia: error: unexpected KeyError: 'driver\\nsecond line'",
        "gl-nvidia: hint: this is a bug in gl-nvidia; rerun with -v for the traceback and report it",
    ]
    assert main(["-v", "values", "--lock", str(LOCK)]) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in bug" in err
    assert "gl-nvidia: error: unexpected KeyError" in err
    # -v does not stick to later runs in the same process
    assert main(["values", "--lock", str(LOCK)]) == 70
    assert "Traceback" not in capsys.readouterr().err
