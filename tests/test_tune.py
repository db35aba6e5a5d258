"""Auto-tuning that a busy machine cannot mislead: a verdict measured while other processes burn the
cores is provisional (used, said, not cached), the next calm run caches its own; a stale entry (other
libraries, an older format) is measured again; a cached calm verdict is used without measuring; the
listing shows what was cached. The probes really run (ggml's in this process, the repack one in its
child); no timing is asserted. "Calm" is made certain by lifting the load threshold (``busy_cores``):
other engineers' tests may share this machine's cores."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llava_gguf import machine_load
from llava_gguf.llm import repack
from llava_gguf.llm.repack import PROBE_FILE, RepackVerdict, choose_repack, probe_key
from llava_gguf.machine_load import BUSY_CORES, LoadMeter, LoadSource, MachineLoad, alternate
from llava_gguf.tune import cached_verdicts, tune
from llava_gguf.vision import choose
from llava_gguf.vision.choose import GGML_PROBE_FILE, ggml_library_key, probe_ggml
from llava_gguf.vision.ggml_lib import load_ggml
from llava_gguf.vision.probe_cache import FORMAT, forget_provisional, library_versions, read_cache

CALM = math.inf  # no load counts as busy: the verdict is cached whatever the machine does meanwhile
THREADS = 2


@pytest.fixture(autouse=True)
def _a_new_run() -> Iterator[None]:
    """Each test a new run: no provisional verdict held from another test's."""
    forget_provisional()
    yield
    forget_provisional()


@contextmanager
def burners(n: int = 2) -> Iterator[None]:
    """``n`` processes spinning on a core each, killed afterwards."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.3)  # running before the probe starts
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _ggml_entry(cache: Path) -> dict[str, object] | None:
    return read_cache(cache / GGML_PROBE_FILE).get(ggml_library_key(load_ggml(), False, THREADS))


def _repack_entry(cache: Path) -> dict[str, object] | None:
    return read_cache(cache / PROBE_FILE).get(probe_key(THREADS))


# -- the load ---------------------------------------------------------------------------------


def test_the_meter_sees_other_processes() -> None:
    with burners():
        meter = LoadMeter()
        time.sleep(1.0)
        load = meter.stop()
    if load.source is not LoadSource.PROC:
        pytest.skip("no /proc here")
    assert load.busy() and load.other_cores is not None and load.other_cores > 0.5
    assert "other processes used" in load.describe()


def test_alternate_keeps_each_best_and_takes_turns() -> None:
    order: list[str] = []

    def run(name: str, timings: list[tuple[float, ...]]) -> Callable[[], tuple[float, ...]]:
        def timed() -> tuple[float, ...]:
            order.append(name)
            return timings.pop(0)
        return timed

    best = alternate({"a": run("a", [(9, 9), (3, 5), (2, 6), (4, 1)]), "b": run("b", [(9, 9), (7, 7), (8, 2), (6, 8)])},
                     min_rounds=3, max_rounds=3, min_seconds=0, max_seconds=math.inf)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then A B, B A, A B
    assert best == {"a": (2, 1), "b": (6, 2)}  # the warm-ups' (9, 9) excluded
    order.clear()
    slow = alternate({"a": run("a", [(9,), (1,), (1,)]), "b": run("b", [(9,), (1,), (1,)])}, min_seconds=0, max_seconds=0)
    assert order == ["a", "b", "a", "b", "b", "a"] and slow == {"a": (1,), "b": (1,)}  # past max_seconds: two rounds


# -- busy, then calm --------------------------------------------------------------------------


def test_a_busy_machine_gives_a_provisional_encoder_verdict(tmp_path: Path) -> None:
    library = load_ggml()
    with burners():
        busy = probe_ggml(library, tmp_path, n_threads=THREADS)
    assert busy.provisional and busy.provenance is not None and busy.provenance.load.busy(BUSY_CORES)
    assert "provisional" in busy.timing() and "measured again next run" in busy.timing()
    assert _ggml_entry(tmp_path) is None  # nothing cached
    before = choose.ggml_probe_run_count()
    assert probe_ggml(library, tmp_path, n_threads=THREADS) == busy  # this run keeps to it
    assert choose.ggml_probe_run_count() == before
    forget_provisional()  # the next run
    calm = probe_ggml(library, tmp_path, n_threads=THREADS, busy_cores=CALM)
    assert choose.ggml_probe_run_count() == before + 1  # measured again
    assert calm.exact and not calm.provisional and "provisional" not in calm.timing()
    entry = _ggml_entry(tmp_path)
    assert entry is not None and entry["format"] == FORMAT and entry["ggml_s"] == calm.ggml_s
    assert entry["versions"] == library_versions(library.directory) and str(entry["measured_at"]).startswith("20")
    again = probe_ggml(library, tmp_path, n_threads=THREADS)  # the cached calm verdict, whatever the load now
    assert choose.ggml_probe_run_count() == before + 1 and again == calm
    assert again.provenance is not None and again.provenance.cached and "cached 20" in again.timing()


def test_a_busy_machine_gives_a_provisional_repack_verdict(tmp_path: Path) -> None:
    """On a CPU where llama.cpp crashes repacking (AMX, issue 20824) the verdict is off and settled:
    a crash is not the load's doing, so it is cached at once."""
    with burners():
        busy = choose_repack(THREADS, tmp_path)
    assert busy.provenance is not None
    if busy.failure is not None:
        assert "crashed" in busy.failure and not busy.repack and not busy.provisional
        assert _repack_entry(tmp_path) is not None
        return
    assert busy.provisional and "provisional" in busy.reason and _repack_entry(tmp_path) is None
    before = repack.probe_run_count()
    assert choose_repack(THREADS, tmp_path) == busy and repack.probe_run_count() == before  # this run keeps to it
    forget_provisional()  # the next run
    calm = choose_repack(THREADS, tmp_path, busy_cores=CALM)
    assert repack.probe_run_count() == before + 1 and not calm.provisional
    entry = _repack_entry(tmp_path)
    assert entry is not None and entry["repack"] is calm.repack and entry["plain"] == {
        "prefill": calm.plain.prefill, "decode": calm.plain.decode}  # type: ignore[union-attr]
    again = choose_repack(THREADS, tmp_path)
    assert repack.probe_run_count() == before + 1 and again.provenance is not None and again.provenance.cached


# -- stale and cached entries -----------------------------------------------------------------


def test_a_stale_encoder_verdict_is_measured_again(tmp_path: Path) -> None:
    library = load_ggml()
    probe_ggml(library, tmp_path, n_threads=THREADS, busy_cores=CALM)
    entry = _ggml_entry(tmp_path)
    assert entry is not None
    key = ggml_library_key(library, False, THREADS)
    old_numpy = {**entry, "versions": {**entry["versions"], "numpy": "1.0.0"}, "ggml_s": 1e-3}  # type: ignore[dict-item]
    old_format = {k: entry[k] for k in ("exact", "ggml_s", "numpy_s", "max_rel_diff")}  # format 1: figures only
    for stale in (old_numpy, old_format):
        (tmp_path / GGML_PROBE_FILE).write_text(json.dumps({key: stale}))
        before = choose.ggml_probe_run_count()
        verdict = probe_ggml(library, tmp_path, n_threads=THREADS, busy_cores=CALM)
        assert choose.ggml_probe_run_count() == before + 1 and verdict.ggml_s != 1e-3
        assert _ggml_entry(tmp_path)["versions"] == library_versions(library.directory)  # type: ignore[index]


def test_a_stale_repack_verdict_is_measured_again(tmp_path: Path) -> None:
    choose_repack(THREADS, tmp_path, busy_cores=CALM)
    entry = _repack_entry(tmp_path)
    assert entry is not None
    other_llama = {**entry, "versions": {**entry["versions"], "llama-cpp-python": "0.0.1"}}  # type: ignore[dict-item]
    (tmp_path / PROBE_FILE).write_text(json.dumps({probe_key(THREADS): other_llama}))
    before = repack.probe_run_count()
    choose_repack(THREADS, tmp_path, busy_cores=CALM)
    assert repack.probe_run_count() == before + 1
    assert _repack_entry(tmp_path)["versions"] == entry["versions"]  # type: ignore[index]


def test_a_cached_calm_verdict_is_used_without_measuring(tmp_path: Path) -> None:
    library = load_ggml()
    measured = probe_ggml(library, tmp_path, n_threads=THREADS, busy_cores=CALM)
    before = choose.ggml_probe_run_count()
    with burners():  # the load now does not matter: nothing is measured
        cached = probe_ggml(library, tmp_path, n_threads=THREADS)
    assert choose.ggml_probe_run_count() == before and cached == measured and not cached.provisional


# -- tune and the listing ---------------------------------------------------------------------


def test_tune_measures_everything_and_the_listing_shows_it(tmp_path: Path) -> None:
    tuned = tune(THREADS, tmp_path, busy_cores=CALM)
    assert [t.probe for t in tuned] == ["repack", "ggml-cpu", "mtmd"]
    repack_now, ggml_now, mtmd_now = tuned
    assert repack_now.cached and ggml_now.cached and mtmd_now.cached and ggml_now.choice in ("ggml", "numpy")
    assert repack_now.choice.startswith("repacking ") and "weight repacking" in repack_now.reason
    listed = {v.probe: v for v in cached_verdicts(tmp_path)}
    assert set(listed) == {"repack", "ggml", "mtmd"}
    for probe in ("repack", "ggml"):
        assert listed[probe].stale is None and listed[probe].provenance is not None
        assert listed[probe].provenance.cached and "cached 20" in listed[probe].summary
    cached_ggml = probe_ggml(load_ggml(), tmp_path, n_threads=THREADS)
    assert f"{cached_ggml.ggml_s:.2f}" in listed["ggml"].summary
    verdict = RepackVerdict.from_json({k: v for k, v in _repack_entry(tmp_path).items()})  # type: ignore[union-attr]
    assert verdict.repack == (repack_now.choice == "repacking on")


def test_the_listing_marks_stale_entries(tmp_path: Path) -> None:
    (tmp_path / GGML_PROBE_FILE).write_text(json.dumps({"old": {"exact": True, "ggml_s": 0.2, "numpy_s": 0.1,
                                                                "max_rel_diff": 1e-7}}))
    (listed,) = cached_verdicts(tmp_path)
    assert listed.probe == "ggml" and listed.stale is not None and "older format" in listed.stale
    assert "NumPy is faster" in listed.summary


def test_without_proc_the_load_average_stands_in_and_else_the_load_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS: the one-minute load average, less this process's thread, against half the cores;
    Windows: unknown, calm."""
    monkeypatch.setattr(machine_load, "machine_busy_s", lambda: None)
    monkeypatch.setattr(machine_load.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(machine_load.os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    load = LoadMeter().stop()
    assert load.source is LoadSource.LOADAVG and load.other_cores == pytest.approx(2.5) and not load.busy()
    monkeypatch.setattr(machine_load.os, "getloadavg", lambda: (6.0, 3.0, 2.0))
    assert LoadMeter().stop().busy()  # 5 of 8 cores taken by others

    def no_load_average() -> tuple[float, float, float]:
        raise OSError("none here")

    monkeypatch.setattr(machine_load.os, "getloadavg", no_load_average)
    unknown = LoadMeter().stop()
    assert unknown.source is LoadSource.UNKNOWN and not unknown.busy() and "unknown" in unknown.describe()
    assert MachineLoad.from_json(unknown.to_json()) == unknown


def test_the_commands_tune_and_cache_info(tmp_path: Path) -> None:
    """`llava-gguf tune` prints every verdict with its figures; `cache info` lists exactly what it cached
    (a busy moment caches nothing, and then lists nothing: either way the two agree)."""
    import os

    env = {**os.environ, "LLAVA_GGUF_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "llava_gguf.cli"]
    tuned = subprocess.run([*command, "tune", "-t", str(THREADS), "--json"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert tuned.returncode == 0, tuned.stderr
    results = {r["probe"]: r for r in json.loads(tuned.stdout)}
    assert set(results) == {"repack", "ggml-cpu", "mtmd"}
    assert all(r["reason"] and r["choice"] for r in results.values())
    for probe in ("repack", "ggml-cpu"):
        provenance = results[probe]["provenance"]
        assert provenance["measured_at"] and provenance["versions"]["llama-cpp-python"] and "load" in provenance
    info = subprocess.run([*command, "cache", "info", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    listed = next(row for row in json.loads(info.stdout) if row["cache"].startswith("measured choices"))
    cached = {"ggml" if p == "ggml-cpu" else p for p, r in results.items() if r["cached"]}
    assert {v["probe"] for v in listed["verdicts"]} == cached and listed["entries"] == len(cached)
    assert all(v["stale"] is None for v in listed["verdicts"])
    text = subprocess.run([*command, "tune", "-t", str(THREADS)], env=env, capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "repack:" in text.stdout and "ggml-cpu:" in text.stdout
