"""What llava-gguf keeps on disk between runs: ``cache info`` and ``cache clear``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from llava_gguf.cli.console import human
from llava_gguf.cli.group import main
from llava_gguf.disk_cache import cache_usage, clear_cache, clear_partials, partial_usage
from llava_gguf.paths import cache_root, features_dir, models_dir, prompts_dir

PARTIALS = "partial files of interrupted runs"


def _caches() -> list[tuple[str, Path, str]]:
    """(name, directory, file pattern) of the caches `cache clear` empties."""
    return [("image features", features_dir(), "*.npy"), ("prompt KV states", prompts_dir(), "*.kv")]


@main.group()
def cache() -> None:
    """Show or empty what llava-gguf keeps on disk between runs: image features and prompt KV states.

    \b
    Examples:
      llava-gguf cache info
      llava-gguf cache clear
    """


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cache_info(as_json: bool) -> None:
    """Where each cache is, and how many entries and bytes it holds."""
    rows = [{"cache": name, "directory": str(directory), "entries": usage[0], "bytes": usage[1]}
            for name, directory, pattern in _caches() for usage in [cache_usage(directory, pattern)]]
    models = cache_usage(models_dir(), "*/*.gguf")
    rows.append({"cache": "converted models (not cleared)", "directory": str(models_dir()), "entries": models[0],
                 "bytes": models[1]})
    partials = partial_usage(cache_root())
    rows.append({"cache": PARTIALS, "directory": str(cache_root()), "entries": partials[0], "bytes": partials[1]})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None)
    for column in ("cache", "entries", "size", "directory"):
        table.add_column(column, justify="right" if column in ("entries", "size") else "left")
    for row in rows:
        table.add_row(row["cache"], str(row["entries"]), human(row["bytes"]), row["directory"])
    Console().print(table)


@cache.command("clear")
def cache_clear() -> None:
    """Empty the image feature and prompt caches (converted models stay), and remove the partial files
    that interrupted runs left anywhere in the cache."""
    for name, directory, pattern in _caches():
        files, size = clear_cache(directory, pattern)
        click.echo(f"{name}: removed {files} entries ({human(size)}) from {directory}")
    files, size = clear_partials(cache_root())  # converted models' folders too
    click.echo(f"{PARTIALS}: removed {files} ({human(size)}) from {cache_root()}")
