"""The `gl-nvidia` command line: a thin layer that parses options and calls one stage per command.

Each stage's commands live in a module of this package named after the stage; `release`, the conductor's,
in its own.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback
from types import FrameType

import click

from gl_nvidia import __version__, ui
from gl_nvidia.errors import BUG_EXIT_CODE, UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gl-nvidia")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (command lines, HTTP requests).")
def cli(verbose: bool) -> None:
    """NVIDIA GPU drivers for Garden Linux: catalog, build, image, publish, deploy."""
    ui.setup_logging(verbose)


def _register() -> None:
    from gl_nvidia.cli import build, catalog, deploy, image, release

    for module in (catalog, build, image, deploy, release):
        for command in module.COMMANDS:
            cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line (and a hint) and exit non-zero; a bug prints one line and
    exits BUG_EXIT_CODE, its traceback only under -v."""
    _register()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    try:
        cli.main(args=argv, prog_name="gl-nvidia", standalone_mode=False)
    except UserError as exc:
        # Messages quote outside data (node names, index fields): escaped, so each stays one plain line.
        click.echo(f"gl-nvidia: error: {ui.printable(exc.message)}", err=True)
        if exc.hint:
            click.echo(f"gl-nvidia: hint: {ui.printable(exc.hint)}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("gl-nvidia: interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: say so in one line, with its own exit code (1 means a check said no)
        if ui.log.isEnabledFor(logging.DEBUG):
            traceback.print_exc()
        first = ui.printable(next(iter(str(exc).splitlines()), ""))
        click.echo(f"gl-nvidia: error: unexpected {type(exc).__name__}" + (f": {first}" if first else ""), err=True)
        click.echo("gl-nvidia: hint: this is a bug in gl-nvidia; rerun with -v for the traceback and report it",
                   err=True)
        return BUG_EXIT_CODE
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminated(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a cancelled CI job, a stopped pod) unwinds like Ctrl-C: every temp directory and
    half-made output is removed on the way out, as for any other error."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
