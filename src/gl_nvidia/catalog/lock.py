"""The lock file `versions.yaml`: policy, sources and what was resolved from them.

Humans edit the policy (with comments); `gl-nvidia update` rewrites the `resolved` section. Reads are
validated with pydantic, writes are round-trip YAML (comments and key order kept) and atomic, so a
rejected input never changes a byte of the file.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from gl_nvidia import yamldoc
from gl_nvidia.arches import check_arch
from gl_nvidia.catalog.model import MODULE_TYPES, BuildUnit, Cell
from gl_nvidia.errors import UserError
from gl_nvidia.fs import atomic_write_text
from gl_nvidia.names import check_driver_version, check_kernel
from gl_nvidia.osprofile import PROFILES

DEFAULT_BRANCH_TYPES = ["production branch", "lts branch", "new feature branch"]
Arch = Annotated[str, AfterValidator(check_arch)]
Flavour = Literal["cloud", "metal"]
_GL_VERSION = re.compile(r"\d+\.\d+(\.\d+)?")
_RANGE_CLAUSE = re.compile(r"^\s*(>=|<=|==|!=|>|<)?\s*([^\s<>=!,]+)\s*$")
# Both end up in file names, image tags and make arguments: checked here, where they enter.
KernelName = Annotated[str, AfterValidator(check_kernel)]
DriverVersion = Annotated[str, AfterValidator(check_driver_version)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExclusionRule(_Strict):
    """Cells matching every given field are excluded. Range fields take clauses like ">=2150.8,<2200"."""

    reason: str = Field(min_length=1)
    module_type: Literal["open", "proprietary"] | None = None  # None: the whole cell
    os_version: str | None = None  # range over GL versions (or Debian's VERSION_ID)
    kernel: str | None = None  # range over kernel releases, Debian version order
    driver_branch: str | None = None  # range over branch numbers
    driver_version: str | None = None  # range over full driver versions
    flavour: str | None = None
    arch: Arch | None = None

    @field_validator("os_version", "kernel", "driver_branch", "driver_version")
    @classmethod
    def _valid_range(cls, value: str | None) -> str | None:
        if value is not None:
            for clause in value.split(","):
                if not _RANGE_CLAUSE.match(clause):
                    raise ValueError(f"bad range clause {clause!r} (use e.g. '>=2150.8' or '570')")
        return value

    @property
    def module_types(self) -> tuple[str, ...]:
        return MODULE_TYPES if self.module_type is None else (self.module_type,)


class KernelEntry(_Strict):
    """The kernel of one (OS version, flavour, arch)."""

    os_version: str
    flavour: Flavour
    arch: Arch
    kernel: KernelName


class KernelSlot(_Strict):
    """One (OS version, flavour, arch) whose kernel series the policy widens."""

    os_version: str
    flavour: Flavour
    arch: Arch


class Policy(_Strict):
    branches: int = Field(default=3, ge=1)
    branch_types: list[str] = Field(default_factory=lambda: list(DEFAULT_BRANCH_TYPES))
    arches: list[Arch] = Field(min_length=1)
    flavours: list[Flavour] = Field(min_length=1)
    # Full driver versions held instead of their branch's newest; a pinned branch stays in the matrix.
    pins: list[DriverVersion] = Field(default_factory=list)
    kernel_pins: list[KernelEntry] = Field(default_factory=list)  # kernels built besides the resolved ones
    # Also build the ABI before the current one of the same series (6.1.0-56 beside 6.1.0-57), read from
    # the index at run time: a real kernel-only upgrade that no archive rotation can make disappear.
    previous_kernels: list[KernelSlot] = Field(default_factory=list)
    kernel_overrides: list[KernelEntry] = Field(default_factory=list)  # replace what the repository says
    exclusions: list[ExclusionRule] = Field(default_factory=list)
    # Which GL minors get images: every released minor of every major in maintenance (nodes are upgraded
    # one by one), from its major's min_minor on ("2150.8.0": 2150.0.0 to 2150.7.x get none), plus
    # keep_minors, built whatever the rest of the policy and the lifecycle say.
    min_minor: list[str] = Field(default_factory=list)
    keep_minors: list[str] = Field(default_factory=list)

    @field_validator("min_minor", "keep_minors")
    @classmethod
    def _gl_versions(cls, versions: list[str]) -> list[str]:
        for v in versions:
            if not _GL_VERSION.fullmatch(v):
                raise ValueError(f"{v!r} is not a Garden Linux version like 1877.3 or 2150.9.0")
        return versions

    @field_validator("min_minor")
    @classmethod
    def _one_floor_per_major(cls, versions: list[str]) -> list[str]:
        majors = [v.split(".", 1)[0] for v in versions]
        twice = sorted({m for m in majors if majors.count(m) > 1})
        if twice:
            raise ValueError(f"more than one min_minor for GL {', '.join(twice)}")
        return versions

    def floor(self, major: int) -> str | None:
        """The oldest minor of `major` that gets images, when min_minor names one."""
        return next((v for v in self.min_minor if v.split(".", 1)[0] == str(major)), None)


class Sources(_Strict):
    # GLRD JSON documents (URL or file), merged; empty for an OS that is not Garden Linux.
    glrd: list[str] = Field(default_factory=list)
    # NVIDIA's releases.json (URL or file), or "apt:<package>" for a distribution's driver source package.
    # Each spelling is a driver source of catalog/refresh.py `DRIVER_FEEDS`; another `<name>:` is refused.
    nvidia: str
    # apt repository base URL (per-OS-version suites); "${VAR}" is read from the environment;
    # "system:<codename>" is this machine's configured archive, suites <codename> and <codename>-*;
    # "system": the same for each of os.versions, with its own codename.
    apt: str


class OSVersionInfo(_Strict):
    """One fixed OS version in maintenance and its release's codename (its suites: `system`)."""

    version: str = Field(min_length=1)
    codename: str | None = None


class OSInfo(_Strict):
    id: str = Field(pattern=r"^[a-z0-9]+$")
    version: str | None = None  # one fixed version (Debian "12"); None: os.versions, or resolved from GLRD
    codename: str | None = None
    # Several fixed versions in maintenance at once (Debian 12 and 13), each resolved from its own suites.
    versions: list[OSVersionInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_way_to_fix_versions(self) -> OSInfo:
        if self.versions and (self.version is not None or self.codename is not None):
            raise ValueError("give os.version (and codename) or os.versions, not both")
        names = [v.version for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError(f"os.versions lists a version twice ({', '.join(names)})")
        return self

    @property
    def fixed(self) -> list[OSVersionInfo]:
        """The fixed OS versions, oldest first as listed; empty: Garden Linux's, resolved from GLRD."""
        if self.version is not None:
            return [OSVersionInfo(version=self.version, codename=self.codename)]
        return list(self.versions)

    def codename_of(self, version: str) -> str | None:
        return next((v.codename for v in self.fixed if v.version == version), None)

    @field_validator("id")
    @classmethod
    def _profiled(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"{PROFILES.refusal(value)} (use {PROFILES.choices()})")
        return value


class ResolvedOSVersion(_Strict):
    version: str
    major: int | None = None
    released: date | None = None
    eol: date | None = None


class ResolvedDriver(_Strict):
    branch: str = Field(pattern=r"^[0-9]{1,6}$")
    type: str
    version: DriverVersion
    release_date: str | None = None
    # The open kernel-module source's version where a distribution packages it apart from the driver
    # (Debian); None: the same version (NVIDIA's .run carries both trees).
    open_version: DriverVersion | None = None
    # False: the distribution packages no open module source of its branch beside it (Debian's Tesla 535).
    open_modules: Literal[False] | None = None
    # The OS version whose suites it was read from: it is built only for that version's kernels (None:
    # every OS version's, as NVIDIA's releases serve all).
    os_version: str | None = None
    # The arches its suites carry its module source for (None: every arch of the policy).
    arches: list[Arch] | None = None


class ResolvedFrom(_Strict):
    """The sources a `resolved` section was read from, as given (URLs, files, `${VAR}` unexpanded)."""

    glrd: list[str] = Field(default_factory=list)
    nvidia: str
    apt: str


class Resolved(_Strict):
    today: date  # the day `gl-nvidia update` resolved it (its --today)
    sources: ResolvedFrom | None = None  # where it came from; None in locks written before it was recorded
    os_versions: list[ResolvedOSVersion]
    drivers: list[ResolvedDriver]
    kernels: list[KernelEntry]


class Lock(_Strict):
    schema_: Literal[1] = Field(alias="schema")
    os: OSInfo
    policy: Policy
    sources: Sources
    resolved: Resolved | None = None

    @model_validator(mode="after")
    def _one_suite_per_version(self) -> Lock:
        if len(self.os.fixed) > 1 and self.sources.apt.startswith("system:"):
            raise ValueError(f"sources.apt {self.sources.apt!r} names one release for {len(self.os.fixed)} OS "
                             "versions: write `system` (each version's suites by its os.versions codename)")
        return self


def _yaml() -> YAML:
    y = YAML()  # round-trip: comments, order and quoting survive a rewrite
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    y.representer.ignore_aliases = lambda *_: True  # equal dates stay dates, not &id001 anchors
    return y


def parse_lock_text(text: str, where: str) -> tuple[Lock, CommentedMap]:
    """Validate lock text; return the typed lock and the round-trip document to edit."""
    doc = yamldoc.load(_yaml(), text, where)
    if not isinstance(doc, CommentedMap):
        raise UserError(f"{where}: expected a mapping at the top level", "see versions.yaml in the repository")
    try:
        lock = Lock.model_validate(doc)
    except ValidationError as exc:
        raise UserError(f"{where}: {describe_validation_error(exc)}", "fix the lock file") from exc
    return lock, doc


def describe_validation_error(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{loc}: {first['msg']}{more}"


def read_lock(path: Path) -> tuple[Lock, CommentedMap]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"lock file not found: {path}", "pass --lock FILE or run in the repository root") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                        "pass the lock file (versions.yaml) itself") from exc
    return parse_lock_text(text, str(path))


def dump(doc: Any) -> str:
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    return buf.getvalue()


def lock_text(path: Path, doc: CommentedMap) -> str:
    """The edited document as the text of the lock at `path`, validated again."""
    text = dump(doc)
    parse_lock_text(text, str(path))  # a bug that produced an invalid lock must not reach the disk
    return text


def write_lock(path: Path, doc: CommentedMap) -> None:
    """Validate the edited document again, then replace the file atomically."""
    atomic_write_text(path, lock_text(path, doc))


def resolved_to_yaml(resolved: Resolved) -> CommentedMap:
    data = resolved.model_dump(exclude_none=True)  # dates stay YAML dates
    out = CommentedMap()
    for key, value in data.items():
        out[key] = _flow_rows(value) if isinstance(value, list) else value
    return out


def _flow_rows(rows: list[Any]) -> CommentedSeq:
    """One line per row: a reviewer reads the diff of a resolved list at a glance."""
    seq = CommentedSeq()
    for row in rows:
        m = CommentedMap(row)
        m.fa.set_flow_style()
        seq.append(m)
    return seq


def add_exclusion(
    lock_path: Path,
    target: Cell | ExclusionRule,
    reason: str | None = None,
    module_type: Literal["open", "proprietary"] | None = None,
) -> bool:
    """Exclude a cell (or a rule's cells) in the lock's policy, keeping comments; atomic rewrite.

    `gl-nvidia build --exclude-failed` calls this for a cell whose build failed: pass the `Cell`, the
    reason (e.g. the compiler's first error line) and, when only one module type failed, `module_type`.
    A `Cell` becomes an exact rule (its OS version, kernel, driver version, flavour and arch), so a
    newer driver patch release of the same branch is tried again. An `ExclusionRule` is added as given
    (`reason`/`module_type` then must be None). Returns False when an equal rule is already there.
    """
    if isinstance(target, Cell):
        if not reason:
            raise UserError("an exclusion needs a reason", "say why the cell must not be built")
        rule = ExclusionRule(
            reason=reason.strip().splitlines()[0],
            module_type=module_type,
            os_version=f"=={target.os_version}",
            kernel=f"=={target.kernel}",
            driver_version=f"=={target.driver_version}",
            flavour=target.flavour,
            arch=target.arch,
        )
    else:
        if reason is not None or module_type is not None:
            raise ValueError("pass reason and module_type inside the ExclusionRule")
        rule = target
    lock, doc = read_lock(lock_path)
    if rule in lock.policy.exclusions:
        return False
    policy = doc["policy"]
    if not policy.get("exclusions"):
        policy["exclusions"] = CommentedSeq()  # block style, even where the file said `[]`
    policy["exclusions"].append(CommentedMap(rule.model_dump(exclude_none=True)))
    write_lock(lock_path, doc)
    return True


def exclude_failures(lock_path: Path, unit: BuildUnit, failures: Mapping[str, str]) -> int:
    """Record a unit's failed module types (type -> first error) as exclusions of each of its cells.

    When every type the unit builds failed alike, one rule covers the whole cell; otherwise each failed
    type gets its own, so the type that built keeps shipping. Returns how many rules were added.
    """
    whole = set(failures) == set(unit.module_types) and len(set(failures.values())) == 1
    added = 0
    for cell in unit.cells():
        if whole:
            added += add_exclusion(lock_path, cell, reason=next(iter(failures.values())))
            continue
        for mtype, error in failures.items():
            added += add_exclusion(lock_path, cell, reason=error, module_type="open" if mtype == "open" else "proprietary")
    return added
