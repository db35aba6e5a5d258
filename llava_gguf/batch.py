"""Many images, one or more questions each: rows of JSON, resumable, one bad image never stops a run.

    for row in run_batch(model, tasks, GenerationOptions(...)):
        ...                     # a dict per (image, prompt): the answer or an ``error``

``collect_tasks`` expands files, directories (recursively) and text files of paths into (image, prompt)
tasks; each image is identified by the sha256 of its bytes, so a renamed file is not redone and a
changed one is. ``JsonlOutput`` appends one complete line per row (flushed and fsynced), reads back what
an earlier run finished, and drops a partial last line an interrupted run left. ``write_sidecar``
writes ``<image>.txt`` atomically. The per-image work is one function (``answer_task``) that the
local loop and the Ray actors both call; ``answer_together`` answers several at once on the scheduler.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_gguf.errors import LlavaGGUFError
from llava_gguf.llm.scheduler import Request, Ticket
from llava_gguf.model import GenerationOptions, LlavaModel, Turn
from llava_gguf.partial import sweep_once, write_atomic

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".lst"}


@dataclass(frozen=True)
class Task:
    path: str
    sha256: str | None  # None: the file could not be read
    prompt: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.sha256 or f"unreadable:{self.path}", self.prompt)


def file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def expand_images(sources: Iterable[str | Path]) -> list[Path]:
    """Files as given, directories walked recursively (image suffixes only, sorted), text files of paths
    (one per line, relative to the list) expanded in place; order kept, duplicates of a path dropped."""
    out: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    entry = Path(line.strip()).expanduser()
                    out.append(entry if entry.is_absolute() else path.parent / entry)
        else:
            out.append(path)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


def collect_tasks(sources: Iterable[str | Path], prompts: list[str]) -> list[Task]:
    tasks = []
    for path in expand_images(sources):
        digest = file_sha256(path)
        tasks += [Task(str(path), digest, prompt) for prompt in prompts]
    return tasks


def model_identity(model: LlavaModel) -> dict[str, str]:
    return {"llm": model.llm_path.name, "mmproj": model.mmproj_path.name, "template": model.template.value,
            "vision_encoder": model.encoder_name}


def task_row(task: Task, error: str | None = None) -> dict[str, Any]:
    """A row's opening fields (the task it answers); with ``error``, the whole row of a task without an answer."""
    row: dict[str, Any] = {"path": task.path, "sha256": task.sha256, "prompt": task.prompt}
    return row if error is None else {**row, "error": error}


def unreadable(task: Task) -> dict[str, Any] | None:
    """The error row of a task whose file could not be read, else None."""
    return task_row(task, f"{task.path}: cannot read the file") if task.sha256 is None else None


def answer_row(model: LlavaModel, task: Task, *, answer: str, tokens: list[int], n_prompt_tokens: int,
               n_image_tokens: list[int], n_restored: int, vision_encode_s: float, prefill_s: float,
               decode_s: float, total_s: float) -> dict[str, Any]:
    """The row of an answered task (one at a time or on the scheduler alike)."""
    return {**task_row(task), "answer": answer, "tokens": tokens, "n_prompt_tokens": n_prompt_tokens,
            "n_image_tokens": n_image_tokens, "n_generated": len(tokens), "n_restored": n_restored,
            "timings": {"vision_encode_s": vision_encode_s, "prefill_s": prefill_s, "decode_s": decode_s,
                        "total_s": total_s},
            "model": model_identity(model)}


def answer_task(model: LlavaModel, task: Task, options: GenerationOptions) -> dict[str, Any]:
    """One row: the answer to ``task`` (a fresh conversation), or an ``error`` saying why there is none."""
    if (failed := unreadable(task)) is not None:
        return failed
    start = time.perf_counter()
    try:
        chat = model.chat()
        answer = "".join(chat.send(task.prompt, [task.path], options))
    except LlavaGGUFError as e:
        return task_row(task, str(e))
    t = model.timings
    return answer_row(model, task, answer=answer, tokens=chat.last_tokens, n_prompt_tokens=t.n_prompt_tokens,
                      n_image_tokens=t.n_image_tokens, n_restored=t.n_restored, vision_encode_s=t.vision_encode_s,
                      prefill_s=t.prefill_s, decode_s=t.decode_s, total_s=time.perf_counter() - start)


def unique_tasks(tasks: list[Task]) -> list[Task]:
    """The first task of each (content, prompt), in the order of first occurrence."""
    first: dict[tuple[str, str], Task] = {}
    for task in tasks:
        first.setdefault(task.key, task)
    return list(first.values())


def copied_row(row: dict[str, Any], task: Task) -> dict[str, Any]:
    """``row`` (an answer to the same content and prompt) as the row of ``task``, another name for it."""
    return {**row, "path": task.path, "duplicate_of": row.get("duplicate_of", row["path"])}


def with_duplicates(tasks: list[Task], rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``rows`` of ``unique_tasks(tasks)`` (in any order, as they arrive), each followed at once by copies
    for the other tasks with the same content and prompt (the same image under another name), marked
    ``duplicate_of``: no row waits for another image's answer."""
    copies: dict[tuple[str, str], list[Task]] = {}
    for task in tasks:
        copies.setdefault(task.key, []).append(task)
    for row in rows:
        yield row
        for task in copies.get(row_key(row), [])[1:]:
            yield copied_row(row, task)


def run_batch(model: LlavaModel, tasks: Iterable[Task], options: GenerationOptions,
              parallel: int = 1) -> Iterator[dict[str, Any]]:
    """The rows of ``tasks`` as their answers arrive: each content is answered once, at its first task,
    and the other tasks with that content and prompt (the same image under another name) follow its row
    at once, marked ``duplicate_of``. ``parallel``: answers generated together by the scheduler
    (``llm/scheduler.py``); a finished answer's sequence takes the next task at once."""
    tasks = list(tasks)
    unique = unique_tasks(tasks)
    rows = (answer_together(model, unique, options, parallel) if parallel > 1
            else (answer_task(model, task, options) for task in unique))
    return with_duplicates(tasks, rows)


def answer_together(model: LlavaModel, tasks: Iterable[Task], options: GenerationOptions,
                    parallel: int) -> Iterator[dict[str, Any]]:
    """Rows of ``tasks`` in the order their answers end, ``parallel`` answered at once: one task more than the
    sequences always waits, prepared, so a sequence that frees takes it at the next step."""
    scheduler = model.scheduler(parallel)
    ended: queue.Queue[Ticket] = queue.Queue()
    pending = iter(tasks)
    in_flight: dict[Ticket, tuple[Task, float, Turn]] = {}
    try:
        while True:
            while len(in_flight) <= parallel:
                task = next(pending, None)
                if task is None:
                    break
                if (failed := unreadable(task)) is not None:
                    yield failed
                    continue
                start = time.perf_counter()
                try:
                    turn = model.chat().prepare(task.prompt, [task.path])
                    ticket = scheduler.submit(Request(turn.items, options, model.feature_source(turn.views)),
                                              on_done=ended.put)
                except LlavaGGUFError as e:
                    yield task_row(task, str(e))
                    continue
                in_flight[ticket] = (task, start, turn)
            if not in_flight:
                return
            ticket = ended.get()
            task, start, turn = in_flight.pop(ticket)
            yield scheduled_row(model, task, ticket, turn, time.perf_counter() - start)
    finally:
        scheduler.close()


def scheduled_row(model: LlavaModel, task: Task, ticket: Ticket, turn: Turn, total_s: float) -> dict[str, Any]:
    """The row of a task the scheduler answered, or its ``error``."""
    if ticket.error is not None:
        return task_row(task, str(ticket.error))
    o = ticket.outcome
    return answer_row(model, task, answer=o.text, tokens=o.tokens, n_prompt_tokens=o.n_prompt_tokens,
                      n_image_tokens=turn.n_image_tokens, n_restored=o.n_restored, vision_encode_s=o.vision_s,
                      prefill_s=o.prefill_s - o.vision_s, decode_s=o.decode_s, total_s=total_s)


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    """The (content, prompt) a row answers, as ``Task.key``."""
    return (row.get("sha256") or f"unreadable:{row.get('path')}", row.get("prompt", ""))


class JsonlOutput:
    """Rows appended to a JSONL file, one complete line each, surviving interruption. ``done`` holds the
    (content, prompt) keys it has rows for (error rows count only without ``retry_errors``); ``has_row``
    says whether a task, by its path too, has a row, and ``copy_for`` makes the row of a task whose
    content another path's row already answers (a renamed file, a duplicate whose copy a kill cut off)."""

    def __init__(self, path: Path, retry_errors: bool = False) -> None:
        self.path = path
        self.retry_errors = retry_errors
        self.done: set[tuple[str, str]] = set()
        self._rows: set[tuple[str, tuple[str, str]]] = set()  # (path, key) of every counted row
        self._offsets: dict[tuple[str, str], int] = {}  # key -> where the first counted row's line starts
        self._read_existing()

    def _read_existing(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a line without its newline was cut short: drop it
        if len(complete) != len(data):
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
        offset = 0
        for line in complete.splitlines(keepends=True):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                self._count(row, offset)
            offset += len(line)

    def _count(self, row: dict[str, Any], offset: int) -> None:
        if "error" in row and self.retry_errors:
            return
        key = row_key(row)
        self.done.add(key)
        self._rows.add((str(row.get("path")), key))
        self._offsets.setdefault(key, offset)

    def has_row(self, task: Task) -> bool:
        return (task.path, task.key) in self._rows

    def copy_for(self, task: Task) -> dict[str, Any] | None:
        """The row of ``task`` copied from the row this file holds for its content and prompt, or None."""
        offset = self._offsets.get(task.key)
        if offset is None:
            return None
        with self.path.open("rb") as f:
            f.seek(offset)
            row = json.loads(f.readline())
        return copied_row(row, task)

    def write(self, row: dict[str, Any]) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self.path.open("ab") as f:
            offset = f.tell()
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._count(row, offset)


@dataclass(frozen=True)
class BatchPlan:
    """What a run does with its tasks: ``todo`` to answer, ``copied`` rows made at once from the
    output's rows for the same content and prompt (a renamed file, a copy a kill cut off), and the
    number of tasks ``skipped`` (their row or sidecar exists)."""

    todo: list[Task]
    copied: list[dict[str, Any]]
    skipped: int


def plan_batch(tasks: list[Task], output: JsonlOutput | None, sidecar: bool = False,
               overwrite: bool = False) -> BatchPlan:
    todo: list[Task] = []
    copied: list[dict[str, Any]] = []
    for task in tasks:
        if output is not None and output.has_row(task):
            continue
        if output is None and sidecar and not overwrite and sidecar_path(task.path).exists():
            continue
        row = output.copy_for(task) if output is not None else None
        if row is not None:
            copied.append(row)
        else:
            todo.append(task)
    return BatchPlan(todo, copied, len(tasks) - len(todo) - len(copied))


def sidecar_path(image: str | Path) -> Path:
    return Path(image).with_suffix(".txt")


def write_sidecar(row: dict[str, Any], overwrite: bool = False) -> bool:
    """``<image>.txt`` with the answer, written atomically; False when it exists and ``overwrite`` is off."""
    if "answer" not in row:
        return False
    path = sidecar_path(row["path"])
    if path.exists() and not overwrite:
        return False
    sweep_once(path.parent)  # partial sidecars that a killed run left there
    write_atomic(path, (row["answer"].strip() + "\n").encode("utf-8"))
    return True
