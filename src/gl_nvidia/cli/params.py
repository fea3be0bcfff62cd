"""Option types that check a value where it enters: a bad one is a usage error (exit 2) before any work."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

from gl_nvidia.names import check_driver_version, check_kernel


def check_sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value.lower()):
        raise ValueError(f"{value[:80]!r} is not a sha256 (64 hex digits)")
    return value.lower()


class Checked(click.ParamType[str]):
    """A string option passed through a pure check that raises ValueError."""

    def __init__(self, name: str, check: Callable[[str], str]) -> None:
        self.name = name
        self.check = check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return self.check(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


KERNEL = Checked("kernel", check_kernel)
DRIVER_VERSION = Checked("version", check_driver_version)
SHA256 = Checked("sha256", check_sha256)
