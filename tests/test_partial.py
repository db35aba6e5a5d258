"""Partial files that writers killed mid-way left behind are removed by the next run that writes there
(and by `cache clear`); a live writer's partial file never is. Real processes, real `kill -9`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from llama_utils import load_llama, mtmd_loads

from llava_gguf.convert import ConvertOptions, Quant, convert_checkpoint
from llava_gguf.disk_cache import clear_cache, clear_partials, partial_usage
from llava_gguf.feature_cache import FeatureCache
from llava_gguf.llm.prompt_cache import PromptCache
from llava_gguf.llm.sequence import ImageSlot
from llava_gguf.partial import (
    PID_REUSE_AGE_S,
    atomic_file,
    is_stale,
    partial_path,
    stale_usage,
    sweep,
    sweep_once,
    write_atomic,
    writer_pid,
)
from llava_gguf.sources import ModelRequest, resolve_model

# A conversion slowed down by its progress callback, so that a kill lands mid-way.
SLOW_CONVERT = """
import sys, time
from llava_gguf.convert import ConvertOptions, Quant, convert_checkpoint
convert_checkpoint(sys.argv[1], sys.argv[2], ConvertOptions(quant=Quant.Q4_K_M), lambda *a: time.sleep(0.05))
"""
SLOW_FIRST_USE = """
import sys, time
from pathlib import Path
from llava_gguf.sources import ModelRequest, resolve_model
resolve_model(ModelRequest(model=sys.argv[1]), lambda *a: time.sleep(0.05))
"""
# Holds a partial file open (and locked) until told to finish on stdin.
HOLD = """
import sys
from pathlib import Path
from llava_gguf.partial import open_partial
with open_partial(Path(sys.argv[1])) as partial:
    print(partial.path, flush=True)
    sys.stdin.readline()
"""


def partials(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*.partial"))


def wait_for(condition: Callable[[], object], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def kill_when(args: list[str], ready: Callable[[], object], env: dict[str, str] | None = None) -> int:
    """Run ``python -c args``, ``kill -9`` it once ``ready()``; its pid."""
    proc = subprocess.Popen([sys.executable, "-c", *args], env=env)
    try:
        wait_for(lambda: ready() or proc.poll() is not None)
        assert proc.poll() is None, f"finished before the kill (exit {proc.returncode})"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return proc.pid


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextmanager
def live_writer(final: Path) -> Iterator[Path]:
    """Another process writing ``final``: its partial file, while it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(final)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        path = Path(proc.stdout.readline().strip())
        assert path.is_file() and writer_pid(path) == proc.pid
        yield path
    finally:
        proc.communicate("\n", timeout=30)
    assert not path.exists()  # a writer that finishes removes its own partial file


def leftover(final: Path, size: int = 1000) -> Path:
    """What a writer killed while writing ``final`` leaves: its partial file, unlocked, of a dead pid."""
    path = partial_path(final, dead_pid())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


def assert_loads(llm: Path, mmproj: Path) -> None:
    model = load_llama(llm, n_ctx=64, logits_all=False)
    try:
        assert len(model.tokenize(b"hello")) > 0
        assert mtmd_loads(mmproj, model)
    finally:
        model.close()


# ---------------------------------------------------------------- conversions


def test_a_killed_conversion_is_swept_by_the_next_one(tiny_checkpoint, tmp_path: Path) -> None:
    """`kill -9` mid-way leaves the three partial files (mmproj, final LLM, unquantized LLM); the next
    conversion into the folder removes them and writes a pair that loads."""
    ckpt = tiny_checkpoint()
    out = tmp_path / "out"
    name = ckpt.path.name
    def llm_begun() -> bool:
        return bool(list(out.glob(f".{name}.F16.gguf.*.partial")))

    pid = kill_when([SLOW_CONVERT, str(ckpt.path), str(out)], llm_begun)
    left = partials(out)
    assert {p.name for p in left} == {f".{name}.F16.gguf.{pid}.partial", f".{name}.Q4_K_M.gguf.{pid}.partial",
                                      f".{name}.mmproj-f16.gguf.{pid}.partial"}
    assert all(is_stale(p) for p in left) and stale_usage(out).files == 3

    result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.Q4_K_M))
    assert partials(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted([result.llm.name, result.mmproj.name])
    assert_loads(result.llm, result.mmproj)


def test_two_conversions_into_one_folder_at_once(tiny_checkpoint, tmp_path: Path) -> None:
    """The second one's sweep leaves the first one's partial files (its writer is alive): both succeed."""
    ckpt = tiny_checkpoint()
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(ckpt.path), str(out)])
    try:
        wait_for(lambda: len(partials(out)) >= 2 or first.poll() is not None)
        theirs = partials(out)
        assert first.poll() is None and theirs
        result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.Q4_K_M))
        assert all(p.exists() or first.poll() is not None for p in theirs)
    finally:
        assert first.wait(timeout=300) == 0
    assert partials(out) == []
    assert_loads(result.llm, result.mmproj)


def test_a_killed_conversion_on_first_use_is_swept(tiny_checkpoint, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the cache (`<cache>/models/<key>/`): `cache info` counts what the kill left, the next
    `ask` converts again and leaves nothing."""
    ckpt = tiny_checkpoint()
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAVA_GGUF_CACHE", str(cache))
    kill_when([SLOW_FIRST_USE, str(ckpt.path)], lambda: len(partials(cache)) >= 3,
              env=os.environ | {"LLAVA_GGUF_CACHE": str(cache)})
    files, size = partial_usage(cache)
    assert files == 3 and size > 0

    found = resolve_model(ModelRequest(model=str(ckpt.path)))
    assert found.converted and partials(cache) == [] and partial_usage(cache) == (0, 0)
    assert_loads(found.llm, found.mmproj)


# ---------------------------------------------------------------- staleness


def test_a_live_writers_partial_survives_a_sweep(tmp_path: Path) -> None:
    stale = leftover(tmp_path / "b.bin")
    with live_writer(tmp_path / "a.bin") as theirs:
        assert not is_stale(theirs)
        assert sweep(tmp_path).files == 1
        assert theirs.exists() and not stale.exists()
        assert stale_usage(tmp_path).files == 0
        assert clear_partials(tmp_path) == (0, 0) and theirs.exists()


def test_a_reused_pid_does_not_keep_a_leftover(tmp_path: Path) -> None:
    """A partial file named with a live pid but not locked by it: a young one is spared (its writer is
    between creating and locking it), an old one is stale."""
    young = partial_path(tmp_path / "young.bin", os.getppid())
    old = partial_path(tmp_path / "old.bin", os.getppid())
    young.write_bytes(b"x")
    old.write_bytes(b"x")
    past = time.time() - PID_REUSE_AGE_S - 60
    os.utime(old, (past, past))
    assert not is_stale(young) and is_stale(old)
    assert sweep(tmp_path).files == 1 and young.exists() and not old.exists()


def test_sweep_once_per_process(tmp_path: Path) -> None:
    """What a writer that runs once per file (batch's sidecars) calls before each write."""
    leftover(tmp_path / "a.txt")
    assert sweep_once(tmp_path).files == 1
    later = leftover(tmp_path / "b.txt")
    assert sweep_once(tmp_path).files == 0 and later.exists()


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "probe.json"
    write_atomic(target, b"{}")
    write_atomic(target, b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}' and list(tmp_path.iterdir()) == [target]
    with pytest.raises(RuntimeError), atomic_file(target) as partial:
        partial.file.write(b"half")
        raise RuntimeError
    assert target.read_bytes() == b'{"a": 1}' and list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------- the feature and prompt caches


def test_feature_cache_leftovers_go_with_the_next_write_and_with_clear(tmp_path: Path) -> None:
    stale = leftover(tmp_path / "a.npy")
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    with live_writer(tmp_path / "b.npy") as theirs:
        cache = FeatureCache(tmp_path)
        cache.put("k", features)
        assert not stale.exists() and theirs.exists()
        assert np.array_equal(FeatureCache(tmp_path).get("k"), features)
        again = leftover(tmp_path / "c.npy", 500)
        entry = (tmp_path / "k.npy").stat().st_size
        assert clear_cache(tmp_path, "*.npy") == (2, entry + 500)
        assert not again.exists() and not (tmp_path / "k.npy").exists() and theirs.exists()


def test_prompt_cache_leftovers_go_with_the_next_save_and_with_clear(tmp_path: Path) -> None:
    stale = leftover(tmp_path / "a.kv")
    cache = PromptCache(tmp_path, "context")
    items = [1, 2, ImageSlot("image", 3)]
    state = bytes(range(256)) * 4

    def fill(buffer: memoryview) -> int:
        buffer[:] = state
        return len(state)

    with live_writer(tmp_path / "b.kv") as theirs:
        cache.save(items, 5, len(state), fill)
        assert cache.saved == 1 and not stale.exists() and theirs.exists()
        found = PromptCache(tmp_path, "context").find([*items, 4])
        assert found is not None and bytes(found.state) == state and found.n_positions == 5
        again = leftover(tmp_path / "c.kv", 700)
        entry = (tmp_path / f"{cache.key_of(items)}.kv").stat().st_size
        assert clear_cache(tmp_path, "*.kv") == (2, entry + 700)
        assert not again.exists() and theirs.exists()
