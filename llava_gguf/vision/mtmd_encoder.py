"""llama.cpp's libmtmd as a LLaVA vision encoder, used only where it computes the reference result.

libmtmd builds LLaVA's CLIP graph with the class token after the patches while filling the
position embeddings as if it came first (llama.cpp issue 25814), and its projector uses
tanh-GELU; so its features differ from transformers'. ``probe_mtmd`` runs libmtmd and the exact
``NumpyVisionEncoder`` on a tiny random tower written by the converter and compares them; the
verdict is cached per installed library, and ``choose_encoder`` picks libmtmd only when the
verdict says it agrees with the reference.

Both encoders take the runtime's normalized float32 tiles ``[n, 3, S, S]``. libmtmd normalizes
uint8 RGB itself, so ``MtmdVisionEncoder`` recovers the uint8 pixels from the tiles (exact: the
tiles came from uint8 pixels) and gives each tile to libmtmd as its own bitmap of exactly the
tile size, which libmtmd copies unchanged into one image chunk, for 1.5 and 1.6 (pinpoints)
mmprojs alike: a bitmap no larger than the tile is never sliced.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from llama_cpp import _logger as llama_logger
from llama_cpp import mtmd_cpp

from llava_gguf.convert.checkpoint import LlavaCheckpoint, TextConfig, VisionConfig
from llava_gguf.convert.mmproj import MmprojType, write_mmproj
from llava_gguf.convert.names import Layout
from llava_gguf.convert.tensors import TensorRef, TensorStore
from llava_gguf.errors import ImageError, ModelLoadError
from llava_gguf.image.preprocess import normalize_tile
from llava_gguf.llm.templates import Template
from llava_gguf.metadata import ImageMode, SelectStrategy, TokenizeMode, VisionSettings, read_gguf
from llava_gguf.vision.encoder import TileCallback
from llava_gguf.vision.numpy_encoder import NumpyVisionEncoder
from llava_gguf.vision.probe_cache import default_cache_dir, read_cache, write_cache

log = logging.getLogger(__name__)

# libmtmd's own log goes through llama-cpp-python's logger, as libllama's does; quiet unless asked.
mtmd_cpp.mtmd_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

# max |libmtmd - reference| over max |reference| on the probe tower's features: room for ggml's
# f16 steps (its patch convolution rounds pixels and weights to f16: about 5e-4 of the scale)
PROBE_TOLERANCE = 1e-3
PROBE_CACHE_FILE = "mtmd-probe.json"
_PROBE_VERSION = 1  # bump when the probe tower or the comparison changes: old verdicts are ignored
_KNOWN_CAUSE = (
    "llama.cpp puts LLaVA's class token after the patches but gives out the positions as if it came "
    "first (llama.cpp issue 25814), and uses tanh-GELU in the projector"
)

# -- libmtmd ----------------------------------------------------------------------------------


def library_paths() -> list[Path]:
    """The loaded libmtmd and libllama shared libraries."""
    return [Path(mtmd_cpp._libmtmd._name), Path(llama_cpp.llama_cpp._lib._name)]


def library_key() -> str:
    """Identifies the installed libraries: path, size and mtime of each."""
    parts = []
    for path in library_paths():
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return f"v{_PROBE_VERSION}|" + "|".join(parts)


def _context_params(n_threads: int | None, use_gpu: bool) -> mtmd_cpp.mtmd_context_params:
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = use_gpu
    params.print_timings = False
    params.n_threads = n_threads or os.cpu_count() or 1
    params.warmup = False
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU kernel rounds K and V to f16
    return params


class MtmdVisionEncoder:
    """Tiles to LLaVA image features with llama.cpp's libmtmd (not the reference: see the module doc).

    ``llm_model`` is the ``llama_model_p`` of the LLM the mmproj belongs to (libmtmd checks the
    projection width against it); it must outlive this encoder. Call ``close()`` before freeing it.
    """

    def __init__(
        self,
        mmproj_path: str | os.PathLike[str],
        llm_model: llama_cpp.llama_model_p,
        *,
        n_threads: int | None = None,
        use_gpu: bool = False,
    ) -> None:
        self.mmproj_path = Path(mmproj_path)
        reader = read_gguf(self.mmproj_path)
        self.settings = VisionSettings.read(reader)
        del reader
        # Shapes, image_newline and the config come from the same file, memory-mapped.
        self._gguf = NumpyVisionEncoder.from_gguf(self.mmproj_path, cache_bytes=0)
        self.config = self._gguf.config
        if self.config.vision_feature_select_strategy != SelectStrategy.DEFAULT:
            raise ModelLoadError(
                f"{self.mmproj_path.name}: libmtmd always drops one token per tile, so it cannot run the "
                f"'{self.config.vision_feature_select_strategy.value}' feature select strategy"
            )
        if not math.isclose(self.settings.rescale_factor, 1 / 255, rel_tol=1e-6):
            raise ModelLoadError(
                f"{self.mmproj_path.name}: libmtmd rescales pixels by 1/255, the model by {self.settings.rescale_factor}"
            )
        self._ctx: mtmd_cpp.mtmd_context_p | None = mtmd_cpp.mtmd_init_from_file(
            str(self.mmproj_path).encode(), llm_model, _context_params(n_threads, use_gpu)
        )
        if not self._ctx:
            self._ctx = None
            raise ModelLoadError(f"{self.mmproj_path}: llama.cpp's libmtmd could not load the mmproj with this LLM")
        self._marker = mtmd_cpp.mtmd_default_marker()

    @property
    def n_tokens(self) -> int:
        return self.config.num_patches

    @property
    def llm_hidden_size(self) -> int:
        return self._gguf.llm_hidden_size

    @property
    def image_newline(self) -> np.ndarray | None:
        return self._gguf.image_newline

    def encode(self, tiles: np.ndarray, on_tile: TileCallback | None = None) -> np.ndarray:
        """tiles [n, 3, S, S] (normalized pixels) -> features [n, n_tokens, llm_hidden]."""
        s = self.config.image_size
        if tiles.ndim != 4 or tiles.shape[1:] != (3, s, s):
            raise ImageError(f"tiles have shape {tuple(tiles.shape)}, expected (n, 3, {s}, {s})")
        return self.encode_pixels(tiles_to_pixels(tiles, self.settings), on_tile)

    def encode_pixels(self, pixels: np.ndarray, on_tile: TileCallback | None = None) -> np.ndarray:
        """uint8 RGB tiles [n, S, S, 3] -> features [n, n_tokens, llm_hidden]."""
        s = self.config.image_size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ImageError(f"pixels are {pixels.dtype} {tuple(pixels.shape)}, expected uint8 (n, {s}, {s}, 3)")
        n = pixels.shape[0]
        out = np.empty((n, self.n_tokens, self.llm_hidden_size), dtype=np.float32)
        for i in range(n):
            out[i] = self.encode_tile_pixels(pixels[i])
            if on_tile is not None:
                on_tile(i + 1, n)
        return out

    def encode_tile_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """One uint8 RGB tile [S, S, 3] -> features [n_tokens, llm_hidden]."""
        if self._ctx is None:
            raise ModelLoadError("the libmtmd encoder is closed")
        s = self.config.image_size
        data = np.ascontiguousarray(pixels, dtype=np.uint8)  # [S, S, 3], rows of RGB
        bitmap = mtmd_cpp.mtmd_bitmap_init(s, s, data.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            return encode_bitmap(self._ctx, bitmap, chunks, self._marker, self.n_tokens, self.llm_hidden_size)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if self._ctx is not None:
            mtmd_cpp.mtmd_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()


def encode_bitmap(
    ctx: mtmd_cpp.mtmd_context_p,
    bitmap: mtmd_cpp.mtmd_bitmap_p,
    chunks: mtmd_cpp.mtmd_input_chunks_p,
    marker: bytes,
    n_tokens: int,
    width: int,
) -> np.ndarray:
    """A bitmap that libmtmd turns into one image chunk -> its embeddings [n_tokens, width]."""
    text = mtmd_cpp.mtmd_input_text()
    text.text = marker
    text.text_len = len(marker)
    text.add_special = False
    text.parse_special = True
    bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
    status = mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)
    if status != 0:
        raise ModelLoadError(f"libmtmd could not preprocess the tile (status {status})")
    images = [
        chunk
        for chunk in (mtmd_cpp.mtmd_input_chunks_get(chunks, i) for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)))
        if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE
    ]
    counts = [mtmd_cpp.mtmd_input_chunk_get_n_tokens(c) for c in images]
    if counts != [n_tokens]:
        raise ModelLoadError(f"libmtmd made image chunks of {counts} tokens from one tile, expected [{n_tokens}]")
    status = mtmd_cpp.mtmd_encode_chunk(ctx, images[0])
    if status != 0:
        raise ModelLoadError(f"libmtmd could not encode the tile (status {status})")
    embd = mtmd_cpp.mtmd_get_output_embd(ctx)  # float [n_tokens * width], owned by ctx
    return np.ctypeslib.as_array(embd, shape=(n_tokens, width)).copy()


def tiles_to_pixels(tiles: np.ndarray, settings: VisionSettings) -> np.ndarray:
    """Normalized tiles [n, 3, h, w] -> the uint8 RGB pixels [n, h, w, 3] they were made from.

    Inverts ``preprocess.normalize_tile``; raises ``ImageError`` when a value is not within a
    small fraction of a pixel level of an integer (the tiles did not come from uint8 pixels).
    """
    mean = np.asarray(settings.image_mean, dtype=np.float64)
    std = np.asarray(settings.image_std, dtype=np.float64)
    hwc = np.asarray(tiles, dtype=np.float64).transpose(0, 2, 3, 1)  # [n, 3, h, w] -> [n, h, w, 3]
    levels = (hwc * std + mean) / settings.rescale_factor
    rounded = np.rint(levels)
    worst = float(np.abs(levels - rounded).max(initial=0.0))
    if worst > 0.01 or rounded.min(initial=0) < 0 or rounded.max(initial=0) > 255:
        raise ImageError(
            f"tiles are not normalized uint8 pixels (off by {worst:.3g} levels); libmtmd needs the pixels"
        )
    return rounded.astype(np.uint8)


# -- the probe --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeVerdict:
    ok: bool  # libmtmd computes the reference features (within PROBE_TOLERANCE)
    max_abs_diff: float  # inf where libmtmd could not run the probe
    reason: str
    seconds: float = 0.0  # how long the probe ran (0 for a cached verdict's first reading)


_probe_runs = 0


def probe_run_count() -> int:
    """How many times this process ran the probe through libmtmd (cached verdicts excluded)."""
    return _probe_runs


def probe_mtmd(cache_dir: str | os.PathLike[str] | None = None, *, use_cache: bool = True) -> ProbeVerdict:
    """Whether the installed libmtmd computes the reference LLaVA features, cached per library."""
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / PROBE_CACHE_FILE
    key = library_key()
    cached = read_cache(path) if use_cache else {}
    entry = cached.get(key)
    if entry is not None:
        try:
            return ProbeVerdict(
                ok=bool(entry["ok"]), max_abs_diff=float(entry["max_abs_diff"]),  # type: ignore[arg-type]
                reason=str(entry["reason"]), seconds=float(entry["seconds"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError):
            log.debug("ignoring a malformed cached probe verdict in %s", path)
    verdict = run_probe()
    cached[key] = asdict(verdict)
    write_cache(path, cached)
    return verdict


def run_probe(n_threads: int = 1) -> ProbeVerdict:
    """Encode a fixed tile of a tiny random tower with libmtmd and with the exact encoder."""
    global _probe_runs
    _probe_runs += 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llava-gguf-probe-") as scratch:
        mmproj, llm = Path(scratch) / "probe.mmproj.gguf", Path(scratch) / "probe.llm.gguf"
        write_probe_mmproj(mmproj)
        write_probe_llm(llm, PROBE_VISION.projection_dim)
        reference = NumpyVisionEncoder.from_gguf(mmproj)
        pixels = np.random.default_rng(1).integers(0, 256, (1, PROBE_VISION.image_size, PROBE_VISION.image_size, 3),
                                                   dtype=np.uint8)  # [1, S, S, 3]
        settings = VisionSettings.read(read_gguf(mmproj))
        expected = reference.encode(_normalize(pixels, settings))  # [1, n_patches, d]
        del reference  # its memory maps of the scratch file
        llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))  # it notes the missing tokenizer
        try:
            model = llama_cpp.llama_model_load_from_file(str(llm).encode(), _llm_params())
        finally:
            llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
        if not model:
            return ProbeVerdict(False, math.inf, "libllama could not load the probe LLM", time.perf_counter() - start)
        try:
            encoder = MtmdVisionEncoder(mmproj, model, n_threads=n_threads)
            try:
                got = encoder.encode_pixels(pixels)
            finally:
                encoder.close()
        except ModelLoadError as e:
            return ProbeVerdict(False, math.inf, f"libmtmd could not run the probe: {e}", time.perf_counter() - start)
        finally:
            llama_cpp.llama_model_free(model)
    diff = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    seconds = time.perf_counter() - start
    if diff <= PROBE_TOLERANCE * scale:
        return ProbeVerdict(
            True, diff, f"libmtmd matches the reference features (max |diff| {diff:.2g} of {scale:.3g})", seconds
        )
    return ProbeVerdict(
        False, diff,
        f"libmtmd's features differ from the reference by up to {diff:.3g} on features up to {scale:.3g} "
        f"(tolerance {PROBE_TOLERANCE:g} of that); known causes: {_KNOWN_CAUSE}",
        seconds,
    )


def _normalize(pixels: np.ndarray, settings: VisionSettings) -> np.ndarray:
    return np.stack([normalize_tile(p, settings) for p in pixels])  # [n, 3, S, S]


@llama_cpp.llama_log_callback
def _silent_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pass


def _llm_params() -> llama_cpp.llama_model_params:
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_mmap = False
    return params


# The probe tower: CLIP's layout at toy size; 3 layers, feature layer -2, so 2 blocks run.
PROBE_VISION = VisionConfig(
    hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2, image_size=4, patch_size=2,
    layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=8,
)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _probe_checkpoint(v: VisionConfig = PROBE_VISION) -> LlavaCheckpoint:
    text = TextConfig(
        model_type="llama", hidden_size=v.projection_dim, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=64, vocab_size=4,
    )
    settings = VisionSettings(
        llava_version="1.5", layout=Layout.LLAVA_HF.value, image_mode=ImageMode.CROP, image_size=v.image_size,
        patch_size=v.patch_size, shortest_edge=v.image_size, crop_size=(v.image_size, v.image_size),
        image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
    )
    return LlavaCheckpoint(
        path=Path("probe"), layout=Layout.LLAVA_HF, llava_version="1.5", text=text, vision=v, settings=settings,
        projector_type="mlp2x_gelu", template=Template.LLAVA_HF, tokenize_mode=TokenizeMode.WHOLE,
        image_token_id=None, clip_path=None, clip_weights_from_repo=False, name="llava-gguf-probe",
    )


def _probe_weights(v: VisionConfig = PROBE_VISION, scale: float = 0.5) -> dict[str, np.ndarray]:
    """Random weights in transformers' names and shapes (fixed seed); matrices drawn with std ``scale``."""
    rng = np.random.default_rng(0)
    matrix_scale = scale
    h, f, p, n_pos = v.hidden_size, v.intermediate_size, v.patch_size, (v.image_size // v.patch_size) ** 2 + 1
    d = v.projection_dim

    def rand(*shape: int, scale: float = matrix_scale) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)

    tower = "vision_tower.vision_model."
    w = {
        tower + "embeddings.patch_embedding.weight": rand(h, 3, p, p),
        tower + "embeddings.class_embedding": rand(h),
        tower + "embeddings.position_embedding.weight": rand(n_pos, h),
        tower + "pre_layrnorm.weight": 1 + rand(h, scale=0.1),
        tower + "pre_layrnorm.bias": rand(h, scale=0.1),
    }
    for i in range(v.num_hidden_layers):
        block = f"{tower}encoder.layers.{i}."
        for name, (n_out, n_in) in {
            "self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
            "self_attn.out_proj": (h, h), "mlp.fc1": (f, h), "mlp.fc2": (h, f),
        }.items():
            w[block + name + ".weight"] = rand(n_out, n_in)
            w[block + name + ".bias"] = rand(n_out, scale=0.1)
        for norm in ("layer_norm1", "layer_norm2"):
            w[block + norm + ".weight"] = 1 + rand(h, scale=0.1)
            w[block + norm + ".bias"] = rand(h, scale=0.1)
    # the projector's pre-activations span roughly [-3, 3], where tanh- and erf-GELU differ most
    w["multi_modal_projector.linear_1.weight"] = rand(d, h)
    w["multi_modal_projector.linear_1.bias"] = rand(d, scale=0.1)
    w["multi_modal_projector.linear_2.weight"] = rand(d, d)
    w["multi_modal_projector.linear_2.bias"] = rand(d, scale=0.1)
    return w


class _ArrayStore(TensorStore):
    """In-memory tensors with the converter's ``TensorStore`` interface."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        super().__init__()
        self._arrays = arrays

    def names(self) -> list[str]:
        return list(self._arrays)

    def ref(self, name: str) -> TensorRef:
        a = self._arrays[name]
        return TensorRef(name, Path("<memory>"), "F32", tuple(a.shape), 0, a.nbytes)

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    def load(self, name: str) -> np.ndarray:
        return self._arrays[name]


def write_probe_mmproj(path: Path, vision: VisionConfig = PROBE_VISION, kind: MmprojType = MmprojType.F32,
                       scale: float = 0.5) -> None:
    """The probe tower (or a random one of ``vision``'s shape) as an mmproj, through the converter's own
    writer (its keys and names); the projector maps to ``vision.projection_dim``."""
    write_mmproj(_probe_checkpoint(vision), _ArrayStore(_probe_weights(vision, scale)), None, path, kind)


def write_probe_llm(path: Path, n_embd: int) -> None:
    """The smallest Llama GGUF libllama loads (one layer, four tokens, no tokenizer): libmtmd
    only needs a model of the projection width."""
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    n_vocab, n_ff = 4, 16
    writer.add_context_length(64)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("none")
    writer.add_file_type(0)
    names = gguf.TENSOR_NAMES
    t = gguf.MODEL_TENSOR
    shapes: dict[str, tuple[int, ...]] = {
        names[t.TOKEN_EMBD] + ".weight": (n_vocab, n_embd),
        names[t.OUTPUT_NORM] + ".weight": (n_embd,),
        names[t.OUTPUT] + ".weight": (n_vocab, n_embd),
        names[t.ATTN_NORM].format(bid=0) + ".weight": (n_embd,),
        names[t.ATTN_Q].format(bid=0) + ".weight": (n_embd, n_embd),
        names[t.ATTN_K].format(bid=0) + ".weight": (n_embd, n_embd),
        names[t.ATTN_V].format(bid=0) + ".weight": (n_embd, n_embd),
        names[t.ATTN_OUT].format(bid=0) + ".weight": (n_embd, n_embd),
        names[t.FFN_NORM].format(bid=0) + ".weight": (n_embd,),
        names[t.FFN_GATE].format(bid=0) + ".weight": (n_ff, n_embd),
        names[t.FFN_UP].format(bid=0) + ".weight": (n_ff, n_embd),
        names[t.FFN_DOWN].format(bid=0) + ".weight": (n_embd, n_ff),
    }
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
