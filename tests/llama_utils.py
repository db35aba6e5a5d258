"""Loading converted GGUFs in llama-cpp-python for comparisons: F32 KV cache, no flash attention."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np


def load_llama(path: Path, n_ctx: int = 512, logits_all: bool = True) -> llama_cpp.Llama:
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
