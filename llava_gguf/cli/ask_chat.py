"""Running a model on a question: ``ask`` (one answer, streamed) and ``chat`` (interactive)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import click
from rich.console import Console

from llava_gguf.cli.console import TileProgress
from llava_gguf.cli.errors import CLIState, reported_errors
from llava_gguf.cli.group import main
from llava_gguf.cli.run_options import RunSettings, load_model, run_options
from llava_gguf.errors import LlavaGGUFError
from llava_gguf.image.load import load_image
from llava_gguf.llm.sequence import display_ids
from llava_gguf.memory import context_needed
from llava_gguf.model import LlavaModel
from llava_gguf.paths import history_file
from llava_gguf.repl import ChatLoop, enable_history
from llava_gguf.sources import ModelFiles


def _check_images(paths: Sequence[str]) -> list[tuple[int, int]]:
    """Decode every image now, so a bad one fails before the model loads; their (height, width)."""
    sizes = []
    for path in paths:
        image = load_image(path)
        sizes.append((image.height, image.width))
    return sizes


@main.command()
@click.argument("question", nargs=-1)
@click.option("-i", "--image", "images", multiple=True, help="An image (repeat for several).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: answer, tokens, prompt, prompt_tokens, image token counts, timings.")
@click.option("--raw", is_flag=True, help="QUESTION is the whole prompt, verbatim; each <image> takes the next image.")
@run_options
@click.pass_obj
def ask(state: CLIState, question: tuple[str, ...], images: tuple[str, ...], as_json: bool, raw: bool,
        settings: RunSettings) -> None:
    """Answer one QUESTION about the images, streaming the answer to stdout.

    With no QUESTION, it is read from stdin.

    \b
    Examples:
      llava-gguf ask -m models/ -i cat.jpg "What is in this picture?"
      llava-gguf ask -m llava-hf/llava-1.5-7b-hf -i a.png -i b.png "What differs?"
      llava-gguf ask --llm m.Q4_K_M.gguf --mmproj m.mmproj-f16.gguf -i cat.jpg --temp 0 --json "Describe it."
      llava-gguf ask -m models/ -i cat.jpg --raw $'USER: <image>\\nWhat is this? ASSISTANT:'
    """
    text = " ".join(question)
    if not text:
        if sys.stdin.isatty():
            raise click.UsageError("give a QUESTION (or pipe it on stdin)")
        text = sys.stdin.read().strip()
    if raw and text.count("<image>") != len(images):
        raise click.UsageError(f"the prompt has {text.count('<image>')} <image> placeholder(s) but "
                               f"{len(images)} image(s) were given")
    quiet = settings.quiet or as_json
    with reported_errors(state):
        sizes = _check_images(images)

        def n_ctx_hint(files: ModelFiles) -> int | None:
            if settings.ctx_size:
                return None
            return context_needed(files.mmproj, sizes, settings.max_tokens, llava_version=settings.llava_version)

        model = load_model(settings, quiet=quiet, n_ctx_hint=n_ctx_hint)
        try:
            chat = model.chat(settings.system)
            tiles = TileProgress(enabled=not quiet)
            pieces: list[str] = []
            try:
                for piece in chat.send(text, list(images), settings.generation_options(), on_tile=tiles, raw=raw):
                    tiles.stop()
                    pieces.append(piece)
                    if not as_json:
                        click.echo(piece, nl=False)
            finally:
                tiles.stop()
            if not as_json:
                click.echo()
                return
            t = model.timings
            click.echo(json.dumps({
                "answer": "".join(pieces),
                "tokens": chat.last_tokens,
                "prompt": chat.last_prompt,
                "prompt_tokens": display_ids(chat.last_items),
                "n_prompt_tokens": t.n_prompt_tokens,
                "n_image_tokens": t.n_image_tokens,
                "timings": {"vision_encode_s": t.vision_encode_s, "prefill_s": t.prefill_s, "decode_s": t.decode_s,
                            "n_prefilled": t.n_prefilled, "n_restored": t.n_restored},
                "model": {"llm": str(model.llm_path), "mmproj": str(model.mmproj_path),
                          "llava_version": model.settings.llava_version, "template": model.template.value,
                          "inferred": model.inference_note, "vision_encoder": model.encoder_name},
            }, ensure_ascii=False))
        finally:
            model.close()


def _stats(model: LlavaModel) -> list[tuple[str, str]]:
    t = model.timings
    if not t.n_prompt_tokens:
        return []
    rate = f" ({t.n_generated / t.decode_s:.1f} tokens/s)" if t.decode_s > 0 else ""
    return [
        ("images encoded", str(t.n_images_encoded)),
        ("image tokens", ", ".join(map(str, t.n_image_tokens)) or "none"),
        ("prompt tokens", f"{t.n_prompt_tokens} ({t.n_prefilled} prefilled, {t.n_restored} restored from disk, "
                          "the rest reused from the context)"),
        ("generated tokens", str(t.n_generated)),
        ("vision encode", f"{t.vision_encode_s:.3f} s"),
        ("prefill", f"{t.prefill_s:.3f} s"),
        ("decode", f"{t.decode_s:.3f} s{rate}"),
        ("feature cache", f"{model.cache.hits} hits, {model.cache.misses} misses"),
        ("context", f"{model.runtime.n_ctx} positions"),
    ]


@main.command()
@click.option("-i", "--image", "images", multiple=True, help="An image for the first message (repeat for several).")
@run_options
@click.pass_obj
def chat(state: CLIState, images: tuple[str, ...], settings: RunSettings) -> None:
    """Chat about images, interactively; earlier turns stay in the model's cache.

    Type a message and press Enter; end a line with \\ to continue it, or wrap several lines in \"\"\".
    Commands: /image PATH... attaches images to the next message, /clear starts over, /save FILE writes the
    transcript (Markdown, or JSON for a .json name), /stats shows timings and tokens, /help, /exit.
    Ctrl-C stops an answer and keeps the conversation; Ctrl-D leaves.

    \b
    Examples:
      llava-gguf chat -m models/ -i cat.jpg
      llava-gguf chat -m llava-hf/llava-1.5-7b-hf --temp 0 -c 4096
      LLAVA_GGUF_MODEL=models/ llava-gguf chat --low-memory
    """
    console = Console(highlight=False)
    with reported_errors(state):
        _check_images(images)
        model = load_model(settings, quiet=settings.quiet, n_ctx_hint=lambda files: None)
    conversation = model.chat(settings.system)
    options = settings.generation_options()

    def respond(text: str, paths: Sequence[str]) -> Iterator[str]:
        tiles = TileProgress(enabled=not settings.quiet)
        stream = conversation.send(text, list(paths), options, on_tile=tiles)
        try:
            for piece in stream:
                tiles.stop()
                yield piece
        finally:
            tiles.stop()
            stream.close()

    def check_image(path: str) -> None:
        load_image(Path(path).expanduser())

    save_history = enable_history(history_file()) if sys.stdin.isatty() else (lambda: None)
    loop = ChatLoop(read_line=input, respond=respond, console=console, on_clear=conversation.clear,
                    stats=lambda: _stats(model), check_image=check_image, errors=(LlavaGGUFError,),
                    pending_images=list(images))
    if not settings.quiet:
        console.print(f"[dim]{model.llm_path.name} + {model.mmproj_path.name}; /help for commands, "
                      "Ctrl-D to leave[/]")
        for path in images:
            console.print(f"[dim]attached {path}[/]")
    try:
        with reported_errors(state):
            loop.run()
    finally:
        save_history()
        model.close()
