"""What the runtime needs of a vision encoder: normalized CLIP tiles in, projected features out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from llava_gguf.vision.weights import VisionTowerConfig

TileCallback = Callable[[int, int], None]  # (tiles done, tiles in all)


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
