"""`gl-nvidia` commands of the image stage."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
