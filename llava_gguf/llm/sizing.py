"""How many sequences to answer together when not asked, and how many positions their context gets: from
the hardware (cores, GPU offload) and the memory available."""

from __future__ import annotations

import os

import llama_cpp

from llava_gguf.llm.llama import LlamaRuntime
from llava_gguf.machine_load import available_memory

DEFAULT_SEQUENCE_POSITIONS = 4096  # what one sequence may use by default
KV_MEMORY_SHARE = 4  # the default context's KV cache takes at most 1/4 of the memory available


def kv_bytes_per_position(runtime: LlamaRuntime) -> int:
    """Bytes one position takes in the KV cache (K and V of every layer) at the runtime's cache type."""
    model = runtime.model.model
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_head, n_head_kv = llama_cpp.llama_model_n_head(model), llama_cpp.llama_model_n_head_kv(model)
    width = runtime.n_embd // max(1, n_head) * n_head_kv
    per_value = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}[runtime.options.kv_cache_type.value]
    return int(2 * n_layer * width * per_value)


def default_pool_size(runtime: LlamaRuntime, n_seq: int, unified: bool) -> int:
    """Positions for ``n_seq`` sequences. With ``-c`` given, each sequence gets that many. Otherwise each may use
    up to 4096 (the model's trained context if smaller): on a CPU the context holds ``n_seq`` of them, within a
    quarter of the memory available (never less than one sequence's worth, or 2048 per stream); with GPU
    offload (whose free memory is not known here) a unified pool holds one sequence's worth, which the
    sequences share as llama-server's unified cache does, and ``-c`` asks for more."""
    if runtime.options.n_ctx is not None:
        return n_seq * runtime.options.n_ctx
    per_sequence = min(runtime.n_ctx_train, DEFAULT_SEQUENCE_POSITIONS)
    if unified and runtime.options.n_gpu_layers != 0:
        return per_sequence
    size = n_seq * per_sequence
    memory = available_memory()
    if memory:
        size = min(size, memory // KV_MEMORY_SHARE // max(1, kv_bytes_per_position(runtime)))
    floor = per_sequence if unified else n_seq * min(per_sequence, 2048)
    return max(floor, size)


def default_sequences(n_gpu_layers: int, cpu_count: int | None = None) -> tuple[int, str]:
    """How many sequences to answer together when not asked, and why (said at the server's start)."""
    if n_gpu_layers != 0:
        return 8, "GPU offload: a GPU decodes 8 answers together for little more than one"
    cores = cpu_count or os.cpu_count() or 1
    if cores < 2:
        return 1, "one core"
    return 4, f"a CPU ({cores} cores): each step reads the weights once for all its answers"
