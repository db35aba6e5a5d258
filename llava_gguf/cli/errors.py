"""Library errors as one line on stderr and an exit code, in one place: 1 for runtime errors (2 for
usage errors, click's own), 130 for Ctrl-C; ``--debug`` keeps the traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from llava_gguf.cli.console import err_console
from llava_gguf.errors import LlavaGGUFError


class CLIState:
    debug: bool = False


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(1)


@contextmanager
def reported_errors(state: CLIState) -> Iterator[None]:
    """Library errors become one line and exit code 1; --debug keeps the traceback."""
    try:
        yield
    except LlavaGGUFError as e:
        if state.debug:
            raise
        fail(str(e))
    except OSError as e:  # a cache or output directory that cannot be written, a full disk
        if state.debug:
            raise
        fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
    except KeyboardInterrupt:
        if state.debug:
            raise
        err_console.print("interrupted")
        sys.exit(130)
    except (click.exceptions.Exit, click.ClickException):  # click's own exits and usage errors
        raise
    except Exception as e:  # a bug here or in a dependency: still one line, the traceback on --debug
        if state.debug:
            raise
        fail(f"unexpected {type(e).__name__}: {e} (a bug; run again with --debug for the traceback and report it)")
