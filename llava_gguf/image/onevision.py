"""Images to normalized SigLIP tiles, pixel for pixel as transformers' `LlavaOnevisionImageProcessorPil`.

That is the class `AutoImageProcessor` picks for llava_onevision without torchvision. An image alone in
its prompt is tiled: the whole image squashed to 384x384, then the 384x384 tiles of the best pinpoint
(resized to fit it, the other side rounded up, centred on black). An image among several is padded to
a square on the mean colour and squashed to 384x384, one tile. No centre crop; rescale, then normalize.
Intermediate images are channels-last uint8 arrays [H, W, 3], resized by Pillow as the reference does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from llava_gguf.image.load import convert_to_rgb, is_plain_rgb
from llava_gguf.image.preprocess import anyres_target_size, pad_to_resolution, pad_to_square, resize, split_tiles
from llava_gguf.packing import select_best_resolution
from llava_gguf.packing_onevision import OnevisionSettings


def preprocess_onevision(
    image: Image.Image, settings: OnevisionSettings, *, tiled: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
    """An image -> (float32 tiles [n_tiles, 3, side, side], original (height, width)).

    `tiled`: the image is the only one of its prompt (see `packing_onevision.tiling_flags`)."""
    rgb = image if is_plain_rgb(image) else convert_to_rgb(image)
    pixels = np.asarray(rgb)  # [H, W, 3] uint8
    views = split_onevision(pixels, settings) if tiled else [square_view(pixels, settings)]
    tiles = [normalize(view, settings) for view in views]
    return np.stack(tiles), (rgb.height, rgb.width)  # [n_tiles, 3, side, side]


def split_onevision(pixels: np.ndarray, settings: OnevisionSettings) -> list[np.ndarray]:
    """[H, W, 3] -> the base image [side, side, 3] then the best pinpoint's tiles, row by row."""
    height, width = pixels.shape[:2]
    side = settings.image_size
    best_hw = select_best_resolution((height, width), settings.image_grid_pinpoints)
    resized = resize(pixels, anyres_target_size(height, width, best_hw), settings.resample)
    padded = pad_to_resolution(resized, best_hw)  # [best_h, best_w, 3]
    base = resize(pixels, (side, side), settings.resample)  # [side, side, 3]
    return [base, *split_tiles(padded, side)]


def square_view(pixels: np.ndarray, settings: OnevisionSettings) -> np.ndarray:
    """[H, W, 3] -> [side, side, 3]: padded to a square on the mean colour (`int(mean * 255)`), then squashed."""
    red, green, blue = (int(x * 255) for x in settings.image_mean)
    square = pad_to_square(pixels, (red, green, blue))  # [S, S, 3]
    return resize(square, (settings.image_size, settings.image_size), settings.resample)


def normalize(pixels: np.ndarray, settings: OnevisionSettings) -> np.ndarray:
    """[h, w, 3] uint8 -> [3, h, w] float32: rescaled in float64, normalized in float32, as the reference."""
    scaled = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.image_mean, dtype=np.float32)
    std = np.asarray(settings.image_std, dtype=np.float32)
    normalized = (scaled - mean) / std  # [h, w, 3]
    return np.ascontiguousarray(normalized.transpose(2, 0, 1))  # [h, w, 3] -> [3, h, w]
