"""A thin layer over llama-cpp-python's low-level API: load the LLM, tokenize, and decode
token ids and embedding rows (the image features) at explicit positions in one sequence."""

from __future__ import annotations

import ctypes
import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _internals

from llava_gguf.errors import ContextOverflowError, ModelLoadError
from llava_gguf.llm.repack import RepackPolicy, choose_repack
from llava_gguf.llm.tokenizer import Tokenizer, kv_override_array, name_overrides

log = logging.getLogger(__name__)
# llama.cpp's own log goes through this logger; keep it quiet unless asked.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
# llama-cpp-python's log callback reads ggml's levels one off (a warning counts as an error, so it is
# printed); this one reads them as ggml defines them and hands them to logging, errors only by default
llama_log = logging.getLogger("llava_gguf.llama_cpp")
llama_log.setLevel(logging.ERROR)
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level != 5:  # 5: the previous message goes on
        _last_level[0] = _GGML_LEVELS.get(level, logging.DEBUG)
    if llama_log.isEnabledFor(_last_level[0]):
        llama_log.log(_last_level[0], "%s", text.decode("utf-8", errors="replace").rstrip("\n"))


def route_llama_log() -> None:
    """Send llama.cpp's log to ``llava_gguf.llama_cpp`` (again, should something have set another callback)."""
    llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))


class KVCacheType(str, enum.Enum):
    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"

    @property
    def ggml_type(self) -> int:
        return int(getattr(llama_cpp, f"GGML_TYPE_{self.name}"))

    @property
    def quantized(self) -> bool:
        return self in (KVCacheType.Q8_0, KVCacheType.Q4_0)


@dataclass(frozen=True)
class LlamaOptions:
    """How the language model runs. ``n_ctx=None`` sizes the context to what a request needs."""

    n_ctx: int | None = None
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    kv_cache_type: KVCacheType = KVCacheType.F16
    flash_attn: bool | None = None  # None: llama.cpp decides (on where supported)
    use_mmap: bool = True
    use_mlock: bool = False
    # llama.cpp's CPU weight repacking: faster on some CPUs, slower on others (repack.py measures
    # which, once per machine); a repacked model loads without mmap, so its weights are resident once
    repack: RepackPolicy = RepackPolicy.AUTO
    repack_cache_dir: Path | None = None  # where the verdict is kept (default: the cache root)


class LlamaRuntime:
    """One llama.cpp model with one context holding a single sequence."""

    def __init__(self, path: Path, options: LlamaOptions = LlamaOptions()) -> None:
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
        route_llama_log()
        self.path = path
        self.options = options
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = options.n_gpu_layers
        threads = options.n_threads or os.cpu_count() or 2
        if options.repack is RepackPolicy.AUTO and options.n_gpu_layers == 0:
            verdict = choose_repack(threads, options.repack_cache_dir)
            self.repack, self.repack_reason = verdict.repack, verdict.reason
        else:
            if options.repack is RepackPolicy.ON and options.n_gpu_layers == 0:
                known = choose_repack(threads, options.repack_cache_dir)  # cached once measured
                if known.crashed:  # a segfault in llama_decode otherwise, taking the process with it
                    raise ModelLoadError(f"--repack on: {known.failure}; use --repack off (or auto)")
            self.repack = options.repack is RepackPolicy.ON
            self.repack_reason = f"weight repacking {'on' if self.repack else 'off'}" + (
                " (as asked)" if options.repack is not RepackPolicy.AUTO else " (GPU offload)")
        # repacked weights live in their own buffer: without mmap the file is not resident beside them
        self.mapped = options.use_mmap and not self.repack
        params.load_mode = {
            (True, False): llama_cpp.LLAMA_LOAD_MODE_MMAP,
            (True, True): llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK,
            (False, True): llama_cpp.LLAMA_LOAD_MODE_MLOCK,
            (False, False): llama_cpp.LLAMA_LOAD_MODE_NONE,
        }[(self.mapped, options.use_mlock)]
        params.use_extra_bufts = self.repack
        overrides = name_overrides(path)
        if overrides:  # llama.cpp's Phi-3 whitespace rule off: the tokenizer applies the reference's
            self._overrides = kv_override_array(overrides)  # llama.cpp reads it while loading: keep it alive
            params.kv_overrides = self._overrides
        try:
            self.model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: llama.cpp could not load the model ({e})") from e
        self.tokenizer = Tokenizer(path, self.model)
        self.n_vocab = self.model.n_vocab()
        self.n_embd = self.model.n_embd()
        self.n_ctx_train = self.model.n_ctx_train()
        self._ctx: _internals.LlamaContext | None = None
        self._batches: dict[str, llama_cpp.llama_batch] = {}
        self.n_past = 0

    # ------------------------------------------------------------------ context

    @property
    def n_ctx(self) -> int:
        return self._ctx.n_ctx() if self._ctx is not None else 0

    def ensure_context(self, n_needed: int) -> None:
        """Create (or grow) the context so it holds ``n_needed`` positions."""
        if n_needed > self.n_ctx_train and self.options.n_ctx is None:
            raise ContextOverflowError(
                f"the prompt and answer need {n_needed} tokens but the model's context is {self.n_ctx_train}; "
                "use fewer or smaller images, a shorter prompt or fewer max tokens"
            )
        if self.options.n_ctx is not None:
            size = self.options.n_ctx
            if n_needed > size:
                raise ContextOverflowError(
                    f"the prompt and answer need {n_needed} tokens but the context holds {size}; "
                    "raise the context size (-c) or ask for fewer max tokens"
                )
        else:
            # a growing conversation doubles the context, so it is rebuilt (and re-prefilled) rarely
            size = min(self.n_ctx_train, max(256, -(-n_needed // 256) * 256, 2 * self.n_ctx))
        if self._ctx is not None and self.n_ctx >= n_needed:
            return
        if self._ctx is not None:
            log.info("growing the context from %d to %d tokens; the cache restarts", self.n_ctx, size)
            self._ctx.close()
        params = self.context_params(size)
        try:
            self._ctx = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        except (ValueError, RuntimeError) as e:
            hint = f"; try --kv-cache-type f16 (a {self.options.kv_cache_type.value} cache needs head sizes that are multiples of 32)" if self.options.kv_cache_type.quantized else ""
            raise ModelLoadError(f"llama.cpp could not create a {size}-token context ({e}){hint}") from e
        self.n_past = 0

    def context_params(self, size: int, n_seq: int = 1, unified: bool = True) -> llama_cpp.llama_context_params:
        """llama.cpp context parameters for ``size`` positions (shared by ``n_seq`` sequences: one pool, or
        ``size / n_seq`` each when not ``unified``) with this runtime's threads, batch, KV cache type and
        flash attention."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = size
        params.n_batch = self.options.n_batch
        params.n_ubatch = self.options.n_batch
        threads = self.options.n_threads or os.cpu_count() or 2
        params.n_threads = threads
        params.n_threads_batch = threads
        params.type_k = self.options.kv_cache_type.ggml_type
        params.type_v = self.options.kv_cache_type.ggml_type
        flash_attn = self.options.flash_attn
        if flash_attn is None and self.options.kv_cache_type.quantized:
            flash_attn = True  # llama.cpp quantizes the V cache only with flash attention
        if flash_attn is False and self.options.kv_cache_type.quantized:
            raise ModelLoadError(f"a {self.options.kv_cache_type.value} KV cache needs flash attention; turn it on")
        params.flash_attn_type = {
            None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        params.n_seq_max = n_seq
        params.kv_unified = unified and n_seq > 1  # one pool of positions the sequences share
        return params

    def truncate(self, n_keep: int) -> None:
        """Forget every position from ``n_keep`` on."""
        if self._ctx is None:
            return
        memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        llama_cpp.llama_memory_seq_rm(memory, 0, n_keep, -1)
        self.n_past = n_keep

    # ------------------------------------------------------------------ state

    @property
    def state_key(self) -> str:
        """What a saved KV state depends on besides the tokens: the LLM file, the settings that change
        the values (cache type, flash attention, batch size, GPU offload) and the llama.cpp library."""
        stat = self.path.stat()
        lib = Path(llama_cpp.llama_cpp._lib._name)
        lib_stat = lib.stat()
        o = self.options
        return "|".join([
            f"{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}",
            f"kv={o.kv_cache_type.value}", f"fa={o.flash_attn}", f"batch={o.n_batch}", f"ngl={o.n_gpu_layers}",
            f"repack={self.repack}",
            f"llama.cpp {llama_cpp.__version__} {lib.resolve()}:{lib_stat.st_size}:{lib_stat.st_mtime_ns}",
        ])

    def state_size(self) -> int:
        """Bytes of the sequence's KV state (all ``n_past`` positions), as llama.cpp serializes it."""
        assert self._ctx is not None
        return int(llama_cpp.llama_state_seq_get_size(self._ctx.ctx, 0))

    def save_state(self, buffer: memoryview) -> int:
        """Serialize the sequence's KV state into a writable ``buffer`` of ``state_size()`` bytes."""
        assert self._ctx is not None
        array = (ctypes.c_uint8 * len(buffer)).from_buffer(buffer)
        return int(llama_cpp.llama_state_seq_get_data(self._ctx.ctx, array, len(buffer), 0))

    def restore_state(self, state: bytes | memoryview, n_positions: int) -> bool:
        """Replace the sequence with a saved state of ``n_positions`` positions; False (and an empty
        sequence) when llama.cpp refuses it or it does not hold exactly those positions. A writable
        buffer is handed over without a copy."""
        assert self._ctx is not None
        self.truncate(0)
        view = memoryview(state)
        array_type = ctypes.c_uint8 * len(view)
        buffer = array_type.from_buffer(view) if not view.readonly else array_type.from_buffer_copy(view)
        read = llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buffer, len(state), 0)
        last = llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(self._ctx.ctx), 0)
        if read != len(state) or last != n_positions - 1:
            self.truncate(0)
            return False
        self.n_past = n_positions
        return True

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens rendered as text)."""
        return self.tokenizer.token_bytes(token)

    def is_one_token(self, text: str) -> bool:
        """Whether the vocabulary holds ``text`` as a single (special or plain) token."""
        tokens = self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return len(tokens) == 1 and self.token_bytes(tokens[0]) == text.encode("utf-8")

    @property
    def add_bos(self) -> bool:
        return self.model.add_bos_token()

    @property
    def bos(self) -> int:
        return self.model.token_bos()

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.model.vocab, token))

    # ------------------------------------------------------------------ decoding

    def _require_room(self, n: int) -> None:
        if self._ctx is None:
            raise RuntimeError("ensure_context() first")
        if self.n_past + n > self.n_ctx:
            raise ContextOverflowError(
                f"the conversation needs {self.n_past + n} tokens but the context holds {self.n_ctx}; "
                "start over (/clear) or raise the context size"
            )

    def _batch(self, embd: bool) -> llama_cpp.llama_batch:
        """One reusable batch of ``n_batch`` positions, for token ids or embedding rows."""
        key = "embd" if embd else "tokens"
        if key not in self._batches:
            self._batches[key] = llama_cpp.llama_batch_init(self.options.n_batch, self.n_embd if embd else 0, 1)
        return self._batches[key]

    def _free_batches(self) -> None:
        for batch in self._batches.values():
            llama_cpp.llama_batch_free(batch)
        self._batches = {}

    def decode_tokens(self, tokens: list[int]) -> None:
        """Append ``tokens``; the logits of the last one become available."""
        self._require_room(len(tokens))
        batch = self._batch(embd=False)
        n_batch = self.options.n_batch
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start : start + n_batch]
            for i, token in enumerate(chunk):
                batch.token[i] = token
                self._set_position(batch, i, self.n_past + i, last=start + i == len(tokens) - 1)
            batch.n_tokens = len(chunk)
            self._decode(batch)
            self.n_past += len(chunk)

    def decode_embeddings(self, embeddings: np.ndarray) -> None:
        """Append rows of input embeddings ``[n, n_embd]`` (image features) as positions."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.n_embd:
            raise ModelLoadError(
                f"image features have width {embeddings.shape[-1]} but the LLM's embeddings have {self.n_embd}: "
                "the mmproj does not belong to this LLM"
            )
        self._require_room(len(embeddings))
        data = np.ascontiguousarray(embeddings, dtype=np.float32)
        batch = self._batch(embd=True)
        n_batch = self.options.n_batch
        for start in range(0, len(data), n_batch):
            chunk = data[start : start + n_batch]  # [<= n_batch, n_embd]
            ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
            for i in range(len(chunk)):
                self._set_position(batch, i, self.n_past + i, last=start + i == len(data) - 1)
            batch.n_tokens = len(chunk)
            self._decode(batch)
            self.n_past += len(chunk)

    @staticmethod
    def _set_position(batch: llama_cpp.llama_batch, i: int, pos: int, *, last: bool) -> None:
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = last

    def _decode(self, batch: llama_cpp.llama_batch) -> None:
        assert self._ctx is not None
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status != 0:
            raise ContextOverflowError(f"llama.cpp could not decode the batch (status {status}); the context may be full")

    def last_logits(self) -> np.ndarray:
        """Logits ``[n_vocab]`` after the last decoded position."""
        assert self._ctx is not None
        ptr = llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        self._free_batches()
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        self.tokenizer.close()
        self.model.close()
