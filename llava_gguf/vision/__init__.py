"""Images to the features the LLM receives: the mmproj's tower (``weights``), the encoders that run
it (``numpy_encoder``, ``ggml_encoder`` on ``ggml_lib``, and libmtmd behind its probe in
``mtmd_encoder``), and the choice among them (``choose``)."""

from __future__ import annotations

from llava_gguf.vision.encoder import TileCallback, VisionEncoder
from llava_gguf.vision.numpy_encoder import DEFAULT_CACHE_BYTES, NumpyVisionEncoder, gelu, gelu_tanh, quick_gelu
from llava_gguf.vision.weights import GGUFTensors, TowerLayout, VisionTowerConfig, load_mmproj_tensors, read_tower

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "GGUFTensors",
    "NumpyVisionEncoder",
    "TileCallback",
    "TowerLayout",
    "VisionEncoder",
    "VisionTowerConfig",
    "gelu",
    "gelu_tanh",
    "load_mmproj_tensors",
    "quick_gelu",
    "read_tower",
]
