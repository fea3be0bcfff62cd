"""`gl-nvidia` commands of the catalog stage: matrix, update, versions."""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path

import click

from gl_nvidia import ui
from gl_nvidia.catalog.github import GitHub
from gl_nvidia.catalog.history import history_path, read_history, support_table
from gl_nvidia.catalog.lock import read_lock
from gl_nvidia.catalog.matrix import PROFILES, load_matrix
from gl_nvidia.catalog.model import BuildUnit, Matrix
from gl_nvidia.catalog.refresh import SourceOverrides
from gl_nvidia.catalog.update import update
from gl_nvidia.errors import UserError

PR_BRANCH = "gl-nvidia/update-versions"


def _today(value: str | None) -> date:
    if value is None:
        return date.today()
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise UserError(f"--today {value!r} is not a date", "use YYYY-MM-DD") from None


def _source_options(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option("--apt-repository", metavar="URL|DIR",
                     help="Replace sources.apt: the OS versions' apt repository base.")(f)
    f = click.option("--nvidia", metavar="URL|FILE", help="Replace sources.nvidia (NVIDIA's releases.json).")(f)
    f = click.option("--glrd", multiple=True, metavar="URL|FILE",
                     help="Replace sources.glrd (GLRD JSON; repeat for majors and minors).")(f)
    f = click.option("--today", metavar="YYYY-MM-DD",
                     help="Decide maintenance as of this date (default: today), for reproducible runs.")(f)
    return f


def print_matrix(matrix: Matrix) -> None:
    ui.print_table(
        f"cells to build ({len(matrix.cells)})",
        ["os", "version", "flavour", "arch", "kernel", "driver"],
        [(c.os_id, c.os_version, c.flavour, c.arch, c.kernel, c.driver_version) for c in matrix.cells],
    )
    if matrix.excluded:
        ui.print_table(
            f"excluded ({len(matrix.excluded)})",
            ["version", "flavour", "arch", "kernel", "driver", "modules", "reason"],
            [(e.cell.os_version, e.cell.flavour, e.cell.arch, e.cell.kernel, e.cell.driver_version,
              "all" if len(e.module_types) > 1 else e.module_types[0], e.reason) for e in matrix.excluded],
        )
    ui.print_table(
        f"build units ({len(matrix.units)}): cells sharing (kernel, driver, arch) compile once",
        ["kernel", "driver", "arch", "modules", "serves"],
        [(u.kernel, u.driver_version, u.arch, ",".join(u.module_types), " ".join(u.os_versions)) for u in matrix.units],
    )


# GitHub's hosted amd64 runner: every unit builds there, arm64 ones cross-compiled, unless a native
# arm64 runner is named (a self-hosted Graviton/Ampere machine or GitHub's arm64 runner label).
RUNNER = "ubuntu-24.04"


def github_row(u: BuildUnit, arm64_runner: str | None = None) -> dict[str, str]:
    """One unit of a `strategy.matrix` fan-out (flat strings: usable in job names and args), with the
    runner it builds on."""
    return {
        "kernel": u.kernel, "driver_version": u.driver_version, "driver_branch": u.driver_branch,
        "arch": u.arch, "flavour": u.flavour, "os_id": u.os_id, "os_versions": " ".join(u.os_versions),
        "module_types": ",".join(u.module_types), "key": u.key,
        "runner": arm64_runner if u.arch == "arm64" and arm64_runner else RUNNER,
    }


def github_matrix(matrix: Matrix, arm64_runner: str | None = None) -> dict[str, list[dict[str, str]]]:
    """A `strategy.matrix` for a fan-out over build units (every arch and flavour)."""
    return {"include": [github_row(u, arm64_runner) for u in matrix.units]}


ARM64_RUNNER_HELP = ("--format github / --plan: the runner label of native arm64 builds (empty or unset: "
                     f"arm64 units cross-compile on {RUNNER}).")


@click.command("matrix")
@click.option("--profile", type=click.Choice(PROFILES), default=None,
              help="debian (embedded default: Debian 12 from this machine's archive) or gardenlinux (./versions.yaml).")
@click.option("--lock", "lock", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A lock file to read instead of a profile.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "github"]), default="table", show_default=True)
@click.option("--arm64-runner", metavar="LABEL", help=ARM64_RUNNER_HELP)
@_source_options
def matrix_cmd(profile: str | None, lock: Path | None, fmt: str, arm64_runner: str | None, today: str | None,
               glrd: tuple[str, ...], nvidia: str | None, apt_repository: str | None) -> None:
    """The cells to build, the excluded cells with their reason, and the build units."""
    if profile and lock:
        raise UserError("--profile and --lock exclude each other", "pass one of them")
    target: str | Path = lock if lock is not None else (profile or "debian")
    m = load_matrix(target, _today(today), SourceOverrides(glrd, nvidia, apt_repository))
    if fmt == "json":
        ui.print_json(m.as_dict())
    elif fmt == "github":
        click.echo(json.dumps(github_matrix(m, arm64_runner), separators=(",", ":")))
    else:
        print_matrix(m)


@click.command("update")
@click.option("--lock", "lock", type=click.Path(path_type=Path, dir_okay=False), default=Path("versions.yaml"),
              show_default=True)
@_source_options
@click.option("--pr", is_flag=True, help="Push the change to a branch and open or update its pull request "
              "(GITHUB_TOKEN; GITHUB_REPOSITORY or --repo; GITHUB_API_URL).")
@click.option("--repo", metavar="OWNER/NAME", default=None, help="GitHub repository (default: $GITHUB_REPOSITORY).")
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
def update_cmd(lock: Path, today: str | None, glrd: tuple[str, ...], nvidia: str | None,
               apt_repository: str | None, pr: bool, repo: str | None, as_json: bool) -> None:
    """Refresh versions.yaml from the sources and print what changed."""
    github = None
    if pr:  # check the token before any work
        github = GitHub(os.environ.get("GITHUB_API_URL", "https://api.github.com"),
                        os.environ.get("GITHUB_TOKEN", ""), repo or os.environ.get("GITHUB_REPOSITORY", ""))
    day = _today(today)
    result = update(lock, day, SourceOverrides(glrd, nvidia, apt_repository))
    proposal = None
    if github is not None and result.changes:  # first: the lock is rewritten only once the PR holds the change
        body = "\n".join(f"- {c.text}" for c in result.changes)
        body += f"\n\n{len(result.matrix.cells)} cells, {len(result.matrix.units)} build units, " \
                f"{len(result.matrix.excluded)} exclusions. Resolved by `gl-nvidia update` on {day}."
        files = {os.path.relpath(p, Path.cwd()): text for p, text in result.files.items()}
        proposal = github.propose(PR_BRANCH, files, f"Update driver catalog ({day})", body)
    result.write()
    if as_json:
        ui.print_json({"changes": [c.as_dict() for c in result.changes],
                       "written": [str(p) for p in result.files]})
    elif not result.changes:
        click.echo("no changes")
    else:
        for change in result.changes:
            click.echo(f"- {change.text}")
    if proposal is not None:
        verb = "opened" if proposal.created else "updated"
        click.echo(f"{verb} pull request #{proposal.number}: {proposal.url}", err=True)


@click.command("versions")
@click.option("--lock", "lock", type=click.Path(path_type=Path, dir_okay=False), default=Path("versions.yaml"),
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
def versions_cmd(lock: Path, as_json: bool) -> None:
    """The support table: every OS version with the driver versions ever built for it, and whether the
    policy still gives it new images (every minor in maintenance, from min_minor on, plus keep_minors)."""
    lk, _ = read_lock(lock)  # a wrong --lock is an error, not an empty table (its history file is beside it)
    current = {v.version for v in lk.resolved.os_versions} if lk.resolved else set()
    table = support_table(read_history(history_path(lock)))
    if as_json:
        ui.print_json([{"os_version": v, "driver_versions": drivers, "current": v in current}
                       for v, drivers in table])
    else:
        ui.print_table("support table", ["os version", "driver versions", "new images"],
                       [(v, ", ".join(d), "yes" if v in current else "no") for v, d in table])


COMMANDS: list[click.Command] = [matrix_cmd, update_cmd, versions_cmd]
