"""The one way a user-facing failure leaves the program: a message, an optional hint, an exit code.

`UserError` is for what the user can fix; anything else is a bug, which exits `BUG_EXIT_CODE` with one
line (the traceback under `-v`).
"""

from __future__ import annotations

# An exception nobody expected (a bug): not 1, which says a check ran and failed. EX_SOFTWARE of sysexits.h.
BUG_EXIT_CODE = 70


class UserError(Exception):
    """A problem with input or environment, shown as one line (plus a hint) without a traceback."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class CheckFailed(UserError):
    """A check ran and its answer is no (missing images, modules that would not load, a failed build or
    vectorAdd): exit 1, apart from bad input (2)."""

    exit_code = 1


class IntegrityError(UserError):
    """Input that failed a check of what it is (a listed sha256, a path or link that leaves its tree):
    exit 2 for the whole run, never recorded as one build unit's failure, which would offer an attack to
    `--exclude-failed` as an exclusion."""


class CommandError(UserError):
    """An external command failed; carries its command line and the end of its output."""

    exit_code = 3

    def __init__(self, argv: list[str], returncode: int, output: str, hint: str | None = None) -> None:
        first = _first_error_line(output)
        super().__init__(
            f"command failed with exit {returncode}: {' '.join(argv)}" + (f": {first}" if first else ""),
            hint,
        )
        self.argv = argv
        self.returncode = returncode
        self.output = output


def _first_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[-1] if lines else ""
