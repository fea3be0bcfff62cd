"""`gl-nvidia release`: the conductor's command (every unit through the stages, `--plan` for the publish
workflow, `--version` for a versioned release's assets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gl_nvidia import ui
from gl_nvidia.catalog.matrix import load_lock
from gl_nvidia.cli.catalog import ARM64_RUNNER_HELP, github_row
from gl_nvidia.deploy import values as values_mod
from gl_nvidia.errors import CheckFailed, UserError
from gl_nvidia.fs import atomic_write_text

if TYPE_CHECKING:
    from gl_nvidia.catalog.lock import Lock
    from gl_nvidia.catalog.model import BuildUnit
    from gl_nvidia.release.inputs import Decision, UnitInputs


@click.command("release")
@click.option("--profile", default="debian", show_default=True,
              help="debian (embedded, Debian's kernel and NVIDIA packages), gardenlinux (./versions.yaml) "
                   "or a lock file path.")
@click.option("--registry", default=None,
              help="Push every image to REGISTRY/PATH/driver (REGISTRY/PATH becomes driver.repository).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out"), show_default=True,
              help="Work and output directory: bundles/, the OCI layout oci/, gpu-operator-values.yaml.")
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True, help="Build units in parallel.")
@click.option("--sign-key", type=click.Path(path_type=Path), default=None,
              help="Sign every pushed image with this ECDSA P-256 PEM key (cosign's format; see `gl-nvidia sign`).")
@click.option("--module-sign-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Sign every module for the kernel's module signature check (as `build --sign-key`).")
@click.option("--module-sign-cert", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The certificate of --module-sign-key (with --plan: alone, it is one of each unit's inputs).")
@click.option("--force", is_flag=True,
              help="Build and push every unit, even one the registry holds from the same inputs.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Build nothing: print the GitHub Actions strategy matrix of the units to build (one JSON line, "
                   "each with its inputs) and, on stderr, what is skipped and why. Needs --registry.")
@click.option("--arm64-runner", metavar="LABEL", help=ARM64_RUNNER_HELP)
@click.option("--version", "version", metavar="X.Y.Z", default=None,
              help="A versioned release (semver: the tag without its v). Needs --registry; once every unit is "
                   "published, writes OUT/release/: the GPU Operator values of each OS version, CHANGELOG.md and "
                   "the OCM component descriptor, which it pushes to REGISTRY/component-descriptors/.")
@click.option("--since", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --version: the previous release's lock (e.g. `git show v1.3.0:versions.yaml`); the "
                   "changelog lists what `gl-nvidia update` changed since. Default: the first release.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def release_cmd(profile: str, registry: str | None, out: Path, jobs: int, sign_key: Path | None,
                module_sign_key: Path | None, module_sign_cert: Path | None, force: bool, plan_only: bool,
                arm64_runner: str | None, version: str | None, since: Path | None, as_json: bool) -> None:
    """catalog -> build -> ABI gate -> image -> push for every build unit. A unit the registry already
    holds, built from the same inputs, is skipped before it is compiled; the table says why each was built
    or skipped."""
    from gl_nvidia.cli.build import module_signer
    from gl_nvidia.modbuild.modsign import cert_fingerprint
    from gl_nvidia.release.assets import release_assets
    from gl_nvidia.release.conductor import plan, release

    registry = registry.rstrip("/") if registry else None  # also driver.repository in the values written below
    previous = _previous_release(profile, registry, plan_only, version, since)
    if plan_only:
        if registry is None:
            raise UserError("--plan needs --registry", "name the repository the workflow publishes to")
        cert = cert_fingerprint(module_sign_cert) if module_sign_cert else ""
        _print_plan(plan(profile, registry, force=force, module_cert=cert), arm64_runner)
        return
    signer = module_signer(module_sign_key, module_sign_cert, "--module-sign")
    result = release(profile, out, registry, jobs=jobs, sign_key=sign_key, module_signer=signer, force=force)
    # A release with a failed unit has no assets: its values could name an image nobody published.
    assets = (release_assets(result, version, previous, out / "release", force=force)
              if version is not None and result.ok else [])
    if as_json:
        ui.print_json({"units": [u.as_dict() for u in result.units], "layout": str(result.layout),
                       "repository": result.repository, "compiled": result.compiled,
                       "blobs_uploaded": result.blobs_uploaded, "manifests_pushed": result.manifests_pushed,
                       "signed": result.signed, "release": {"version": version, "assets": [str(p) for p in assets]}
                       if version is not None else None})
    else:
        ui.print_table("release", ["unit", "modules", "tags", "digest", "status"],
                       [[(u.unit.kernel, f"{u.unit.driver_version} {u.unit.arch}"),
                         [",".join(u.unit.module_types), *(f"no {t}: {r}" for t, r in u.left_out)],
                         list(u.tags), (u.digest or "-").removeprefix("sha256:")[:12], u.status]
                        for u in result.units])
    branch = result.values_branch
    if branch is not None:
        settings = values_mod.ValuesSettings(branch, repository=registry or values_mod.DEFAULT_REPOSITORY)
        values_file = out / "gpu-operator-values.yaml"
        atomic_write_text(values_file, values_mod.to_yaml(values_mod.helm_values(settings)))
        if registry is None:
            click.echo(f"images are in the OCI layout {result.layout}; publish them with:\n"
                       f"  gl-nvidia push {result.layout} REGISTRY/PATH/driver\n"
                       "then install the GPU Operator with:\n"
                       f"  {values_mod.helm_command(values_file)} --set driver.repository=REGISTRY/PATH", err=as_json)
        else:
            click.echo(f"install the GPU Operator with:\n  {values_mod.helm_command(values_file)}", err=as_json)
    if assets:
        click.echo(f"release {version}: {', '.join(p.name for p in assets)} in {assets[0].parent}", err=as_json)
    failed = [u for u in result.units if not u.ok]
    if failed:
        first = failed[0]
        raise CheckFailed(f"{len(failed)} of {len(result.units)} build unit(s) failed; first, {first.unit.key}: "
                            f"{(first.error or '').splitlines()[0]}",
                            "see the table; rerun after fixing the cause: finished units are skipped")


def _previous_release(profile: str, registry: str | None, plan_only: bool, version: str | None,
                      since: Path | None) -> Lock | None:
    """Check a versioned release's options before anything is built; the previous release's lock, if given."""
    from gl_nvidia.catalog.lock import read_lock
    from gl_nvidia.release.assets import check_version

    if version is None:
        if since is not None:
            raise UserError("--since is read only with --version", "pass the release's --version too")
        return None
    check_version(version)
    if plan_only or registry is None:
        raise UserError("--version writes a release's assets from the published images",
                        "pass --registry, without --plan")
    if since is None:
        return None
    previous, os_id = read_lock(since)[0], load_lock(profile).os.id
    if previous.os.id != os_id:
        raise UserError(f"--since {since} is a lock of {previous.os.id}, not of {os_id}",
                        "pass the previous release's lock of the same profile")
    return previous


def _print_plan(decided: list[tuple[BuildUnit, UnitInputs | None, Decision]], arm64_runner: str | None) -> None:
    build = [{**github_row(u, arm64_runner), "inputs": inputs.text() if inputs else ""} for u, inputs, d in decided if d.build]
    for u, _, d in decided:  # stderr: stdout is the one line for $GITHUB_OUTPUT
        ui.log.info("%s %s: %s", "build" if d.build else "skip", u.key, d.reason)
    ui.log.info("release plan: %d of %d unit(s) to build", len(build), len(decided))
    click.echo(json.dumps({"include": build}, separators=(",", ":")))


COMMANDS: list[click.Command] = [release_cmd]
