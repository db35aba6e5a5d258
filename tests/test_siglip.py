"""SigLIP towers (llava-interleave, LLaVA-OneVision) against transformers on the same weights: the converted
mmproj, SiglipImageProcessor's pixels, both exact encoders' features and a greedy answer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from PIL import Image
from siglip_checkpoints import SIGLIP_IMAGE_SIZE, SiglipCheckpoint, build_siglip_checkpoint
from test_runtime import EXACT, GREEDY, random_image, reference_run
from transformers import AutoProcessor

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.image.preprocess import preprocess
from llava_gguf.llm.llama import KVCacheType
from llava_gguf.llm.templates import Message, Role, user_text
from llava_gguf.memory import estimate_memory
from llava_gguf.metadata import GGUFFields, ImageMode, LlavaKeys, SelectStrategy, TowerKind, VisionSettings, read_gguf
from llava_gguf.model import LlavaModel
from llava_gguf.packing import count_image_tokens
from llava_gguf.vision import NumpyVisionEncoder, gelu_tanh
from llava_gguf.vision.ggml_encoder import GgmlVisionEncoder

PATCHES = (SIGLIP_IMAGE_SIZE // 14) ** 2
SIZES = [(1, 1), (1, 2000), (2000, 1500), (90, 50), (56, 56)]  # (width, height)
SELECTIONS = [(-2, "default"), (-1, "full"), (-2, "full"), (-1, "default")]
TOLERANCE = 1e-4  # relative to the features' largest magnitude


@pytest.fixture(scope="module")
def siglip(sp_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint, mmproj path, llm path) per (layer, strategy, mmproj type), converted once."""
    cache: dict[tuple[int, str, MmprojType], tuple[SiglipCheckpoint, Path, Path]] = {}

    def make(layer: int = -2, strategy: str = "default",
             kind: MmprojType = MmprojType.F32) -> tuple[SiglipCheckpoint, Path, Path]:
        key = (layer, strategy, kind)
        if key not in cache:
            exact = {MmprojType.F32: None, MmprojType.F16: "f16", MmprojType.Q8_0: "q8_0"}[kind]
            ckpt = build_siglip_checkpoint(tmp_path_factory.mktemp("siglip"), sp_model, feature_layer=layer,
                                           strategy=strategy, exact_in=exact)
            result = convert_checkpoint(ckpt.path, tmp_path_factory.mktemp("gguf"),
                                        ConvertOptions(quant=Quant.F32, mmproj_type=kind))
            cache[key] = ckpt, result.mmproj, result.llm
        return cache[key]

    return make


def reference_features(ckpt: SiglipCheckpoint, image: Image.Image) -> np.ndarray:
    pixels = ckpt.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        (features,) = ckpt.model.model.get_image_features(pixel_values=pixels).pooler_output
    return features.numpy()  # [n_tokens, llm_hidden]


def our_features(encoder: NumpyVisionEncoder | GgmlVisionEncoder, mmproj: Path, image: Image.Image) -> np.ndarray:
    tiles, _ = preprocess(image, VisionSettings.read(read_gguf(mmproj)))
    return encoder.encode(tiles)[0]


def relative_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------- the converted file


def test_the_mmproj_records_a_siglip_tower(siglip) -> None:
    ckpt, mmproj, _ = siglip(-2, "default")
    reader = read_gguf(mmproj)
    settings = VisionSettings.read(reader)
    assert settings.tower is TowerKind.SIGLIP
    assert settings.image_mode is ImageMode.RESIZE
    assert settings.image_mean == settings.image_std == (0.5, 0.5, 0.5)
    assert settings.crop_size == (SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE)
    assert (settings.vision_feature_layer, settings.vision_feature_select_strategy) == (-2, SelectStrategy.DEFAULT)
    fields = GGUFFields(reader)
    assert fields.get(LlavaKeys.VISION_TOWER) == "siglip"
    assert fields.get(gguf.Keys.ClipVision.USE_GELU) is True  # clip.cpp's FFN_GELU: the tanh GELU
    assert fields.get(gguf.Keys.ClipVision.Attention.LAYERNORM_EPS) == pytest.approx(1e-6)
    names = fields.tensor_names
    assert {"v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight"} <= names
    assert not {"v.class_embd", "v.pre_ln.weight", "v.post_ln.weight"} & names
    assert not any("head" in n for n in names)  # the attention-pooling head never runs
    assert max(int(n.split(".")[2]) for n in names if n.startswith("v.blk.")) == 1  # hidden_states[-2]: 2 blocks
    # the reference's token count: "default" drops position 0 of a tower without a class token
    assert count_image_tokens((300, 200), settings) == PATCHES - 1 == len(reference_features(ckpt, random_image(9, 9, 0)))


def test_files_without_the_tower_key_are_clip(siglip, tmp_path: Path) -> None:
    _, mmproj, _ = siglip(-2, "default")
    reader = read_gguf(mmproj)
    copy = tmp_path / "no-tower-key.gguf"
    writer = gguf.GGUFWriter(copy, "clip")
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in (LlavaKeys.VISION_TOWER, gguf.Keys.General.ARCHITECTURE):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    settings = VisionSettings.read(read_gguf(copy))
    assert settings.tower is TowerKind.CLIP
    assert settings.extra_tokens == 0  # CLIP, "default": the class token dropped
    assert replace(settings, tower=TowerKind.SIGLIP).extra_tokens == -1
    assert replace(settings, tower=TowerKind.SIGLIP, vision_feature_select_strategy=SelectStrategy.FULL).extra_tokens == 0


def test_the_memory_estimate_knows_the_tower(siglip) -> None:
    _, mmproj, llm = siglip(-2, "default")
    estimate = estimate_memory(llm, mmproj, n_ctx=512, kv_cache_type=KVCacheType.F32, n_tiles=1)
    assert estimate.vision > 0 and estimate.total > estimate.weights


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", SIZES + [(300, 7), (57, 55)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_preprocessing_is_pixel_identical(siglip, size, mode) -> None:
    ckpt, mmproj, _ = siglip(-2, "default")
    image = random_image(*size, seed=size[0] + size[1]).convert(mode)
    ours, original_hw = preprocess(image, VisionSettings.read(read_gguf(mmproj)))
    ref = ckpt.image_processor(image, return_tensors="np")["pixel_values"]
    assert original_hw == (size[1], size[0])
    assert ours.shape == ref.shape == (1, 3, SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE)
    assert np.array_equal(ours, ref)


def test_the_checkpoint_loads_with_auto_processor(siglip) -> None:
    ckpt, _, _ = siglip(-2, "default")
    processor = AutoProcessor.from_pretrained(str(ckpt.path))
    assert "Siglip" in type(processor.image_processor).__name__


# ---------------------------------------------------------------- features


def test_tanh_gelu_matches_torch() -> None:
    x = np.linspace(-12, 12, 200_001, dtype=np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    assert np.abs(gelu_tanh(x.copy()) - ref).max() <= 2e-6


@pytest.mark.parametrize("layer,strategy", SELECTIONS)
@pytest.mark.parametrize("encoder", ["numpy", "ggml"])
def test_features_match_transformers(siglip, layer, strategy, encoder) -> None:
    ckpt, mmproj, _ = siglip(layer, strategy)
    enc = NumpyVisionEncoder.from_gguf(mmproj) if encoder == "numpy" else GgmlVisionEncoder.from_gguf(mmproj)
    for size in SIZES:
        image = random_image(*size, seed=size[0])
        ref = reference_features(ckpt, image)
        assert len(ref) == PATCHES - (1 if strategy == "default" else 0)
        diff = relative_diff(our_features(enc, mmproj, image), ref)
        assert diff <= TOLERANCE, (size, diff)


@pytest.mark.parametrize("kind", [MmprojType.F16, MmprojType.Q8_0])
@pytest.mark.parametrize("encoder", ["numpy", "ggml"])
def test_f16_and_q8_0_files_match_transformers(siglip, kind, encoder) -> None:
    ckpt, mmproj, _ = siglip(-2, "default", kind)
    enc = NumpyVisionEncoder.from_gguf(mmproj) if encoder == "numpy" else GgmlVisionEncoder.from_gguf(mmproj)
    for size in [(90, 50), (2000, 1500)]:
        image = random_image(*size, seed=7)
        assert relative_diff(our_features(enc, mmproj, image), reference_features(ckpt, image)) <= TOLERANCE


# ---------------------------------------------------------------- the runtime


def test_greedy_answer_matches_transformers(siglip) -> None:
    ckpt, mmproj, llm = siglip(-2, "default")
    model = LlavaModel(llm, mmproj, EXACT)
    image = random_image(90, 50, seed=1)
    prompt = model.render([Message(Role.USER, user_text("What is in the picture?", 1))])
    ref_logits, ref_tokens, counts = reference_run(ckpt, prompt, [image])  # type: ignore[arg-type]
    assert counts == [PATCHES - 1]
    assert np.abs(model.prompt_logits(prompt, [image]) - ref_logits).max() <= 2e-3
    chat = model.chat()
    "".join(chat.send("What is in the picture?", [image], GREEDY))
    assert chat.last_prompt == prompt
    assert model.timings.n_image_tokens == counts
    assert chat.last_tokens == ref_tokens
