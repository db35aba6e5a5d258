"""LLaVA-OneVision converted and run against transformers' own pipeline on the same weights.

The reference is what a user of the llava-hf checkpoint runs: its processor (`onevision_checkpoints.
onevision_processor`: `AutoProcessor` less the torchvision-only video processor), ``apply_chat_template``,
``processor(images=[images], text=...)`` (a conversation's images nested together, as apply_chat_template
does: several images in one prompt are untiled) and ``model.generate`` (greedy, stopping where the
generation config says). Ours: the checkpoint converted to F32 (and F16 / Q8_0 mmproj files), an F32 KV cache.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from checkpoints import ByteLevelTokenizer, train_qwen2_bpe
from onevision_checkpoints import OnevisionCheckpoint, build_onevision_checkpoint
from PIL import Image
from test_families_reference import expanded_ids, greedy
from test_runtime import EXACT, random_image

from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint
from llava_gguf.convert.checkpoint import read_checkpoint
from llava_gguf.errors import CheckpointError, ModelLoadError
from llava_gguf.llm.sampling import SamplingOptions
from llava_gguf.memory import context_needed
from llava_gguf.metadata import ImageMode, LlavaKeys, VisionSettings, read_gguf
from llava_gguf.model import GenerationOptions, LlavaModel
from llava_gguf.packing_onevision import ONEVISION_PINPOINTS, OnevisionSettings, packed_grid_shape
from llava_gguf.vision.choose import EncoderChoice

N_NEW = 24
GREEDY = GenerationOptions(max_tokens=N_NEW, sampling=SamplingOptions(temperature=0.0))
TOLERANCE = 1e-4  # relative to the features' largest magnitude
COUNT_SIZES = [
    (1, 1), (1, 2000), (2000, 1), (2000, 1500), (5000, 400), (400, 5000), (384, 384), (385, 383), (772, 1739),
    (1374, 1145), (90, 50),
]  # (height, width)  # fmt: skip
DOWNSCALED = (772, 1739)  # 2x5 tiles whose 54x135 unpadded grid is downscaled to 53x122 ("anyres_max_9")
FEATURE_SIZES = [(1, 1), (90, 50), (500, 300), DOWNSCALED]


@pytest.fixture(scope="module")
def onevision(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(checkpoint, llm, mmproj) per mmproj type: F32 and F16 from weights f16 holds, Q8_0 from weights it holds."""
    cache: dict[MmprojType, tuple[OnevisionCheckpoint, Path, Path]] = {}
    bpe: list[ByteLevelTokenizer] = []

    def make(kind: MmprojType = MmprojType.F32) -> tuple[OnevisionCheckpoint, Path, Path]:
        if kind not in cache:
            if not bpe:
                bpe.append(train_qwen2_bpe(tmp_path_factory.mktemp("qwen2-bpe")))
            exact = "q8_0" if kind is MmprojType.Q8_0 else "f16"
            ckpt = build_onevision_checkpoint(tmp_path_factory.mktemp("onevision"), exact_in=exact, bpe=bpe[0])
            result = convert_checkpoint(ckpt.path, tmp_path_factory.mktemp("gguf"),
                                        ConvertOptions(quant=Quant.F32, mmproj_type=kind))
            cache[kind] = ckpt, result.llm, result.mmproj
        return cache[kind]

    return make


@pytest.fixture(scope="module")
def model(onevision) -> Any:
    _, llm, mmproj = onevision()
    loaded = LlavaModel(llm, mmproj, EXACT)
    yield loaded
    loaded.close()


def reference_features(ckpt: OnevisionCheckpoint, images: list[Image.Image]) -> list[np.ndarray]:
    """The packed features transformers computes for one prompt's images ([n_tokens, d] each)."""
    inputs = ckpt.processor.image_processor(images=[images], return_tensors="pt")
    config = ckpt.model.config
    with torch.no_grad():
        features = ckpt.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio, batch_num_images=inputs["batch_num_images"],
        ).pooler_output  # fmt: skip
    return [f.numpy() for f in features]


def reference(ckpt: OnevisionCheckpoint, messages: list[dict[str, Any]],
              images: list[Image.Image]) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) of transformers' pipeline, the tokens cut where generation stops."""
    processor = ckpt.processor
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[images] if images else None, text=text, return_tensors="pt")
    eos = ckpt.model.generation_config.eos_token_id
    return greedy(ckpt.model, inputs, eos if isinstance(eos, list) else [eos], N_NEW)


def reference_counts(ckpt: OnevisionCheckpoint, sizes: list[tuple[int, int]]) -> list[int]:
    """Image positions per image in the processor's input_ids, all ``sizes`` in one prompt (runs apart)."""
    images = [Image.new("RGB", (w, h), (10, 20, 30)) for h, w in sizes]
    inputs = ckpt.processor(text=" x ".join(["<image>"] * len(images)), images=[images], return_tensors="np")
    is_image = (inputs["input_ids"][0] == ckpt.image_token_id).astype(np.int8)  # [n]
    edges = np.diff(np.concatenate([[0], is_image, [0]]))  # +1 where a run starts, -1 after it ends
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


def relative_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(1.0, float(np.abs(ref).max())))


def _content(question: str, n_images: int) -> list[dict[str, str]]:
    return [{"type": "image"}] * n_images + [{"type": "text", "text": question}]


# ---------------------------------------------------------------- the converted file


def test_the_mmproj_records_onevision(onevision) -> None:
    _, _, mmproj = onevision()
    settings = VisionSettings.read(read_gguf(mmproj))
    assert settings.image_mode is ImageMode.ANYRES_MAX
    assert settings.vision_aspect_ratio == "anyres_max_9"
    assert settings.pinpoints_hw == ONEVISION_PINPOINTS
    assert (settings.vision_feature_layer, settings.vision_feature_select_strategy.value) == (-1, "full")
    assert settings.description.startswith("LLaVA-OneVision")
    assert OnevisionSettings.from_vision_settings(settings) == OnevisionSettings()  # the real checkpoints' geometry
    reader = read_gguf(mmproj)
    assert reader.fields[LlavaKeys.VISION_ASPECT_RATIO].contents() == "anyres_max_9"
    assert gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_IMGNL] in {t.name for t in reader.tensors}


@pytest.mark.parametrize("version", ["1.5", "1.6"])
def test_llava_version_overrides_are_refused(onevision, version: str) -> None:
    _, _, mmproj = onevision()
    with pytest.raises(ModelLoadError, match="OneVision"):
        VisionSettings.read(read_gguf(mmproj)).with_llava_version(version)


def _copy_with_config(ckpt: OnevisionCheckpoint, dest: Path, drop: tuple[str, ...], **changes: Any) -> Path:
    shutil.copytree(ckpt.path, dest)
    config = json.loads((dest / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_config_defaults_are_llava_onevision_config(onevision, tmp_path: Path) -> None:
    """A config.json that leaves LlavaOnevisionConfig's defaults out reads as that class fills them in."""
    ckpt, _, _ = onevision()
    drop = ("vision_config", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
            "image_grid_pinpoints", "architectures")
    read = read_checkpoint(_copy_with_config(ckpt, tmp_path / "bare", drop, model_type="llava_onevision"))
    assert (read.vision.hidden_size, read.vision.num_hidden_layers, read.vision.image_size) == (1152, 26, 384)
    assert read.settings.image_mode is ImageMode.ANYRES_MAX
    assert read.settings.vision_aspect_ratio == "anyres_max_9"
    assert (read.settings.vision_feature_layer, read.settings.vision_feature_select_strategy.value) == (-1, "full")
    assert read.settings.pinpoints_hw == ONEVISION_PINPOINTS  # preprocessor_config.json's


@pytest.mark.parametrize(("changes", "match"), [
    ({"vision_feature_select_strategy": "default"}, "full"), ({"vision_aspect_ratio": "anyres"}, "anyres_max"),
])  # fmt: skip
def test_unsupported_onevision_settings_are_refused(onevision, tmp_path: Path, changes: dict[str, str],
                                                    match: str) -> None:
    ckpt, _, _ = onevision()
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(_copy_with_config(ckpt, tmp_path / "odd", (), **changes))


# ---------------------------------------------------------------- token counts


@pytest.mark.parametrize("size_hw", COUNT_SIZES)
def test_token_counts_match_processor(onevision, model, size_hw: tuple[int, int]) -> None:
    ckpt, _, _ = onevision()
    image = Image.new("RGB", (size_hw[1], size_hw[0]), (10, 20, 30))
    assert [model.count_image_tokens(image)] == reference_counts(ckpt, [size_hw])


def test_several_images_count_untiled(onevision, model) -> None:
    ckpt, _, mmproj = onevision()
    sizes = [(300, 700), (1000, 200), (1, 1)]
    prepared = [model.prepare_image(Image.new("RGB", (w, h))) for h, w in sizes]
    views = model.image_views(prepared)
    assert [v.slot.n_tokens for v in views] == reference_counts(ckpt, sizes)
    assert not any(v.tiled for v in views) and all(v.slot.key != p.slot.key for v, p in zip(views, prepared))
    assert model.image_views(prepared[:1]) == prepared[:1]
    assert context_needed(mmproj, sizes, 0, text_tokens=0) == sum(v.slot.n_tokens for v in views)


# ---------------------------------------------------------------- features


def test_the_downscale_case_is_downscaled() -> None:
    assert packed_grid_shape(DOWNSCALED, OnevisionSettings()) == (53, 122)


@pytest.mark.parametrize("size_hw", FEATURE_SIZES)
def test_features_match_transformers(onevision, model, size_hw: tuple[int, int]) -> None:
    ckpt, _, _ = onevision()
    image = random_image(*size_hw, seed=size_hw[0])
    (expected,) = reference_features(ckpt, [image])
    diff = relative_diff(model.image_features(image), expected)
    assert diff <= TOLERANCE, diff


def test_untiled_features_match_transformers(onevision, model) -> None:
    ckpt, _, _ = onevision()
    images = [random_image(90, 50, seed=1), random_image(300, 700, seed=2)]
    expected = reference_features(ckpt, images)
    views = model.image_views([model.prepare_image(i) for i in images])
    for view, ref in zip(views, expected):
        assert relative_diff(model.encode_image(view), ref) <= TOLERANCE


@pytest.mark.parametrize("kind", [MmprojType.F16, MmprojType.Q8_0])
@pytest.mark.parametrize("encoder", [EncoderChoice.NUMPY, EncoderChoice.GGML])
def test_f16_and_q8_0_files_match_transformers(onevision, kind: MmprojType, encoder: EncoderChoice) -> None:
    ckpt, llm, mmproj = onevision(kind)
    loaded = LlavaModel(llm, mmproj, replace(EXACT, encoder=encoder))
    try:
        assert loaded.encoder_name.lower().startswith(encoder.value.lower())
        for size in [(90, 50), DOWNSCALED]:
            image = random_image(*size, seed=7)
            (expected,) = reference_features(ckpt, [image])
            diff = relative_diff(loaded.image_features(image), expected)
            assert diff <= TOLERANCE, (size, diff)
    finally:
        loaded.close()


# ---------------------------------------------------------------- the runtime


def test_one_image_a_second_turn_and_a_new_image(onevision, model) -> None:
    """One image (tiled), a second turn about it, then a third turn with a second image: both images are then
    untiled, as apply_chat_template nests a conversation's images into one prompt."""
    ckpt, _, _ = onevision()
    first, second = random_image(90, 50, seed=1), random_image(40, 70, seed=2)
    chat = model.chat()
    answer = "".join(chat.send("What is in the picture?", [first], GREEDY))
    messages: list[dict[str, Any]] = [{"role": "user", "content": _content("What is in the picture?", 1)}]
    ref_ids, ref_tokens = reference(ckpt, messages, [first])
    assert expanded_ids(chat.last_items, ckpt.image_token_id) == ref_ids
    assert chat.last_tokens == ref_tokens
    assert model.timings.n_image_tokens == [model.count_image_tokens(first)]

    answer2 = "".join(chat.send("And its colour?", [], GREEDY))
    messages += [{"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]},
                 {"role": "user", "content": _content("And its colour?", 0)}]
    ref_ids, ref_tokens = reference(ckpt, messages, [first])
    assert expanded_ids(chat.last_items, ckpt.image_token_id) == ref_ids
    assert chat.last_tokens == ref_tokens

    "".join(chat.send("Compare it with this one.", [second], GREEDY))
    messages += [{"role": "assistant", "content": [{"type": "text", "text": answer2.strip()}]},
                 {"role": "user", "content": _content("Compare it with this one.", 1)}]
    ref_ids, ref_tokens = reference(ckpt, messages, [first, second])
    assert expanded_ids(chat.last_items, ckpt.image_token_id) == ref_ids
    assert chat.last_tokens == ref_tokens
    assert model.timings.n_image_tokens == [730]  # the new image, untiled beside the first


def test_two_images_in_one_prompt(onevision, model) -> None:
    ckpt, _, _ = onevision()
    images = [random_image(90, 50, seed=1), random_image(40, 70, seed=2)]
    chat = model.chat()
    "".join(chat.send("What differs?", images, GREEDY))
    ref_ids, ref_tokens = reference(ckpt, [{"role": "user", "content": _content("What differs?", 2)}], images)
    assert expanded_ids(chat.last_items, ckpt.image_token_id) == ref_ids
    assert chat.last_tokens == ref_tokens
    assert model.timings.n_image_tokens == [730, 730]


def test_prompt_logits_untile_several_images(onevision, model) -> None:
    """The raw-prompt path goes through `sequence` too: two images are untiled there as well."""
    ckpt, _, _ = onevision()
    images = [random_image(90, 50, seed=3), random_image(500, 300, seed=4)]
    prompt = "<|im_start|>user <image><image>\nSay<|im_end|><|im_start|>assistant\n"
    inputs = ckpt.processor(images=[images], text=prompt, return_tensors="pt")
    with torch.no_grad():
        expected = ckpt.model(**inputs).logits[0, -1].numpy()
    ours = model.prompt_logits(prompt, images)
    assert np.abs(ours - expected).max() <= 2e-3 * max(1.0, float(np.abs(expected).max()))


def test_answers_together_equal_answers_alone(model) -> None:
    """The scheduler (serve, batch --parallel) on LLaVA-OneVision: one image tiled, two images untiled (their
    own feature keys), a text-only prompt, a follow-up turn; each answer equals its lone answer."""
    from llava_gguf.llm.scheduler import Request

    cases = [("What is in the picture?", [random_image(90, 50, seed=81)]),
             ("Compare them.", [random_image(90, 50, seed=81), random_image(33, 77, seed=82)]),
             ("Hello there.", []),
             ("Describe it.", [random_image(120, 40, seed=83)])]
    expected = []
    for question, images in cases:
        chat = model.chat()
        "".join(chat.send(question, images, GREEDY))
        expected.append(chat.last_tokens)
    follow = model.chat()
    "".join(follow.send(*cases[0], GREEDY))
    "".join(follow.send("And then?", [], GREEDY))
    expected.append(follow.last_tokens)
    scheduler = model.scheduler(3)
    try:
        turns = [model.chat().prepare(question, images) for question, images in cases]
        follow.messages = follow.messages[:2]
        turns.append(follow.prepare("And then?"))
        tickets = [scheduler.submit(Request(t.items, GREEDY, model.feature_source(t.views))) for t in turns]
        assert [t.wait(timeout=300).tokens for t in tickets] == expected
    finally:
        scheduler.close()
