"""Image loading against transformers' `convert_to_rgb` / `load_image`, and the loader's error cases."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb as ref_convert_to_rgb
from transformers.image_utils import load_image as ref_load_image

from llava_gguf.errors import ImageError
from llava_gguf.image.load import image_digest, load_image
from llava_gguf.metadata import ImageMode, VisionSettings

RNG_SEED = 0
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "I;16", "I", "F", "YCbCr", "HSV"]


def random_rgba(height: int = 13, width: int = 17, seed: int = RNG_SEED) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))


def image_in_mode(mode: str) -> Image.Image:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (13, 17), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-70000, 70000, (13, 17), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.standard_normal((13, 17)).astype(np.float32) * 300)
    if mode in ("P", "PA"):
        return random_rgba().convert("RGB").quantize(64).convert(mode)
    return random_rgba().convert(mode)


def reference_rgb(image: Image.Image) -> np.ndarray:
    return ref_convert_to_rgb(image, return_numpy=True)  # [H, W, 3] uint8


def vision_settings(**changes: object) -> VisionSettings:
    base = VisionSettings(
        llava_version="1.5", layout="llava-hf", image_mode=ImageMode.CROP, image_size=336, patch_size=14,
        shortest_edge=336, crop_size=(336, 336), image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28),
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_converts_like_transformers(mode: str) -> None:
    image = image_in_mode(mode)
    assert image.mode == mode
    loaded = load_image(image)
    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), reference_rgb(image))


def test_palette_transparency_is_composited_on_white_like_transformers() -> None:
    image = random_rgba().convert("RGB").quantize(16)
    image.info["transparency"] = 3
    expected = reference_rgb(image)
    loaded = np.asarray(load_image(image))
    assert np.array_equal(loaded, expected)
    assert (loaded[np.asarray(image) == 3] == 255).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_png_files_load_like_transformers(tmp_path: Path, mode: str) -> None:
    image = image_in_mode(mode)
    if mode == "P":
        image.info["transparency"] = 0
    path = tmp_path / "image.png"
    image.save(path)
    with Image.open(path) as reopened:
        expected = reference_rgb(reopened)
    assert np.array_equal(np.asarray(load_image(path)), expected)
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), expected)
    assert np.array_equal(np.asarray(load_image(str(path))), expected)


def test_rgba_without_compositing_drops_alpha_like_original_llava(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    random_rgba().save(path)
    expected = np.asarray(ref_load_image(str(path)))  # exif_transpose + convert("RGB")
    assert np.array_equal(np.asarray(load_image(path, composite_alpha=False)), expected)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    image = random_rgba(2, 4).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    rotations = {3: 2, 6: -1, 8: 1}  # np.rot90 k (counter-clockwise) per EXIF orientation
    loaded = np.asarray(load_image(path))
    assert np.array_equal(loaded, np.rot90(np.asarray(image), rotations[orientation]))
    assert np.array_equal(loaded, np.asarray(ref_load_image(str(path))))


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 6), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    loaded = load_image(path)
    assert loaded.size == (8, 6)
    assert np.array_equal(np.asarray(loaded), np.asarray(frames[0]))
    with Image.open(path) as animated:
        animated.seek(2)
        assert np.array_equal(np.asarray(load_image(animated)), np.asarray(frames[0]))


def test_one_pixel_image(tmp_path: Path) -> None:
    path = tmp_path / "pixel.jpg"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
    loaded = load_image(path)
    assert loaded.size == (1, 1)
    assert loaded.mode == "RGB"


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_uint8_arrays_convert_like_transformers(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    channels_last = array[..., None] if array.ndim == 2 else array  # [H, W] -> [H, W, 1]
    expected = ref_convert_to_rgb(channels_last, return_numpy=True, input_data_format="channels_last")
    assert np.array_equal(np.asarray(load_image(array)), expected)


def test_float_arrays_scale_like_to_pil_image() -> None:
    array = np.random.default_rng(3).random((4, 6, 3))
    expected = (array * 255).astype(np.float32).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(array)), expected)


def test_non_image_file_is_an_image_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(path)


def test_empty_file_is_an_image_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(path)


def test_truncated_jpeg_is_an_image_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    random_rgba(64, 64).convert("RGB").save(buffer, "JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.png")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_decompression_bomb_is_an_image_error(tmp_path: Path) -> None:
    side = 20000  # 400 Mpixels, over Pillow's 2 * MAX_IMAGE_PIXELS
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    rows = zlib.compress(bytes((1 + side // 8) * side), 9)  # filter byte + packed bits per row, all black
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="too large"):
        load_image(path)


@pytest.mark.parametrize("array", [np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0), np.uint8)])
def test_empty_array_is_an_image_error(array: np.ndarray) -> None:
    with pytest.raises(ImageError, match="empty"):
        load_image(array)


def test_zero_size_pil_image_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))


@pytest.mark.parametrize(
    "array", [np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8), np.full((4, 4, 3), 2.0), np.zeros((4, 4), np.int64)]
)
def test_unsupported_arrays_are_image_errors(array: np.ndarray) -> None:
    with pytest.raises(ImageError):
        load_image(array)


def test_unsupported_source_type_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="unsupported image source"):
        load_image(42)  # type: ignore[arg-type]


def test_digest_tracks_pixels_size_and_settings() -> None:
    image = random_rgba().convert("RGB")
    settings = vision_settings()
    digest = image_digest(image, settings)
    assert digest == image_digest(image.copy(), vision_settings())
    assert digest == image_digest(image, dataclasses.replace(settings, inferred=("a note",)))
    changed = np.asarray(image).copy()
    changed[0, 0, 0] ^= 1
    assert digest != image_digest(Image.fromarray(changed), settings)
    assert digest != image_digest(Image.frombytes("RGB", (13, 17), image.tobytes()), settings)  # same bytes
    assert digest != image_digest(image, vision_settings(image_mode=ImageMode.PAD))
    assert digest != image_digest(image, vision_settings(image_mean=(0.5, 0.5, 0.5)))
