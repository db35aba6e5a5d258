"""The ``llava-gguf`` command line. Only this module prints, and only it turns the library's
exceptions into messages and exit codes (1 for runtime errors, 2 for usage errors)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from llava_gguf.disk_cache import cache_usage, clear_cache
from llava_gguf.errors import LlavaGGUFError
from llava_gguf.image.load import load_image
from llava_gguf.llm.llama import KVCacheType, LlamaOptions
from llava_gguf.llm.repack import RepackPolicy, choose_repack
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.llm.sequence import display_ids
from llava_gguf.llm.templates import Template
from llava_gguf.memory import context_needed, estimate_memory
from llava_gguf.model import EncoderChoice, GenerationOptions, LlavaModel, RuntimeOptions
from llava_gguf.paths import features_dir, history_file, models_dir, prompts_dir
from llava_gguf.repl import ChatLoop, enable_history
from llava_gguf.sources import MODEL_ENV, ModelFiles, ModelRequest, resolve_model
from llava_gguf.vision import DEFAULT_CACHE_BYTES

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)
err_console = Console(stderr=True)


class CLIState:
    debug: bool = False


def _fail(message: str) -> None:
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
        _fail(str(e))
    except OSError as e:  # a cache or output directory that cannot be written, a full disk
        if state.debug:
            raise
        _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
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
        _fail(f"unexpected {type(e).__name__}: {e} (a bug; run again with --debug for the traceback and report it)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and llama.cpp's log.")
@click.version_option(package_name="llava-gguf")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run LLaVA 1.5 / 1.6 vision-language models locally on llama.cpp, exactly as the reference does."""
    state = ctx.ensure_object(CLIState)
    state.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    )


def _conversion_progress(progress: Progress) -> Callable[[str, int, int], None]:
    """A bar per stage for `convert_checkpoint`'s ``progress(description, done, total)``."""
    tasks: dict[str, Any] = {}

    def on_progress(description: str, done: int, total: int) -> None:
        stage = description.split(" ")[0] if not description.startswith("quantizing") else description
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return on_progress


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
    with reported_errors(state), _progress(quiet) as progress:
        result = convert_checkpoint(source, out_dir, options, _conversion_progress(progress))
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
        table.add_row("llava", f"LLaVA {llava['version']}, {llava['image_mode']}")
        for note in llava["inferred"]:
            table.add_row("inferred", note)
    if info.get("reference"):
        table.add_row("reference", str(info["reference"]))
    if info.get("template"):
        table.add_row("template", str(info["template"]))
    if info.get("chat_template"):
        table.add_row("chat_template", f"{len(info['chat_template'])} characters")
    console.print(table)



# ---------------------------------------------------------------- the caches


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
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None)
    for column in ("cache", "entries", "size", "directory"):
        table.add_column(column, justify="right" if column in ("entries", "size") else "left")
    for row in rows:
        table.add_row(row["cache"], str(row["entries"]), _human(row["bytes"]), row["directory"])
    Console().print(table)


@cache.command("clear")
def cache_clear() -> None:
    """Empty the image feature and prompt caches (converted models stay)."""
    for name, directory, pattern in _caches():
        files, size = clear_cache(directory, pattern)
        click.echo(f"{name}: removed {files} entries ({_human(size)}) from {directory}")


# ---------------------------------------------------------------- running a model: ask and chat


@dataclass(frozen=True)
class RunSettings:
    """The options `ask` and `chat` share: which model, how it runs, how it samples."""

    model: str | None
    llm: Path | None
    mmproj: Path | None
    quant: str | None
    revision: str | None
    n_gpu_layers: int
    threads: int | None
    ctx_size: int | None
    kv_cache_type: str | None
    flash_attn: str
    encoder: str
    temp: float
    top_p: float
    top_k: int
    repeat_penalty: float
    seed: int | None
    max_tokens: int
    template: str | None
    llava_version: str | None
    system: str | None
    no_cache: bool
    low_memory: bool
    repack: str
    quiet: bool

    def model_request(self) -> ModelRequest:
        return ModelRequest(model=self.model, llm=self.llm, mmproj=self.mmproj, quant=self.quant,
                            revision=self.revision)

    def runtime_options(self) -> RuntimeOptions:
        kv = self.kv_cache_type or ("q8_0" if self.low_memory else "f16")
        llama = LlamaOptions(
            n_ctx=self.ctx_size, n_threads=self.threads, n_gpu_layers=self.n_gpu_layers,
            kv_cache_type=KVCacheType(kv), flash_attn={"auto": None, "on": True, "off": False}[self.flash_attn],
            use_mmap=True,
            # low memory: the smallest resident set, so never a repacked copy
            repack=RepackPolicy.OFF if self.low_memory else RepackPolicy(self.repack),
        )
        return RuntimeOptions(
            llama=llama, encoder=EncoderChoice(self.encoder),
            cache_dir=None if self.no_cache else features_dir(),
            prompt_cache=not self.no_cache,
            template=Template(self.template) if self.template else None,
            llava_version=self.llava_version,
            low_memory=self.low_memory,
        )

    def generation_options(self) -> GenerationOptions:
        sampling = SamplingOptions(temperature=self.temp, top_p=self.top_p, top_k=self.top_k,
                                   repeat_penalty=self.repeat_penalty, seed=self.seed)
        return GenerationOptions(max_tokens=self.max_tokens, sampling=sampling)


_RUN_OPTIONS = [
    click.option("-m", "--model", envvar=MODEL_ENV, show_envvar=True,
                 help="A directory with an LLM GGUF and an mmproj GGUF, an LLM .gguf, a Hub repo of GGUF pairs, an "
                      "ollama model (ollama:llava:7b), or a Hugging Face checkpoint (directory or repo id; converted "
                      "once into the cache)."),
    click.option("--llm", type=click.Path(dir_okay=False, path_type=Path), help="The LLM GGUF (with --mmproj)."),
    click.option("--mmproj", type=click.Path(dir_okay=False, path_type=Path), help="The mmproj GGUF (with --llm)."),
    click.option("--quant", help="LLM file type: which GGUF of a Hub repo, or what to convert a checkpoint to "
                                 "[default: Q4_K_M]."),
    click.option("--revision", help="Hub revision (branch, tag or commit) of the model."),
    click.option("-ngl", "--n-gpu-layers", type=click.IntRange(min=-1), default=0, show_default=True,
                 help="Layers offloaded to the GPU (-1: all)."),
    click.option("-t", "--threads", type=click.IntRange(min=1), help="CPU threads [default: all cores]."),
    click.option("-c", "--ctx-size", type=click.IntRange(min=16),
                 help="Context size in tokens [default: what the request needs]."),
    click.option("--kv-cache-type", type=click.Choice([t.value for t in KVCacheType], case_sensitive=False),
                 help="KV cache element type [default: f16; q8_0 with --low-memory]."),
    click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                 help="llama.cpp flash attention."),
    click.option("--encoder", type=click.Choice([e.value for e in EncoderChoice]), default="auto",
                 show_default=True,
                 help="Vision encoder: auto picks the fastest exact one (ggml on the GPU with -ngl, else ggml or "
                      "NumPy, whichever runs faster here); ggml, numpy and mtmd force one."),
    click.option("--temp", type=click.FloatRange(min=0), default=0.2, show_default=True,
                 help="Sampling temperature (0: greedy)."),
    click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True),
    click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0: off."),
    click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                 help="1: off."),
    click.option("--seed", type=int, help="Sampling seed."),
    click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
                 help="Longest answer in tokens."),
    click.option("--template", type=click.Choice([t.value for t in Template]),
                 help="Conversation template [default: the one the GGUF names; guessed for other tools' files]."),
    click.option("--llava-version", type=click.Choice(["1.5", "1.6"]),
                 help="Treat the mmproj as LLaVA 1.5 (padded square) or 1.6 (anyres tiles) [default: the file's; "
                      "inferred for other tools' files]."),
    click.option("--system", help="System prompt [default: the template's]."),
    click.option("--no-cache", is_flag=True,
                 help="Keep nothing on disk across runs: neither image features nor prompt KV states."),
    click.option("--low-memory", is_flag=True, help="q8_0 KV cache, the smallest context that fits, mmap, no "
                                                    "weight repacking."),
    click.option("--repack", type=click.Choice([p.value for p in RepackPolicy]), default="auto", show_default=True,
                 help="llama.cpp's CPU weight repacking: auto measures once which is faster on this CPU."),
    click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr but errors."),
]


def run_options(f: F) -> F:
    """Add the shared options; the command receives them as one ``settings: RunSettings``."""
    names = [field.name for field in fields(RunSettings)]

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        settings = RunSettings(**{name: kwargs.pop(name) for name in names})
        if settings.llm is not None or settings.mmproj is not None:
            if (settings.llm is None) != (settings.mmproj is None):
                raise click.UsageError("give both --llm and --mmproj")
            if click.get_current_context().get_parameter_source("model") is ParameterSource.COMMANDLINE:
                raise click.UsageError("give -m or --llm/--mmproj, not both")
            settings = replace(settings, model=None)  # over LLAVA_GGUF_MODEL
        return f(*args, settings=settings, **kwargs)

    for option in reversed(_RUN_OPTIONS):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _report_memory(files: ModelFiles, settings: RunSettings, n_ctx: int | None) -> None:
    kv = KVCacheType(settings.runtime_options().llama.kv_cache_type)
    m = estimate_memory(files.llm, files.mmproj, n_ctx=n_ctx, kv_cache_type=kv,
                        vision_cache_bytes=0 if settings.low_memory else DEFAULT_CACHE_BYTES)
    line = (f"memory estimate {_human(m.total)}: weights {_human(m.weights)}, KV cache {_human(m.kv_cache)} "
            f"({'up to ' if n_ctx is None else ''}{m.n_ctx} positions, {kv.value}), vision encoder {_human(m.vision)}")
    if m.available is not None:
        line += f"; {_human(m.available)} available"
    if settings.n_gpu_layers:
        line += " (offloaded layers live on the GPU)"
    llama = settings.runtime_options().llama
    if llama.repack is RepackPolicy.AUTO and not settings.n_gpu_layers:
        line += "; " + choose_repack(llama.n_threads or os.cpu_count() or 2).reason  # measured once per machine
    elif not settings.n_gpu_layers:
        line += f"; weight repacking {llama.repack.value}" + (" (--low-memory)" if settings.low_memory else "")
    if m.fits is False:
        err_console.print(f"[yellow]warning:[/] {line}; try --low-memory, a smaller --quant or -c",
                          highlight=False, soft_wrap=True)
    else:
        err_console.print(line, style="dim", highlight=False, soft_wrap=True)


def _load_model(settings: RunSettings, *, quiet: bool, n_ctx_hint: Callable[[ModelFiles], int | None]) -> LlavaModel:
    """Find (download, convert) the model, tell what it needs, load it."""
    request = settings.model_request()
    if request.model is None and request.llm is None:
        raise click.UsageError(f"no model: pass -m MODEL (or --llm and --mmproj), or set {MODEL_ENV}")

    def event(message: str) -> None:
        log.info("%s", message)
        if not quiet:
            err_console.print(message, style="dim", highlight=False, soft_wrap=True)

    with _progress(quiet) as progress:
        files = resolve_model(request, _conversion_progress(progress), event)
    if not quiet:
        _report_memory(files, settings, settings.ctx_size or n_ctx_hint(files))
    model = LlavaModel(files.llm, files.mmproj, settings.runtime_options(), template_hint=files.template_hint)
    if not quiet:
        if model.inference_note:  # files made by other tools: what was inferred, in one line
            event(f"{model.inference_note}; use --template / --llava-version to change")
        event(model.encoder_reason)  # once, in one line: which vision encoder, and why
    return model


class TileProgress:
    """``on_tile(done, total)`` as a bar per image on stderr; ``stop()`` before the answer prints."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task: Any = None
        self.images = 0
        self.last = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("tiles"), TimeElapsedColumn(), console=err_console)
            self.progress.start()
        if self.task is None or done <= self.last:
            self.images += 1
            self.task = self.progress.add_task(f"encoding image {self.images}", total=total)
        self.progress.update(self.task, completed=done, total=total)
        self.last = done

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task, self.last = None, 0


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

        model = _load_model(settings, quiet=quiet, n_ctx_hint=n_ctx_hint)
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
        model = _load_model(settings, quiet=settings.quiet, n_ctx_hint=lambda files: None)
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


# ---------------------------------------------------------------- the server


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="LLAVA_GGUF_API_KEY", show_envvar=True,
              help="Require this Bearer token on every route but /health (needed to listen beyond loopback).")
@click.option("--no-auth", is_flag=True, help="Listen beyond loopback without an API key (anyone who can reach "
                                              "the port can use the model).")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow browser pages from this origin "
                                                                     "(repeat for several); none by default.")
@click.option("--allow-remote-images", is_flag=True, help="Fetch http(s) image URLs (public addresses only).")
@click.option("--allowed-dir", "allowed_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Let requests name local image files under this directory (repeat for several).")
@click.option("--max-queue", type=click.IntRange(min=0), default=4, show_default=True,
              help="Requests waiting for the model beyond the one generating; more get 429.")
@click.option("--max-images", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images in one conversation.")
@click.option("--max-image-mb", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True)
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True)
@run_options
@click.pass_obj
def serve(state: CLIState, host: str, port: int, api_key: str | None, no_auth: bool, cors_origins: tuple[str, ...],
          allow_remote_images: bool, allowed_dirs: tuple[Path, ...], max_queue: int, max_images: int,
          max_image_mb: float, max_body_mb: float, settings: RunSettings) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/models) and a web page (/).

    --temp, --top-p, -n and the other sampling options are the defaults for requests that leave them out.

    \b
    Examples:
      llava-gguf serve -m llava-hf/llava-1.5-7b-hf
      llava-gguf serve -m ollama:llava:7b --port 8000
      llava-gguf serve -m models/ --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
    """
    import uvicorn

    from llava_gguf.server.app import AppOptions, create_app
    from llava_gguf.server.images import ImagePolicy
    from llava_gguf.server.service import ChatService, ServiceOptions

    if host not in _LOOPBACK and api_key is None and not no_auth:
        raise click.UsageError(f"--host {host} reaches beyond this machine: give --api-key (or --no-auth, knowingly)")
    if no_auth and host not in _LOOPBACK:
        err_console.print(f"[yellow]warning:[/] listening on {host} without an API key: anyone who reaches the port "
                          "can use the model", highlight=False)
    with reported_errors(state):
        model = _load_model(settings, quiet=settings.quiet, n_ctx_hint=lambda files: None)
        name = Path(settings.model).name if settings.model and not settings.model.startswith("ollama:") else (
            settings.model or model.llm_path.stem)
        policy = ImagePolicy(max_bytes=int(max_image_mb * 2**20), max_images=max_images,
                             allow_remote=allow_remote_images, allowed_dirs=tuple(d.resolve() for d in allowed_dirs))
        service = ChatService(model, ServiceOptions(name=name, max_queue=max_queue, images=policy,
                                                    defaults=settings.generation_options()))
        app = create_app(service, AppOptions(api_key=api_key, cors_origins=cors_origins,
                                             max_body_bytes=int(max_body_mb * 2**20)))
    shown = f"[{host}]" if ":" in host else host
    if not settings.quiet:
        err_console.print(f"serving {name} on http://{shown}:{port}/ (OpenAI API at http://{shown}:{port}/v1)",
                          highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        model.close()




# ---------------------------------------------------------------- many images


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--prompt", "-p", "prompt_texts", multiple=True, help="A question for every image (repeat for several).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A file of questions, one per line, each asked of every image.")
@click.option("--out", "-o", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The JSONL file rows are appended to (a rerun skips what it holds).")
@click.option("--sidecar", is_flag=True, help="Write each answer to <image stem>.txt beside the image (one prompt).")
@click.option("--overwrite", is_flag=True, help="With --sidecar: replace existing .txt files (else skip their images).")
@click.option("--retry-errors", is_flag=True, help="Run again the tasks the output holds error rows for.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              help="Run on Ray Data: a local Ray, or the cluster at ADDRESS (pip install 'llava-gguf[ray]').")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: actors, each with one loaded model and -t threads.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Answers decoded together (one llama.cpp batch step for all; prefill stays one at a time).")
@run_options
@click.pass_obj
def batch(state: CLIState, images: tuple[str, ...], prompt_texts: tuple[str, ...], prompts_file: Path | None,
          out_path: Path | None, sidecar: bool, overwrite: bool, retry_errors: bool, ray_address: str | None,
          workers: int, parallel: int, settings: RunSettings) -> None:
    """Ask every prompt of every image (files, directories walked recursively, or .txt lists of paths),
    writing one JSON line per (image, prompt): the answer, token counts and timings, or an `error`.

    Rerunning the same command skips the rows the output already holds (images known by the sha256
    of their bytes), so an interrupted run resumes; a bad image is an error row, never a stop.

    \b
    Examples:
      llava-gguf batch photos/ -p "Describe the image in one sentence." -o captions.jsonl -m models/
      llava-gguf batch photos/ --prompts questions.txt -o answers.jsonl --temp 0
      llava-gguf batch photos/ -p "Write a caption." --sidecar -m models/
      llava-gguf batch list.txt -p "Describe it." -o out.jsonl --ray --workers 2
    """
    from llava_gguf.batch import JsonlOutput, collect_tasks, sidecar_path, unique_tasks, with_duplicates, write_sidecar

    prompts = list(prompt_texts)
    if prompts_file is not None:
        try:
            prompts += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise click.UsageError(f"{prompts_file}: cannot read ({e.strerror})") from e
    if not prompts:
        raise click.UsageError("give a question: --prompt TEXT or --prompts FILE")
    if out_path is None and not sidecar:
        raise click.UsageError("give --out FILE.jsonl, --sidecar, or both")
    if sidecar and len(prompts) != 1:
        raise click.UsageError("--sidecar writes one answer per image: give one prompt")
    with reported_errors(state):
        output = JsonlOutput(out_path, retry_errors) if out_path is not None else None
        tasks = collect_tasks(images, prompts)
        todo = [t for t in tasks if not (output is not None and t.key in output.done)
                and not (output is None and sidecar and not overwrite and sidecar_path(t.path).exists())]
        skipped = len(tasks) - len(todo)
        quiet = settings.quiet
        if not quiet:
            err_console.print(f"{len(tasks)} task(s) ({len({t.path for t in tasks})} images x {len(prompts)} "
                              f"prompt(s)); {skipped} already done; {len(todo)} to run", highlight=False)
        if not todo:
            return
        options = settings.generation_options()
        if ray_address is not None:
            from llava_gguf.batch_ray import run_batch_ray

            files = resolve_model(settings.model_request())
            # the same content under another name is answered once, its answer copied to the other paths
            rows = with_duplicates(todo, run_batch_ray(unique_tasks(todo), files, settings.runtime_options(), options,
                                                       workers=workers,
                                                       address=None if ray_address == "local" else ray_address))
            model = None
        else:
            from llava_gguf.batch import run_batch

            model = _load_model(settings, quiet=quiet, n_ctx_hint=lambda files: None)
            rows = run_batch(model, todo, options, parallel=parallel)
        errors = 0
        start = time.perf_counter()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[errors]} errors"), TextColumn("{task.fields[rate]}"),
                            TimeRemainingColumn(), console=err_console, disable=quiet, transient=False)
        try:
            with progress:
                bar = progress.add_task("answering", total=len(todo), errors=0, rate="")
                for done, row in enumerate(rows, 1):
                    if output is not None:
                        output.write(row)
                    if sidecar:
                        write_sidecar(row, overwrite)
                    errors += "error" in row
                    elapsed = time.perf_counter() - start
                    progress.update(bar, completed=done, errors=errors, rate=f"{60 * done / elapsed:.1f}/min")
        finally:
            if model is not None:
                model.close()
        elapsed = time.perf_counter() - start
        if not quiet:
            err_console.print(f"done: {len(todo) - errors} answered, {errors} error(s), {skipped} skipped, "
                              f"{elapsed:.1f} s ({60 * len(todo) / max(elapsed, 1e-9):.1f}/min)"
                              + (f" -> {out_path}" if out_path else ""), highlight=False, soft_wrap=True)
        if errors == len(todo):
            _fail(f"every one of the {errors} task(s) failed; see the error rows" + (f" in {out_path}" if out_path else ""))


if __name__ == "__main__":
    main()
