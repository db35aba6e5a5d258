"""GGUF pairs made by llama.cpp's legacy LLaVA tools (as the Hub repos and ollama hold them) against the
original LLaVA code on the same weights: inferred settings, features, greedy answers, the inferred template."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from checkpoints import TinyCheckpoint
from legacy_gguf import write_legacy_llm, write_legacy_mmproj
from original_llava import OriginalLlava
from test_runtime import EXACT, GREEDY, random_image

from llava_gguf.errors import GGUFFormatError
from llava_gguf.metadata import ImageMode, Layout, VisionSettings, read_gguf
from llava_gguf.model import LlavaModel, RuntimeOptions
from llava_gguf.templates import Message, Role, Template, user_text

# (LLaVA version, LLM, mmproj storage, key set, newline tensor name)
CASES = [
    pytest.param(("1.5", "llama", "f16", "old", None), id="1.5-f16-old"),
    pytest.param(("1.5", "llama", "f32", "new", None), id="1.5-f32-new"),
    pytest.param(("1.6", "llama", "f16", "old", "model.image_newline"), id="1.6-f16-old"),
    pytest.param(("1.6", "mistral", "f32", "new", "v.image_newline"), id="1.6-mistral-f32-new"),
    pytest.param(("1.6", "llama", "q8_0", "new", "model.image_newline"), id="1.6-q8_0-new"),
]


class Legacy:
    """A legacy pair of a tiny original-layout checkpoint, loaded, with the original code as reference."""

    def __init__(self, ckpt: TinyCheckpoint, out: Path, storage: str, key_set: str, newline: str | None) -> None:
        quant = gguf.GGMLQuantizationType.Q8_0 if storage == "q8_0" else None
        self.mmproj = write_legacy_mmproj(ckpt, out / "mmproj-model-f16.gguf", use_f32=storage == "f32",
                                          key_set=key_set, newline_name=newline or "model.image_newline", quant=quant)
        self.llm = write_legacy_llm(ckpt, out / "ggml-model-f32.gguf", out / "work")
        self.ckpt = ckpt
        self.model = LlavaModel(self.llm, self.mmproj, EXACT)
        self.original = OriginalLlava(ckpt)


@pytest.fixture(scope="module")
def legacy(tiny_checkpoint: Callable[..., TinyCheckpoint], tmp_path_factory: pytest.TempPathFactory):
    cache: dict[tuple, Legacy] = {}

    def make(case: tuple) -> Legacy:
        if case not in cache:
            version, llm, storage, key_set, newline = case
            ckpt = tiny_checkpoint(llava_version=version, layout="original", llm=llm,
                                   exact_in="q8_0" if storage == "q8_0" else "f16")
            cache[case] = Legacy(ckpt, tmp_path_factory.mktemp("legacy"), storage, key_set, newline)
        return cache[case]

    return make


@pytest.mark.parametrize("case", CASES)
def test_settings_are_inferred_as_the_original_code_uses_them(legacy, case) -> None:
    pair = legacy(case)
    settings = pair.model.settings
    version = case[0]
    assert settings.layout == Layout.ORIGINAL.value
    assert settings.llava_version == version
    assert settings.image_mode is (ImageMode.ANYRES if version == "1.6" else ImageMode.PAD)
    assert settings.follows_original_code
    assert settings.inferred
    assert pair.model.encoder.config.vision_feature_layer == 2  # all stored blocks: 3 layers, select -2
    assert pair.model.inference_note is not None and f"LLaVA {version}" in pair.model.inference_note


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size_wh", [(40, 30), (30, 50), (90, 50)])
def test_features_match_the_original_code(legacy, case, size_wh) -> None:
    pair = legacy(case)
    image = random_image(*size_wh, seed=sum(size_wh))
    ours = pair.model.image_features(image)
    ref = pair.original.image_features(image).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sizes", [[(40, 30)], [(56, 56), (30, 50)]], ids=["one-image", "two-images"])
def test_greedy_answer_matches_the_original_code(legacy, case, sizes) -> None:
    pair = legacy(case)
    images = [random_image(*wh, seed=7 + i) for i, wh in enumerate(sizes)]
    question = "What is in the picture?"
    chat = pair.model.chat()
    "".join(chat.send(question, images, GREEDY))
    expected = Template.MISTRAL_INSTRUCT if case[1] == "mistral" else Template.VICUNA_V1
    assert pair.model.template is expected
    assert chat.last_prompt == pair.model.render([Message(Role.USER, user_text(question, len(images)))])
    _, ref_tokens = pair.original.generate(chat.last_prompt, images)
    assert chat.last_tokens == ref_tokens


def test_overrides(legacy) -> None:
    pair = legacy(CASES[2].values[0])
    options = RuntimeOptions(llama=EXACT.llama, encoder=EXACT.encoder, template=Template.LLAVA_V1, llava_version="1.5")
    model = LlavaModel(pair.llm, pair.mmproj, options)
    assert model.template is Template.LLAVA_V1 and model.settings.image_mode is ImageMode.PAD
    assert "asked" in (model.inference_note or "")
    model.close()


def test_our_own_files_still_say_everything(tiny_checkpoint, tmp_path: Path) -> None:
    from llava_gguf.convert import ConvertOptions, MmprojType, Quant, convert_checkpoint

    ckpt = tiny_checkpoint(llava_version="1.6", layout="original")
    result = convert_checkpoint(ckpt.path, tmp_path, ConvertOptions(quant=Quant.F32, mmproj_type=MmprojType.F32))
    settings = VisionSettings.read(read_gguf(result.mmproj))
    assert settings.inferred == ()
    model = LlavaModel(result.llm, result.mmproj, EXACT)
    assert model.inference_note is None
    model.close()


# ---------------------------------------------------------------- bad files


def _rewrite(src: Path, dest: Path, *, drop: tuple[str, ...] = (), add: dict | None = None) -> Path:
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dest, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    copy_with_new_metadata(reader, writer, {k: MetadataDetails(gguf.GGUFValueType.STRING, v) for k, v in (add or {}).items()},
                           list(drop))
    return dest


def test_another_projector_type_is_one_line(legacy, tmp_path: Path) -> None:
    pair = legacy(CASES[1].values[0])
    ldp = _rewrite(pair.mmproj, tmp_path / "mmproj-ldp.gguf", add={"clip.projector_type": "ldp"})
    with pytest.raises(GGUFFormatError, match="projector is 'ldp', not LLaVA's MLP"):
        LlavaModel(pair.llm, ldp, EXACT)


def test_clip_without_projector_is_one_line(legacy, tmp_path: Path) -> None:
    pair = legacy(CASES[0].values[0])
    plain = _rewrite(pair.mmproj, tmp_path / "clip.gguf", drop=("clip.has_llava_projector",))
    with pytest.raises(GGUFFormatError, match="without a LLaVA projector"):
        VisionSettings.read(read_gguf(plain))
