"""Whether llama.cpp's CPU weight repacking makes LLaVA requests faster on this machine.

Repacking rearranges quantized weights for the CPU's SIMD layout (AVX2/AVX-512, ARM dotprod/i8mm):
faster on some CPUs, slower on others, and not always the same way for prefill (many-token products)
and decode (one-token products). ``auto`` measures once per CPU model, thread count and libraries: a
small synthetic Q4_K_M model (1B-wide, two layers), loaded with and without repacking, prefills 256
tokens and decodes 32, the two settings alternating (``machine_load.alternate``: a warm-up each, then
at least three rounds and a second, each setting's best kept; about a second and a half in all; its
decode, over 58 MiB of weights, understates what repacking does for a real model's). Repacking is
chosen when it is at least 5% faster for prefill, or for a typical request (an image's 1,000 positions
of prefill, then a 100-token answer): so prefill is never much slower than llama.cpp's default
(repacking on), and repacking is left off where it buys nothing.

The verdict is cached with the encoders' probes (``probe_cache``: figures, date, load, versions) when
the machine was calm while it measured; measured while other processes used the cores, it is
provisional: this run uses it and says so, the next measures again. A stale entry (other libraries,
an older format) or a corrupt one is measured again. The probe runs in a child process: llama.cpp's
repacked kernels can crash (its AMX ones on a Q4_K_M prefill, llama.cpp issue 20824), and a crash
gives a settled "off", cached whatever the load. When repacking, the model is loaded without mmap,
so its weights are resident once, not as the mapped file plus the repacked copy.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp import _logger as llama_logger

from llava_gguf.machine_load import BUSY_CORES, LoadMeter, MachineLoad, alternate, cpu_model
from llava_gguf.vision.probe_cache import Provenance, default_cache_dir, library_versions, lookup, now_iso, store

log = logging.getLogger(__name__)

PROBE_FILE = "repack-probe.json"
CRASHED = "llama.cpp crashed"  # how a crashed probe's failure begins
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
    provenance: Provenance | None = field(default=None, compare=False)  # when and how calmly it was measured

    @property
    def provisional(self) -> bool:
        """Measured on a busy machine: used by this run only."""
        return self.provenance is not None and self.provenance.provisional

    @property
    def crashed(self) -> bool:
        """llama.cpp's repacked kernels crashed on this machine: repacking must not be used here."""
        return self.failure is not None and self.failure.startswith(CRASHED)

    @property
    def reason(self) -> str:
        choice = "on" if self.repack else "off"
        r, p = self.repacked, self.plain
        note = f"; {self.provenance.note()}" if self.provenance is not None else ""
        if r is None or p is None:
            return f"weight repacking {choice} (the probe could not run: {self.failure}{note})"
        return (f"weight repacking {choice} (measured here on a small Q4_K_M model with and without: "
                f"prefill {r.prefill:.0f} vs {p.prefill:.0f} tok/s, decode {r.decode:.0f} vs {p.decode:.0f} tok/s{note})")

    def figures(self) -> dict[str, object]:
        """The cache entry's figures."""
        return {"repack": self.repack, "repacked": asdict(self.repacked) if self.repacked else None,
                "plain": asdict(self.plain) if self.plain else None, "failure": self.failure}

    @classmethod
    def from_json(cls, entry: object, provenance: Provenance | None = None) -> RepackVerdict:
        """A cached verdict; ``ValueError`` when malformed."""
        try:
            if entry.get("failure"):  # type: ignore[union-attr]  # llama.cpp crashed on the probe: off
                return cls(False, None, None, str(entry["failure"]), provenance)  # type: ignore[index]
            speeds = [Speeds(float(entry[k]["prefill"]), float(entry[k]["decode"]))  # type: ignore[index]
                      for k in ("repacked", "plain")]
            verdict = cls(bool(entry["repack"]), *speeds, provenance=provenance)  # type: ignore[index]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise ValueError(f"malformed repack verdict: {e}") from e
        figures = (speeds[0].prefill, speeds[0].decode, speeds[1].prefill, speeds[1].decode)
        if not all(math.isfinite(x) and x > 0 for x in figures):
            raise ValueError("malformed repack verdict: a speed is not a positive number")
        return verdict


_runs = 0


def probe_run_count() -> int:
    return _runs


def _library_dir() -> Path:
    return Path(llama_cpp.llama_cpp._lib._name).resolve().parent


def probe_key(n_threads: int) -> str:
    """What a verdict is about: the CPU, its cores, the threads and the llama.cpp library's place (its
    build and versions are recorded in the entry: a change makes the entry stale)."""
    raw = f"{cpu_model()}|{os.cpu_count()}|t{n_threads}|{_library_dir()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def probe_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / PROBE_FILE


def choose_repack(n_threads: int, cache_dir: str | os.PathLike[str] | None = None, *, use_cache: bool = True,
                  busy_cores: float = BUSY_CORES) -> RepackVerdict:
    """The cached verdict for this machine, or a new measurement (about a second and a half), cached
    when other processes used at most ``busy_cores`` cores meanwhile. ``use_cache=False`` measures
    anyway (and still caches a calm machine's verdict)."""
    path, key = probe_path(cache_dir), probe_key(n_threads)
    versions = library_versions(_library_dir())
    found = lookup(path, key, versions) if use_cache else None
    if found is not None:
        try:
            return RepackVerdict.from_json(*found)
        except ValueError as e:
            log.debug("measuring again: %s in %s", e, path)
    try:
        verdict = measure(n_threads, busy_cores=busy_cores, versions=versions)
    except (RuntimeError, ValueError, OSError) as e:  # llama.cpp refused the probe model, no scratch space
        log.debug("the repack probe failed: %s", e)
        return RepackVerdict(False, None, None, str(e))  # llama.cpp's load default stays off; not cached
    if verdict.provenance is not None:
        store(path, key, verdict.figures(), verdict.provenance)
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


class _ProbeRun:
    """The probe model loaded with or without repacking, with a context; ``run()`` times a prefill of
    256 tokens and a decode of 32 (seconds of each)."""

    def __init__(self, path: Path, n_threads: int, repack: bool) -> None:
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = repack
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE if repack else llama_cpp.LLAMA_LOAD_MODE_MMAP
        self.model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        try:
            ctx_params = llama_cpp.llama_context_default_params()
            ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = _N_TOKENS + _N_DECODE
            ctx_params.n_threads = ctx_params.n_threads_batch = n_threads
            self.ctx = _internals.LlamaContext(model=self.model, params=ctx_params, verbose=False)
        except BaseException:
            self.model.close()
            raise
        self.batch = llama_cpp.llama_batch_init(_N_TOKENS, 0, 1)
        self.tokens = [int(t) for t in np.random.default_rng(1).integers(1, _N_VOCAB, _N_TOKENS + _N_DECODE)]

    def run(self) -> tuple[float, float]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx.ctx), True)
        prefill_s = _timed_decode(self.ctx, self.batch, self.tokens[:_N_TOKENS], 0)
        start = time.perf_counter()
        for i in range(_N_TOKENS, _N_TOKENS + _N_DECODE):
            _timed_decode(self.ctx, self.batch, self.tokens[i:i + 1], i)
        return prefill_s, time.perf_counter() - start

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        self.ctx.close()
        self.model.close()


def measure_speeds(path: Path, n_threads: int) -> tuple[Speeds, Speeds, MachineLoad]:
    """(repacked, plain) speeds of the probe model, the settings alternating, and the machine's load
    meanwhile."""
    plain = _ProbeRun(path, n_threads, repack=False)
    try:
        repacked = _ProbeRun(path, n_threads, repack=True)
        try:
            meter = LoadMeter()
            best = alternate({"plain": plain.run, "repacked": repacked.run})
            load = meter.stop()
        finally:
            repacked.close()
    finally:
        plain.close()

    def speeds(name: str) -> Speeds:
        prefill_s, decode_s = best[name]
        return Speeds(_N_TOKENS / prefill_s, _N_DECODE / decode_s)

    return speeds("repacked"), speeds("plain"), load


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


class ProbeCrashed(Exception):
    """llama.cpp killed the probe's process (a signal): repacking cannot run here."""


def measure(n_threads: int, *, busy_cores: float = BUSY_CORES, versions: dict[str, str] | None = None) -> RepackVerdict:
    """Measure now (no cache), in a child process: llama.cpp's repacked kernels can crash (its AMX ones
    on Q4_K_M, llama.cpp issue 20824), and a crash must not take the caller with it. Provisional when
    other processes used more than ``busy_cores`` cores; a crash gives a settled "off"."""
    global _runs
    _runs += 1
    about = {"probe": "repack", "cpu": cpu_model(), "threads": str(n_threads), "library": str(_library_dir())}
    versions = versions or library_versions(_library_dir())
    meter = LoadMeter()
    try:
        repacked, plain, load = _probe_in_child(n_threads)
    except ProbeCrashed as e:
        return RepackVerdict(False, None, None, str(e), Provenance(now_iso(), meter.stop(), versions, about))
    provenance = Provenance(now_iso(), load, versions, about, provisional=load.busy(busy_cores))
    return RepackVerdict(decide(repacked, plain), repacked, plain, provenance=provenance)


_CHILD_TIMEOUT_S = 300  # a probe on a saturated machine takes longer than its second or two, not minutes


def _probe_in_child(n_threads: int) -> tuple[Speeds, Speeds, MachineLoad]:
    """(repacked, plain, load) from ``python -m llava_gguf.llm.repack``; ``ProbeCrashed`` on a signal,
    ``RuntimeError`` on any other failure."""
    import llava_gguf

    env = dict(os.environ)  # the same llama.cpp (LLAMA_CPP_LIB_PATH) and this llava_gguf
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(llava_gguf.__file__).parents[1]), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="llava-gguf-repack-") as scratch:
        out = Path(scratch) / "speeds.json"
        try:
            child = subprocess.run([sys.executable, "-m", __name__, str(n_threads), str(out)], env=env,
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=_CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"the probe took over {_CHILD_TIMEOUT_S} s") from e
        if child.returncode < 0:
            raise ProbeCrashed(_crash_text(-child.returncode))
        if child.returncode != 0 or not out.is_file():
            tail = child.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise RuntimeError(f"the probe's process exited with {child.returncode}: {tail[0]}")
        result = json.loads(out.read_text())
    try:
        return (Speeds(**result["repacked"]), Speeds(**result["plain"]), MachineLoad.from_json(result["load"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RuntimeError(f"the probe's process gave malformed figures ({e})") from e


def _crash_text(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    amx = " (this CPU has AMX: llama.cpp's AMX kernels crash on Q4_K_M, llama.cpp issue 20824)" if _has_amx() else ""
    return f"{CRASHED} on the probe model with {name}{amx}"


def _has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def probe_here(n_threads: int) -> dict[str, object]:
    """The child's side: the probe model written to a scratch directory and timed both ways."""
    llama_cpp.llama_log_set(_silent, ctypes.c_void_p(0))  # the loader narrates every tensor
    try:
        with tempfile.TemporaryDirectory(prefix="llava-gguf-repack-") as scratch:
            path = Path(scratch) / "probe.Q4_K_M.gguf"
            write_probe_model(path)
            repacked, plain, load = measure_speeds(path, n_threads)
    finally:
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    return {"repacked": asdict(repacked), "plain": asdict(plain), "load": load.to_json()}


def _child_main(argv: list[str]) -> int:
    """``python -m llava_gguf.llm.repack THREADS OUT.json``: the probe, its figures written to OUT."""
    n_threads, out = int(argv[0]), Path(argv[1])
    out.write_text(json.dumps(probe_here(n_threads)))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
