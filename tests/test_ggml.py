"""The ggml vision encoder (CPU backend; CI has no GPU) against the references on the same weights, and
its ctypes layer: another library directory, an ABI it does not know, missing symbols."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from checkpoints import TinyCheckpoint
from original_llava import OriginalLlava
from test_runtime import EXACT, GREEDY, random_image, reference_features, reference_run

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.llm.templates import Message, Role, user_text
from llava_gguf.model import LlavaModel, RuntimeOptions
from llava_gguf.vision import ggml_lib
from llava_gguf.vision.choose import EncoderChoice, choose_encoder, probe_ggml
from llava_gguf.vision.ggml_encoder import GgmlVisionEncoder
from llava_gguf.vision.ggml_lib import GgmlLib, GgmlUnavailable, default_library_dir, load_ggml

GGML = RuntimeOptions(llama=EXACT.llama, encoder=EncoderChoice.GGML)
# (LLaVA version, layout, LLM)
CASES = [("1.5", "llava-hf", "llama"), ("1.6", "llava-hf", "mistral"), ("1.5", "original", "llama"),
         ("1.6", "original", "llama")]
ODD_SIZES = [(1, 1), (90, 50), (30, 120), (333, 17)]
# measured: f32 files 1.4e-6, f16 1.5e-6, q8_0 1.3e-6 (max |ggml - NumPy| on features up to 13); the
# bounds leave room for other CPUs' SIMD widths
TOLERANCE = {MmprojType.F32: 1e-4, MmprojType.F16: 1e-4, MmprojType.Q8_0: 1e-4}


@pytest.fixture(scope="module")
def models(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint, ggml model, NumPy model) per case and mmproj type, converted once."""
    cache: dict[tuple, tuple[TinyCheckpoint, LlavaModel, LlavaModel]] = {}

    def make(case: tuple, kind: MmprojType = MmprojType.F32) -> tuple[TinyCheckpoint, LlavaModel, LlavaModel]:
        key = (case, kind)
        if key not in cache:
            version, layout, llm = case
            ckpt = tiny_checkpoint(llava_version=version, layout=layout, llm=llm)
            out = tmp_path_factory.mktemp("gguf-ggml")
            result = convert_checkpoint(ckpt.path, out, ConvertOptions(quant=Quant.F32, mmproj_type=kind))
            cache[key] = ckpt, LlavaModel(result.llm, result.mmproj, GGML), LlavaModel(result.llm, result.mmproj, EXACT)
        return cache[key]

    return make


def _reference(ckpt: TinyCheckpoint, image) -> np.ndarray:
    if ckpt.layout == "original":
        return OriginalLlava(ckpt).image_features(image).numpy()
    (features,) = reference_features(ckpt, [image])
    return features


@pytest.mark.parametrize("case", CASES, ids="-".join)
@pytest.mark.parametrize("size", ODD_SIZES)
def test_f32_features_match_the_reference_and_numpy(models, case, size) -> None:
    ckpt, ggml, numpy = models(case)
    assert ggml.encoder_name == "ggml" and isinstance(ggml.encoder, GgmlVisionEncoder)
    image = random_image(*size, seed=sum(size))
    ours = ggml.image_features(image)
    assert ours.shape == numpy.image_features(image).shape
    assert np.abs(ours - numpy.image_features(image)).max() <= 1e-4
    assert np.abs(ours - _reference(ckpt, image)).max() <= 1e-4


@pytest.mark.parametrize("case", CASES, ids="-".join)
@pytest.mark.parametrize("n_images", [1, 2])
def test_greedy_answers_match_the_reference(models, case, n_images) -> None:
    ckpt, ggml, _ = models(case)
    images = [random_image(90, 50, seed=11), random_image(40, 100, seed=12)][:n_images]
    question = "What is in the picture?"
    chat = ggml.chat()
    "".join(chat.send(question, images, GREEDY))
    prompt = ggml.render([Message(Role.USER, user_text(question, n_images))])
    if ckpt.layout == "original":
        _, expected = OriginalLlava(ckpt).generate(prompt, images)
    else:
        _, expected, _ = reference_run(ckpt, prompt, images)
    assert chat.last_tokens == expected


@pytest.mark.parametrize("kind", [MmprojType.F16, MmprojType.Q8_0])
def test_f16_and_q8_0_files_match_numpy(models, kind) -> None:
    """Both encoders read the same stored values (converted to float32 once), so they agree as closely as
    on f32 files; the distance to the f32 reference is the storage's own rounding."""
    _, ggml, numpy = models(CASES[1], kind)
    image = random_image(333, 17, seed=3)
    ours, theirs = ggml.image_features(image), numpy.image_features(image)
    assert np.abs(ours - theirs).max() <= TOLERANCE[kind]
    chat_g, chat_n = ggml.chat(), numpy.chat()
    "".join(chat_g.send("Describe it.", [image], GREEDY))
    "".join(chat_n.send("Describe it.", [image], GREEDY))
    assert chat_g.last_tokens == chat_n.last_tokens


def test_tiles_per_run_and_progress(models) -> None:
    _, ggml, numpy = models(CASES[1])
    encoder = ggml.encoder
    assert isinstance(encoder, GgmlVisionEncoder)
    tiles = np.random.default_rng(4).standard_normal((5, 3, 56, 56), dtype=np.float32)
    expected = numpy.encoder.encode(tiles)
    for per_run in (1, 2, 5):
        encoder.tiles_per_run = per_run
        calls: list[tuple[int, int]] = []
        got = encoder.encode(tiles, lambda done, total, calls=calls: calls.append((done, total)))
        assert np.abs(got - expected).max() <= 1e-4
        assert calls[-1] == (5, 5) and len(calls) == -(-5 // per_run)
    encoder.tiles_per_run = 1


# ---------------------------------------------------------------- the library


def test_another_library_directory(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$LLAVA_GGUF_GGML_LIB (or RuntimeOptions.ggml_library): a ggml built apart, e.g. with CUDA. It runs when
    llama-cpp-python loads the same build (LLAMA_CPP_LIB_PATH); mixed with the wheel's own core it is refused."""
    lib_dir = tmp_path / "ggml-build"
    shutil.copytree(default_library_dir(), lib_dir, symlinks=True)
    _, ggml, numpy = models(CASES[0])
    script = f"""
import numpy as np
from llava_gguf.vision.ggml_lib import load_ggml, _defining_file
from llava_gguf.vision.ggml_encoder import GgmlVisionEncoder
from llava_gguf.vision.numpy_encoder import NumpyVisionEncoder
import llama_cpp  # loads libllama, and with it ggml, from LLAMA_CPP_LIB_PATH
library = load_ggml()
assert library.directory == __import__("pathlib").Path({str(lib_dir)!r}), library.directory
assert _defining_file(library._cdll.ggml_init).parent.resolve() == library.directory.resolve()
tiles = np.random.default_rng(5).standard_normal((1, 3, 56, 56), dtype=np.float32)
got = GgmlVisionEncoder.from_gguf({str(ggml.mmproj_path)!r}, library=library).encode(tiles)
print(float(np.abs(got - NumpyVisionEncoder.from_gguf({str(ggml.mmproj_path)!r}).encode(tiles)).max()))
"""
    env = {**os.environ, ggml_lib.LIB_ENV: str(lib_dir), "LLAMA_CPP_LIB_PATH": str(lib_dir), "MTMD_CPP_LIB": str(lib_dir)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-4

    # in this process llama-cpp-python already runs its own ggml: the copy would mix with it
    monkeypatch.setenv(ggml_lib.LIB_ENV, str(lib_dir))
    monkeypatch.setattr(ggml_lib, "_cached", {})
    with pytest.raises(GgmlUnavailable, match="set LLAMA_CPP_LIB_PATH and MTMD_CPP_LIB to .*ggml-build"):
        load_ggml()
    monkeypatch.setenv(ggml_lib.LIB_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(GgmlUnavailable, match="no ggml library at .*nowhere.*LLAVA_GGUF_GGML_LIB"):
        load_ggml()


def test_an_unknown_abi_is_refused_and_auto_falls_back(models, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ggml_lib, "KNOWN_TENSOR_OVERHEADS", (1,))
    monkeypatch.setattr(ggml_lib, "_cached", {})
    with pytest.raises(GgmlUnavailable, match=r"ggml_tensor_overhead\(\) is 368, not \(1,\)"):
        GgmlLib()
    _, ggml, _ = models(CASES[0])
    with caplog.at_level(logging.INFO, logger="llava_gguf.vision.choose"):
        encoder, name, reason = choose_encoder("auto", ggml.mmproj_path, ggml.runtime.model.model, cache_dir=tmp_path)
    assert name == "numpy" and "ggml_tensor_overhead() is 368" in reason
    assert [r.getMessage() for r in caplog.records if r.name == "llava_gguf.vision.choose"] == [reason]
    with pytest.raises(GgmlUnavailable):
        choose_encoder("ggml", ggml.mmproj_path, ggml.runtime.model.model, cache_dir=tmp_path)


def test_missing_symbols_make_auto_fall_back(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ggml_lib.SIGNATURES, "ggml_gelu_erf_v2", ggml_lib.SIGNATURES["ggml_gelu_erf"])
    monkeypatch.setattr(ggml_lib, "_cached", {})
    with pytest.raises(GgmlUnavailable, match="lacks ggml_gelu_erf_v2 .an older or different ggml"):
        GgmlLib()
    _, ggml, _ = models(CASES[0])
    _, name, reason = choose_encoder("auto", ggml.mmproj_path, ggml.runtime.model.model, cache_dir=tmp_path)
    assert name == "numpy" and reason.startswith("using the exact NumPy vision encoder: ") and "lacks" in reason


def test_a_gpu_is_asked_for_by_name(models) -> None:
    """A CPU-only build (CI's) says so in one line; a GPU build runs the tower on the GPU."""
    _, ggml, _ = models(CASES[0])
    try:
        encoder = GgmlVisionEncoder.from_gguf(ggml.mmproj_path, use_gpu=True)
    except GgmlUnavailable as e:
        assert "has no GPU backend (a CPU-only build)" in str(e)
    else:
        assert encoder.on_gpu and "CPU" not in encoder.backend_name
        encoder.close()


def test_the_probe_is_exact_and_cached(tmp_path: Path) -> None:
    from llava_gguf.vision.choose import ggml_probe_run_count

    library = load_ggml()
    before = ggml_probe_run_count()
    # cached whatever the machine's load: tests run beside other work (tests/test_tune.py covers the load)
    verdict = probe_ggml(library, tmp_path, n_threads=1, busy_cores=math.inf)
    assert verdict.exact and verdict.max_rel_diff < 1e-5 and verdict.ggml_s > 0 and verdict.numpy_s > 0
    assert probe_ggml(library, tmp_path, n_threads=1, busy_cores=math.inf) == verdict
    assert ggml_probe_run_count() == before + 1  # the second answer came from the cache


def test_low_memory_keeps_auto_on_numpy(models, tmp_path: Path) -> None:
    _, ggml, _ = models(CASES[0])
    encoder, name, reason = choose_encoder("auto", ggml.mmproj_path, ggml.runtime.model.model, cache_dir=tmp_path,
                                           low_memory=True)
    assert name == "numpy" and "low memory" in reason
