"""The ``llava-gguf`` command line. Only this package prints, and only it turns the library's
exceptions into messages and exit codes (``errors.py``); one module per command group."""

from llava_gguf.cli import ask_chat, batch, cache, convert, serve  # noqa: E402,F401  (their commands join ``main``)
from llava_gguf.cli.group import main

__all__ = ["main"]
