"""Loading converted GGUFs in llama-cpp-python for comparisons: F32 KV cache, no flash attention."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import llama_cpp as bindings  # where Llama takes its default parameters from


def load_llama(path: Path, n_ctx: int = 512, logits_all: bool = True) -> llama_cpp.Llama:
    """llama-cpp-python's own Llama on ``path``, without weight repacking: repacked quantized weights round
    differently, and llama.cpp's repacked AMX kernels crash on some CPUs (llama.cpp issue 20824). ``Llama``
    has no option for it, so the default parameters it starts from are changed while it loads."""
    default_params = bindings.llama_model_default_params

    def without_repacking() -> llama_cpp.llama_model_params:
        params = default_params()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_repacking
    try:
        return _load(path, n_ctx, logits_all)
    finally:
        bindings.llama_model_default_params = default_params


def _load(path: Path, n_ctx: int, logits_all: bool) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=2,
        logits_all=logits_all,
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )


def text_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    """Logits at every position of ``ids`` (a fresh sequence): [len(ids), n_vocab]."""
    llm.reset()
    llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def mtmd_loads(mmproj: Path, llm: llama_cpp.Llama) -> bool:
    """Whether llama.cpp's libmtmd accepts the mmproj file with this LLM."""
    from llama_cpp import mtmd_cpp

    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.print_timings = False
    params.n_threads = 1
    params.warmup = False
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    if not ctx:
        return False
    mtmd_cpp.mtmd_free(ctx)
    return True


del ctypes
