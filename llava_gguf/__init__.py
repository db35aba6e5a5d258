"""llava-gguf: exact LLaVA 1.5 / 1.6 inference on llama.cpp.

The Python API: ``from llava_gguf import LlavaModel, RuntimeOptions, GenerationOptions,
LlamaOptions, KVCacheType, SamplingOptions`` (loaded on first use, so importing the package, e.g.
for the converter or the errors, does not load llama.cpp).
"""

from __future__ import annotations

import importlib
from typing import Any

from llava_gguf.errors import (
    CheckpointError,
    ContextOverflowError,
    ConversionError,
    GGUFFormatError,
    ImageError,
    LlavaGGUFError,
    ModelLoadError,
)

__version__ = "0.1.0"

_API = {
    "LlavaModel": "llava_gguf.model",
    "RuntimeOptions": "llava_gguf.model",
    "GenerationOptions": "llava_gguf.model",
    "LlamaOptions": "llava_gguf.llm.llama",
    "KVCacheType": "llava_gguf.llm.llama",
    "SamplingOptions": "llava_gguf.llm.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'llava_gguf' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ContextOverflowError",
    "ConversionError",
    "GGUFFormatError",
    "GenerationOptions",
    "ImageError",
    "KVCacheType",
    "LlamaOptions",
    "LlavaGGUFError",
    "LlavaModel",
    "ModelLoadError",
    "RuntimeOptions",
    "SamplingOptions",
    "__version__",
]
