"""`gl-nvidia` commands of the build stage: `build` and `check-modules`."""

from __future__ import annotations

from pathlib import Path

import click

from gl_nvidia import ui
from gl_nvidia.arches import ARCHES, BUILD
from gl_nvidia.bundle import MODULE_TYPES
from gl_nvidia.cli.params import DRIVER_VERSION, KERNEL, SHA256
from gl_nvidia.errors import CheckFailed, UserError
from gl_nvidia.fs import check_writable_dir
from gl_nvidia.modbuild import build_all, bundle_name
from gl_nvidia.modbuild.abi import check_bundle
from gl_nvidia.modbuild.kenv import kernel_release
from gl_nvidia.modbuild.modsign import ModuleSigner, bundle_signatures, load_signer
from gl_nvidia.modbuild.request import exclude_failed as exclude_failed_units
from gl_nvidia.modbuild.request import failures_lock, kernel_request, matrix_request
from gl_nvidia.modbuild.strategy import DRIVER_SOURCES, KERNEL_ENVS, SourceOptions, driver_source
from gl_nvidia.osprofile import PROFILES


def _line(text: str) -> None:
    """One unwrapped line of detail under a table."""
    ui.stdout.print(text, soft_wrap=True)


def module_signer(key: Path | None, cert: Path | None, option: str = "--sign") -> ModuleSigner | None:
    """The checked module signing key pair of `<option>-key` and `<option>-cert` (None: neither given)."""
    if key is None and cert is None:
        return None
    if key is None or cert is None:
        raise UserError(f"{option}-key and {option}-cert go together", "pass the private key and its certificate")
    return load_signer(key, cert)


@click.command("build")
@click.option("--kernel", type=KERNEL, help="Kernel release (uname -r) of one build unit.")
@click.option("--driver", "driver_version", type=DRIVER_VERSION,
              help="Driver version of one build unit (e.g. 535.309.01).")
@click.option("--arch", default=BUILD.debian, show_default=True, type=click.Choice(list(ARCHES)))
@click.option("--os-version", default="12", show_default=True, help="OS version of the one unit (GL version for kmodbuild).")
@click.option("--os-id", default="debian", show_default=True, type=click.Choice(sorted(PROFILES)))
@click.option("--all", "all_units", is_flag=True, help="Build every unit of the matrix (--profile).")
@click.option("--profile", default="debian", show_default=True,
              help="Profile or lock file for --all: 'debian' (embedded), 'gardenlinux' (./versions.yaml) or a path.")
@click.option("--type", "types", multiple=True, type=click.Choice(MODULE_TYPES),
              help="Module type(s) to build (default: both, less what the matrix excludes).")
@click.option("--source", "source_kind", default="debian", show_default=True,
              type=click.Choice(list(DRIVER_SOURCES)), help="Where the driver comes from.")
@click.option("--source-path", help="nvidia: a .run file or URL template ({version}, {machine}; default: NVIDIA's "
              "download site); dir: an unpacked driver tree.")
@click.option("--sha256", type=SHA256, help="nvidia: the .run's expected sha256.")
@click.option("--redist", help="nvidia: the redist tree (URL or directory: NVIDIA's, a mirror) whose "
              "redistrib_<version>.json lists the release's fabric manager, IMEX and nvlsm; each is used only with "
              "the sha256 it lists (default: NVIDIA's tree, or the directory of a local .run).")
@click.option("--env", "env_kind", type=click.Choice(list(KERNEL_ENVS)),
              help="Where kernel headers and compiler come from (default: kmodbuild for Garden Linux locks, else apt).")
@click.option("--kernel-headers", type=click.Path(path_type=Path, file_okay=False),
              help="--env dir: the kernel's build headers directory.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("dist/bundles"),
              show_default=True, help="Bundles are written to OUT/<driver version>-<arch>/.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1), help="Units built in parallel.")
@click.option("--make-jobs", type=click.IntRange(1), help="make -j per unit (default: cores / --jobs).")
@click.option("--keep-debug", is_flag=True, help="Also keep the unstripped modules under debug/.")
@click.option("--sign-key", type=click.Path(path_type=Path, dir_okay=False),
              help="Sign every module for the kernel's module signature check with this PEM private key "
                   "(the kernel's sign-file format; with --sign-cert).")
@click.option("--sign-cert", type=click.Path(path_type=Path, dir_okay=False),
              help="The X.509 certificate (PEM or DER) of --sign-key: the one to enrol on the nodes (MOK).")
@click.option("--exclude-failed", is_flag=True,
              help="Add every failed cell to the lock file's exclusions (with the first compiler error).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def build_cmd(kernel: str | None, driver_version: str | None, arch: str, os_version: str, os_id: str,
              all_units: bool, profile: str, types: tuple[str, ...], source_kind: str, source_path: str | None,
              sha256: str | None, redist: str | None, env_kind: str | None, kernel_headers: Path | None, out: Path, jobs: int,
              make_jobs: int | None, keep_debug: bool, sign_key: Path | None, sign_cert: Path | None,
              exclude_failed: bool, as_json: bool) -> None:
    """Compile NVIDIA kernel modules for one build unit or the whole matrix into driver bundles."""
    signer = module_signer(sign_key, sign_cert)  # a bad key is an error now, not after every compile
    source = driver_source(source_kind, SourceOptions(source_path, sha256, redist))
    if all_units:
        if kernel or driver_version:
            raise UserError("--all builds the matrix; leave out --kernel and --driver")
        request = matrix_request(profile, source, env_kind, kernel_headers)
    else:
        if not kernel:
            raise UserError("say what to build: --kernel K [--driver V], or --all")
        request = kernel_request(kernel, driver_version, arch, os_id, os_version, source, env_kind, kernel_headers)
    lock_file = failures_lock(profile) if exclude_failed else None
    check_writable_dir(out)  # before any compile, not after
    results = [r for unit_source, units in request.by_source()
               for r in build_all(units, out, source=unit_source, env_for=request.env_for, jobs=jobs,
                                  make_jobs=make_jobs, module_types=types or None, keep_debug=keep_debug, signer=signer)]
    if as_json:
        ui.print_json([{"unit": r.unit.as_dict(), "bundle": str(r.bundle),
                        "modules": {t: {"status": o.status, "cached": o.cached, "error": o.error,
                                        "log": str(o.log) if o.log else None,
                                        "fixes": [{"id": f.id, "why": f.why} for f in o.fixes]}
                                    for t, o in r.outcomes.items()},
                         "left_out": dict(r.manifest.left_out) if r.manifest else {}}
                       for r in results])
    else:
        rows = [[r.unit.kernel, r.unit.driver_version, r.unit.arch,
                 *((r.outcomes[t].cell if t in r.outcomes else "-") for t in MODULE_TYPES)] for r in results]
        ui.print_table("build results", ["kernel", "driver", "arch", *MODULE_TYPES], rows)
        for r in results:
            for o in r.outcomes.values():
                if o.status != "ok":
                    _line(f"{r.unit.key} {o.module_type}: {o.error}" + (f" (log: {o.log})" if o.log else ""))
        # what of a source was not NVIDIA's as shipped: once per driver, module type and fix
        fixed = {(r.unit.driver_version, t, f.id): f.why for r in results for t, o in r.outcomes.items() for f in o.fixes}
        for (driver, mtype, fix_id), why in sorted(fixed.items()):
            _line(f"{driver} {mtype}: compatibility fix {fix_id}: {why}")
        # what the image will not carry, once per bundle: an NVSwitch node would miss it
        for bundle_dir, left in sorted({str(r.bundle): r.manifest.left_out for r in results if r.manifest}.items()):
            for component, why in sorted(left.items()):
                _line(f"{Path(bundle_dir).name}: left out {component}: {why}")
    failed = [r for r in results if not r.ok]
    if lock_file is not None and failed:
        ui.log.info("added %d exclusion(s) to %s", exclude_failed_units(lock_file, failed), lock_file)
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(results)} build unit(s) failed",
                        "see the table and logs above; --exclude-failed records them as exclusions")
    ui.log.info("bundles in %s",
                ", ".join(sorted({str(out / bundle_name(u.driver_version, u.arch)) for u in request.units})))


@click.command("check-modules")
@click.argument("bundle", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--kernel-headers", required=True, type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Build headers directory of the kernel to check against (holds .config and Module.symvers).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def check_modules_cmd(bundle: Path, kernel_headers: Path, as_json: bool) -> None:
    """Would the target kernel load this bundle's modules? (vermagic, symbols, modversions CRCs)"""
    verdicts = check_bundle(bundle, kernel_headers)
    signatures = bundle_signatures(bundle)
    if as_json:
        ui.print_json([{"kernel": k, "module_type": t, "ok": g.ok, "problems": list(g.problems),
                        "evidence": list(g.evidence),
                        "signatures": {name: sig.as_dict() if sig else None
                                       for name, sig in signatures.get((k, t), {}).items()}}
                       for (k, t), g in verdicts.items()])
    else:
        ui.print_table(f"ABI gate against {kernel_release(kernel_headers)}", ["built for", "type", "loads", "problems"],
                       [[k, t, "yes" if g.ok else "no", len(g.problems)] for (k, t), g in verdicts.items()])
        for (k, t), g in verdicts.items():
            for p in g.problems[:20]:
                _line(f"{k} {t}: {p}")
            if len(g.problems) > 20:
                _line(f"{k} {t}: ... and {len(g.problems) - 20} more")
            for e in g.evidence:
                _line(f"{k} {t}: {e}")
            for name, sig in signatures.get((k, t), {}).items():
                _line(f"{k} {t}: {name}: {sig.text() if sig else 'unsigned'}")
    bad = [kt for kt, g in verdicts.items() if not g.ok]
    if bad:
        raise CheckFailed(f"{len(bad)} module set(s) would not load on the kernel of {kernel_headers}")


COMMANDS: list[click.Command] = [build_cmd, check_modules_cmd]
