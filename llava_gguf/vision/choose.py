"""Which vision encoder runs: the fastest one that computes the reference features.

``auto``: ggml on a GPU when the LLM is offloaded and this ggml has a GPU backend that passes the
exactness probe; else libmtmd where its own probe says it is exact (not in llama.cpp today); else, on
the CPU, whichever of ggml and NumPy ran the probe tile faster (both exact). ``numpy``, ``ggml`` and
``mtmd`` force one. The ggml probe (one CLIP-L-wide block and projector, one tile, through both
encoders) is cached per library, backend, thread count and machine, like libmtmd's.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from llava_gguf.errors import ModelLoadError
from llava_gguf.metadata import VisionSettings
from llava_gguf.vision.encoder import VisionEncoder
from llava_gguf.vision.ggml_encoder import GgmlVisionEncoder
from llava_gguf.vision.ggml_lib import GgmlLib, GgmlUnavailable, load_ggml
from llava_gguf.vision.mtmd_encoder import MtmdVisionEncoder, probe_mtmd
from llava_gguf.vision.numpy_encoder import DEFAULT_CACHE_BYTES, NumpyVisionEncoder
from llava_gguf.vision.probe_cache import default_cache_dir, read_cache, write_cache
from llava_gguf.vision.weights import TowerLayout, VisionTowerConfig, tensor_name

log = logging.getLogger(__name__)

GGML_PROBE_FILE = "ggml-probe.json"
_GGML_PROBE_VERSION = 1
# max |ggml - NumPy| over max |NumPy| on the probe: float32 reassociation only (measured about 1e-6)
GGML_PROBE_TOLERANCE = 1e-4


class EncoderChoice(str, enum.Enum):
    AUTO = "auto"  # the fastest encoder that computes the reference features
    NUMPY = "numpy"
    GGML = "ggml"  # on the GPU when the LLM is offloaded, else the CPU
    MTMD = "mtmd"  # forced, even where it differs from the reference


@dataclass(frozen=True)
class GgmlVerdict:
    exact: bool  # ggml's probe features are the NumPy encoder's (within GGML_PROBE_TOLERANCE)
    ggml_s: float  # seconds per probe tile
    numpy_s: float
    max_rel_diff: float


def choose_encoder(
    choice: str,
    mmproj_path: str | os.PathLike[str],
    llm_model: llama_cpp.llama_model_p,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    n_threads: int | None = None,
    use_gpu: bool = False,
    numpy_cache_bytes: int = DEFAULT_CACHE_BYTES,
    settings: VisionSettings | None = None,
    ggml_library: str | os.PathLike[str] | None = None,
    low_memory: bool = False,
) -> tuple[VisionEncoder, str, str]:
    """``choice`` "auto" | "numpy" | "ggml" | "mtmd" -> (encoder, name, reason); one log line says which
    and why. ``cache_dir`` holds the probes' verdicts; ``settings``: the mmproj's, as the runtime uses them;
    ``ggml_library``: a directory with another ggml build (else ``$LLAVA_GGUF_GGML_LIB``, else
    llama-cpp-python's). ``low_memory``: on the CPU, auto keeps to NumPy, which holds no float32 copy of
    the weights (ggml holds one in its buffer)."""
    choice = str(getattr(choice, "value", choice))
    if choice not in {c.value for c in EncoderChoice}:
        raise ModelLoadError(f"unknown vision encoder {choice!r}; choose one of {', '.join(c.value for c in EncoderChoice)}")

    def numpy_encoder() -> NumpyVisionEncoder:
        return NumpyVisionEncoder.from_gguf(mmproj_path, cache_bytes=numpy_cache_bytes, settings=settings)

    def ggml_encoder(gpu: bool, library: GgmlLib) -> GgmlVisionEncoder:
        return GgmlVisionEncoder.from_gguf(mmproj_path, settings=settings, use_gpu=gpu, n_threads=n_threads,
                                           library=library)

    def chosen(encoder: VisionEncoder, name: str, reason: str, level: int = logging.INFO) -> tuple[VisionEncoder, str, str]:
        log.log(level, "%s", reason)
        return encoder, name, reason

    if choice == "numpy":
        return chosen(numpy_encoder(), "numpy", "using the exact NumPy vision encoder, as asked")
    if choice == "mtmd":
        verdict = probe_mtmd(cache_dir)
        encoder = MtmdVisionEncoder(mmproj_path, llm_model, n_threads=n_threads, use_gpu=use_gpu)
        if verdict.ok:
            return chosen(encoder, "mtmd", f"asked for libmtmd; {verdict.reason}")
        return chosen(encoder, "mtmd", f"asked for libmtmd, which is not the reference model: {verdict.reason}",
                      logging.WARNING)
    if choice == "ggml":
        library = load_ggml(ggml_library)
        encoder = ggml_encoder(use_gpu, library)
        return chosen(encoder, "ggml", f"using the ggml vision encoder on {encoder.backend_name}, as asked")

    # auto
    try:
        library: GgmlLib | None = load_ggml(ggml_library)
        why_not_ggml = ""
    except GgmlUnavailable as e:
        library, why_not_ggml = None, str(e)
    if use_gpu and library is not None:
        try:
            verdict = probe_ggml(library, cache_dir, use_gpu=True, n_threads=n_threads)
            if verdict.exact:
                encoder = ggml_encoder(True, library)
                return chosen(encoder, "ggml", f"using the ggml vision encoder on {encoder.backend_name} "
                                               f"(exact: max relative difference {verdict.max_rel_diff:.1g})")
            why_not_ggml = f"ggml on the GPU is off the reference by {verdict.max_rel_diff:.2g} (relative)"
        except (GgmlUnavailable, ModelLoadError) as e:
            why_not_ggml = str(e)
    mtmd = probe_mtmd(cache_dir)
    if mtmd.ok:
        try:
            return chosen(MtmdVisionEncoder(mmproj_path, llm_model, n_threads=n_threads, use_gpu=use_gpu), "mtmd",
                          f"using libmtmd for images: {mtmd.reason}")
        except ModelLoadError as e:
            log.debug("libmtmd cannot load the mmproj: %s", e)
    if library is not None and low_memory:
        why_not_ggml = "low memory: ggml on the CPU would hold a float32 copy of the vision weights"
    elif library is not None:
        try:
            verdict = probe_ggml(library, cache_dir, use_gpu=False, n_threads=n_threads)
            timing = f"ggml {verdict.ggml_s:.2f} s vs NumPy {verdict.numpy_s:.2f} s per probe tile"
            if verdict.exact and verdict.ggml_s < verdict.numpy_s:
                return chosen(ggml_encoder(False, library), "ggml",
                              f"using the ggml vision encoder on the CPU ({timing})")
            why_not_ggml = (f"NumPy is faster here ({timing})" if verdict.exact
                            else f"ggml is off the reference by {verdict.max_rel_diff:.2g} (relative)")
        except (GgmlUnavailable, ModelLoadError) as e:
            why_not_ggml = str(e)
    return chosen(numpy_encoder(), "numpy", f"using the exact NumPy vision encoder: {why_not_ggml}")


# -- the ggml probe ---------------------------------------------------------------------------

# CLIP-L/336's widths, one block, a projector to a 1024-wide LLM: the per-block cost decides
PROBE_TOWER = VisionTowerConfig(hidden_size=1024, num_attention_heads=16, image_size=336, patch_size=14,
                                vision_feature_layer=1)
PROBE_FFN, PROBE_LLM = 4096, 1024

_ggml_probe_runs = 0


def ggml_probe_run_count() -> int:
    """How many times this process ran the ggml probe (cached verdicts excluded)."""
    return _ggml_probe_runs


def ggml_library_key(library: GgmlLib, use_gpu: bool, n_threads: int | None) -> str:
    """Identifies the library files, the backend, the threads and the machine."""
    parts = [f"v{_GGML_PROBE_VERSION}", "gpu" if use_gpu else "cpu", f"t{n_threads or os.cpu_count()}",
             platform.machine(), platform.processor(), f"cpus{os.cpu_count()}", f"numpy{np.__version__}"]
    for path in sorted(library.directory.glob("*ggml*")):
        if path.is_file():
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24] + f"|{library.directory}"


def probe_ggml(library: GgmlLib, cache_dir: str | os.PathLike[str] | None = None, *, use_gpu: bool = False,
               n_threads: int | None = None, use_cache: bool = True) -> GgmlVerdict:
    """Whether ggml computes the NumPy encoder's features here, and how fast each runs a tile; cached."""
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / GGML_PROBE_FILE
    key = ggml_library_key(library, use_gpu, n_threads)
    cached = read_cache(path) if use_cache else {}
    entry = cached.get(key)
    if entry is not None:
        try:
            return GgmlVerdict(exact=bool(entry["exact"]), ggml_s=float(entry["ggml_s"]),  # type: ignore[arg-type]
                               numpy_s=float(entry["numpy_s"]), max_rel_diff=float(entry["max_rel_diff"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            log.debug("ignoring a malformed cached ggml verdict in %s", path)
    verdict = run_ggml_probe(library, use_gpu=use_gpu, n_threads=n_threads)
    cached[key] = asdict(verdict)
    write_cache(path, cached)
    return verdict


def probe_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights of the probe tower, by GGUF name, in torch's shapes."""
    cfg, rng = PROBE_TOWER, np.random.default_rng(seed)
    h, p, t = cfg.hidden_size, cfg.patch_size, cfg.num_patches + 1
    m = gguf.MODEL_TENSOR

    def rand(*shape: int, scale: float = 0.03, mean: float = 0.0) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale + mean).astype(np.float32)

    weights = {
        tensor_name(m.V_ENC_EMBD_PATCH, ".weight"): rand(h, 3, p, p), tensor_name(m.V_ENC_EMBD_CLS): rand(h, scale=1.0),
        tensor_name(m.V_ENC_EMBD_POS, ".weight"): rand(t, h, scale=0.5),
        tensor_name(m.V_PRE_NORM, ".weight"): rand(h, scale=0.1, mean=1.0), tensor_name(m.V_PRE_NORM, ".bias"): rand(h),
        tensor_name(m.V_MMPROJ, ".weight", 0): rand(PROBE_LLM, h), tensor_name(m.V_MMPROJ, ".bias", 0): rand(PROBE_LLM),
        tensor_name(m.V_MMPROJ, ".weight", 2): rand(PROBE_LLM, PROBE_LLM),
        tensor_name(m.V_MMPROJ, ".bias", 2): rand(PROBE_LLM),
    }
    shapes = {m.V_ENC_INPUT_NORM: (h,), m.V_ENC_POST_ATTN_NORM: (h,), m.V_ENC_ATTN_Q: (h, h), m.V_ENC_ATTN_K: (h, h),
              m.V_ENC_ATTN_V: (h, h), m.V_ENC_ATTN_O: (h, h), m.V_ENC_FFN_UP: (PROBE_FFN, h),
              m.V_ENC_FFN_DOWN: (h, PROBE_FFN)}
    for tensor, shape in shapes.items():
        norm = len(shape) == 1
        weights[tensor_name(tensor, ".weight", 0)] = rand(*shape, scale=0.1 if norm else 0.03, mean=1.0 if norm else 0.0)
        weights[tensor_name(tensor, ".bias", 0)] = rand(shape[0])
    return weights


def run_ggml_probe(library: GgmlLib, *, use_gpu: bool = False, n_threads: int | None = None) -> GgmlVerdict:
    """One tile of the probe tower through ggml and NumPy (after a warm-up each): agreement and speed."""
    global _ggml_probe_runs
    _ggml_probe_runs += 1
    weights: Mapping[str, np.ndarray] = probe_weights()
    layout = TowerLayout(weights, PROBE_TOWER, "the ggml probe tower")
    tiles = np.random.default_rng(1).standard_normal((1, 3, 336, 336), dtype=np.float32)
    reference = NumpyVisionEncoder(weights, PROBE_TOWER)
    ggml = GgmlVisionEncoder(weights, layout, use_gpu=use_gpu, n_threads=n_threads, library=library)
    try:
        times = {}
        outputs = {}
        for name, encoder in (("numpy", reference), ("ggml", ggml)):
            encoder.encode(tiles)  # warm-up: first-touch pages, thread pools, GPU kernels
            start = time.perf_counter()
            outputs[name] = encoder.encode(tiles)
            times[name] = time.perf_counter() - start
    finally:
        ggml.close()
    scale = float(np.abs(outputs["numpy"]).max())
    rel = float(np.abs(outputs["ggml"] - outputs["numpy"]).max()) / scale
    return GgmlVerdict(exact=rel <= GGML_PROBE_TOLERANCE, ggml_s=times["ggml"], numpy_s=times["numpy"], max_rel_diff=rel)
