"""k-quants through llama.cpp's own quantizer (the gguf package cannot write them)."""

from __future__ import annotations

import ctypes
import enum
import os
from pathlib import Path

from llava_gguf.errors import ConversionError


class Quant(str, enum.Enum):
    """LLM file types the converter writes."""

    Q4_K_M = "Q4_K_M"
    Q4_K_S = "Q4_K_S"
    Q5_K_M = "Q5_K_M"
    Q6_K = "Q6_K"
    Q8_0 = "Q8_0"
    F16 = "F16"
    F32 = "F32"

    @property
    def needs_quantizer(self) -> bool:
        return self not in (Quant.F16, Quant.F32)


def _ftype(quant: Quant) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.value}"))


def quantize_gguf(source: Path, target: Path, quant: Quant, threads: int | None = None) -> None:
    """Quantize the F16/BF16/F32 GGUF ``source`` into ``target`` with llama.cpp."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(quant)
    params.nthread = threads or os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise ConversionError(f"llama.cpp failed to quantize {source.name} to {quant.value} (status {status})")
