"""Pixel values against transformers' Pillow processors and the original LLaVA 1.5 pad pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaNextImageProcessorPil

from llava_gguf.image.preprocess import preprocess
from llava_gguf.metadata import ImageMode, VisionSettings

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PINPOINTS = ((56, 112), (112, 56), (112, 112), (168, 56), (56, 168))
REAL_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
SIZES = [
    (1, 1), (10, 500), (500, 10), (56, 56), (55, 57), (57, 113), (113, 57), (2, 3), (112, 112),
    (168, 56), (33, 71), (300, 299), (2000, 1500), (1500, 2000),
]  # fmt: skip
TOLERANCE = 1e-6


def vision_settings(mode: ImageMode, tile: int = 56, pinpoints: tuple[tuple[int, int], ...] = PINPOINTS) -> VisionSettings:
    return VisionSettings(
        llava_version="1.6" if mode == ImageMode.ANYRES else "1.5",
        layout="original" if mode == ImageMode.PAD else "llava-hf",
        image_mode=mode,
        image_size=tile,
        patch_size=14,
        shortest_edge=tile,
        crop_size=(tile, tile),
        image_mean=MEAN,
        image_std=STD,
        image_grid_pinpoints=pinpoints if mode == ImageMode.ANYRES else (),
        mm_patch_merge_type="spatial_unpad" if mode == ImageMode.ANYRES else "flat",
    )


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def llava_next_reference(image: Image.Image, tile: int, pinpoints: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, tuple[int, int]]:
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=[list(p) for p in pinpoints]
    )
    out = processor(images=image, return_tensors="np")
    height, width = out["image_sizes"][0]
    return out["pixel_values"][0], (int(height), int(width))  # [n_tiles, 3, tile, tile]


def llava_reference(image: Image.Image, do_pad: bool) -> np.ndarray:
    processor = LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_pad=do_pad)
    return processor(images=image, return_tensors="np")["pixel_values"]  # [1, 3, 56, 56]


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Original LLaVA (llava/mm_utils.py), verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def original_llava_pad_reference(image: Image.Image) -> np.ndarray:
    """Original LLaVA 1.5 `process_images` with image_aspect_ratio="pad" and a CLIP image processor."""
    processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_mean=MEAN, image_std=STD)
    square = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return processor.preprocess(square, return_tensors="np")["pixel_values"]  # [1, 3, 56, 56]


def check_anyres(image: Image.Image, tile: int = 56, pinpoints: tuple[tuple[int, int], ...] = PINPOINTS) -> None:
    expected, expected_hw = llava_next_reference(image, tile, pinpoints)
    ours, ours_hw = preprocess(image, vision_settings(ImageMode.ANYRES, tile, pinpoints))
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    assert ours_hw == expected_hw == (image.height, image.width)
    assert np.abs(ours - expected).max() <= TOLERANCE


@pytest.mark.parametrize("size_hw", SIZES)
def test_anyres_matches_llava_next_processor(size_hw: tuple[int, int]) -> None:
    check_anyres(random_image(*size_hw))


@pytest.mark.parametrize("size_hw", [(480, 640), (10, 500), (2000, 1500), (336, 336)])
def test_anyres_real_size_matches_llava_next_processor(size_hw: tuple[int, int]) -> None:
    check_anyres(random_image(*size_hw, seed=3), tile=336, pinpoints=REAL_PINPOINTS)


@hyp_settings(max_examples=30, deadline=None)
@given(height=st.integers(1, 400), width=st.integers(1, 400), seed=st.integers(0, 1000))
def test_anyres_matches_any_size(height: int, width: int, seed: int) -> None:
    check_anyres(random_image(height, width, seed))


@pytest.mark.parametrize("size_hw", SIZES)
def test_crop_matches_llava_processor(size_hw: tuple[int, int]) -> None:
    image = random_image(*size_hw, seed=1)
    ours, ours_hw = preprocess(image, vision_settings(ImageMode.CROP))
    assert ours_hw == size_hw
    assert np.abs(ours - llava_reference(image, do_pad=False)).max() <= TOLERANCE


@pytest.mark.parametrize("size_hw", SIZES)
def test_pad_matches_llava_processor_and_original_llava(size_hw: tuple[int, int]) -> None:
    image = random_image(*size_hw, seed=2)
    ours, _ = preprocess(image, vision_settings(ImageMode.PAD))
    assert np.abs(ours - llava_reference(image, do_pad=True)).max() <= TOLERANCE
    assert np.abs(ours - original_llava_pad_reference(image)).max() <= TOLERANCE


@hyp_settings(max_examples=15, deadline=None)
@given(height=st.integers(1, 300), width=st.integers(1, 300), pad=st.booleans())
def test_llava_15_matches_any_size(height: int, width: int, pad: bool) -> None:
    image = random_image(height, width, seed=height + width)
    ours, _ = preprocess(image, vision_settings(ImageMode.PAD if pad else ImageMode.CROP))
    assert np.abs(ours - llava_reference(image, do_pad=pad)).max() <= TOLERANCE


def test_crop_larger_than_resize_is_zero_padded_like_reference() -> None:
    image = random_image(40, 90, seed=4)
    settings = VisionSettings(
        llava_version="1.5", layout="llava-hf", image_mode=ImageMode.CROP, image_size=56, patch_size=14,
        shortest_edge=42, crop_size=(56, 56), image_mean=MEAN, image_std=STD,
    )  # fmt: skip
    processor = LlavaImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 56, "width": 56})
    expected = processor(images=image, return_tensors="np")["pixel_values"]
    ours, _ = preprocess(image, settings)
    assert np.abs(ours - expected).max() <= TOLERANCE


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_non_rgb_input_is_converted_like_processor(mode: str) -> None:
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (37, 61, 4), dtype=np.uint8))
    image = rgba.convert(mode) if mode != "RGBA" else rgba
    expected, _ = llava_next_reference(image, 56, PINPOINTS)
    ours, _ = preprocess(image, vision_settings(ImageMode.ANYRES))
    assert np.abs(ours - expected).max() <= TOLERANCE
