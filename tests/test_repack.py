"""The CPU weight-repacking policy: a cached verdict decides, a corrupt one is measured again, on/off are
what llama.cpp does (its own log says which buffer holds the weights), and repacking never comes with mmap.
No timing is asserted."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import llama_cpp
import pytest
from llama_cpp import _logger as llama_logger

from llava_gguf import repack
from llava_gguf.llama import LlamaOptions, LlamaRuntime
from llava_gguf.repack import PROBE_FILE, RepackPolicy, choose_repack, probe_key, write_probe_model


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repack") / "probe.Q4_K_M.gguf"
    write_probe_model(path)
    return path


def _verdict_file(directory: Path, threads: int, chosen: bool) -> None:
    entry = {"repack": chosen, "repack_tok_s": 2.0 if chosen else 1.0, "plain_tok_s": 1.0 if chosen else 2.0}
    (directory / PROBE_FILE).write_text(json.dumps({probe_key(threads): entry}))


@pytest.mark.parametrize("chosen", [True, False])
def test_a_cached_verdict_decides(tmp_path: Path, chosen: bool) -> None:
    _verdict_file(tmp_path, 2, chosen)
    before = repack.probe_run_count()
    assert choose_repack(2, tmp_path).repack is chosen
    assert repack.probe_run_count() == before


def test_a_corrupt_verdict_is_measured_again(tmp_path: Path) -> None:
    for garbage in ("{not json", json.dumps({probe_key(2): {"repack": True}})):
        (tmp_path / PROBE_FILE).write_text(garbage)
        before = repack.probe_run_count()
        verdict = choose_repack(2, tmp_path)
        assert repack.probe_run_count() == before + 1
        assert verdict.repack_tok_s > 0 and verdict.plain_tok_s > 0 and "measured here" in verdict.reason
        assert json.loads((tmp_path / PROBE_FILE).read_text())[probe_key(2)]["repack"] is verdict.repack


def _load_log(path: Path, options: LlamaOptions) -> tuple[LlamaRuntime, str]:
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        runtime = LlamaRuntime(path, options)
    finally:
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    return runtime, "".join(lines)


def test_on_and_off_are_what_llama_cpp_does(q4_model: Path, tmp_path: Path) -> None:
    on, log_on = _load_log(q4_model, LlamaOptions(n_threads=2, repack=RepackPolicy.ON))
    assert on.repack and not on.mapped  # repacked weights: no mapped file beside them
    assert "CPU_REPACK model buffer size" in log_on
    on.close()
    off, log_off = _load_log(q4_model, LlamaOptions(n_threads=2, repack=RepackPolicy.OFF))
    assert not off.repack and off.mapped and "CPU_REPACK" not in log_off
    off.close()
    _verdict_file(tmp_path, 2, True)  # auto follows the machine's verdict
    auto, log_auto = _load_log(q4_model, LlamaOptions(n_threads=2, repack_cache_dir=tmp_path))
    assert auto.repack and not auto.mapped and "CPU_REPACK model buffer size" in log_auto
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
