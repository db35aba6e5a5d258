"""The local server: ``serve``."""

from __future__ import annotations

from pathlib import Path

import click

from llava_gguf.cli.console import err_console
from llava_gguf.cli.errors import CLIState, reported_errors
from llava_gguf.cli.group import main
from llava_gguf.cli.run_options import RunSettings, load_model, run_options

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
@click.option("--parallel", type=click.IntRange(1, 256), default=None,
              help="Requests answered together, as sequences of one context [default: from the hardware: 4 on a "
                   "CPU, 8 with GPU offload]. -c is each sequence's context.")
@click.option("--kv-streams", is_flag=True,
              help="Give each sequence a KV stream of its own, laid out as a lone request's: quantized models' "
                   "answers part from their lone answers less often, decoding together is slower, and the prompt "
                   "cache on disk is not used.")
@click.option("--max-queue", type=click.IntRange(min=0), default=4, show_default=True,
              help="Requests waiting for a sequence beyond the --parallel answering; more get 429.")
@click.option("--max-images", type=click.IntRange(min=1), default=8, show_default=True,
              help="Images in one conversation.")
@click.option("--max-image-mb", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True)
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=100_000_000, show_default=True,
              help="Pixels (width x height, read from the image's header before decoding) in one image; more get "
                   "400.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True)
@run_options
@click.pass_obj
def serve(state: CLIState, host: str, port: int, api_key: str | None, no_auth: bool, cors_origins: tuple[str, ...],
          allow_remote_images: bool, allowed_dirs: tuple[Path, ...], parallel: int | None, kv_streams: bool,
          max_queue: int, max_images: int,
          max_image_mb: float, max_image_pixels: int, max_body_mb: float, settings: RunSettings) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/models) and a web page (/).

    --temp, --top-p, -n and the other sampling options are the defaults for requests that leave them out.

    \b
    Examples:
      llava-gguf serve -m llava-hf/llava-1.5-7b-hf
      llava-gguf serve -m ollama:llava:7b --port 8000
      llava-gguf serve -m models/ --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
    """
    import uvicorn

    from llava_gguf.llm.sizing import DEFAULT_SEQUENCE_POSITIONS, default_sequences
    from llava_gguf.server.app import AppOptions, create_app
    from llava_gguf.server.images import ImagePolicy
    from llava_gguf.server.service import ChatService, ServiceOptions

    if host not in _LOOPBACK and api_key is None and not no_auth:
        raise click.UsageError(f"--host {host} reaches beyond this machine: give --api-key (or --no-auth, knowingly)")
    if no_auth and host not in _LOOPBACK:
        err_console.print(f"[yellow]warning:[/] listening on {host} without an API key: anyone who reaches the port "
                          "can use the model", highlight=False)
    if parallel is None:
        parallel, why = default_sequences(settings.n_gpu_layers, settings.threads)
    else:
        why = "as asked"

    with reported_errors(state):
        # what default_pool_size gives before its memory cap: each sequence up to 4096 positions (one pool's
        # worth shared with GPU offload)
        pooled = bool(settings.n_gpu_layers) and not kv_streams and not settings.ctx_size
        model = load_model(settings, quiet=settings.quiet, n_ctx_hint=lambda files: DEFAULT_SEQUENCE_POSITIONS,
                           n_seq=1 if pooled else parallel)
        name = Path(settings.model).name if settings.model and not settings.model.startswith("ollama:") else (
            settings.model or model.llm_path.stem)
        policy = ImagePolicy(max_bytes=int(max_image_mb * 2**20), max_images=max_images, max_pixels=max_image_pixels,
                             allow_remote=allow_remote_images, allowed_dirs=tuple(d.resolve() for d in allowed_dirs))
        service = ChatService(model, ServiceOptions(name=name, parallel=parallel, max_queue=max_queue,
                                                    kv_streams=kv_streams, images=policy,
                                                    defaults=settings.generation_options()))
        app = create_app(service, AppOptions(api_key=api_key, cors_origins=cors_origins,
                                             max_body_bytes=int(max_body_mb * 2**20)))
    shown = f"[{host}]" if ":" in host else host
    if not settings.quiet:
        err_console.print(f"serving {name} on http://{shown}:{port}/ (OpenAI API at http://{shown}:{port}/v1)",
                          highlight=False)
        scheduler = service.scheduler
        room = (f"sharing {scheduler.ctx.size} positions, up to {scheduler.max_request} each" if scheduler.ctx.unified
                else f"{scheduler.max_request} positions each")
        err_console.print(f"{parallel} request(s) answered together ({why}; --parallel to change), {room}",
                          highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        service.close()
        model.close()
