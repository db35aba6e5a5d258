"""LLaVA-OneVision pixels, packing and token counts against transformers' OneVision processor and model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoImageProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from llava_gguf.errors import ImageError
from llava_gguf.image.onevision import preprocess_onevision
from llava_gguf.packing_onevision import (
    ONEVISION_PINPOINTS,
    OnevisionSettings,
    count_image_tokens,
    count_tiles,
    downscale_ratio,
    interpolate_bilinear,
    pack_image_features,
    tiling_flags,
    unpad_layout,
)

HIDDEN = 16
IMAGE_TOKEN_ID = 1
TOLERANCE = 1e-6
SETTINGS = OnevisionSettings()
# llava-hf/llava-onevision-qwen2-*-ov-hf preprocessor_config.json, as (height, width) lists
REAL_PREPROCESSOR_CONFIG = {
    "image_processor_type": "LlavaOnevisionImageProcessor",
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": [list(p) for p in ONEVISION_PINPOINTS],
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "resample": 3, "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384},
}  # fmt: skip
PIXEL_SIZES = [
    (1, 1), (1, 2000), (2000, 1), (2000, 1500), (1500, 2000), (5000, 400), (400, 5000), (384, 384),
    (385, 383), (1000, 700), (700, 1000), (2, 3), (768, 1152),
]  # fmt: skip
# unpadded grid ratio just above 1.1 (59x135 -> 53x122), just below (98x81: kept), far above, none
DOWNSCALED = [(772, 1739), (2000, 1500), (1500, 2000), (1080, 1920), (2304, 1000), (3000, 2000), (2304, 2304)]
KEPT = [
    (1374, 1145), (800, 1200), (1, 1), (1, 2000), (2000, 1), (384, 384), (385, 383), (5000, 400), (400, 5000),
    (1000, 700), (20000, 300),
]  # fmt: skip


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_processor(tmp_path_factory: pytest.TempPathFactory) -> LlavaOnevisionImageProcessorPil:
    """What `AutoImageProcessor` loads from the real checkpoint's preprocessor_config.json here."""
    folder = Path(tmp_path_factory.mktemp("onevision"))
    (folder / "preprocessor_config.json").write_text(json.dumps(REAL_PREPROCESSOR_CONFIG))
    processor = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(processor, LlavaOnevisionImageProcessorPil)
    return processor


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<image>": IMAGE_TOKEN_ID, "<video>": 2, "describe": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


@pytest.fixture(scope="module")
def processor(image_processor: LlavaOnevisionImageProcessorPil) -> LlavaOnevisionProcessor:
    """The real processor's settings; no video processor (that class needs torchvision, absent here)."""
    check = LlavaOnevisionProcessor.check_argument_for_proper_class

    def check_but_video(self: LlavaOnevisionProcessor, name: str, argument: object) -> object:
        # without torchvision the video check fails even for None (its class lookup raises)
        return None if name == "video_processor" else check(self, name, argument)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LlavaOnevisionProcessor, "check_argument_for_proper_class", check_but_video)
        return LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tiny_tokenizer(), num_image_tokens=729,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_onevision() -> LlavaOnevisionForConditionalGeneration:
    """Real geometry (SigLIP 384/14, the real pinpoints), tiny widths: only `pack_image_features` is used."""
    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            image_size=384,
            patch_size=14,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        text_config=Qwen2Config(
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            vocab_size=100,
        ),
        image_grid_pinpoints=[list(p) for p in ONEVISION_PINPOINTS],
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return LlavaOnevisionForConditionalGeneration(config).eval()


def reference_pack(
    model: LlavaOnevisionForConditionalGeneration, features: np.ndarray, size_hw: tuple[int, int], newline: np.ndarray
) -> np.ndarray:
    # the ForConditionalGeneration wrapper passes an argument the model's method no longer takes: call the model's
    with torch.no_grad():
        packed, lens = model.model.pack_image_features(
            [torch.from_numpy(features)], torch.tensor([size_hw]), image_newline=torch.from_numpy(newline),
            vision_aspect_ratio=model.config.vision_aspect_ratio,
        )  # fmt: skip
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0].numpy()


def check_pack(model: LlavaOnevisionForConditionalGeneration, size_hw: tuple[int, int], seed: int = 0) -> float:
    n_tiles = image_size_to_num_patches(size_hw, [list(p) for p in ONEVISION_PINPOINTS], 384)
    assert count_tiles(size_hw, SETTINGS) == n_tiles
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n_tiles, 729, HIDDEN), dtype=np.float32)  # [tiles, patches, d]
    newline = rng.standard_normal(HIDDEN, dtype=np.float32)
    expected = reference_pack(model, features, size_hw, newline)
    ours = pack_image_features(features, size_hw, SETTINGS, newline)
    assert ours.shape == expected.shape
    diff = float(np.abs(ours - expected).max())
    assert diff <= TOLERANCE
    assert count_image_tokens(size_hw, SETTINGS) == expected.shape[0]
    return diff


def grid_ratio(size_hw: tuple[int, int]) -> float:
    _, _, (top, bottom, left, right) = unpad_layout(size_hw, SETTINGS)
    return downscale_ratio(bottom - top, right - left, SETTINGS)


@pytest.mark.parametrize("size_hw", PIXEL_SIZES)
def test_pixels_match_processor(image_processor: LlavaOnevisionImageProcessorPil, size_hw: tuple[int, int]) -> None:
    image = random_image(*size_hw, seed=size_hw[0] * 31 + size_hw[1])
    out = image_processor(images=image, return_tensors="np")
    tiles, original_hw = preprocess_onevision(image, SETTINGS)
    assert original_hw == tuple(int(x) for x in out["image_sizes"][0])
    assert tiles.shape == out["pixel_values"][0].shape  # [n_tiles, 3, 384, 384]
    assert np.abs(tiles - out["pixel_values"][0]).max() <= TOLERANCE


def test_several_images_in_one_prompt_are_single_squares(image_processor: LlavaOnevisionImageProcessorPil) -> None:
    images = [random_image(300, 700, seed=1), random_image(1000, 200, seed=2), random_image(384, 384, seed=3)]
    out = image_processor(images=[images], return_tensors="np")  # one prompt, three images: batch_num_images [3]
    assert list(out["batch_num_images"]) == [3]
    assert tiling_flags([3]) == [False, False, False]
    for index, image in enumerate(images):
        tiles, _ = preprocess_onevision(image, SETTINGS, tiled=False)
        assert tiles.shape == (1, 3, 384, 384)
        assert np.abs(tiles[0] - out["pixel_values"][index][0]).max() <= TOLERANCE


def test_tiling_flags_follow_images_per_prompt() -> None:
    assert tiling_flags([1, 2, 1]) == [True, False, False, True]


def test_sizes_straddle_the_downscale_threshold() -> None:
    assert 1.1 < grid_ratio(DOWNSCALED[0]) < 1.102
    assert 1.099 < grid_ratio(KEPT[0]) <= 1.1
    assert all(grid_ratio(size) > 1.1 for size in DOWNSCALED)
    assert all(grid_ratio(size) <= 1.1 for size in KEPT)


@pytest.mark.parametrize("size_hw", DOWNSCALED + KEPT)
def test_pack_matches_transformers(
    tiny_onevision: LlavaOnevisionForConditionalGeneration, size_hw: tuple[int, int]
) -> None:
    check_pack(tiny_onevision, size_hw)


@hyp_settings(max_examples=20, deadline=None)
@given(height=st.integers(1, 4000), width=st.integers(1, 4000))
def test_pack_matches_transformers_any_size(
    tiny_onevision: LlavaOnevisionForConditionalGeneration, height: int, width: int
) -> None:
    check_pack(tiny_onevision, (height, width), seed=height * 7919 + width)


def test_untiled_image_is_one_tile_and_a_newline(tiny_onevision: LlavaOnevisionForConditionalGeneration) -> None:
    rng = np.random.default_rng(1)
    features = rng.standard_normal((1, 729, HIDDEN), dtype=np.float32)
    newline = rng.standard_normal(HIDDEN, dtype=np.float32)
    expected = reference_pack(tiny_onevision, features, (300, 700), newline)
    assert np.array_equal(pack_image_features(features, (300, 700), SETTINGS, newline, tiled=False), expected)
    assert count_image_tokens((300, 700), SETTINGS, tiled=False) == expected.shape[0] == 730


def test_wrong_tile_count_is_an_image_error() -> None:
    features = np.zeros((3, 729, HIDDEN), dtype=np.float32)
    with pytest.raises(ImageError, match="tiles"):
        pack_image_features(features, (1000, 700), SETTINGS, np.zeros(HIDDEN, dtype=np.float32))


@pytest.mark.parametrize(("in_hw", "out_hw"), [((162, 162), (88, 88)), ((59, 135), (53, 122)), ((145, 131), (100, 90))])
def test_interpolate_matches_torch(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(in_hw[0])
    grid = rng.standard_normal((40, in_hw[0] + 4, in_hw[1] + 6), dtype=np.float32) * 3  # [d, H + 4, W + 6]
    window = grid[:, 2 : 2 + in_hw[0], 3 : 3 + in_hw[1]]  # [d, H, W], strided as an unpadded grid
    expected = torch.nn.functional.interpolate(torch.from_numpy(window)[None], list(out_hw), mode="bilinear")[0].numpy()
    assert np.abs(interpolate_bilinear(window, out_hw) - expected).max() <= TOLERANCE


def test_small_interpolate_outputs_are_refused() -> None:
    with pytest.raises(ImageError, match="channels-last"):
        interpolate_bilinear(np.zeros((4, 30, 40), dtype=np.float32), (20, 30))


@pytest.mark.parametrize("size_hw", DOWNSCALED + KEPT + [(3000, 1), (1, 3000), (57, 113)])
def test_token_counts_match_processor(processor: LlavaOnevisionProcessor, size_hw: tuple[int, int]) -> None:
    expected = processor._get_num_multimodal_tokens(image_sizes=[list(size_hw)]).num_image_tokens[0]
    assert count_image_tokens(size_hw, SETTINGS) == expected


@pytest.mark.parametrize("size_hw", [(1, 1), (772, 1739), (1374, 1145), (5000, 400), (385, 383)])
def test_token_count_matches_processor_prompt(processor: LlavaOnevisionProcessor, size_hw: tuple[int, int]) -> None:
    image = Image.new("RGB", (size_hw[1], size_hw[0]), (10, 20, 30))
    inputs = processor(text="describe <image>", images=image, return_tensors="np")
    assert count_image_tokens(size_hw, SETTINGS) == int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())


def test_several_images_count_like_processor_prompt(processor: LlavaOnevisionProcessor) -> None:
    images = [Image.new("RGB", (700, 300)), Image.new("RGB", (200, 1000))]
    inputs = processor(text=["describe <image> <image>"], images=[images], return_tensors="np")
    expected = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert sum(count_image_tokens((img.height, img.width), SETTINGS, tiled=False) for img in images) == expected


def test_max_num_patches_is_parsed() -> None:
    assert OnevisionSettings(vision_aspect_ratio="anyres_max_16").max_num_patches == 16
    with pytest.raises(ImageError, match="anyres_max"):
        _ = OnevisionSettings(vision_aspect_ratio="anyres").max_num_patches
