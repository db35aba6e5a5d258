"""The options every command that runs a model shares (which model, how it runs, how it samples),
defined once as ``RunSettings``, and loading the model they name."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from llava_gguf.cli.console import conversion_progress, err_console, human, transfer_progress
from llava_gguf.llm.llama import KVCacheType, LlamaOptions
from llava_gguf.llm.repack import RepackPolicy, choose_repack
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.llm.templates import Template
from llava_gguf.memory import estimate_memory
from llava_gguf.model import EncoderChoice, GenerationOptions, LlavaModel, RuntimeOptions
from llava_gguf.paths import features_dir
from llava_gguf.sources import MODEL_ENV, ModelFiles, ModelRequest, resolve_model
from llava_gguf.vision import DEFAULT_CACHE_BYTES

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)


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

def report_memory(files: ModelFiles, settings: RunSettings, n_ctx: int | None, n_seq: int = 1) -> None:
    kv = KVCacheType(settings.runtime_options().llama.kv_cache_type)
    m = estimate_memory(files.llm, files.mmproj, n_ctx=n_ctx, kv_cache_type=kv, n_seq=n_seq,
                        vision_cache_bytes=0 if settings.low_memory else DEFAULT_CACHE_BYTES)
    sequences = f" for {n_seq} sequences" if n_seq > 1 else ""
    line = (f"memory estimate {human(m.total)}: weights {human(m.weights)}, KV cache {human(m.kv_cache)} "
            f"({'up to ' if n_ctx is None else ''}{m.n_ctx} positions{sequences}, {kv.value}), "
            f"vision encoder {human(m.vision)}")
    if m.available is not None:
        line += f"; {human(m.available)} available"
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


def load_model(settings: RunSettings, *, quiet: bool, n_ctx_hint: Callable[[ModelFiles], int | None],
               n_seq: int = 1) -> LlavaModel:
    """Find (download, convert) the model, tell what it needs, load it. ``n_ctx_hint``: the positions a request
    needs when ``-c`` does not say; ``n_seq``: sequences of that many positions (a server's)."""
    request = settings.model_request()
    if request.model is None and request.llm is None:
        raise click.UsageError(f"no model: pass -m MODEL (or --llm and --mmproj), or set {MODEL_ENV}")

    def event(message: str) -> None:
        log.info("%s", message)
        if not quiet:
            err_console.print(message, style="dim", highlight=False, soft_wrap=True)

    with transfer_progress(quiet) as progress:
        files = resolve_model(request, conversion_progress(progress), event)
    if not quiet:
        report_memory(files, settings, settings.ctx_size or n_ctx_hint(files), n_seq)
    model = LlavaModel(files.llm, files.mmproj, settings.runtime_options(), template_hint=files.template_hint)
    if not quiet:
        if model.inference_note:  # files made by other tools: what was inferred, in one line
            event(f"{model.inference_note}; use --template / --llava-version to change")
        event(model.encoder_reason)  # once, in one line: which vision encoder, and why
    return model
