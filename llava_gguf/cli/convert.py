"""Making and reading GGUF files: ``convert`` and ``inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from llava_gguf.cli.console import conversion_progress, err_console, transfer_progress
from llava_gguf.cli.errors import CLIState, reported_errors
from llava_gguf.cli.group import main


@main.command()
@click.argument("source")
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the two GGUF files.")
@click.option("--quant", "-q", type=click.Choice(["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "F32"],
              case_sensitive=False), default="Q4_K_M", show_default=True, help="LLM file type.")
@click.option("--mmproj-type", type=click.Choice(["f16", "f32", "q8_0"], case_sensitive=False), default="f16",
              show_default=True, help="Vision tower / projector file type.")
@click.option("--vision-tower", help="CLIP repo id or directory, overriding the checkpoint's mm_vision_tower.")
@click.option("--revision", help="Hub revision (branch, tag or commit) of SOURCE.")
@click.option("--name", help="Output file stem (default: the checkpoint's name).")
@click.option("--threads", "-t", type=click.IntRange(min=1), help="Quantizer threads.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_obj
def convert(state: CLIState, source: str, out_dir: Path, quant: str, mmproj_type: str, vision_tower: str | None,
            revision: str | None, name: str | None, threads: int | None, quiet: bool) -> None:
    """Convert a Hugging Face LLaVA checkpoint (local directory or Hub repo id) to GGUF.

    Writes the LLM as a k-quant GGUF and the CLIP tower plus projector as an mmproj GGUF.

    \b
    Examples:
      llava-gguf convert llava-hf/llava-1.5-7b-hf --out models/
      llava-gguf convert liuhaotian/llava-v1.6-mistral-7b --out models/ --quant Q5_K_M
      llava-gguf convert ./llava-v1.5-7b --vision-tower ./clip-vit-large-patch14-336 --out models/
    """
    from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

    options = ConvertOptions(
        quant=Quant(quant.upper()), mmproj_type=MmprojType(mmproj_type.lower()), vision_tower=vision_tower,
        revision=revision, threads=threads, name=name,
    )
    with reported_errors(state), transfer_progress(quiet) as progress:
        result = convert_checkpoint(source, out_dir, options, conversion_progress(progress))
    if not quiet:
        err_console.print(f"[green]wrote[/] {result.llm}\n[green]wrote[/] {result.mmproj}")
    click.echo(json.dumps({"llm": str(result.llm), "mmproj": str(result.mmproj)}) if quiet else "", nl=quiet)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def inspect(state: CLIState, file: Path, as_json: bool) -> None:
    """Show what a GGUF holds: architecture, quant type, tensors, vision settings, tokenizer, template.

    \b
    Example:
      llava-gguf inspect models/llava-1.5-7b-hf.Q4_K_M.gguf --json
    """
    from llava_gguf.info import describe_gguf

    with reported_errors(state):
        info = describe_gguf(file)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    console = Console()
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key in ("path", "architecture", "name", "file_type", "tensor_count"):
        table.add_row(key, str(info[key]))
    table.add_row("tensor_bytes", f"{info['tensor_bytes']:,}")
    table.add_row("tensor_types", ", ".join(f"{k}: {v}" for k, v in info["tensor_types"].items()))
    for section in ("hyperparameters", "llava_gguf", "tokenizer"):
        for key, value in (info.get(section) or {}).items():
            table.add_row(key if section != "tokenizer" else f"tokenizer.{key}", str(value))
    llava = info.get("llava") or {}
    if llava.get("error"):
        table.add_row("llava", f"[red]{llava['error']}[/]")
    elif llava:
        table.add_row("llava", llava["description"])
        for note in llava["inferred"]:
            table.add_row("inferred", note)
    if info.get("reference"):
        table.add_row("reference", str(info["reference"]))
    if info.get("architecture") != "clip":
        tokenizer = info.get("tokenizer") or {}
        table.add_row("LLM", f"{info['architecture']}, tokenizer {tokenizer.get('model')}"
                             + (f" (pre-tokenizer {tokenizer['pre']})" if tokenizer.get("pre") else ""))
    if info.get("template"):
        source = info.get("template_source")
        name = str(info["template"]).split(" (guessed", 1)[0]
        table.add_row("template", f"{name} ({source})" if source else name)
    if info.get("chat_template"):
        table.add_row("chat_template", f"{len(info['chat_template'])} characters")
    console.print(table)
