"""`gl-nvidia` commands of the deploy stage: values, resolve, preflight, verify, release."""

from __future__ import annotations

from pathlib import Path

import click

from gl_nvidia import ui
from gl_nvidia.catalog.matrix import load_lock
from gl_nvidia.deploy import resolve as resolve_mod
from gl_nvidia.deploy import values as values_mod
from gl_nvidia.deploy.pins import default_driver_version
from gl_nvidia.errors import UserError
from gl_nvidia.fs import atomic_write_text

LOCK_OPTION = click.option(
    "--lock", default="gardenlinux", show_default=True,
    help="Lock file naming the tracked driver branches and pins, or a profile: gardenlinux "
         "(./versions.yaml), debian (embedded).")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


@click.command("values")
@click.option("--repository", default=values_mod.DEFAULT_REPOSITORY, show_default=True,
              help="Registry path holding the driver images (driver.repository).")
@click.option("--driver-branch", "driver_version", default=None,
              help="driver.version: a branch (590) or a full version (590.48.01). "
                   "Default: the newest tracked branch; for gvisor the nvproxy-qualified pin.")
@click.option("--variant", type=click.Choice(values_mod.VARIANTS), default="precompiled", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["helm", "shoot"]), default="helm", show_default=True,
              help="helm: GPU Operator chart values; shoot: the Shoot's nvidia-gpu-extension entry.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here (atomically) instead of stdout.")
@LOCK_OPTION
def values_cmd(repository: str, driver_version: str | None, variant: values_mod.Variant, fmt: str,
               out: Path | None, lock: str) -> None:
    """GPU Operator Helm values for Garden Linux nodes (or the Gardener Shoot snippet)."""
    settings = values_mod.ValuesSettings(
        driver_version=driver_version or default_driver_version(variant, load_lock(lock)),
        variant=variant,
        repository=repository,
    )
    data = values_mod.helm_values(settings) if fmt == "helm" else values_mod.shoot_snippet(settings)
    text = values_mod.to_yaml(data)
    if out is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        ui.log.info("wrote %s", out)


@click.command("resolve")
@click.option("--os-release", "os_release", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The node's /etc/os-release.")
@click.option("--kernel", required=True, help="The node's kernel (uname -r).")
@click.option("--values", "values_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Helm values in use (default: what `gl-nvidia values` generates).")
@click.option("--registry", default=None,
              help="Check this repository instead of driver.repository (e.g. a mirror).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@LOCK_OPTION
def resolve_cmd(os_release: Path, kernel: str, values_file: Path | None, registry: str | None,
                as_json: bool, lock: str) -> None:
    """The exact image the GPU Operator pulls for such a node, and whether it exists."""
    from gl_nvidia.deploy.registry import image_exists

    if values_file is not None:
        values = values_mod.load_yaml(_read_text(values_file, "values file"), str(values_file))
    else:
        version = default_driver_version("precompiled", load_lock(lock))
        values = values_mod.helm_values(values_mod.ValuesSettings(version))
    if registry:
        values = {**values, "driver": {**(values.get("driver") or {}), "repository": registry}}
    spec = resolve_mod.DriverSpec.from_values(values)
    node = resolve_mod.node_os(resolve_mod.parse_os_release(_read_text(os_release, "os-release")), kernel, values)
    res = resolve_mod.resolve(spec, node)
    exists = image_exists(res.reference)
    if as_json:
        ui.print_json({**res.as_dict(), "exists": exists, "os_tag": node.os_tag, "kernel": kernel})
    else:
        ui.print_table(None, ["image the operator pulls", "exists"], [[res.reference, "yes" if exists else "NO"]])
    if not exists:
        raise UserError(
            f"{res.reference} does not exist: driver pods on such nodes would sit in ImagePullBackOff",
            "publish it with `gl-nvidia release`, or pin driver.version to a published one",
        )


COMMANDS: list[click.Command] = [values_cmd, resolve_cmd]
