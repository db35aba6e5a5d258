"""Images to normalized CLIP tiles, pixel for pixel as the reference processors make them.

PAD: original LLaVA 1.5 (`expand2square` + CLIPImageProcessor), the same as transformers'
`LlavaImageProcessorPil(do_pad=True)`. CROP: `LlavaImageProcessorPil` / `CLIPImageProcessor`.
ANYRES: `LlavaNextImageProcessorPil`. RESIZE: `SiglipImageProcessorPil` (the image squashed to
the tile, no crop). Resizing is Pillow's, on uint8 RGB, as the Pillow
backends do it; intermediate images are channels-last uint8 arrays [H, W, 3].
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from llava_gguf.image.load import convert_to_rgb, is_plain_rgb
from llava_gguf.metadata import ImageMode, VisionSettings
from llava_gguf.packing import select_best_resolution


def preprocess(
    image: Image.Image, settings: VisionSettings, *, tiled: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
    """An image -> (float32 tiles [n_tiles, 3, crop_h, crop_w], original (height, width)).

    ``tiled``: LLaVA-OneVision's image alone in its prompt (False: one square tile); other modes ignore it."""
    if settings.image_mode is ImageMode.ANYRES_MAX:
        from llava_gguf.image.onevision import preprocess_onevision  # it builds on this module
        from llava_gguf.packing_onevision import OnevisionSettings

        return preprocess_onevision(image, OnevisionSettings.from_vision_settings(settings), tiled=tiled)
    rgb = image if is_plain_rgb(image) else convert_to_rgb(image)
    pixels = np.asarray(rgb)  # [H, W, 3] uint8
    original_hw = (rgb.height, rgb.width)
    if settings.image_mode == ImageMode.PAD:
        views = [pad_to_square(pixels, background_color(settings))]
    elif settings.image_mode == ImageMode.CROP:
        views = [pixels]
    elif settings.image_mode == ImageMode.RESIZE:
        return np.stack([resize_view(pixels, settings)]), original_hw  # [1, 3, crop_h, crop_w]
    else:
        views = split_anyres(pixels, settings)
    tiles = [process_view(view, settings) for view in views]
    return np.stack(tiles), original_hw  # [n_tiles, 3, crop_h, crop_w]


def process_view(pixels: np.ndarray, settings: VisionSettings) -> np.ndarray:
    """[H, W, 3] uint8 -> [3, crop_h, crop_w] float32: resize the shortest edge, center crop, normalize."""
    return normalize_tile(center_crop(resize_shortest_edge(pixels, settings), settings.crop_size), settings)


def resize_view(pixels: np.ndarray, settings: VisionSettings) -> np.ndarray:
    """[H, W, 3] uint8 -> [3, crop_h, crop_w] float32: resize to the tile (aspect not kept), normalize."""
    return normalize_tile(resize(pixels, settings.crop_size, settings.resample), settings)


def background_color(settings: VisionSettings) -> tuple[int, int, int]:
    """The padding colour of original LLaVA's `expand2square`: the mean, in 0..255, truncated."""
    red, green, blue = (int(x * 255) for x in settings.image_mean)
    return red, green, blue


def pad_to_square(pixels: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """[H, W, 3] -> [S, S, 3], S = max(H, W), the image centered (offset floored) on `color`."""
    height, width = pixels.shape[:2]
    if height == width:
        return pixels
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = np.asarray(color, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = pixels
    return square


def resize(pixels: np.ndarray, size_hw: tuple[int, int], resample: int) -> np.ndarray:
    """Pillow resize of [H, W, 3] uint8 to [h, w, 3]."""
    height, width = size_hw
    resized = Image.fromarray(pixels).resize((width, height), resample=resample)
    return np.asarray(resized)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' `get_resize_output_image_size(default_to_square=False)`: the long side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def resize_shortest_edge(pixels: np.ndarray, settings: VisionSettings) -> np.ndarray:
    height, width = pixels.shape[:2]
    return resize(pixels, shortest_edge_size(height, width, settings.shortest_edge), settings.resample)


def center_crop(pixels: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """transformers' `center_crop`: offsets floored; an image smaller than the crop is zero-padded first."""
    height, width = pixels.shape[:2]
    crop_height, crop_width = crop_hw
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_height, left : left + crop_width]
    new_height, new_width = max(crop_height, height), max(crop_width, width)
    top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
    padded = np.zeros((new_height, new_width, 3), dtype=pixels.dtype)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_height, top + crop_height), max(0, left) : min(new_width, left + crop_width)]


def normalize_tile(pixels: np.ndarray, settings: VisionSettings) -> np.ndarray:
    """[h, w, 3] uint8 -> [3, h, w] float32: rescaled in float64, normalized in float32, as the reference."""
    scaled = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.image_mean, dtype=np.float32)
    std = np.asarray(settings.image_std, dtype=np.float32)
    normalized = (scaled - mean) / std
    return np.ascontiguousarray(normalized.transpose(2, 0, 1))  # [h, w, 3] -> [3, h, w]


def anyres_target_size(height: int, width: int, target_hw: tuple[int, int]) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: fit inside the target, the other side rounded up."""
    target_height, target_width = target_hw
    scale_w = target_width / width
    scale_h = target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def pad_to_resolution(pixels: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    """[h, w, 3] -> [H, W, 3] centered on black (offset floored), as `_pad_for_patching`."""
    height, width = pixels.shape[:2]
    target_height, target_width = target_hw
    top, left = (target_height - height) // 2, (target_width - width) // 2
    padded = np.zeros((target_height, target_width, 3), dtype=np.uint8)
    padded[top : top + height, left : left + width] = pixels
    return padded


def split_tiles(pixels: np.ndarray, tile: int) -> list[np.ndarray]:
    """[H, W, 3] -> tiles [tile, tile, 3], row by row (`divide_to_patches`)."""
    height, width = pixels.shape[:2]
    return [pixels[i : i + tile, j : j + tile] for i in range(0, height, tile) for j in range(0, width, tile)]


def split_anyres(pixels: np.ndarray, settings: VisionSettings) -> list[np.ndarray]:
    """The base image (squashed to the tile size) then the tiles of the best grid resolution."""
    height, width = pixels.shape[:2]
    best_hw = select_best_resolution((height, width), settings.pinpoints_hw)
    resized = resize(pixels, anyres_target_size(height, width, best_hw), settings.resample)
    padded = pad_to_resolution(resized, best_hw)  # [best_h, best_w, 3]
    side = settings.shortest_edge
    base = resize(pixels, (side, side), settings.resample)
    return [base, *split_tiles(padded, settings.crop_size[0])]
