"""Which vision encoder runs: the fastest one that computes the reference features.

``auto``: ggml on a GPU when the LLM is offloaded and this ggml has a GPU backend that passes the
exactness probe; else libmtmd where its own probe says it is exact (not in llama.cpp today); else, on
the CPU, whichever of ggml and NumPy ran the probe tile faster (both exact). ``numpy``, ``ggml`` and
``mtmd`` force one.

The ggml probe runs one tile through a CLIP-L-wide tower of one block (577 tokens, 1024 wide, the
real tower's layer) and its projector with both encoders, alternating (``machine_load.alternate``: a
warm-up each, then at least three rounds and a second, each one's best kept; about a second and a half
in all). One call of each is too little: OpenBLAS and ggml share the cores differently (OpenBLAS
splits a product evenly between its threads and waits for the slowest; ggml hands out chunks), so a
core taken by another process slows NumPy three to six times and ggml two, and a single reading
decides for whichever ran in a calm moment. The verdict is cached per library, backend, thread count
and machine, like libmtmd's, when the machine was calm while it measured (``probe_cache``); measured
while other processes used the cores, it is provisional: used by this run, which says so, and measured
again by the next. (On the GPU only exactness decides, which no load changes: always cached.)
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from llava_gguf.errors import ModelLoadError
from llava_gguf.machine_load import BUSY_CORES, LoadMeter, alternate, cpu_model
from llava_gguf.metadata import VisionSettings
from llava_gguf.vision.encoder import VisionEncoder
from llava_gguf.vision.ggml_encoder import GgmlVisionEncoder
from llava_gguf.vision.ggml_lib import GgmlLib, GgmlUnavailable, load_ggml
from llava_gguf.vision.mtmd_encoder import MtmdVisionEncoder, probe_mtmd
from llava_gguf.vision.numpy_encoder import DEFAULT_CACHE_BYTES, NumpyVisionEncoder
from llava_gguf.vision.probe_cache import Provenance, default_cache_dir, library_versions, lookup, now_iso, store
from llava_gguf.vision.weights import TowerLayout, VisionTowerConfig, tensor_name

log = logging.getLogger(__name__)

GGML_PROBE_FILE = "ggml-probe.json"
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
    ggml_s: float  # seconds per probe tile, the best of the probe's rounds
    numpy_s: float
    max_rel_diff: float
    provenance: Provenance | None = field(default=None, compare=False)  # when and how calmly it was measured

    @property
    def provisional(self) -> bool:
        """Measured on a busy machine: used by this run only."""
        return self.provenance is not None and self.provenance.provisional

    @property
    def ggml_faster(self) -> bool:
        return self.exact and self.ggml_s < self.numpy_s

    def timing(self) -> str:
        """E.g. "ggml 0.20 s vs NumPy 0.13 s per probe tile; cached 2026-12-01"."""
        note = f"; {self.provenance.note()}" if self.provenance is not None else ""
        return f"ggml {self.ggml_s:.2f} s vs NumPy {self.numpy_s:.2f} s per probe tile{note}"

    def figures(self) -> dict[str, object]:
        return {"exact": self.exact, "ggml_s": self.ggml_s, "numpy_s": self.numpy_s, "max_rel_diff": self.max_rel_diff}

    @classmethod
    def from_json(cls, entry: Mapping[str, object], provenance: Provenance | None = None) -> GgmlVerdict:
        """A cached verdict; ``ValueError`` when malformed."""
        try:
            verdict = cls(exact=bool(entry["exact"]), ggml_s=float(entry["ggml_s"]),  # type: ignore[arg-type]
                          numpy_s=float(entry["numpy_s"]), max_rel_diff=float(entry["max_rel_diff"]),  # type: ignore[arg-type]
                          provenance=provenance)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed ggml verdict: {e}") from e
        if not all(math.isfinite(x) and x > 0 for x in (verdict.ggml_s, verdict.numpy_s)):
            raise ValueError("malformed ggml verdict: a time is not a positive number")
        return verdict


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
            if verdict.ggml_faster:
                return chosen(ggml_encoder(False, library), "ggml",
                              f"using the ggml vision encoder on the CPU ({verdict.timing()})")
            why_not_ggml = (f"NumPy is faster here ({verdict.timing()})" if verdict.exact
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
    """What a verdict is about: the backend, the threads, the machine and the library's place (its build
    and versions are recorded in the entry: a change makes the entry stale)."""
    parts = ["gpu" if use_gpu else "cpu", f"t{n_threads or os.cpu_count()}", platform.machine(), cpu_model(),
             f"cpus{os.cpu_count()}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24] + f"|{library.directory}"


def ggml_probe_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / GGML_PROBE_FILE


def probe_ggml(library: GgmlLib, cache_dir: str | os.PathLike[str] | None = None, *, use_gpu: bool = False,
               n_threads: int | None = None, use_cache: bool = True, busy_cores: float = BUSY_CORES) -> GgmlVerdict:
    """Whether ggml computes the NumPy encoder's features here, and how fast each runs a tile: the cached
    verdict, or a new measurement (about a second and a half), cached when other processes used at most
    ``busy_cores`` cores meanwhile. ``use_cache=False`` measures anyway (and still caches a calm one)."""
    path, key = ggml_probe_path(cache_dir), ggml_library_key(library, use_gpu, n_threads)
    versions = library_versions(library.directory)
    found = lookup(path, key, versions) if use_cache else None
    if found is not None:
        try:
            return GgmlVerdict.from_json(*found)
        except ValueError as e:
            log.debug("measuring again: %s in %s", e, path)
    verdict = run_ggml_probe(library, use_gpu=use_gpu, n_threads=n_threads, busy_cores=busy_cores, versions=versions)
    if verdict.provenance is not None:
        store(path, key, verdict.figures(), verdict.provenance)
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


def run_ggml_probe(library: GgmlLib, *, use_gpu: bool = False, n_threads: int | None = None,
                   busy_cores: float = BUSY_CORES, versions: dict[str, str] | None = None) -> GgmlVerdict:
    """One tile of the probe tower through ggml and NumPy, alternating (no cache): agreement, each one's
    best time, and the machine's load meanwhile (provisional above ``busy_cores``)."""
    global _ggml_probe_runs
    _ggml_probe_runs += 1
    weights: Mapping[str, np.ndarray] = probe_weights()
    layout = TowerLayout(weights, PROBE_TOWER, "the ggml probe tower")
    tiles = np.random.default_rng(1).standard_normal((1, 3, 336, 336), dtype=np.float32)
    encoders: dict[str, VisionEncoder] = {"numpy": NumpyVisionEncoder(weights, PROBE_TOWER)}
    outputs: dict[str, np.ndarray] = {}

    def run(name: str) -> Callable[[], tuple[float]]:
        def timed() -> tuple[float]:
            start = time.perf_counter()
            outputs[name] = encoders[name].encode(tiles)
            return (time.perf_counter() - start,)
        return timed

    ggml = GgmlVisionEncoder(weights, layout, use_gpu=use_gpu, n_threads=n_threads, library=library)
    encoders["ggml"] = ggml
    try:
        meter = LoadMeter()
        best = alternate({name: run(name) for name in encoders})
        load = meter.stop()
    finally:
        ggml.close()
    scale = float(np.abs(outputs["numpy"]).max())
    rel = float(np.abs(outputs["ggml"] - outputs["numpy"]).max()) / scale
    about = {"probe": "ggml", "backend": ggml.backend_name, "cpu": cpu_model(),
             "threads": str(n_threads or os.cpu_count()), "library": str(library.directory)}
    # on the GPU only exactness decides, which no load changes: that verdict is never provisional
    provenance = Provenance(now_iso(), load, versions or library_versions(library.directory), about,
                            provisional=load.busy(busy_cores) and not use_gpu)
    return GgmlVerdict(exact=rel <= GGML_PROBE_TOLERANCE, ggml_s=best["ggml"][0], numpy_s=best["numpy"][0],
                       max_rel_diff=rel, provenance=provenance)
