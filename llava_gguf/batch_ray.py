"""The batch on Ray Data: the task list as a dataset, mapped by a pool of actors that each load the model
once and call the same ``answer_task`` as the local loop. Imported only for ``batch --ray``.

Rows cross Ray as JSON strings (they nest lists and dicts); each task is a block of its own, so the
driver yields each row as it arrives and writes it, and resuming works as locally. An actor that dies is restarted and its work retried by
Ray; a task that still fails becomes an error row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from llava_gguf.batch import Task, answer_task
from llava_gguf.errors import ModelLoadError
from llava_gguf.model import GenerationOptions, LlavaModel, RuntimeOptions
from llava_gguf.sources import ModelFiles

MAX_BLOCKS = 10_000  # beyond it a block holds a few tasks: fewer objects for Ray to track


class AnswerActor:
    """One loaded model per actor; each call answers a batch of task rows."""

    def __init__(self, files: ModelFiles, runtime: RuntimeOptions, generation: GenerationOptions) -> None:
        self.model = LlavaModel(files.llm, files.mmproj, runtime, template_hint=files.template_hint)
        self.generation = generation

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        rows = []
        for path, sha256, prompt in zip(batch["path"], batch["sha256"], batch["prompt"]):
            task = Task(str(path), None if sha256 in (None, "") else str(sha256), str(prompt))
            try:
                rows.append(answer_task(self.model, task, self.generation))
            except Exception as e:  # noqa: BLE001  a row that fails is written with its error
                rows.append({"path": task.path, "sha256": task.sha256, "prompt": task.prompt,
                             "error": f"unexpected {type(e).__name__}: {e}"})
        return {"row": [json.dumps(row, ensure_ascii=False) for row in rows]}


def run_batch_ray(tasks: list[Task], files: ModelFiles, runtime: RuntimeOptions, generation: GenerationOptions, *,
                  workers: int = 1, address: str | None = None, num_cpus: int | None = None) -> Iterator[dict[str, Any]]:
    """The rows of ``tasks`` computed on Ray (a local instance, or the cluster at ``address``)."""
    try:
        import ray
    except ImportError as e:
        raise ModelLoadError("--ray needs Ray Data: pip install 'llava-gguf[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    threads = runtime.llama.n_threads or 1
    items = [{**asdict(task), "sha256": task.sha256 or ""} for task in tasks]
    # a block per task (up to MAX_BLOCKS): a row reaches the driver, and the output file, as soon as its
    # answer exists, not when the rest of its block is done
    blocks = max(1, min(len(items), MAX_BLOCKS))
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        AnswerActor, fn_constructor_kwargs={"files": files, "runtime": runtime, "generation": generation},
        batch_size=1, concurrency=workers, num_cpus=threads,
        max_restarts=2, max_task_retries=2,
    )
    for row in dataset.iter_rows():
        yield json.loads(row["row"])
