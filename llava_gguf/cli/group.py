"""The ``llava-gguf`` command group; each command module adds its commands to it."""

from __future__ import annotations

import logging

import click

from llava_gguf.cli.errors import CLIState


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and llama.cpp's log.")
@click.version_option(package_name="llava-gguf")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run LLaVA 1.5 / 1.6 vision-language models locally on llama.cpp, exactly as the reference does."""
    state = ctx.ensure_object(CLIState)
    state.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
