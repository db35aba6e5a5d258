"""LLaVA 1.6 "anyres" geometry and the packing of tile features into the LLM's image embeddings.

NumPy ports of transformers' `select_best_resolution`, `get_anyres_image_grid_shape`,
`image_size_to_num_patches`, `unpad_image` and `LlavaNextModel.pack_image_features`, and of the
original LLaVA code's variants for original-layout checkpoints (`VisionSettings.pinpoints_hw`,
``unpad_bounds(truncate=True)``). transformers' LlavaNext always packs as "spatial_unpad"
(whatever `mm_patch_merge_type` says); so does this module. Sizes are (height, width).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llava_gguf.errors import ImageError
from llava_gguf.metadata import ImageMode, VisionSettings


def select_best_resolution(
    original_size: tuple[int, int], possible_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most of the image and wastes the least."""
    original_height, original_width = original_size
    best_fit: tuple[int, int] | None = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (int(height), int(width))
    if best_fit is None:
        raise ImageError(f"no grid pinpoint fits an image of {original_size}; check image_grid_pinpoints")
    return best_fit


def anyres_grid_shape(
    image_size_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile_size: int
) -> tuple[int, int]:
    """(rows, cols) of tiles the best pinpoint is cut into."""
    height, width = select_best_resolution(image_size_hw, pinpoints)
    return height // tile_size, width // tile_size


def count_tiles(image_size_hw: tuple[int, int], settings: VisionSettings, *, tiled: bool = True) -> int:
    """How many CLIP inputs preprocessing makes for one image (the base image included for anyres).
    ``tiled``: LLaVA-OneVision's image alone in its prompt (see `packing_onevision`); other modes ignore it."""
    if settings.image_mode is ImageMode.ANYRES_MAX:
        from llava_gguf import packing_onevision  # it builds on this module

        return packing_onevision.count_tiles(
            image_size_hw, packing_onevision.OnevisionSettings.from_vision_settings(settings), tiled=tiled)
    if settings.image_mode != ImageMode.ANYRES:
        return 1
    height, width = select_best_resolution(image_size_hw, settings.pinpoints_hw)
    tile = settings.image_size
    return len(range(0, height, tile)) * len(range(0, width, tile)) + 1


def unpad_bounds(
    current_hw: tuple[int, int], original_hw: tuple[int, int], *, truncate: bool = False
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the feature grid that is image, not padding: transformers'
    `unpad_image` (sizes rounded to 7 decimals first) or, with ``truncate``, the original LLaVA's
    (``int(x * scale)``, which differs where x * scale lands just below a whole number)."""
    original_height, original_width = original_hw
    current_height, current_width = current_hw
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = _scaled(original_height, scale_factor, truncate)
        padding = (current_height - new_height) // 2
        return padding, current_height - padding, 0, current_width
    scale_factor = current_height / original_height
    new_width = _scaled(original_width, scale_factor, truncate)
    padding = (current_width - new_width) // 2
    return 0, current_height, padding, current_width - padding


def _scaled(size: int, scale: float, truncate: bool) -> int:
    return int(size * scale) if truncate else int(round(size * scale, 7))


def unpad_layout(
    image_size_hw: tuple[int, int], settings: VisionSettings
) -> tuple[int, int, tuple[int, int, int, int]]:
    """(rows, cols) of tiles and the (top, bottom, left, right) of their patch grid that is image,
    by the rules of the layout's reference."""
    side = settings.patches_per_side
    rows, cols = anyres_grid_shape(image_size_hw, settings.pinpoints_hw, settings.image_size)
    bounds = unpad_bounds((rows * side, cols * side), image_size_hw, truncate=settings.follows_original_code)
    return rows, cols, bounds


def unpadded_grid_shape(image_size_hw: tuple[int, int], settings: VisionSettings) -> tuple[int, int]:
    """(height, width) in patches of the tile grid once the padding is cut away."""
    _, _, (top, bottom, left, right) = unpad_layout(image_size_hw, settings)
    return bottom - top, right - left


def count_image_tokens(image_size_hw: tuple[int, int], settings: VisionSettings, *, tiled: bool = True) -> int:
    """How many embeddings the LLM sees for one image of this (height, width). ``tiled``: LLaVA-OneVision's
    image alone in its prompt (False: one of several, one square tile); other modes ignore it."""
    if settings.image_mode is ImageMode.ANYRES_MAX:
        from llava_gguf import packing_onevision  # it builds on this module

        return packing_onevision.count_image_tokens(
            image_size_hw, packing_onevision.OnevisionSettings.from_vision_settings(settings), tiled=tiled)
    extra = settings.extra_tokens  # the class token kept (CLIP, "full"), or SigLIP's first patch dropped ("default")
    if settings.image_mode != ImageMode.ANYRES:
        crop_height, crop_width = settings.crop_size
        return (crop_height // settings.patch_size) * (crop_width // settings.patch_size) + extra
    base = settings.patches_per_side**2 + extra
    height, width = unpadded_grid_shape(image_size_hw, settings)
    return base + height * width + height  # base tile, unpadded grid, one image_newline per row


def pack_image_features(
    features: np.ndarray, image_size_hw: tuple[int, int], settings: VisionSettings, image_newline: np.ndarray,
    *, tiled: bool = True,
) -> np.ndarray:
    """features [n_tiles, n_patches, d] (projected) -> [n_tokens, d], as the reference feeds the LLM.
    ``tiled``: as in `count_image_tokens`."""
    n_tiles, n_patches, dim = features.shape
    if settings.image_mode is ImageMode.ANYRES_MAX:
        from llava_gguf import packing_onevision  # it builds on this module

        onevision = packing_onevision.OnevisionSettings.from_vision_settings(settings)
        return packing_onevision.pack_image_features(features, image_size_hw, onevision, image_newline, tiled=tiled)
    if settings.image_mode != ImageMode.ANYRES:
        return features.reshape(n_tiles * n_patches, dim)  # [1, n_patches, d] -> [n_patches, d]
    newline = image_newline.astype(features.dtype)
    if n_tiles == 1:
        return np.concatenate([features[0], newline[None]], axis=0)  # [n_patches + 1, d]
    side = settings.patches_per_side
    rows, cols, (top, bottom, left, right) = unpad_layout(image_size_hw, settings)
    if (n_tiles - 1, n_patches) != (rows * cols, side * side):
        raise ImageError(
            f"image of {image_size_hw} needs {rows * cols} tiles of {side * side} patches plus the base tile, "
            f"got {n_tiles} tiles of {n_patches} patches; anyres packing needs vision_feature_select_strategy "
            "'default' and features from `preprocess` for this image"
        )
    grid = unpadded_grid(features[1:], rows, cols, side, (top, bottom, left, right))  # [d, H, W]
    return np.concatenate([features[0], rows_with_newlines(grid, newline)], axis=0)  # [n_patches + H * (W + 1), d]


def unpadded_grid(tiles: np.ndarray, rows: int, cols: int, side: int,
                  bounds: tuple[int, int, int, int]) -> np.ndarray:
    """Tile features [rows * cols, side * side, d] laid out as the image they cover, the padding cut away:
    [d, H, W]. ``bounds``: (top, bottom, left, right) of the image in the grid of patches."""
    dim = tiles.shape[-1]
    top, bottom, left, right = bounds
    grid = tiles.reshape(rows, cols, side, side, dim)  # [rows, cols, h, w, d]
    grid = grid.transpose(4, 0, 2, 1, 3)  # [d, rows, h, cols, w]
    grid = grid.reshape(dim, rows * side, cols * side)  # [d, rows*h, cols*w]
    return grid[:, top:bottom, left:right]  # [d, H, W]


def rows_with_newlines(grid: np.ndarray, newline: np.ndarray) -> np.ndarray:
    """[d, H, W] -> [H * (W + 1), d]: the grid row by row, each row followed by ``image_newline``."""
    dim, height = grid.shape[:2]
    newlines = np.broadcast_to(newline[:, None, None], (dim, height, 1))  # [d, H, 1]
    return np.concatenate([grid, newlines], axis=-1).reshape(dim, -1).T  # [d, H, W + 1] -> [H * (W + 1), d]
