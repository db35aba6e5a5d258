"""Anyres geometry, token counts and feature packing against transformers' LlavaNext model and processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import select_best_resolution as ref_select_best_resolution
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from llava_gguf.errors import ImageError
from llava_gguf.metadata import ImageMode, SelectStrategy, VisionSettings
from llava_gguf.packing import (
    anyres_grid_shape,
    count_image_tokens,
    count_tiles,
    pack_image_features,
    select_best_resolution,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PINPOINTS = ((56, 112), (112, 56), (112, 112), (168, 56), (56, 168))
REAL_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
HIDDEN = 32
IMAGE_TOKEN_ID = 1
SIZES = [
    (1, 1), (10, 500), (500, 10), (56, 56), (57, 56), (56, 57), (112, 112), (2000, 1500),
    (1500, 2000), (20000, 300), (300, 20000), (33, 71), (71, 33), (100, 101), (168, 56),
]  # fmt: skip


def settings_16(
    pinpoints: tuple[tuple[int, int], ...] = PINPOINTS, tile: int = 56, strategy: SelectStrategy = SelectStrategy.DEFAULT
) -> VisionSettings:
    return VisionSettings(
        llava_version="1.6",
        layout="llava-hf",
        image_mode=ImageMode.ANYRES,
        image_size=tile,
        patch_size=14,
        shortest_edge=tile,
        crop_size=(tile, tile),
        image_mean=MEAN,
        image_std=STD,
        vision_feature_select_strategy=strategy,
        image_grid_pinpoints=pinpoints,
        mm_patch_merge_type="spatial_unpad",
    )


def settings_15(mode: ImageMode, strategy: SelectStrategy = SelectStrategy.DEFAULT) -> VisionSettings:
    return VisionSettings(
        llava_version="1.5",
        layout="llava-hf",
        image_mode=mode,
        image_size=56,
        patch_size=14,
        shortest_edge=56,
        crop_size=(56, 56),
        image_mean=MEAN,
        image_std=STD,
        vision_feature_select_strategy=strategy,
    )


@pytest.fixture(scope="module")
def tiny_llava_next() -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
        ),
        text_config=LlamaConfig(
            hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=100
        ),
        image_grid_pinpoints=[list(p) for p in PINPOINTS],
        image_token_index=IMAGE_TOKEN_ID,
    )
    return LlavaNextForConditionalGeneration(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory: `<image>` is id 1."""
    vocab = {"<unk>": 0, "<image>": IMAGE_TOKEN_ID, "describe": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


@pytest.fixture(scope="module")
def next_processor() -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=[list(p) for p in PINPOINTS]
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def reference_pack(
    model: LlavaNextForConditionalGeneration, features: np.ndarray, size_hw: tuple[int, int], newline: np.ndarray
) -> np.ndarray:
    with torch.no_grad():
        packed, lens = model.pack_image_features(
            [torch.from_numpy(features)],
            torch.tensor([size_hw]),
            vision_feature_select_strategy="default",
            image_newline=torch.from_numpy(newline),
        )
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0].numpy()


def check_pack(model: LlavaNextForConditionalGeneration, size_hw: tuple[int, int], seed: int = 0) -> None:
    settings = settings_16()
    n_tiles = image_size_to_num_patches(size_hw, [list(p) for p in PINPOINTS], 56)
    assert count_tiles(size_hw, settings) == n_tiles
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n_tiles, 16, HIDDEN), dtype=np.float32)  # [tiles, patches, d]
    newline = rng.standard_normal(HIDDEN, dtype=np.float32)
    expected = reference_pack(model, features, size_hw, newline)
    ours = pack_image_features(features, size_hw, settings, newline)
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-6
    assert count_image_tokens(size_hw, settings) == expected.shape[0]


@pytest.mark.parametrize("size_hw", SIZES)
def test_pack_matches_transformers(tiny_llava_next: LlavaNextForConditionalGeneration, size_hw: tuple[int, int]) -> None:
    check_pack(tiny_llava_next, size_hw)


@hyp_settings(max_examples=30, deadline=None)
@given(height=st.integers(1, 3000), width=st.integers(1, 3000))
def test_pack_matches_transformers_any_size(tiny_llava_next: LlavaNextForConditionalGeneration, height: int, width: int) -> None:
    check_pack(tiny_llava_next, (height, width), seed=height * 7919 + width)


def test_single_tile_appends_one_newline(tiny_llava_next: LlavaNextForConditionalGeneration) -> None:
    rng = np.random.default_rng(1)
    features = rng.standard_normal((1, 16, HIDDEN), dtype=np.float32)
    newline = rng.standard_normal(HIDDEN, dtype=np.float32)
    expected = reference_pack(tiny_llava_next, features, (40, 90), newline)
    assert np.array_equal(pack_image_features(features, (40, 90), settings_16(), newline), expected)


def test_wrong_tile_count_is_an_image_error() -> None:
    features = np.zeros((2, 16, HIDDEN), dtype=np.float32)
    with pytest.raises(ImageError, match="tiles"):
        pack_image_features(features, (100, 300), settings_16(), np.zeros(HIDDEN, dtype=np.float32))


@pytest.mark.parametrize("mode", [ImageMode.CROP, ImageMode.PAD])
def test_llava_15_features_pass_through(mode: ImageMode) -> None:
    features = np.arange(16 * HIDDEN, dtype=np.float32).reshape(1, 16, HIDDEN)
    packed = pack_image_features(features, (123, 45), settings_15(mode), np.zeros(HIDDEN, dtype=np.float32))
    assert np.array_equal(packed, features[0])


@pytest.mark.parametrize("pinpoints", [PINPOINTS, REAL_PINPOINTS])
@pytest.mark.parametrize("size_hw", SIZES)
def test_geometry_matches_transformers(pinpoints: tuple[tuple[int, int], ...], size_hw: tuple[int, int]) -> None:
    tile = pinpoints[0][0]
    as_lists = [list(p) for p in pinpoints]
    assert select_best_resolution(size_hw, pinpoints) == tuple(ref_select_best_resolution(size_hw, as_lists))
    assert anyres_grid_shape(size_hw, pinpoints, tile) == tuple(get_anyres_image_grid_shape(size_hw, as_lists, tile))
    assert count_tiles(size_hw, settings_16(pinpoints, tile)) == image_size_to_num_patches(size_hw, as_lists, tile)


@pytest.mark.parametrize("size_hw", [(1, 1), (10, 500), (500, 10), (336, 336), (2000, 1500), (20000, 300), (300, 20000), (480, 640)])
def test_real_size_token_counts_match_processor(size_hw: tuple[int, int]) -> None:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=[list(p) for p in REAL_PINPOINTS]
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
    )  # fmt: skip
    expected = processor._get_num_multimodal_tokens(image_sizes=[list(size_hw)]).num_image_tokens[0]
    assert count_image_tokens(size_hw, settings_16(REAL_PINPOINTS, 336)) == expected


@pytest.mark.parametrize("size_hw", [(1, 1), (10, 500), (500, 10), (56, 56), (57, 113), (300, 200)])
def test_token_count_matches_processor_prompt(next_processor: LlavaNextProcessor, size_hw: tuple[int, int]) -> None:
    image = Image.new("RGB", (size_hw[1], size_hw[0]), (10, 20, 30))
    inputs = next_processor(text="describe <image>", images=image, return_tensors="np")
    assert count_image_tokens(size_hw, settings_16()) == int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())


@pytest.mark.parametrize("size_hw", [(20000, 300), (300, 20000), (3000, 1)])
def test_huge_sizes_count_like_processor(next_processor: LlavaNextProcessor, size_hw: tuple[int, int]) -> None:
    expected = next_processor._get_num_multimodal_tokens(image_sizes=[list(size_hw)]).num_image_tokens[0]
    assert count_image_tokens(size_hw, settings_16()) == expected


@pytest.mark.parametrize("strategy", [SelectStrategy.DEFAULT, SelectStrategy.FULL])
@pytest.mark.parametrize("mode", [ImageMode.CROP, ImageMode.PAD])
def test_llava_15_token_count_matches_processor(mode: ImageMode, strategy: SelectStrategy) -> None:
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
        tokenizer=tiny_tokenizer(), patch_size=14, vision_feature_select_strategy=strategy.value,
        num_additional_image_tokens=1, image_token="<image>",
    )  # fmt: skip
    inputs = processor(text="describe <image>", images=Image.new("RGB", (90, 40)), return_tensors="np")
    expected = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert count_image_tokens((40, 90), settings_15(mode, strategy)) == expected
