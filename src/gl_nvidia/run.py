"""The single seam for running external programs. Nothing else calls `subprocess` directly.

A failure raises `CommandError` naming the command line and the first error line, so every
caller reports a failed tool the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from gl_nvidia.errors import CommandError, UserError

log = logging.getLogger(__name__)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    log_file: Path | None = None,
    check: bool = True,
    timeout: float | None = None,
    hint: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command, capture stdout+stderr (or stream them to `log_file`), raise on failure."""
    args = [os.fspath(a) for a in argv]
    if shutil.which(args[0]) is None and not Path(args[0]).exists():
        raise UserError(f"required program not found: {args[0]}", hint or "run scripts/bootstrap")
    full_env = None if env is None else {**os.environ, **env}
    log.debug("run: %s", " ".join(args))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("wb") as fh:
            proc = subprocess.run(
                args, cwd=cwd, env=full_env, input=input, stdout=fh, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )
        output = log_file.read_bytes()
        result = subprocess.CompletedProcess(args, proc.returncode, output, b"")
    else:
        result = subprocess.run(
            args, cwd=cwd, env=full_env, input=input, capture_output=True, timeout=timeout, check=False,
        )
    if check and result.returncode != 0:
        text = (result.stdout or b"").decode(errors="replace") + (result.stderr or b"").decode(errors="replace")
        raise CommandError(args, result.returncode, text, hint=hint)
    return result


def output(argv: Sequence[str | os.PathLike[str]], **kwargs: object) -> str:
    """Run a command and return its stdout as text."""
    return run(argv, **kwargs).stdout.decode()  # type: ignore[arg-type]
