"""The CPU weight-repacking policy: a cached verdict decides, a corrupt one is measured again, on/off are
what llama.cpp does (its own log says which buffer holds the weights), and repacking never comes with mmap.
No timing is asserted. (The load, the provisional verdicts and stale entries: test_tune.py.)"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from llava_gguf.errors import ModelLoadError
from llava_gguf.llm import repack
from llava_gguf.llm.llama import LlamaOptions, LlamaRuntime, llama_log
from llava_gguf.llm.repack import (
    PROBE_FILE,
    RepackPolicy,
    RepackVerdict,
    Speeds,
    choose_repack,
    decide,
    probe_key,
    write_probe_model,
)
from llava_gguf.machine_load import LoadSource, MachineLoad
from llava_gguf.vision.probe_cache import Provenance, library_versions, store


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repack") / "probe.Q4_K_M.gguf"
    write_probe_model(path)
    return path


def _verdict_file(directory: Path, threads: int, chosen: bool) -> None:
    """A calm machine's verdict, cached with this machine's libraries."""
    fast, slow = {"prefill": 2.0, "decode": 2.0}, {"prefill": 1.0, "decode": 1.0}
    verdict = RepackVerdict(chosen, Speeds(**(fast if chosen else slow)), Speeds(**(slow if chosen else fast)))
    provenance = Provenance("2026-12-01T10:00:00+00:00", MachineLoad(1.0, 0.0, LoadSource.PROC),
                            library_versions(repack._library_dir()), {"library": str(repack._library_dir())})
    store(directory / PROBE_FILE, probe_key(threads), verdict.figures(), provenance)


@pytest.mark.parametrize(("repacked", "plain", "chosen"), [
    (Speeds(120, 53), Speeds(180, 38), False),  # this AMD EPYC (the 1B model): prefill and the request favour off
    (Speeds(37, 8.6), Speeds(25, 9.0), True),  # the Intel Xeon: prefill favours repacking
    (Speeds(100, 60), Speeds(102, 30), True),  # prefill a tie, the answer twice as fast repacked
    (Speeds(100, 10), Speeds(103, 10.2), False),  # within 5% both ways: no reason to repack
])
def test_the_decision(repacked: Speeds, plain: Speeds, chosen: bool) -> None:
    assert decide(repacked, plain) is chosen


@pytest.mark.parametrize("chosen", [True, False])
def test_a_cached_verdict_decides(tmp_path: Path, chosen: bool) -> None:
    _verdict_file(tmp_path, 2, chosen)
    before = repack.probe_run_count()
    assert choose_repack(2, tmp_path).repack is chosen
    assert repack.probe_run_count() == before


def assert_measured(verdict: RepackVerdict) -> None:
    """A verdict measured here: figures and the decision they give, or llama.cpp's crash (repacking is
    then off: on CPUs with AMX, its AMX kernels crash on Q4_K_M prefill, llama.cpp issue 20824)."""
    if verdict.failure is not None:
        assert not verdict.repack and "crashed" in verdict.failure and verdict.provenance is not None
        return
    assert verdict.repacked is not None and verdict.plain is not None
    assert min(verdict.repacked.prefill, verdict.repacked.decode, verdict.plain.prefill, verdict.plain.decode) > 0
    assert verdict.repack is decide(verdict.repacked, verdict.plain) and "measured here" in verdict.reason


def test_a_corrupt_verdict_is_measured_again(tmp_path: Path) -> None:
    """(The load threshold is lifted: whether the machine is calm is test_tune's matter.)"""
    stale = {"repack": True, "repack_tok_s": 2.0, "plain_tok_s": 1.0}  # the first version's entry
    zero = {"repack": True, "repacked": {"prefill": 1.0, "decode": 0.0}, "plain": {"prefill": 1.0, "decode": 1.0}}
    nan = {"repack": True, "repacked": {"prefill": float("nan"), "decode": 1.0}, "plain": {"prefill": 1.0, "decode": 1.0}}
    current = {"format": 2, "versions": library_versions(repack._library_dir()), "measured_at": "2026-12-01",
               "load": {"wall_s": 1.0, "other_cpu_s": 0.0, "source": "proc"}}
    entries = ({"repack": True}, stale, zero, nan, {**zero, **current}, {**nan, **current})
    for garbage in ("{not json", *(json.dumps({probe_key(2): e}) for e in entries)):
        (tmp_path / PROBE_FILE).write_text(garbage)
        before = repack.probe_run_count()
        verdict = choose_repack(2, tmp_path, busy_cores=math.inf)
        assert repack.probe_run_count() == before + 1
        assert_measured(verdict)
        assert json.loads((tmp_path / PROBE_FILE).read_text())[probe_key(2)]["repack"] is verdict.repack


# llama.cpp's extra CPU buffer types: its generic repacking, or AMX's on CPUs that have it
REPACKED_BUFFER = re.compile(r"(CPU_REPACK|AMX) model buffer size")


def _load_log(path: Path, options: LlamaOptions) -> tuple[LlamaRuntime, str]:
    """The runtime and what llama.cpp logged while loading it (through the runtime's own log routing)."""
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    level = llama_log.level
    llama_log.addHandler(handler)
    llama_log.setLevel(logging.DEBUG)
    try:
        runtime = LlamaRuntime(path, options)
    finally:
        llama_log.removeHandler(handler)
        llama_log.setLevel(level)
    return runtime, "\n".join(lines)


def test_on_and_off_are_what_llama_cpp_does(q4_model: Path, tmp_path: Path) -> None:
    _verdict_file(tmp_path, 2, False)  # a machine where repacking runs (loading alone never crashes)
    on, log_on = _load_log(q4_model, LlamaOptions(n_threads=2, repack=RepackPolicy.ON, repack_cache_dir=tmp_path))
    assert on.repack and not on.mapped  # repacked weights: no mapped file beside them
    assert REPACKED_BUFFER.search(log_on)
    on.close()
    off, log_off = _load_log(q4_model, LlamaOptions(n_threads=2, repack=RepackPolicy.OFF))
    assert not off.repack and off.mapped and not REPACKED_BUFFER.search(log_off)
    off.close()
    _verdict_file(tmp_path, 2, True)  # auto follows the machine's verdict
    auto, log_auto = _load_log(q4_model, LlamaOptions(n_threads=2, repack_cache_dir=tmp_path))
    assert auto.repack and not auto.mapped and REPACKED_BUFFER.search(log_auto)
    assert auto.state_key != off.state_key  # repacked weights round differently: prompt states apart
    auto.close()


def test_low_memory_never_repacks(f32_pair, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llava_gguf.cli import main

    _, llm, mmproj = f32_pair("1.5", "llava-hf", "llama")
    photo = tmp_path / "photo.png"
    from test_runtime import random_image

    random_image(40, 30, seed=1).save(photo)
    result = CliRunner().invoke(main, ["ask", "--llm", str(llm), "--mmproj", str(mmproj), "-i", str(photo), "-n", "2",
                                       "--low-memory", "--kv-cache-type", "f16", "--repack", "on", "hi"])
    assert result.exit_code == 0, result.output
    assert "weight repacking off (--low-memory)" in result.stderr


def test_the_probe_model_holds_finite_small_weights(q4_model: Path) -> None:
    """Its random K-quant blocks dequantize (gguf-py, bit-exact with ggml) to small finite weights in
    the Q4_K_M layout, so the timings are of ordinary arithmetic."""
    reader = gguf.GGUFReader(q4_model)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.Q6_K
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_K
    for t in reader.tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
            weights = gguf.quants.dequantize(t.data, t.tensor_type)
            assert np.isfinite(weights).all() and 0 < np.abs(weights).max() < 1, t.name


def test_on_is_refused_where_repacking_crashed(q4_model: Path, tmp_path: Path) -> None:
    """Where the probe saw llama.cpp's repacked kernels crash (AMX, llama.cpp issue 20824), --repack on is
    one line, not a segfault in the first llama_decode."""
    crashed = RepackVerdict(False, None, None, f"{repack.CRASHED} on the probe model with SIGSEGV")
    provenance = Provenance("2026-12-01T10:00:00+00:00", MachineLoad(1.0, 0.0, LoadSource.PROC),
                            library_versions(repack._library_dir()), {"library": str(repack._library_dir())})
    store(tmp_path / PROBE_FILE, probe_key(2), crashed.figures(), provenance)
    with pytest.raises(ModelLoadError, match="--repack on: llama.cpp crashed .* use --repack off"):
        LlamaRuntime(q4_model, LlamaOptions(n_threads=2, repack=RepackPolicy.ON, repack_cache_dir=tmp_path))
    auto = LlamaRuntime(q4_model, LlamaOptions(n_threads=2, repack_cache_dir=tmp_path))
    assert not auto.repack and "crashed" in auto.repack_reason
    auto.close()
