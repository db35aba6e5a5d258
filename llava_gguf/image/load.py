"""Reading images into RGB the way the reference pipeline sees them, and hashing them for a feature cache.

Decisions:

* Alpha (RGBA, LA, PA, P or RGB with a ``transparency`` entry) is composited onto white, as
  transformers' image processors do in ``image_transforms.convert_to_rgb``; every other mode goes
  through ``PIL.Image.convert("RGB")``. Original LLaVA (and ``transformers.image_utils.load_image``)
  call ``convert("RGB")`` on everything, which drops the alpha channel instead: pass
  ``composite_alpha=False`` for that.
* EXIF orientation is applied (``ImageOps.exif_transpose``); animated images give their first frame.
* Pillow's decompression-bomb guard stays on: above ``2 * Image.MAX_IMAGE_PIXELS`` pixels Pillow
  refuses and we raise `ImageError`; between 1x and 2x Pillow only emits its
  ``DecompressionBombWarning`` through Python's warnings and the image loads. ``max_pixels`` sets a
  limit of one's own for encoded images (paths and bytes), checked from the header before decoding.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import os
import struct
from typing import IO, Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_gguf.errors import ImageError
from llava_gguf.metadata import VisionSettings

ImageSource = Union[str, "os.PathLike[str]", bytes, Image.Image, np.ndarray]

# What Pillow's decoders raise on corrupt or truncated data.
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)


def load_image(source: ImageSource, *, composite_alpha: bool = True, max_pixels: int | None = None) -> Image.Image:
    """Read `source` (a path, encoded bytes, a PIL image or a numpy array) into an RGB PIL image; encoded images
    of more than `max_pixels` pixels are refused before decoding."""
    if isinstance(source, np.ndarray):
        return image_from_array(source, composite_alpha=composite_alpha)
    if isinstance(source, Image.Image):
        image = orient_image(source, name="PIL image")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = decode_image(io.BytesIO(bytes(source)), name="image bytes", max_pixels=max_pixels)
    elif isinstance(source, (str, os.PathLike)):
        image = open_image_file(source, max_pixels=max_pixels)
    else:
        raise ImageError(
            f"unsupported image source of type {type(source).__name__}; "
            "pass a path, bytes, a PIL image or a numpy array"
        )
    return convert_to_rgb(image, composite_alpha=composite_alpha)


def open_image_file(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            return decode_image(f, name=name, max_pixels=max_pixels)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ImageError(f"{name}: cannot read image file ({e.strerror}); check the path") from e


def decode_image(fp: IO[bytes], name: str, max_pixels: int | None = None) -> Image.Image:
    """Decode the first frame of an encoded image, fully, with EXIF orientation applied."""
    try:
        with Image.open(fp) as image:  # reads the header only
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageError(f"{name}: image is {image.width}x{image.height} ({image.width * image.height} "
                                 f"pixels), over the limit of {max_pixels} pixels; downscale it first")
            return orient_image(image, name=name)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image is too large to decode safely ({e}); downscale it first") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image file Pillow can decode (empty, wrong format or corrupt)") from e
    except MemoryError as e:
        raise ImageError(f"{name}: not enough memory to decode the image; downscale it first") from e
    except DECODE_ERRORS as e:
        raise ImageError(f"{name}: image data is corrupt or truncated ({e}); re-export the image") from e


def orient_image(image: Image.Image, name: str) -> Image.Image:
    """Force-decode `image` and apply its EXIF orientation; reject empty images."""
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated: the first frame
        image.load()
        oriented = ImageOps.exif_transpose(image)
        oriented.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image is too large to decode safely ({e}); downscale it first") from e
    except DECODE_ERRORS as e:
        raise ImageError(f"{name}: image data is corrupt or truncated ({e}); re-export the image") from e
    if oriented.width == 0 or oriented.height == 0:
        raise ImageError(f"{name}: image is empty ({oriented.width}x{oriented.height} pixels)")
    return oriented


def convert_to_rgb(image: Image.Image, *, composite_alpha: bool = True) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL images: alpha composited onto white, else `convert("RGB")`."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if composite_alpha and has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"cannot convert a {image.mode} image to RGB ({e}); convert it to RGB first") from e


def is_plain_rgb(image: Image.Image) -> bool:
    """RGB with no transparency entry: what `convert_to_rgb` would return unchanged."""
    return image.mode == "RGB" and image.info.get("transparency") is None


def image_from_array(array: np.ndarray, *, composite_alpha: bool = True) -> Image.Image:
    """An RGB image from a channels-last array, as transformers' `convert_to_rgb` treats arrays.

    uint8 HxW, HxWx1, HxWx3 or HxWx4; float arrays must lie in [0, 1] and become uint8 as
    transformers' `to_pil_image` does (times 255, truncated).
    """
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # [H, W, 1] -> [H, W]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"numpy image must be HxW, HxWx3 or HxWx4 (channels last); got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"numpy image is empty (shape {array.shape})")
    pixels = array_to_uint8(array)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)  # [H, W] -> [H, W, 3]
    elif pixels.shape[-1] == 4:
        pixels = flatten_alpha(pixels) if composite_alpha else pixels[..., :3]
    return Image.fromarray(np.ascontiguousarray(pixels))


def array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
            raise ImageError(f"float numpy image must lie in [0, 1]; got [{array.min()}, {array.max()}]")
        return (array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    raise ImageError(f"numpy image must be uint8 or float in [0, 1]; got dtype {array.dtype}")


def flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] uint8 -> [H, W, 3] uint8 composited onto white, rounded as transformers does."""
    alpha = rgba[..., 3:4] / 255
    composite = alpha * rgba[..., :3] + (1 - alpha) * 255
    return np.round(composite).astype(np.uint8)


def image_digest(image: Image.Image, settings: VisionSettings) -> str:
    """sha256 over the RGB pixels, the size and the vision settings: a key for cached image features."""
    rgb = image if is_plain_rgb(image) else convert_to_rgb(image)
    digest = hashlib.sha256()
    digest.update(b"llava-gguf image v1\0")
    digest.update(struct.pack("<II", rgb.width, rgb.height))
    digest.update(describe_settings(settings).encode())
    digest.update(b"\0")
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def describe_settings(settings: VisionSettings) -> str:
    """Canonical JSON of the settings that shape an image's features (`inferred` excluded)."""
    values = {f.name: plain_value(getattr(settings, f.name)) for f in dataclasses.fields(settings) if f.compare}
    return json.dumps(values, sort_keys=True)


def plain_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [plain_value(v) for v in value]
    return value
