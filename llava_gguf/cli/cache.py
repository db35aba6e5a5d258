"""What llava-gguf keeps on disk between runs: ``cache info`` and ``cache clear``; the machine's
measured choices: ``tune``."""

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
from llava_gguf.tune import CachedVerdict, cached_verdicts, tune
from llava_gguf.vision.probe_cache import Provenance

PARTIALS = "partial files of interrupted runs"
VERDICTS = "measured choices (llava-gguf tune)"


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
    verdicts = cached_verdicts()
    rows.append({"cache": VERDICTS, "directory": str(cache_root()), "entries": len(verdicts),
                 "bytes": sum({v.file: v.file.stat().st_size for v in verdicts if v.file.exists()}.values()),
                 "verdicts": [_verdict_json(v) for v in verdicts]})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None)
    for column in ("cache", "entries", "size", "directory"):
        table.add_column(column, justify="right" if column in ("entries", "size") else "left")
    for row in rows:
        table.add_row(row["cache"], str(row["entries"]), human(row["bytes"]), row["directory"])
    console = Console(highlight=False)
    console.print(table)
    for verdict in verdicts:
        console.print(f"{verdict.probe}: {verdict.summary}", soft_wrap=True)
        if verdict.provenance is not None:
            console.print(f"  {_measured(verdict.provenance)}", style="dim", soft_wrap=True)
        if verdict.stale:
            console.print(f"  stale: {verdict.stale} (measured again on next use)", style="yellow", soft_wrap=True)


def _measured(provenance: Provenance) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in provenance.versions.items() if name != "ggml-files")
    threads = provenance.about.get("threads")
    return (f"measured {provenance.measured_at}, {provenance.load.describe()}"
            + (f", {threads} threads" if threads else "") + f"; {versions}")


def _verdict_json(verdict: CachedVerdict) -> dict[str, object]:
    return {"probe": verdict.probe, "file": str(verdict.file), "summary": verdict.summary, "stale": verdict.stale,
            "provenance": verdict.provenance.to_json() if verdict.provenance is not None else None}


@cache.command("clear")
def cache_clear() -> None:
    """Empty the image feature and prompt caches (converted models stay), and remove the partial files
    that interrupted runs left anywhere in the cache."""
    for name, directory, pattern in _caches():
        files, size = clear_cache(directory, pattern)
        click.echo(f"{name}: removed {files} entries ({human(size)}) from {directory}")
    files, size = clear_partials(cache_root())  # converted models' folders too
    click.echo(f"{PARTIALS}: removed {files} ({human(size)}) from {cache_root()}")


@main.command("tune")
@click.option("-t", "--threads", type=click.IntRange(min=1), help="CPU threads the runs will use [default: all cores].")
@click.option("-ngl", "--n-gpu-layers", type=click.IntRange(min=-1), default=0,
              help="Also measure ggml's vision encoder on the GPU (any value but 0).")
@click.option("--ggml-lib", type=click.Path(file_okay=False, path_type=Path),
              help="Directory of another ggml build [default: llama-cpp-python's].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tune_command(threads: int | None, n_gpu_layers: int, ggml_lib: Path | None, as_json: bool) -> None:
    """Measure now the choices `auto` makes on this machine (weight repacking, the vision encoder, libmtmd's
    exactness) and print each with its figures. A choice measured while other processes used the cores is
    not cached: the next run measures it again.

    \b
    Example:
      llava-gguf tune -t 4
    """
    results = tune(threads, ggml_library=ggml_lib, gpu=n_gpu_layers != 0)
    if as_json:
        click.echo(json.dumps([{"probe": r.probe, "choice": r.choice, "reason": r.reason, "cached": r.cached,
                                "provenance": r.provenance.to_json() if r.provenance is not None else None}
                               for r in results], indent=2))
        return
    console = Console(highlight=False)
    for result in results:
        console.print(f"[bold]{result.probe}[/]: {result.choice} ({result.reason})", soft_wrap=True)
        console.print("  cached" if result.cached else
                      "  not cached (busy machine): run `llava-gguf tune` again when it is calm", style="dim")
