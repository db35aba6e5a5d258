"""LLaVA-OneVision geometry, token counts and the packing of tile features into the LLM's embeddings.

NumPy ports of transformers' `LlavaOnevisionModel.pack_image_features` (unpad, then the "anyres_max_N"
bilinear downscale of the tile grid, then one `image_newline` per row, the base tile first) and of
`LlavaOnevisionProcessor._get_number_of_features`. An image is tiled only when it is the only image
of its prompt (`batch_num_images` == 1); an image among several is one square tile followed by one
`image_newline`. Sizes are (height, width); pinpoints as transformers reads them, (height, width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llava_gguf.errors import ImageError
from llava_gguf.metadata import ImageMode, VisionSettings
from llava_gguf.packing import anyres_grid_shape, rows_with_newlines, unpad_bounds, unpadded_grid

TILE = 384
# the real checkpoints' `image_grid_pinpoints`: every (a * 384, b * 384) for a, b in 1..6, as (height, width)
ONEVISION_PINPOINTS: tuple[tuple[int, int], ...] = tuple((a * TILE, b * TILE) for a in range(1, 7) for b in range(1, 7))
ANYRES_MAX_PREFIX = "anyres_max_"
DOWNSCALE_THRESHOLD = 1.1
# torch's CPU bilinear resize takes its channels-last kernel for outputs with height + width <= 128
# (`_use_vectorized_kernel_cond_2d`); "anyres_max_9" on 27x27-patch tiles never does (h * w > 6000)
VECTORIZED_KERNEL_MAX_OUTPUT = 128


@dataclass(frozen=True)
class OnevisionSettings:
    """What OneVision preprocessing and packing need beyond a LLaVA 1.6 checkpoint's settings.

    Defaults are the llava-hf OneVision checkpoints' (SigLIP 384/14, "full" features: 729 per tile).
    Every tile's feature count must be `patches_per_side ** 2`, as the reference model checks.
    """

    image_size: int = TILE  # the tower's input side: the tile and the base image side
    patch_size: int = 14
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ONEVISION_PINPOINTS
    vision_aspect_ratio: str = "anyres_max_9"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255

    @classmethod
    def from_vision_settings(cls, settings: VisionSettings) -> OnevisionSettings:
        """A OneVision mmproj's settings (``ImageMode.ANYRES_MAX``); pinpoints as transformers reads them."""
        if settings.image_mode is not ImageMode.ANYRES_MAX:
            raise ImageError(f"{settings.description} is not LLaVA-OneVision (image mode {settings.image_mode.value})")
        if settings.extra_tokens != 0:
            raise ImageError(
                f"OneVision packing needs {settings.patches_per_side**2} features per tile "
                f"(vision_feature_select_strategy 'full' on SigLIP), not {settings.extra_tokens:+d} beyond the patches"
            )
        return cls(
            image_size=settings.image_size,
            patch_size=settings.patch_size,
            image_grid_pinpoints=settings.pinpoints_hw,
            vision_aspect_ratio=settings.vision_aspect_ratio,
            image_mean=settings.image_mean,
            image_std=settings.image_std,
            resample=settings.resample,
            rescale_factor=settings.rescale_factor,
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def max_num_patches(self) -> int:
        """N of "anyres_max_N": the grid is downscaled to about N tiles' worth of positions."""
        return parse_max_num_patches(self.vision_aspect_ratio)


def parse_max_num_patches(vision_aspect_ratio: str) -> int:
    """N of "anyres_max_N": "anyres_max_9" -> 9 (transformers reads it with `str.strip("anyres_max_")`)."""
    digits = vision_aspect_ratio.removeprefix(ANYRES_MAX_PREFIX)
    if not vision_aspect_ratio.startswith(ANYRES_MAX_PREFIX) or not digits.isdigit():
        raise ImageError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not of the form 'anyres_max_<N>'")
    return int(digits)


def tiling_flags(batch_num_images: Sequence[int]) -> list[bool]:
    """Per image, in order: tiled (anyres) or not. Only an image alone in its prompt is tiled (`need_patching`)."""
    return [n == 1 for n in batch_num_images for _ in range(n)]


def count_tiles(image_size_hw: tuple[int, int], settings: OnevisionSettings, *, tiled: bool = True) -> int:
    """How many tower inputs preprocessing makes for one image, the base image included."""
    if not tiled:
        return 1
    rows, cols = anyres_grid_shape(image_size_hw, settings.image_grid_pinpoints, settings.image_size)
    return rows * cols + 1


def unpad_layout(
    image_size_hw: tuple[int, int], settings: OnevisionSettings
) -> tuple[int, int, tuple[int, int, int, int]]:
    """(rows, cols) of tiles and the (top, bottom, left, right) of their patch grid that is image."""
    side = settings.patches_per_side
    rows, cols = anyres_grid_shape(image_size_hw, settings.image_grid_pinpoints, settings.image_size)
    bounds = unpad_bounds((rows * side, cols * side), image_size_hw)
    return rows, cols, bounds


def downscale_ratio(height: int, width: int, settings: OnevisionSettings) -> float:
    """sqrt(positions / (N tiles' positions)), in float64 as the reference computes it."""
    return math.sqrt(height * width / (settings.max_num_patches * settings.patches_per_side**2))


def downscaled_size(height: int, width: int, settings: OnevisionSettings) -> tuple[int, int]:
    """The unpadded grid's (height, width) after "anyres_max_N": unchanged unless the ratio exceeds 1.1,
    else each side floor-divided by the ratio (float `//`, as transformers)."""
    ratio = downscale_ratio(height, width, settings)
    if ratio > DOWNSCALE_THRESHOLD:
        return int(height // ratio), int(width // ratio)
    return height, width


def packed_grid_shape(image_size_hw: tuple[int, int], settings: OnevisionSettings) -> tuple[int, int]:
    """(height, width) in positions of a tiled image's grid once unpadded and downscaled."""
    _, _, (top, bottom, left, right) = unpad_layout(image_size_hw, settings)
    return downscaled_size(bottom - top, right - left, settings)


def count_image_tokens(image_size_hw: tuple[int, int], settings: OnevisionSettings, *, tiled: bool = True) -> int:
    """How many embeddings the LLM sees for one image of this (height, width)."""
    base = settings.patches_per_side**2
    if not tiled:
        return base + 1  # one square tile and one image_newline
    height, width = packed_grid_shape(image_size_hw, settings)
    return base + height * width + height  # base tile, grid, one image_newline per row


def fma(a: np.ndarray | np.float32, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 a * b + c as a fused multiply-add (torch's AVX2/AVX512 kernels are built with FMA contraction):
    the float64 product of two float32s is exact; the float64 sum is exact unless the terms' exponents are
    ~29 bits apart, where the double rounding can cost 1 ulp on a tie (never seen in the tests)."""
    exact = np.float64(a) * np.asarray(b, dtype=np.float64) + np.asarray(c, dtype=np.float64)
    return exact.astype(np.float32)


def linear_indices_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's CPU `upsample_linear` taps along one axis (align_corners=False, half-pixel centres, float32):
    (index0 [out], index1 [out], weight0 [out], weight1 [out])."""
    scale = np.float32(in_size) / np.float32(out_size)  # float32, as `compute_scales_value` without a scale
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)  # [out], exact
    src = fma(scale, dst, np.float32(-0.5))  # [out] float32: torch's build contracts `scale * x - 0.5` to an FMA
    src = np.where(src < 0, np.float32(0), src)
    index0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)  # `guard_index_and_lambda`
    lam = np.clip(src - index0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    index1 = index0 + (index0 < in_size - 1)
    return index0, index1, (np.float32(1) - lam).astype(np.float32), lam


def interpolate_bilinear(grid: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """[d, H, W] float32 -> [d, h, w]: `nn.functional.interpolate(mode="bilinear")` as torch's generic CPU
    kernel (`Interpolate<2, ..., 2>`, the one taken when h + w > 128) computes it in float32:
    t0 * w0 + t1 * w1 per axis, W inside H, compiled as fma(t0, w0, t1 * w1)."""
    _, in_height, in_width = grid.shape
    out_height, out_width = size_hw
    if out_height + out_width <= VECTORIZED_KERNEL_MAX_OUTPUT:
        raise ImageError(
            f"a bilinear resize to {size_hw} runs torch's channels-last kernel, which sums in another order; "
            f"only outputs with height + width > {VECTORIZED_KERNEL_MAX_OUTPUT} are reproduced"
        )
    h0, h1, wh0, wh1 = linear_indices_weights(in_height, out_height)
    w0, w1, ww0, ww1 = linear_indices_weights(in_width, out_width)
    grid = grid.astype(np.float32, copy=False)
    rows0, rows1 = grid[:, h0], grid[:, h1]  # [d, h, W]
    top = fma(rows0[:, :, w0], ww0, rows0[:, :, w1] * ww1)  # [d, h, w]
    bottom = fma(rows1[:, :, w0], ww0, rows1[:, :, w1] * ww1)  # [d, h, w]
    return fma(top, wh0[:, None], bottom * wh1[:, None])  # [d, h, w]


def pack_image_features(
    features: np.ndarray,
    image_size_hw: tuple[int, int],
    settings: OnevisionSettings,
    image_newline: np.ndarray,
    *,
    tiled: bool = True,
) -> np.ndarray:
    """features [n_tiles, n_patches, d] (projected) -> [n_tokens, d], as the reference feeds the LLM."""
    n_tiles, n_patches, dim = features.shape
    newline = image_newline.astype(features.dtype)
    side = settings.patches_per_side
    if not tiled or n_tiles == 1:
        return np.concatenate([features[0], newline[None]], axis=0)  # [n_patches + 1, d]
    rows, cols, (top, bottom, left, right) = unpad_layout(image_size_hw, settings)
    if (n_tiles - 1, n_patches) != (rows * cols, side * side):
        raise ImageError(
            f"image of {image_size_hw} needs {rows * cols} tiles of {side * side} patches plus the base tile, "
            f"got {n_tiles} tiles of {n_patches} patches; OneVision packing needs features from "
            "`preprocess_onevision` for this image"
        )
    grid = unpadded_grid(features[1:], rows, cols, side, (top, bottom, left, right))  # [d, H, W]
    size_hw = downscaled_size(grid.shape[1], grid.shape[2], settings)
    if size_hw != grid.shape[1:]:
        grid = interpolate_bilinear(grid, size_hw)  # [d, h, w]
    return np.concatenate([features[0], rows_with_newlines(grid, newline)], axis=0)  # [n_patches + h * (w + 1), d]
