"""Many images: ``batch``."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from llava_gguf.cli.console import err_console
from llava_gguf.cli.errors import CLIState, fail, reported_errors
from llava_gguf.cli.group import main
from llava_gguf.cli.run_options import RunSettings, load_model, run_options
from llava_gguf.sources import resolve_model


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
@click.option("--parallel", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Answers generated together (one llama.cpp batch step for all); a finished answer's sequence "
                   "takes the next image at once.")
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
    from llava_gguf.batch import JsonlOutput, collect_tasks, plan_batch, unique_tasks, with_duplicates, write_sidecar

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
        plan = plan_batch(tasks, output, sidecar, overwrite)
        todo, skipped = plan.todo, plan.skipped
        quiet = settings.quiet
        if not quiet:
            err_console.print(f"{len(tasks)} task(s) ({len({t.path for t in tasks})} images x {len(prompts)} "
                              f"prompt(s)); {skipped} already done; "
                              + (f"{len(plan.copied)} copied from rows for the same image; " if plan.copied else "")
                              + f"{len(todo)} to run", highlight=False)
        if not todo and not plan.copied:
            return
        options = settings.generation_options()
        model = None
        if not todo:
            answered: Iterator[dict[str, Any]] = iter(())
        elif ray_address is not None:
            from llava_gguf.batch_ray import run_batch_ray

            files = resolve_model(settings.model_request())
            # the same content under another name is answered once, its answer copied to the other paths
            answered = with_duplicates(todo, run_batch_ray(unique_tasks(todo), files, settings.runtime_options(),
                                                           options, workers=workers,
                                                           address=None if ray_address == "local" else ray_address))
        else:
            from llava_gguf.batch import run_batch
            from llava_gguf.llm.sizing import DEFAULT_SEQUENCE_POSITIONS

            # --parallel: the scheduler's sequences, up to 4096 positions each (scheduler.default_pool_size)
            model = load_model(settings, quiet=quiet, n_seq=parallel,
                               n_ctx_hint=lambda files: None if parallel == 1 else DEFAULT_SEQUENCE_POSITIONS)
            answered = run_batch(model, todo, options, parallel=parallel)
        rows = itertools.chain(plan.copied, answered)
        total = len(todo) + len(plan.copied)
        errors = 0
        start = time.perf_counter()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[errors]} errors"), TextColumn("{task.fields[rate]}"),
                            TimeRemainingColumn(), console=err_console, disable=quiet, transient=False)
        try:
            with progress:
                bar = progress.add_task("answering", total=total, errors=0, rate="")
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
            err_console.print(f"done: {total - errors} answered, {errors} error(s), {skipped} skipped, "
                              f"{elapsed:.1f} s ({60 * total / max(elapsed, 1e-9):.1f}/min)"
                              + (f" -> {out_path}" if out_path else ""), highlight=False, soft_wrap=True)
        if errors == total:
            fail(f"every one of the {errors} task(s) failed; see the error rows" + (f" in {out_path}" if out_path else ""))
