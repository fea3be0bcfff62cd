"""`gl-nvidia` commands of the deploy stage: values, resolve, preflight, verify."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from gl_nvidia import ui
from gl_nvidia.catalog.matrix import load_lock
from gl_nvidia.cli.params import KERNEL
from gl_nvidia.deploy import resolve as resolve_mod
from gl_nvidia.deploy import values as values_mod
from gl_nvidia.deploy.pins import default_driver_version, generated_values
from gl_nvidia.errors import CheckFailed, UserError
from gl_nvidia.fs import atomic_write_text

if TYPE_CHECKING:
    from gl_nvidia.deploy.preflight import CheckResult

LOCK_OPTION = click.option(
    "--lock", default="gardenlinux", show_default=True,
    help="Lock file naming the tracked driver branches and pins, or a profile: gardenlinux "
         "(./versions.yaml), debian (embedded).")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                        "pass the text file itself") from exc


@click.command("values")
@click.option("--repository", default=values_mod.DEFAULT_REPOSITORY, show_default=True,
              help="Registry path holding the driver images (driver.repository).")
@click.option("--driver-branch", "driver_version", default=None,
              help="driver.version: a branch (590) or a full version (590.48.01). "
                   "Default: the newest tracked branch.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here (atomically) instead of stdout.")
@LOCK_OPTION
def values_cmd(repository: str, driver_version: str | None, out: Path | None, lock: str) -> None:
    """GPU Operator Helm values for Garden Linux nodes."""
    settings = values_mod.ValuesSettings(
        driver_version=driver_version or default_driver_version(load_lock(lock)),
        repository=repository,
    )
    text = values_mod.to_yaml(values_mod.helm_values(settings))
    if out is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        ui.log.info("wrote %s", out)


@click.command("resolve")
@click.option("--os-release", "os_release", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The node's /etc/os-release.")
@click.option("--kernel", required=True, type=KERNEL, help="The node's kernel (uname -r).")
@click.option("--values", "values_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Helm values in use (default: what `gl-nvidia values` generates).")
@click.option("--registry", default=None,
              help="Check this repository instead of driver.repository (e.g. a mirror).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@LOCK_OPTION
def resolve_cmd(os_release: Path, kernel: str, values_file: Path | None, registry: str | None,
                as_json: bool, lock: str) -> None:
    """The exact image the GPU Operator pulls for such a node, and whether it exists."""
    from gl_nvidia.deploy.imagecheck import image_exists
    from gl_nvidia.reference import Reference

    if values_file is not None:
        values = values_mod.load_yaml(_read_text(values_file, "values file"), str(values_file))
    else:
        values = generated_values(load_lock(lock))
    if registry:
        values = {**values, "driver": {**(values.get("driver") or {}), "repository": registry}}
    spec = resolve_mod.DriverSpec.from_values(values)
    node = resolve_mod.node_os(resolve_mod.parse_os_release(_read_text(os_release, "os-release")), kernel, values)
    res = resolve_mod.resolve(spec, node)
    Reference.parse(res.reference)  # decided before anything is printed: stdout never holds a refused reference
    exists: bool | None = None
    try:
        exists = image_exists(res.reference)
    finally:  # the reference is worth showing even when the registry cannot be asked
        if as_json:
            ui.print_json({**res.as_dict(), "exists": exists, "os_tag": node.os_tag, "kernel": kernel})
        else:  # one value: a plain line (no table truncates it) that scripts can take as it is
            click.echo(res.reference)
            click.echo(f"exists: {({True: 'yes', False: 'NO', None: 'unknown'})[exists]}", err=True)
    if not exists:
        raise CheckFailed(
            f"{res.reference} does not exist: driver pods on such nodes would sit in ImagePullBackOff",
            "publish it with `gl-nvidia release`, or pin driver.version to a published one",
        )


def _print_checks(title: str, results: list[CheckResult], as_json: bool, subject: str | None) -> None:
    """`subject`: the first column's name (node), or None when the tag says it all (plan rows)."""
    if as_json:
        ui.print_json([r.as_dict() for r in results])
        return
    # One repository for all rows (the usual case): name it once and show tags, so rows fit a terminal.
    repos = {r.reference.rpartition(":")[0] for r in results if r.reference and "@" not in r.reference}
    short = len(repos) == 1
    if short:
        title += f" in {next(iter(repos))}"
    rows = []
    for r in results:
        image = r.reference.rpartition(":")[2] if short and r.reference else r.reference or "-"
        rows.append(([r.subject] if subject else []) + [image, r.status, (r.digest or "")[:19]])
    ui.print_table(title, ([subject] if subject else []) + ["tag" if short else "image", "status", "digest"], rows)


@click.command("preflight")
@click.option("--gl-version", "os_version", default=None,
              help="The OS version nodes will be upgraded to (Garden Linux MAJOR.MINOR[.PATCH]).")
@click.option("--registry", default=None,
              help="Repository holding the driver images, i.e. driver.repository (default: the ClusterPolicy's; "
                   f"without --kubeconfig {values_mod.DEFAULT_REPOSITORY}).")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Check the live cluster's GPU nodes and ClusterPolicy instead of the lock's plan.")
@click.option("--context", default=None, help="kubeconfig context (default: its current-context).")
@click.option("--cloudprofile", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A Gardener CloudProfile (kubectl get cloudprofile NAME -o yaml): check every Garden Linux "
                   "version it offers and has not expired, on each arch it lists.")
@click.option("--shoot", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A Gardener Shoot (kubectl get shoot NAME -o yaml): check each GPU worker pool's Garden Linux "
                   "version and arch (GPU pools: machine types --cloudprofile lists with GPUs).")
@click.option("--values", "values_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --cloudprofile/--shoot: only the driver these Helm values deploy (default: every tracked "
                   "branch).")
@LOCK_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def preflight_cmd(os_version: str | None, registry: str | None, kubeconfig: Path | None, context: str | None,
                  cloudprofile: Path | None, shoot: Path | None, values_file: Path | None, lock: str,
                  as_json: bool) -> None:
    """Will every GPU node still find its driver image after upgrading to --gl-version (or on every Garden Linux
    version a Gardener CloudProfile offers, or on each GPU pool of a Shoot)? Exit 1 if not."""
    from gl_nvidia.deploy import preflight
    from gl_nvidia.deploy.imagecheck import ImageChecker
    from gl_nvidia.deploy.pins import resolved

    if cloudprofile is not None or shoot is not None:
        if os_version is not None or kubeconfig is not None:
            raise UserError("--cloudprofile and --shoot name the versions to check; --gl-version and --kubeconfig "
                            "cannot be combined with them", "run one check at a time")
        _gardener_preflight(cloudprofile, shoot, registry, values_file, lock, as_json)
        return
    if values_file is not None:
        raise UserError("--values is read with --cloudprofile or --shoot",
                        "the plan checks every tracked branch; --kubeconfig reads the cluster's ClusterPolicy")
    if kubeconfig is None and os_version is None:
        raise UserError("preflight needs --gl-version (the plan for an OS version) or --kubeconfig (a live cluster)")
    lk = load_lock(lock)
    res = resolved(lk)
    kernels = preflight.kernels_for(lk, res, os_version) if os_version else None
    with ImageChecker() as checker:
        if kubeconfig is None:
            assert os_version is not None and kernels is not None
            repository = registry or values_mod.DEFAULT_REPOSITORY
            targets = preflight.plan_targets(lk, res, os_version, kernels)
            results = preflight.check_targets(targets, repository, values_mod.DEFAULT_IMAGE, checker)
            title = f"driver images for {lk.os.id} {os_version}"
        else:
            from gl_nvidia.deploy.kube import Kube
            from gl_nvidia.deploy.nodes import gpu_nodes

            kube = Kube(kubeconfig, context)
            nodes = gpu_nodes(kube.nodes(), kube.server)
            spec = preflight.cluster_spec(kube.cluster_policies(), lk, registry)
            upgrade = (os_version, kernels) if os_version and kernels else None
            results = preflight.check_nodes(nodes, spec, checker, upgrade)
            title = f"driver images for the GPU nodes of {kube.server}"
    _print_checks(title, results, as_json, None if kubeconfig is None else "node")
    preflight.raise_if_missing(results)


def _gardener_preflight(cloudprofile: Path | None, shoot: Path | None, registry: str | None,
                        values_file: Path | None, lock: str, as_json: bool) -> None:
    from datetime import UTC, datetime

    from gl_nvidia.deploy import gardener, preflight
    from gl_nvidia.deploy.imagecheck import ImageChecker
    from gl_nvidia.deploy.pins import resolved

    now = datetime.now(UTC)
    profile = (gardener.parse_cloudprofile(_read_text(cloudprofile, "CloudProfile"), str(cloudprofile), now)
               if cloudprofile is not None else None)
    cluster = gardener.parse_shoot(_read_text(shoot, "Shoot"), str(shoot)) if shoot is not None else None
    lk = load_lock(lock)
    preflight.check_gardenlinux(lk)  # before a profile without `resolved` is resolved from its sources
    res = resolved(lk)
    wanted = preflight.Wanted(registry or values_mod.DEFAULT_REPOSITORY)
    if values_file is not None:
        spec = resolve_mod.DriverSpec.from_values(
            values_mod.load_yaml(_read_text(values_file, "values file"), str(values_file)))
        if not spec.use_precompiled or not spec.version:
            raise UserError(f"{values_file} does not deploy precompiled driver images (driver.usePrecompiled, "
                            "driver.version)", "pass the values `gl-nvidia values` writes")
        wanted = preflight.Wanted(registry or spec.repository, spec.image, spec.version)
    with ImageChecker() as checker:
        if cluster is not None:
            results = preflight.shoot_results(cluster, profile, lk, res, wanted, checker)
            title, subject = f"driver images for the GPU worker pools of Shoot {cluster.name}", "pool"
        else:
            assert profile is not None
            results = preflight.cloudprofile_results(profile, lk, res, wanted, checker)
            title, subject = f"driver images for the Garden Linux versions of CloudProfile {profile.name}", "version"
    _print_checks(title, results, as_json, subject)
    preflight.raise_if_missing(results)


@click.command("verify")
@click.option("--kubeconfig", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--context", default=None, help="kubeconfig context (default: its current-context).")
@click.option("--node", default=None, help="Only this node (default: every GPU node).")
@click.option("--namespace", default="default", show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds to wait for the pods (the first pull of the sample image takes a while).")
@click.option("--image", default=None, help="The vectorAdd sample image (a mirror in air-gapped clusters).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_cmd(kubeconfig: Path, context: str | None, node: str | None, namespace: str, timeout_s: float,
               image: str | None, as_json: bool) -> None:
    """Run the CUDA vectorAdd sample on each GPU node and report "Test PASSED" per node."""
    from gl_nvidia.deploy.kube import Kube
    from gl_nvidia.deploy.nodes import gpu_nodes
    from gl_nvidia.deploy.verify import VECTORADD_IMAGE, verify_nodes

    kube = Kube(kubeconfig, context)
    nodes = gpu_nodes(kube.nodes(), kube.server, only=node)
    results = verify_nodes(kube, [n.name for n in nodes], namespace, timeout_s, image=image or VECTORADD_IMAGE,
                           on_result=lambda r: ui.log.info("%s: %s", r.node, r.status))
    if as_json:
        ui.print_json([r.as_dict() for r in results])
    else:
        ui.print_table("CUDA vectorAdd per node", ["node", "result", "detail"],
                       [[r.node, r.status, r.detail] for r in results])
    failed = [r.node for r in results if r.status != "PASSED"]
    if failed:
        raise CheckFailed(f"vectorAdd did not pass on {', '.join(failed)}",
                            "see the detail column; `kubectl -n gpu-operator get pods` shows the driver's state")


COMMANDS: list[click.Command] = [values_cmd, resolve_cmd, preflight_cmd, verify_cmd]
