"""What the runtime needs of a vision encoder: normalized CLIP tiles in, projected features out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from llava_gguf.vision.weights import TowerLayout, VisionTowerConfig

TileCallback = Callable[[int, int], None]  # (tiles done, tiles in all); the model sends (0, n) first


class VisionEncoder(Protocol):
    """``NumpyVisionEncoder``, ``GgmlVisionEncoder`` and ``MtmdVisionEncoder``."""

    config: VisionTowerConfig

    @property
    def n_tokens(self) -> int: ...

    @property
    def llm_hidden_size(self) -> int: ...

    @property
    def image_newline(self) -> np.ndarray | None: ...

    def encode(self, tiles: np.ndarray, on_tile: TileCallback | None = None) -> np.ndarray:
        """tiles [n_tiles, 3, S, S] (normalized pixels) -> features [n_tiles, n_tokens, llm_hidden]."""
        ...


class TowerShapes:
    """What an encoder reading an mmproj's tower answers without running it (NumPy's and ggml's)."""

    config: VisionTowerConfig
    layout: TowerLayout
    _tensors: Mapping[str, np.ndarray]

    @property
    def n_tokens(self) -> int:
        """Image features per tile."""
        return self.config.n_tokens

    @property
    def llm_hidden_size(self) -> int:
        return self.layout.llm_hidden_size

    @property
    def image_newline(self) -> np.ndarray | None:
        """LLaVA 1.6's ``image_newline`` [llm_hidden] in float32, or None."""
        if self.layout.newline is None:
            return None
        return np.asarray(self._tensors[self.layout.newline], dtype=np.float32).reshape(-1)  # [1, d] or [d] -> [d]
