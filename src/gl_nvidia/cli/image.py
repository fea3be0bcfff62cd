"""`gl-nvidia` commands of the image stage: `image` (bundle -> OCI layout), `push`, `mirror`, `sign`,
`verify-image`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from gl_nvidia import ui
from gl_nvidia.arches import ARCHES
from gl_nvidia.catalog.feeds import version_key
from gl_nvidia.cli.params import KERNEL
from gl_nvidia.errors import UserError
from gl_nvidia.image import base as base_mod
from gl_nvidia.image.assemble import (
    MODULE_TYPE_CHOICES,
    ImageOptions,
    build_images,
    read_bundle_manifest,
)
from gl_nvidia.oci import LayoutBase
from gl_nvidia.registry.transfer import PushResult, helm_repository_line, mirror, push


@click.command("image")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--kernel", "kernels", multiple=True, type=KERNEL, help="Kernel (uname -r) to build an image for; repeatable.")
@click.option("--all", "all_kernels", is_flag=True, help="One image per kernel in the bundle.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/images"), show_default=True,
              help="OCI image layout directory (created, or added to).")
@click.option("--base", help="Existing base image: OCI layout dir[:tag] or REGISTRY/REPO:TAG (default: mmdebstrap).")
@click.option("--gardenlinux-repo", metavar="URL",
              help="Build the base from this Garden Linux apt repository (needs --gl-version) instead of Debian's.")
@click.option("--module-types", type=click.Choice(sorted(MODULE_TYPE_CHOICES)), default="both", show_default=True)
@click.option("--os-id", help="Node OS id (NFD system-os_release.ID; default: the one the bundle records, which "
              "this may only repeat).")
@click.option("--gl-version", "os_versions", multiple=True,
              help="GL version (or, for other --os-id, VERSION_ID) this kernel ships in; repeatable (default: the "
                   "ones the bundle records).")
@click.option("--source-url", help="org.opencontainers.image.source label.")
@click.option("--revision", help="org.opencontainers.image.revision label (git commit).")
@click.option("--inputs", "inputs_text", metavar="JSON",
              help="The unit's inputs as `release --plan` printed them, recorded as manifest annotations "
                   "(one --kernel).")
@click.option("--json", "as_json", is_flag=True, help="Print the built images as JSON.")
def image_cmd(
    bundle: Path, kernels: tuple[str, ...], all_kernels: bool, out: Path, base: str | None,
    gardenlinux_repo: str | None, module_types: str, os_id: str | None, os_versions: tuple[str, ...],
    source_url: str | None, revision: str | None, inputs_text: str | None, as_json: bool,
) -> None:
    """Build driver images from BUNDLE into an OCI image layout, without a container engine."""
    from gl_nvidia.release.inputs import annotations_from_text

    if bool(kernels) == all_kernels:
        raise UserError("pass --kernel K (repeatable) or --all")
    annotations = None
    if inputs_text is not None:
        if len(kernels) != 1:
            raise UserError("--inputs describes one build unit", "pass exactly one --kernel with it")
        try:
            annotations = {kernels[0]: annotations_from_text(inputs_text)}
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--inputs is not what `release --plan` prints: {exc}") from exc
    chosen: str | base_mod.BaseSpec | LayoutBase | None = base
    if gardenlinux_repo:
        if base or not os_versions:
            raise UserError("--gardenlinux-repo needs --gl-version and no --base")
        # The newest GL version's repository, as release builds it.
        newest = max(os_versions, key=version_key)
        chosen = base_mod.gardenlinux_spec(gardenlinux_repo, newest, read_bundle_manifest(bundle).arch)
    with tempfile.TemporaryDirectory(prefix="gl-nvidia-base-") as tmp:
        if base and not LayoutBase.split(base)[0].is_dir():
            from gl_nvidia.registry.transfer import (
                pull_base,  # only a registry base needs the client
            )

            chosen = pull_base(base, Path(tmp), ARCHES[read_bundle_manifest(bundle).arch].oci)
        images = build_images(
            bundle, None if all_kernels else list(kernels), out, base=chosen,
            options=ImageOptions(module_types, os_id, os_versions, source_url, revision), annotations=annotations,
        )
    if as_json:
        ui.print_json([i.as_dict() for i in images])
        return
    ui.print_table(f"images in {out}", ["kernel", "digest", "size MB", "modules", "tags"],
                   [(i.kernel, i.digest[:19], f"{i.size / 1e6:.1f}", ",".join(i.module_types), list(i.tags))
                    for i in images])


@click.command("push")
@click.argument("layout", type=click.Path(path_type=Path))
@click.argument("target")
@click.option("--force", is_flag=True, help="Move tags that already point to other content.")
@click.option("--plain-http", is_flag=True, default=None, help="Talk HTTP, not HTTPS (default only for loopback).")
@click.option("--json", "as_json", is_flag=True)
def push_cmd(layout: Path, target: str, force: bool, plain_http: bool | None, as_json: bool) -> None:
    """Push the images of an OCI LAYOUT to TARGET (REGISTRY/REPO, or REGISTRY/REPO:TAG for one)."""
    from gl_nvidia.registry.transfer import ClientOptions

    _report(push(layout, target, force=force, options=ClientOptions(plain_http=plain_http)), as_json)


@click.command("mirror")
@click.argument("source")
@click.argument("destination")
@click.option("--driver-branch", help="Only this driver branch's tags (e.g. 535).")
@click.option("--force", is_flag=True, help="Move destination tags that point to other content.")
@click.option("--plain-http", is_flag=True, default=None, help="Talk HTTP, not HTTPS (default only for loopback).")
@click.option("--component", metavar="NAME:VERSION",
              help="Copy this OCM component version (what `release --version` pushes) with every image it lists; "
                   "SOURCE and DESTINATION are then OCM repositories (REGISTRY/PATH).")
@click.option("--key", "key_path", type=click.Path(path_type=Path, dir_okay=False),
              help="With --component: verify each signed image's copy with this public key (cosign.pub).")
@click.option("--json", "as_json", is_flag=True)
def mirror_cmd(source: str, destination: str, driver_branch: str | None, force: bool,
               plain_http: bool | None, component: str | None, key_path: Path | None, as_json: bool) -> None:
    """Copy driver images from SOURCE to DESTINATION repository (air-gapped sites), or a whole OCM component."""
    if component is not None or key_path is not None:
        _mirror_component(source, destination, component, key_path, driver_branch, force, plain_http, as_json)
        return
    from gl_nvidia.registry.transfer import ClientOptions

    results = mirror(source, destination, driver_branch=driver_branch, force=force,
                     options=ClientOptions(plain_http=plain_http))
    if as_json:
        ui.print_json({"images": [r.as_dict() for r in results], "helm_set": helm_repository_line(destination)})
        return
    _report(results, as_json=False)
    click.echo(f"GPU Operator: helm ... {helm_repository_line(destination)}")


def _mirror_component(source: str, destination: str, component: str | None, key_path: Path | None,
                      driver_branch: str | None, force: bool, plain_http: bool | None, as_json: bool) -> None:
    from gl_nvidia.registry.sign import load_public_key
    from gl_nvidia.registry.transfer import ClientOptions
    from gl_nvidia.release.ocm import mirror_component

    if component is None:
        raise UserError("--key verifies the images of a component", "pass --component NAME:VERSION too")
    if driver_branch is not None:
        raise UserError("--component copies the whole component", "leave out --driver-branch")
    public = load_public_key(key_path) if key_path is not None else None
    copied = mirror_component(source, destination, component, public_key=public, force=force,
                              options=ClientOptions(plain_http=plain_http))
    if as_json:
        ui.print_json(copied.as_dict())
        return
    ui.print_table(f"component {copied.component}", ["resource", "copy", "blobs sent", "signature"],
                   [[f"{r.name} {' '.join(r.identity.values())}", r.destination, str(r.uploaded), r.signature]
                    for r in copied.resources])
    click.echo(f"component descriptor: {copied.descriptor}")


@click.command("sign")
@click.argument("images", nargs=-1, required=True)
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path),
              help="ECDSA P-256 private key, unencrypted PEM (PKCS#8 or SEC1).")
@click.option("--plain-http", is_flag=True, default=None, help="Talk HTTP, not HTTPS (default only for loopback).")
@click.option("--json", "as_json", is_flag=True)
def sign_cmd(images: tuple[str, ...], key_path: Path, plain_http: bool | None, as_json: bool) -> None:
    """Sign pushed IMAGES (REGISTRY/REPO:TAG or @DIGEST) the way `cosign sign --key` does: the digest is signed."""
    from gl_nvidia.reference import Reference
    from gl_nvidia.registry.sign import load_private_key, sign_digest
    from gl_nvidia.registry.transfer import ClientOptions

    key = load_private_key(key_path)  # a key problem is one error line before anything is asked of a registry
    refs = [Reference.parse(i) for i in images]
    results = []
    for ref in refs:
        with ClientOptions(plain_http=plain_http).client(ref.host) as client:
            manifest = client.get_manifest(ref.repo, ref.digest or ref.tag or "latest")
            if manifest is None:
                raise UserError(f"image {ref} not found", "push it before signing it")
            results.append(sign_digest(client, ref.repo, manifest.digest, key))
    if as_json:
        ui.print_json([r.as_dict() for r in results])
        return
    ui.print_table(None, ["image", "signature"],
                   [(r.reference, "added" if r.added else "already signed by this key") for r in results])


@click.command("verify-image")
@click.argument("image")
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path),
              help="The signer's public key (PEM; cosign.pub works as it is).")
@click.option("--plain-http", is_flag=True, default=None, help="Talk HTTP, not HTTPS (default only for loopback).")
@click.option("--json", "as_json", is_flag=True)
def verify_image_cmd(image: str, key_path: Path, plain_http: bool | None, as_json: bool) -> None:
    """Check IMAGE carries a cosign signature by KEY of its exact digest (exit 1 if not)."""
    from gl_nvidia.reference import Reference
    from gl_nvidia.registry.sign import load_public_key, verify_image
    from gl_nvidia.registry.transfer import ClientOptions

    public = load_public_key(key_path)
    ref = Reference.parse(image)
    with ClientOptions(plain_http=plain_http).client(ref.host) as client:
        result = verify_image(client, ref, public)
    if as_json:
        ui.print_json(result.as_dict())
        return
    click.echo(f"{result.reference}: {result.signatures} valid signature(s) by this key "
               f"(signed as {result.identity or 'no identity'})")


def _report(results: list[PushResult], as_json: bool) -> None:
    if as_json:
        ui.print_json([r.as_dict() for r in results])
        return
    ui.print_table(None, ["repository", "digest", "uploaded", "skipped", "mounted", "MB sent", "tags"],
                   [(r.repository, r.digest[:19], r.uploaded, r.skipped, r.mounted, f"{r.bytes_uploaded / 1e6:.1f}",
                     list(r.tags)) for r in results])


COMMANDS: list[click.Command] = [image_cmd, push_cmd, mirror_cmd, sign_cmd, verify_image_cmd]
