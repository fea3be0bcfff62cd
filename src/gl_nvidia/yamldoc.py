"""YAML from outside (lock files, values, kubeconfigs): every way such text can be bad is one error line."""

from __future__ import annotations

import re
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from gl_nvidia.errors import UserError

# Far deeper than any document we read; YAML parsers take time cubic in flow nesting (seconds at 500 levels).
MAX_FLOW_DEPTH = 64
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def check_nesting(text: str, where: str) -> None:
    """Refuse flow collections nested deeper than MAX_FLOW_DEPTH before a parser spends minutes on them.

    Brackets inside quoted strings count too: no real document has 64 of them open at once.
    """
    depth = 0
    for ch in _NOT_BRACKETS.sub("", text):
        depth = depth + 1 if ch in "[{" else max(depth - 1, 0)
        if depth > MAX_FLOW_DEPTH:
            raise UserError(f"{where}: malformed YAML: nested too deeply (more than {MAX_FLOW_DEPTH} levels)",
                            "fix the YAML syntax")


def load(yaml: YAML, text: str, where: str) -> Any:
    """Parse YAML with ruamel, turning every way the text can be bad into one error line."""
    check_nesting(text, where)
    try:
        return yaml.load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: malformed YAML{at}: {problem}", "fix the YAML syntax") from exc
    except RecursionError as exc:  # block nesting, which check_nesting does not count
        raise UserError(f"{where}: malformed YAML: nested too deeply", "fix the YAML syntax") from exc
    except ValueError as exc:  # scalars YAML resolves but Python refuses: 2026-13-45, a 5000-digit integer
        problem = str(exc).splitlines()[0].split("; use sys.")[0]  # Python's advice is not the user's fix
        raise UserError(f"{where}: malformed YAML: {problem}", "fix the value") from exc
