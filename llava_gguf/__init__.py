"""llava-gguf: exact LLaVA 1.5 / 1.6 inference on llama.cpp."""

from __future__ import annotations

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

__all__ = [
    "CheckpointError",
    "ContextOverflowError",
    "ConversionError",
    "GGUFFormatError",
    "ImageError",
    "LlavaGGUFError",
    "ModelLoadError",
    "__version__",
]
