"""Whether llama.cpp's CPU weight repacking makes LLaVA requests faster on this machine.

Repacking rearranges quantized weights for the CPU's SIMD layout (AVX2/AVX-512, ARM dotprod/i8mm):
faster on some CPUs, slower on others, and not always the same way for prefill (many-token products)
and decode (one-token products). ``auto`` measures once per CPU model, llama.cpp build and thread
count: a small synthetic Q4_K_M model (1B-wide, two layers) prefills 256 tokens and decodes 32 with
and without repacking (the best of a few runs each; about a second in all; its decode, over 58 MiB
of weights, understates what repacking does for a real model's). Repacking is chosen when it is at
least 5% faster for prefill, or for a typical request (an image's 1,000 positions of prefill, then a
100-token answer): so prefill is never much slower than llama.cpp's default (repacking on), and
repacking is left off where it buys nothing. The verdict is cached with the encoders' probes; a
corrupt cache entry is measured again. When repacking, the model is loaded without mmap, so its
weights are resident once, not as the mapped file plus the repacked copy.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp import _logger as llama_logger

from llava_gguf.vision.probe_cache import default_cache_dir, read_cache, write_cache

log = logging.getLogger(__name__)

PROBE_FILE = "repack-probe.json"
_PROBE_VERSION = 3
GAIN = 0.95  # repack when it takes at most this fraction of the plain time
REQUEST_PREFILL, REQUEST_DECODE = 1000, 100  # a typical request: an image and its question, the answer
_N_EMBD, _N_FF, _N_LAYER, _N_HEAD, _N_HEAD_KV, _N_VOCAB = 2048, 5632, 2, 32, 4, 512
_N_TOKENS, _N_DECODE = 256, 32


class RepackPolicy(str, enum.Enum):
    AUTO = "auto"  # measured once per machine (this module)
    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class Speeds:
    """Tokens per second of the probe model, with or without repacking."""

    prefill: float
    decode: float

    def request_s(self) -> float:
        """Seconds for a typical request's prefill and answer, at these speeds (relative figure)."""
        return REQUEST_PREFILL / self.prefill + REQUEST_DECODE / self.decode


def decide(repacked: Speeds, plain: Speeds) -> bool:
    """Repack when it is at least 5% faster for prefill or for a typical request."""
    return (plain.prefill <= GAIN * repacked.prefill
            or repacked.request_s() <= GAIN * plain.request_s())


@dataclass(frozen=True)
class RepackVerdict:
    repack: bool
    repacked: Speeds | None  # None: the probe could not run (``failure`` says why)
    plain: Speeds | None
    failure: str | None = None

    @property
    def reason(self) -> str:
        choice = "on" if self.repack else "off"
        r, p = self.repacked, self.plain
        if r is None or p is None:
            return f"weight repacking {choice} (the probe could not run: {self.failure})"
        return (f"weight repacking {choice} (measured here on a small Q4_K_M model with and without: "
                f"prefill {r.prefill:.0f} vs {p.prefill:.0f} tok/s, decode {r.decode:.0f} vs {p.decode:.0f} tok/s)")

    @classmethod
    def from_json(cls, entry: object) -> RepackVerdict:
        """A cached verdict; ``ValueError`` when malformed."""
        try:
            speeds = [Speeds(float(entry[k]["prefill"]), float(entry[k]["decode"]))  # type: ignore[index]
                      for k in ("repacked", "plain")]
            verdict = cls(bool(entry["repack"]), *speeds)  # type: ignore[index]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"malformed repack verdict: {e}") from e
        figures = (speeds[0].prefill, speeds[0].decode, speeds[1].prefill, speeds[1].decode)
        if not all(math.isfinite(x) and x > 0 for x in figures):
            raise ValueError("malformed repack verdict: a speed is not a positive number")
        return verdict


_runs = 0


def probe_run_count() -> int:
    return _runs


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_key(n_threads: int) -> str:
    lib = Path(llama_cpp.llama_cpp._lib._name)
    stat = lib.stat()
    raw = f"v{_PROBE_VERSION}|{cpu_model()}|{os.cpu_count()}|t{n_threads}|{lib.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def choose_repack(n_threads: int, cache_dir: str | os.PathLike[str] | None = None) -> RepackVerdict:
    """The cached verdict for this machine, or a new measurement (about a second)."""
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / PROBE_FILE
    key = probe_key(n_threads)
    cached = read_cache(path)
    entry = cached.get(key)
    if entry is not None:
        try:
            return RepackVerdict.from_json(entry)
        except ValueError as e:
            log.debug("measuring again: %s in %s", e, path)
    try:
        verdict = measure(n_threads)
    except (RuntimeError, ValueError, OSError) as e:  # llama.cpp refused the probe model, no scratch space
        log.debug("the repack probe failed: %s", e)
        return RepackVerdict(False, None, None, str(e))  # llama.cpp's load default stays off; not cached
    cached[key] = asdict(verdict)
    write_cache(path, cached)
    return verdict


def write_probe_model(path: Path) -> None:
    """A small llama-architecture GGUF laid out as Q4_K_M (Q6_K for attn_v, ffn_down and the output,
    Q4_K for the rest), its blocks random bytes with small scales: for timing only, written in a
    fraction of a second without a quantizer. 2048 wide like a 1B model, so the products are real-sized."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(1024)
    writer.add_embedding_length(_N_EMBD)
    writer.add_block_count(_N_LAYER)
    writer.add_feed_forward_length(_N_FF)
    writer.add_head_count(_N_HEAD)
    writer.add_head_count_kv(_N_HEAD_KV)
    writer.add_rope_dimension_count(_N_EMBD // _N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(_N_VOCAB)
    writer.add_tokenizer_model("none")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    rng = np.random.default_rng(0)
    t, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    q4, q6 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K
    n_kv = _N_EMBD // _N_HEAD * _N_HEAD_KV
    writer.add_tensor(names[t.TOKEN_EMBD] + ".weight", rng.standard_normal((_N_VOCAB, _N_EMBD), dtype=np.float32) * 0.02)
    writer.add_tensor(names[t.OUTPUT_NORM] + ".weight", np.ones(_N_EMBD, np.float32))
    writer.add_tensor(names[t.OUTPUT] + ".weight", _random_blocks(q6, _N_VOCAB, _N_EMBD, rng), raw_dtype=q6)
    for i in range(_N_LAYER):
        for norm in (t.ATTN_NORM, t.FFN_NORM):
            writer.add_tensor(names[norm].format(bid=i) + ".weight", np.ones(_N_EMBD, np.float32))
        for tensor, qtype, rows, cols in ((t.ATTN_Q, q4, _N_EMBD, _N_EMBD), (t.ATTN_K, q4, n_kv, _N_EMBD),
                                          (t.ATTN_V, q6, n_kv, _N_EMBD), (t.ATTN_OUT, q4, _N_EMBD, _N_EMBD),
                                          (t.FFN_GATE, q4, _N_FF, _N_EMBD), (t.FFN_UP, q4, _N_FF, _N_EMBD),
                                          (t.FFN_DOWN, q6, _N_EMBD, _N_FF)):
            writer.add_tensor(names[tensor].format(bid=i) + ".weight", _random_blocks(qtype, rows, cols, rng),
                              raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _random_blocks(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, cols] weights as random K-quant blocks whose float16 super-block scales are 1e-4."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    # Q4_K: d and dmin lead the block; Q6_K: d ends it
    for offset in ((0, 2) if qtype == gguf.GGMLQuantizationType.Q4_K else (type_size - 2,)):
        blocks[..., offset:offset + 2] = scale
    return blocks.reshape(rows, -1)  # [rows, n_blocks * type_size] bytes


def measure_speeds(path: Path, n_threads: int, repack: bool) -> Speeds:
    """Prefill of 256 tokens and decode of 32, the best of a few runs each after a warm-up."""
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = repack
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE if repack else llama_cpp.LLAMA_LOAD_MODE_MMAP
    model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = _N_TOKENS + _N_DECODE
        ctx_params.n_threads = ctx_params.n_threads_batch = n_threads
        ctx = _internals.LlamaContext(model=model, params=ctx_params, verbose=False)
        batch = llama_cpp.llama_batch_init(_N_TOKENS, 0, 1)
        try:
            tokens = [int(t) for t in np.random.default_rng(1).integers(1, _N_VOCAB, _N_TOKENS + _N_DECODE)]
            prefill = decode = float("inf")
            for run in range(3):  # the first is a warm-up
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)
                prefill_s = _timed_decode(ctx, batch, tokens[:_N_TOKENS], 0)
                start = time.perf_counter()
                for i in range(_N_DECODE):
                    _timed_decode(ctx, batch, tokens[_N_TOKENS + i:_N_TOKENS + i + 1], _N_TOKENS + i)
                if run > 0:
                    prefill, decode = min(prefill, prefill_s), min(decode, time.perf_counter() - start)
        finally:
            llama_cpp.llama_batch_free(batch)
            ctx.close()
    finally:
        model.close()
    return Speeds(_N_TOKENS / prefill, _N_DECODE / decode)


def _timed_decode(ctx: _internals.LlamaContext, batch: llama_cpp.llama_batch, tokens: list[int], pos: int) -> float:
    """Decode ``tokens`` from position ``pos`` (logits of the last only); the seconds it took."""
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
    batch.n_tokens = len(tokens)
    start = time.perf_counter()
    status = llama_cpp.llama_decode(ctx.ctx, batch)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"llama_decode returned {status} on the probe model")
    return elapsed


@llama_cpp.llama_log_callback
def _silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pass


def measure(n_threads: int) -> RepackVerdict:
    global _runs
    _runs += 1
    llama_cpp.llama_log_set(_silent, ctypes.c_void_p(0))  # the loader narrates every tensor
    try:
        with tempfile.TemporaryDirectory(prefix="llava-gguf-repack-") as scratch:
            path = Path(scratch) / "probe.Q4_K_M.gguf"
            write_probe_model(path)
            plain = measure_speeds(path, n_threads, repack=False)
            repacked = measure_speeds(path, n_threads, repack=True)
    finally:
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    return RepackVerdict(decide(repacked, plain), repacked, plain)
