"""One llama.cpp context of several sequences: decode a batch of (sequence, position, token id) entries or a
run of one sequence's embedding rows, read the logits of the entries that asked for them, forget a
sequence's positions, give one sequence another's prefix, and save or restore one sequence's KV state (the
prompt cache's entries).

Two layouts. ``unified``: one pool of positions the sequences share, cells anywhere (flexible, small; a
sequence's cells interleave with the others', so its attention sums run in another order than alone and
round differently). Otherwise each sequence has a stream of ``size / n_seq`` positions of its own, laid
out as a lone context lays it out, so its attention sums run in a lone run's order (llama.cpp's CPU
kernels compute a text token's logits bit for bit alike in a batch of several streams; measured).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
import numpy as np
from llama_cpp import _internals

from llava_gguf.errors import ContextOverflowError, LlavaGGUFError, ModelLoadError
from llava_gguf.llm.llama import LlamaRuntime


@dataclass(frozen=True)
class TokenEntry:
    seq: int
    pos: int
    token: int
    logits: bool


class SharedContext:
    """``n_seq`` sequences over a pool of ``size`` positions of ``runtime``'s model (a context of its own)."""

    def __init__(self, runtime: LlamaRuntime, n_seq: int, size: int, unified: bool = True) -> None:
        self.runtime, self.n_seq = runtime, n_seq
        self.n_batch = runtime.options.n_batch
        try:
            self._ctx = _internals.LlamaContext(model=runtime.model, params=runtime.context_params(size, n_seq, unified),
                                                verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"llama.cpp could not create a {size}-position context for {n_seq} sequences "
                                 f"({e}); use a smaller --parallel or context size") from e
        self.unified = unified or n_seq == 1
        self.size = self._ctx.n_ctx()
        self.per_sequence = self.size if self.unified else self.size // n_seq  # positions one sequence may hold
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._tokens = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._embd = llama_cpp.llama_batch_init(self.n_batch, runtime.n_embd, 1)

    def close(self) -> None:
        if self._ctx is not None:
            llama_cpp.llama_batch_free(self._tokens)
            llama_cpp.llama_batch_free(self._embd)
            self._ctx.close()
            self._ctx = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ decoding

    def decode_tokens(self, entries: list[TokenEntry]) -> dict[int, np.ndarray]:
        """Decode up to ``n_batch`` token entries of any sequences in one ``llama_decode`` -> the logits
        ``[n_vocab]`` of each entry that asked for them, by its index in ``entries``."""
        assert 0 < len(entries) <= self.n_batch
        batch = self._tokens
        for i, e in enumerate(entries):
            batch.token[i] = e.token
            self._set(batch, i, e.pos, e.seq, e.logits)
        batch.n_tokens = len(entries)
        self._decode(batch)
        return {i: self._logits(i) for i, e in enumerate(entries) if e.logits}

    def decode_embeddings(self, seq: int, pos: int, rows: np.ndarray, logits: bool) -> np.ndarray | None:
        """Decode up to ``n_batch`` embedding rows ``[n, n_embd]`` of one sequence from position ``pos`` ->
        the logits after the last row when asked for."""
        if rows.ndim != 2 or rows.shape[1] != self.runtime.n_embd:
            raise ModelLoadError(f"image features have width {rows.shape[-1]} but the LLM's embeddings have "
                                 f"{self.runtime.n_embd}: the mmproj does not belong to this LLM")
        assert 0 < len(rows) <= self.n_batch
        data = np.ascontiguousarray(rows, dtype=np.float32)  # [n, n_embd]
        batch = self._embd
        ctypes.memmove(batch.embd, data.ctypes.data, data.nbytes)
        for i in range(len(data)):
            self._set(batch, i, pos + i, seq, logits and i == len(data) - 1)
        batch.n_tokens = len(data)
        self._decode(batch)
        return self._logits(len(data) - 1) if logits else None

    def _logits(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.runtime.n_vocab,)).copy()

    @staticmethod
    def _set(batch: llama_cpp.llama_batch, i: int, pos: int, seq: int, logits: bool) -> None:
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _decode(self, batch: llama_cpp.llama_batch) -> None:
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status == 1:
            raise ContextOverflowError(f"llama.cpp found no room for the batch in the {self.size}-position context")
        if status != 0:
            raise LlavaGGUFError(f"llama.cpp could not decode the batch (status {status})")

    # ------------------------------------------------------------------ sequences

    def forget(self, seq: int, keep: int = 0) -> None:
        """Forget sequence ``seq``'s positions from ``keep`` on."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1)

    def share(self, source: int, target: int, n_positions: int) -> None:
        """Give sequence ``target`` (empty) the first ``n_positions`` of ``source``: in a unified pool the cells
        are shared; between streams the whole stream is copied (at the next decode, cell for cell, so the
        layout stays a lone run's) and the rest forgotten."""
        if self.unified:
            llama_cpp.llama_memory_seq_cp(self._memory, source, target, 0, n_positions)
        else:
            llama_cpp.llama_memory_seq_cp(self._memory, source, target, -1, -1)
            self.forget(target, n_positions)

    def n_positions(self, seq: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq)) + 1

    def state_size(self, seq: int) -> int:
        return int(llama_cpp.llama_state_seq_get_size(self._ctx.ctx, seq))

    def save_state(self, seq: int, buffer: memoryview) -> int:
        """Serialize sequence ``seq``'s KV state into a writable ``buffer`` of ``state_size(seq)`` bytes."""
        array = (ctypes.c_uint8 * len(buffer)).from_buffer(buffer)
        return int(llama_cpp.llama_state_seq_get_data(self._ctx.ctx, array, len(buffer), seq))

    def restore_state(self, seq: int, state: bytes | memoryview, n_positions: int) -> bool:
        """Replace sequence ``seq`` with a saved state of ``n_positions`` positions; False (and an empty
        sequence) when llama.cpp refuses it or it does not hold exactly those positions."""
        self.forget(seq)
        view = memoryview(state)
        array_type = ctypes.c_uint8 * len(view)
        buffer = array_type.from_buffer(view) if not view.readonly else array_type.from_buffer_copy(view)
        read = llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buffer, len(view), seq)
        if read != len(view) or self.n_positions(seq) != n_positions:
            self.forget(seq)
            return False
        return True
