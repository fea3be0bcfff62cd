"""Each strategy (OS profile, driver source, kernel environment, base source) is chosen by name from one
table: every name there makes what it names, wherever it is read, and a name without a row is one error
line where it enters, with nothing written."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from gl_nvidia.catalog.lock import parse_lock_text
from gl_nvidia.catalog.model import BuildUnit
from gl_nvidia.catalog.refresh import DRIVER_FEEDS, driver_feed
from gl_nvidia.cli import main
from gl_nvidia.errors import UserError
from gl_nvidia.image.base import BASE_SOURCES, base_for, debian_spec
from gl_nvidia.modbuild.strategy import (
    DRIVER_SOURCES,
    KERNEL_ENVS,
    EnvOptions,
    SourceOptions,
    driver_source,
    kernel_envs,
    sources_for,
)
from gl_nvidia.osprofile import GARDENLINUX, PROFILES, os_profile
from tests.fixtures.cli import one_error, tree

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "gl_nvidia"
DEBIAN_LOCK = ROOT / "tests" / "data" / "deploy" / "release-debian-lock.yaml"
UNIT = BuildUnit("6.1.0-56-cloud-amd64", "535.309.01", "535", "amd64", "cloud", "debian", ("12",))


def _lock(old: str, new: str) -> str:
    text = DEBIAN_LOCK.read_text()
    assert old in text
    return text.replace(old, new, 1)


def test_every_driver_source_is_what_its_name_makes(tmp_path: Path) -> None:
    options = {"debian": SourceOptions(), "nvidia": SourceOptions(str(tmp_path / "NVIDIA-Linux.run")),
               "dir": SourceOptions(str(tmp_path))}
    assert list(DRIVER_SOURCES) == list(options)
    for name, given in options.items():
        assert driver_source(name, given).source.name == name


@pytest.mark.parametrize(("spelled", "name", "what"), [
    ("apt:nvidia-kernel-source,nvidia-tesla-535-kernel-source", "debian",
     "nvidia-kernel-source,nvidia-tesla-535-kernel-source"),
    ("https://docs.nvidia.invalid/releases.json", "nvidia", "https://docs.nvidia.invalid/releases.json"),
    ("tests/data/catalog/nvidia-releases.json", "nvidia", "tests/data/catalog/nvidia-releases.json"),
    ("file:///srv/releases.json", "nvidia", "file:///srv/releases.json"),
])
def test_a_locks_driver_source_is_one_name_for_the_catalog_and_the_build(spelled: str, name: str, what: str) -> None:
    """`sources.nvidia` names the row the catalog lists releases with and the one the release builds from."""
    assert driver_feed(spelled) == (name, what)
    assert name in DRIVER_FEEDS and name in DRIVER_SOURCES
    lock = parse_lock_text(_lock("nvidia: apt:nvidia-kernel-source", f"nvidia: {spelled}"), "lock")[0]
    assert sources_for(lock)(UNIT).name == name


@pytest.mark.parametrize("name", list(KERNEL_ENVS))
def test_every_kernel_environment_is_what_its_name_makes(name: str, tmp_path: Path) -> None:
    if name == "kmodbuild" and not (shutil.which("podman") or shutil.which("docker")):
        pytest.skip("kmodbuild needs podman or docker to be chosen")
    env = kernel_envs(GARDENLINUX, name, EnvOptions(headers=tmp_path if name == "dir" else None))(UNIT)
    assert env.name == name


def test_every_os_profile_names_its_environment_and_base_by_a_row() -> None:
    for profile in PROFILES.values():
        assert profile.build_env in KERNEL_ENVS and profile.base in BASE_SOURCES
    debian = parse_lock_text(DEBIAN_LOCK.read_text(), "lock")[0]
    assert os_profile(debian.os.id).base == "system" and base_for(debian, "amd64", "12") == debian_spec("amd64")
    gl = debian.model_copy(update={"os": debian.os.model_copy(update={"id": "gardenlinux", "version": None}),
                                   "sources": debian.sources.model_copy(update={"apt": "http://apt.invalid/gl"})})
    spec = base_for(gl, "arm64", "1877.3")
    assert (spec.suite, spec.mirrors) == ("1877.3", ("deb http://apt.invalid/gl 1877.3 main",))


def test_each_table_refuses_a_name_without_a_row() -> None:
    for table, name in ((PROFILES, "ubuntu"), (DRIVER_SOURCES, "ubuntu"), (DRIVER_FEEDS, "ubuntu"),
                        (KERNEL_ENVS, "docker"), (BASE_SOURCES, "yum")):
        with pytest.raises(UserError) as exc:
            table.lookup(name)
        assert exc.value.message == f"gl-nvidia has no {table.what} {name!r}"
        assert exc.value.hint == f"use {table.choices()}" and "\n" not in exc.value.hint
    assert DRIVER_SOURCES.choices() == "debian, nvidia or dir" and PROFILES.choices() == "debian or gardenlinux"


@pytest.mark.parametrize(("args", "words"), [
    (["--source", "ubuntu"], "'ubuntu' is not one of 'debian', 'nvidia', 'dir'"),
    (["--env", "docker"], "'docker' is not one of 'apt', 'dir', 'kmodbuild'"),
], ids=["source", "env"])
def test_build_refuses_a_source_or_environment_without_a_row(args: list[str], words: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--kernel", UNIT.kernel, "--driver", UNIT.driver_version,
                 "--out", str(tmp_path / "out"), *args]) == 2
    one_error(capsys.readouterr().err, words)
    assert tree(tmp_path) == []


@pytest.mark.parametrize("command", [
    ["matrix", "--lock"], ["values", "--lock"], ["build", "--all", "--profile"], ["update", "--lock"],
    ["release", "--out", "{tmp}/out", "--profile"],
], ids=["matrix", "values", "build", "update", "release"])
def test_a_lock_naming_a_driver_source_without_a_row_is_one_error_line(command: list[str], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`deb:` is no location and no source: read as a file of that name it would fail later, unexplained."""
    lock = tmp_path / "versions.yaml"
    text = _lock("nvidia: apt:nvidia-kernel-source", "nvidia: deb:nvidia-kernel-source")
    lock.write_text(text)
    before = tree(tmp_path)
    assert main([*(a.format(tmp=tmp_path) for a in command), str(lock)]) == 2
    one_error(capsys.readouterr().err,
              "sources.nvidia 'deb:nvidia-kernel-source' names no driver source gl-nvidia has ('deb:')")
    assert tree(tmp_path) == before and lock.read_text() == text


def _choices_outside_the_tables(path: Path) -> list[str]:
    """Comparisons of a driver source's, base source's or lock spelling's name, outside the tables."""
    names = {*DRIVER_SOURCES, *BASE_SOURCES, *(f.prefix for f in DRIVER_FEEDS.values() if f.prefix)}
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        sides: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if not any(isinstance(s, (ast.Name, ast.Attribute)) and ast.unparse(s).endswith(
                    ("base", "source", "kind", "nvidia")) for s in sides):
                continue
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "startswith", "removeprefix"):
            sides = list(node.args)
        if {s.value for s in sides if isinstance(s, ast.Constant)} & names:
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_stage_chooses_a_source_outside_the_tables() -> None:
    """Issue 20: the lock's `apt:` was read in three places and a base chosen by comparing `distro.base`."""
    tables = {SRC / "build" / "strategy.py", SRC / "catalog" / "refresh.py", SRC / "image" / "base.py"}
    found = [hit for p in sorted(SRC.rglob("*.py")) if p not in tables for hit in _choices_outside_the_tables(p)]
    assert found == [], found
