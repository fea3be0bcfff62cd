"""catalog -> build (with its ABI gate) -> image -> push, for every build unit of a profile's matrix.

Incremental by construction: a unit whose tags the registry already holds, each with a manifest built
from the same inputs (`release.inputs`: lock cell, source checksums, base spec, gl-nvidia version), is
skipped before anything is compiled (`force` builds it anyway); the build cache skips compiles already
done, an image whose tags the layout holds with the same inputs is not rebuilt unless its modules were,
and a registry whose tags already point at an image's digest gets no upload at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gl_nvidia
from gl_nvidia import ui
from gl_nvidia.catalog.lock import Lock, Resolved
from gl_nvidia.catalog.matrix import build_matrix, load_lock, lock_matrix, lock_resolved
from gl_nvidia.catalog.model import MODULE_TYPES, BuildUnit, Exclusion, Matrix
from gl_nvidia.errors import UserError
from gl_nvidia.fs import check_writable_dir
from gl_nvidia.image.assemble import BuiltImage, ImageOptions, build_images
from gl_nvidia.image.base import base_for
from gl_nvidia.image.tags import image_tags
from gl_nvidia.modbuild import build_all
from gl_nvidia.modbuild.modsign import ModuleSigner
from gl_nvidia.modbuild.sources import DriverSource
from gl_nvidia.modbuild.strategy import env_for, os_version_of, sources_for
from gl_nvidia.modbuild.unit import UnitResult
from gl_nvidia.oci import Layout, attachment_tag
from gl_nvidia.reference import check_repository
from gl_nvidia.release.inputs import INPUTS_DIGEST, Decision, UnitInputs, decide

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from rich.progress import Progress

    from gl_nvidia.reference import Reference
    from gl_nvidia.registry.client import RegistryClient

log = logging.getLogger(__name__)

IMAGE = "driver"  # the chart's default driver.image


@dataclass(frozen=True)
class UnitReport:
    unit: BuildUnit
    tags: tuple[str, ...]
    digest: str | None
    build: str  # "compiled" | "cached" | "failed" | "skipped" (published with the same inputs)
    image: str  # "built" | "exists" | "-"
    push: str  # "pushed" | "exists" | "-"
    error: str | None = None
    left_out: tuple[tuple[str, str], ...] = ()  # (module type, reason) the matrix excluded for this unit
    reason: str | None = None  # why the unit was built or skipped, when a registry was asked

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        if self.build == "skipped":
            return f"skipped: {self.reason}"
        why = f" ({self.reason})" if self.reason else ""
        return f"build {self.build}, image {self.image}" + (f", {self.push}" if self.push != "-" else "") + why

    def as_dict(self) -> dict[str, Any]:
        return {"unit": self.unit.as_dict(), "tags": list(self.tags), "digest": self.digest, "build": self.build,
                "image": self.image, "push": self.push, "error": self.error, "reason": self.reason,
                "left_out": [{"module_type": t, "reason": r} for t, r in self.left_out]}


@dataclass(frozen=True)
class ReleaseResult:
    units: tuple[UnitReport, ...]
    layout: Path
    repository: str | None  # where images were pushed (driver.repository), None for --out only
    compiled: int  # module sets compiled in this run
    blobs_uploaded: int
    manifests_pushed: int
    lock: Lock
    matrix: Matrix
    resolved: Resolved  # the catalog the matrix came from (the lock's, or resolved now for a profile)
    signed: int = 0  # signatures added (release --sign-key)

    @property
    def ok(self) -> bool:
        return all(u.ok for u in self.units)

    @property
    def values_branch(self) -> str | None:
        """driver.version for the values written after the release: the newest branch that has images."""
        branches = [u.unit.driver_branch for u in self.units if u.ok]
        return max(branches, key=int) if branches else None


def _left_out(unit: BuildUnit, excluded: Sequence[Exclusion]) -> tuple[tuple[str, str], ...]:
    """The module types the matrix dropped from a unit's cells, with the reason (once per type)."""
    out: dict[str, str] = {}
    for e in excluded:
        if (e.cell.kernel, e.cell.driver_version, e.cell.arch) == (unit.kernel, unit.driver_version, unit.arch):
            for t in e.module_types:
                if t not in unit.module_types:
                    out.setdefault(t, e.reason)
    return tuple(out.items())


def _module_choice(types: Sequence[str]) -> str:
    return "both" if set(types) == set(MODULE_TYPES) else types[0]


def _build_state(result: UnitResult) -> tuple[str, str | None]:
    failed = [o for o in result.outcomes.values() if o.status != "ok"]
    built = [o for o in result.outcomes.values() if o.status == "ok"]
    if not built:
        errors = list(dict.fromkeys(o.error or "failed" for o in failed))  # both types often fail alike
        if len(errors) == 1:
            return "failed", errors[0]
        return "failed", "; ".join(f"{o.module_type}: {o.error}" for o in failed) or "nothing built"
    if failed:  # one type failed its compile or the ABI gate: ship the other, say so
        log.warning("%s: %s", result.unit.key, "; ".join(f"{o.module_type} failed: {o.error}" for o in failed))
    return ("cached" if all(o.cached for o in built) else "compiled"), None


def unit_inputs(lock: Lock, unit: BuildUnit, source: Callable[[BuildUnit], DriverSource],
                module_cert: str = "") -> UnitInputs:
    """A unit's inputs, from the lock, the source's index and the base spec: nothing is downloaded but the
    source's index (Debian's signed apt index; NVIDIA's redistrib_<version>.json, a few KB).
    `module_cert`: the module signing certificate's sha256 ("": modules unsigned)."""
    return UnitInputs(unit.as_dict(), source(unit).checksums(unit.driver_version, unit.arch),
                      base_for(lock, unit.arch, os_version_of(unit)).key(), gl_nvidia.__version__, module_cert)


def plan(profile: str | Path, registry: str, *, force: bool = False, module_cert: str = ""
         ) -> list[tuple[BuildUnit, UnitInputs | None, Decision]]:
    """What `release` would build and skip, and why, without building anything (the publish workflow's fan-out)."""
    _target(registry)
    lock = load_lock(profile)
    units = lock_matrix(lock).units
    inputs = _all_inputs(lock, units, sources_for(lock), module_cert)
    with ui.progress() as prog:
        decisions = _decide(units, inputs, registry, force, {}, prog)
    return [(u, inputs[u], decisions[u]) for u in units]


def _all_inputs(lock: Lock, units: Sequence[BuildUnit], source: Callable[[BuildUnit], DriverSource],
                module_cert: str = "") -> dict[BuildUnit, UnitInputs | None]:
    inputs: dict[BuildUnit, UnitInputs | None] = {}
    for u in units:
        try:
            inputs[u] = unit_inputs(lock, u, source, module_cert)
        except UserError as exc:  # the build says the same for this unit alone, with the others built
            log.warning("%s: inputs unknown before the build: %s", u.key, exc.message)
            inputs[u] = None
    return inputs


def release(
    profile: str | Path,
    out: Path,
    registry: str | None = None,
    *,
    jobs: int = 1,
    sign_key: Path | None = None,
    module_signer: ModuleSigner | None = None,
    force: bool = False,
) -> ReleaseResult:
    """Run the whole pipeline for `profile` into `out` (bundles/, oci/) and, with `registry`
    (`HOST[:PORT]/PATH`, the values' driver.repository), push every image with its SBOM to
    `<registry>/driver`, and sign each with `sign_key` (cosign's format). `module_signer` signs every
    module for the kernel's module signature check (its certificate is one of each unit's inputs).

    With `registry`, a unit already published there from the same inputs is skipped before its build
    (`force`: built and pushed anyway); the report says why each unit was built or skipped."""
    if registry is not None:  # a typo in --registry is an error now, not after every compile
        check_repository(registry, IMAGE)  # it becomes driver.repository in the values written at the end
        _target(registry)
    check_writable_dir(out)  # likewise an --out that cannot hold the result
    key = None
    if sign_key is not None:
        from gl_nvidia.registry.sign import load_private_key

        if registry is None:
            raise UserError("--sign-key signs pushed images", "pass --registry too")
        key = load_private_key(sign_key)  # a bad key is an error now, not after every compile
    lock = load_lock(profile)
    resolved = lock_resolved(lock)
    matrix = build_matrix(lock.os.id, resolved, lock.policy.exclusions)
    if not matrix.units:
        raise UserError(f"the matrix of {profile} has no build units", "check the lock's policy and exclusions")
    bundles, layout_dir = out / "bundles", out / "oci"
    source = sources_for(lock)
    inputs = _all_inputs(lock, matrix.units, source, module_signer.cert_sha256 if module_signer else "")
    reports: dict[BuildUnit, UnitReport] = {}
    decisions: dict[BuildUnit, Decision] = {}
    with ui.progress() as prog:
        if registry is not None:
            decisions = _decide(matrix.units, inputs, registry, force, reports, prog)
        todo = [u for u in matrix.units if u not in reports]
        results: list[UnitResult] = []
        if todo:
            with ui.task(prog, f"build {len(todo)} unit(s)"):
                envs = env_for(lock)
                for version in dict.fromkeys(os_version_of(u) for u in todo):  # one driver source per OS version
                    group = [u for u in todo if os_version_of(u) == version]
                    results += build_all(group, bundles, source=source(group[0]), env_for=envs, jobs=jobs,
                                         signer=module_signer)
        compiled = sum(1 for r in results for o in r.outcomes.values() if o.status == "ok" and not o.cached)
        images = _images(lock, results, layout_dir, reports, inputs, prog)
        pushed = (0, 0, 0)
        if registry is not None and images:
            movable = {u for u, d in decisions.items() if d.replace}
            pushed = _push(images, layout_dir, registry, reports, movable, prog, key)
    ordered = tuple(replace(reports[u], left_out=_left_out(u, matrix.excluded),
                            reason=decisions[u].reason if u in decisions else None)
                    for u in matrix.units)
    blobs, manifests, signed = pushed
    return ReleaseResult(ordered, layout_dir, registry, compiled, blobs_uploaded=blobs, manifests_pushed=manifests,
                         lock=lock, matrix=matrix, resolved=resolved, signed=signed)


def _tags(unit: BuildUnit) -> tuple[str, ...]:
    return tuple(image_tags(unit.driver_version, unit.driver_branch, unit.kernel, unit.os_id, unit.os_versions))


def _decide(units: Sequence[BuildUnit], inputs: Mapping[BuildUnit, UnitInputs | None], registry: str, force: bool,
            reports: dict[BuildUnit, UnitReport], prog: Progress | None) -> dict[BuildUnit, Decision]:
    """Ask the registry what each unit's tags hold; a unit to skip gets its report now."""
    from gl_nvidia.registry.transfer import ClientOptions

    ref = _target(registry)
    decisions: dict[BuildUnit, Decision] = {}
    with ClientOptions(retries=2).client(ref.host) as client, ui.task(prog, f"ask {ref.repository} what is published",
                                                                         total=len(units)) as t:
        for unit in units:
            wanted = inputs[unit]
            if wanted is None:
                decisions[unit] = Decision(True, "inputs unknown before the build")
                t.advance(1)
                continue
            manifests = {tag: client.get_manifest(ref.repo, tag) for tag in _tags(unit)}
            decision = decide(wanted, {tag: m.annotations if m else None for tag, m in manifests.items()}, force)
            decisions[unit] = decision
            if not decision.build:
                digests = {m.digest for m in manifests.values() if m is not None}
                digest = next(iter(digests)) if len(digests) == 1 else None
                reports[unit] = UnitReport(unit, _tags(unit), digest, "skipped", "-", "exists")
            t.advance(1)
    return decisions


def _images(lock: Lock, results: list[UnitResult], layout_dir: Path, reports: dict[BuildUnit, UnitReport],
            inputs: Mapping[BuildUnit, UnitInputs | None],
            prog: Progress | None) -> list[tuple[BuildUnit, BuiltImage | None, tuple[str, ...], str]]:
    """Build (or find in the layout) each unit's image. Returns (unit, image or None, tags, digest)."""
    layout = Layout.open(layout_dir) if (layout_dir / "index.json").exists() else None
    existing = layout.tags() if layout is not None else {}
    todo: dict[tuple[Path, ImageOptions, str], list[BuildUnit]] = {}
    found: list[tuple[BuildUnit, BuiltImage | None, tuple[str, ...], str]] = []
    states: dict[BuildUnit, str] = {}
    for r in results:
        unit = r.unit
        state, error = _build_state(r)
        states[unit] = state
        tags = _tags(unit)
        if error is not None:
            reports[unit] = UnitReport(unit, tags, None, "failed", "-", "-", error)
            continue
        digests = {existing.get(t) for t in tags}
        wanted = inputs.get(unit)
        if state == "cached" and len(digests) == 1 and None not in digests:
            digest = next(iter(digests))
            assert digest is not None and layout is not None
            recorded = layout.manifest(digest).annotations.get(INPUTS_DIGEST)
            if wanted is None or recorded == wanted.digest:
                found.append((unit, None, tags, digest))
                reports[unit] = UnitReport(unit, tags, digest, state, "exists", "-")
                continue
        built_types = tuple(t for t, o in r.outcomes.items() if o.status == "ok")
        opts = ImageOptions(module_types=_module_choice(built_types), os_id=unit.os_id, os_versions=unit.os_versions)
        todo.setdefault((r.bundle, opts, os_version_of(unit)), []).append(unit)
    with ui.task(prog, f"images for {sum(len(u) for u in todo.values())} unit(s)"):
        for (bundle, opts, os_version), units in todo.items():
            arch = units[0].arch
            annotations = {u.kernel: w.annotations() for u in units if (w := inputs.get(u)) is not None}
            try:
                built = build_images(bundle, [u.kernel for u in units], layout_dir,
                                     base=base_for(lock, arch, os_version), options=opts, annotations=annotations)
            except UserError as exc:
                for u in units:
                    reports[u] = UnitReport(u, (), None, states[u], "-", "-", exc.message)
                continue
            for u, img in zip(units, built, strict=True):
                found.append((u, img, img.tags, img.digest))
                reports[u] = UnitReport(u, img.tags, img.digest, states[u], "built", "-")
    return found


def _target(registry: str) -> Reference:
    """`<registry>/driver`, the repository release pushes to."""
    from gl_nvidia.reference import Reference

    ref = Reference.parse(f"{registry.rstrip('/')}/{IMAGE}")
    if ref.tag or ref.digest:
        raise UserError(f"--registry {registry} must be a repository path without tag or digest",
                        "e.g. --registry registry.example:5000/gl-nvidia")
    return ref


def _push(images: list[tuple[BuildUnit, BuiltImage | None, tuple[str, ...], str]], layout_dir: Path, registry: str,
          reports: dict[BuildUnit, UnitReport], movable: set[BuildUnit], prog: Progress | None,
          key: EllipticCurvePrivateKey | None) -> tuple[int, int, int]:
    from gl_nvidia.registry.transfer import ClientOptions, copy_image

    ref = _target(registry)
    layout = Layout.open(layout_dir)
    blobs = manifests = signed = 0
    with ClientOptions(retries=2).client(ref.host) as client, ui.task(prog, f"push to {ref.repository}",
                                                                         total=len(images)) as t:
        for unit, _img, tags, digest in images:
            current = {tag: client.manifest_digest(ref.repo, tag) for tag in tags}
            if all(d == digest for d in current.values()):
                reports[unit] = replace(reports[unit], push="exists")
                try:
                    signed += _attach(client, ref.repo, layout, digest, key)
                except UserError as exc:
                    reports[unit] = replace(reports[unit], error=exc.message)
                t.advance(1)
                continue
            manifest = layout.manifest(digest)
            # Branch tags follow the branch's newest release by design; a full-version tag moves only where
            # _decide found it holding an image of other (or unrecorded) inputs, or --force said so.
            branch_tags = tuple(tag for tag in tags if tag.startswith(f"{unit.driver_branch}-"))
            fixed = tuple(tag for tag in tags if tag not in branch_tags)
            try:
                for group, force in ((fixed, unit in movable), (branch_tags, True)):
                    if group and any(current[tag] != digest for tag in group):
                        result = copy_image(manifest, lambda b, _s: layout.blob_path(b.digest), client, ref.repo,
                                            group, force=force)
                        blobs += result.uploaded
                        manifests += 1
                signed += _attach(client, ref.repo, layout, digest, key)
                reports[unit] = replace(reports[unit], push="pushed")
            except UserError as exc:
                reports[unit] = replace(reports[unit], push="-", error=exc.message)
            t.advance(1)
    return blobs, manifests, signed


def _attach(client: RegistryClient, repo: str, layout: Layout, digest: str,
            key: EllipticCurvePrivateKey | None) -> int:
    """The image's SBOM from the layout (its referrer, tagged for registries without the referrers API)
    and, with a key, its signature; returns the signatures added (0 or 1)."""
    from gl_nvidia.registry.sign import sign_digest
    from gl_nvidia.registry.transfer import copy_image

    tag = attachment_tag(digest, "sbom")
    sbom = layout.tags().get(tag)
    if sbom is not None and client.manifest_digest(repo, tag) != sbom:
        copy_image(layout.manifest(sbom), lambda b, _s: layout.blob_path(b.digest), client, repo, [tag], force=True)
    return int(sign_digest(client, repo, digest, key).added) if key is not None else 0
